"""What one large tensor's step costs on the CPU out of cache, pass by pass: ``python bench/cpu_pass_costs.py``.

The bench report times whole parameter sets, where the projection pass's share is a guess from the
bytes it moves. Here one tensor (default 3072 x 768: vit_b's MLP weights, its largest) steps on this
process's threads, cold at every step (128 MB, four times a 32 MB last-level cache, is written before
each), and each SPD line steps twice over:
- with grads ``g = -(p - a)``: c = -sum(g (p - a)) > 0, so SPD never projects: Adam and the sums
  alone (the first pass);
- with grads that fire the projection at every step: one element sits about 1 from its anchor with grad
  +1e6 (so c < 0), the rest as above, moving away from the anchor: each step adds about n lr^2 to
  |q - a|^2 and the one element takes 2 lr off, so |q - a| > |p - a| and r > 0 from the first step
  (lr = 1e-3: n over 2000 elements). lambda is 1e-3 here, not the lines' 1, so that a projection
  barely moves p and the next step still projects; what a projection costs does not depend on it.

The difference is the projection pass alone, which re-reads q and the anchor and writes p again
(``Line.projection_bytes``) right after the first pass wrote them: where the tensor fits the
last-level cache it reads them there, not from memory. Lines interleave round by round; each figure
is the median over rounds of a round's median step. GB/s counts ``Line.step_bytes`` for the first
pass and ``Line.projection_bytes`` for the second, per param. A step that should have projected and
did not (or the reverse) stops the run with an error.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from spd_kernels import AdamSPD  # noqa: E402
from spd_kernels.bench.lines import LINES  # noqa: E402
from spd_kernels.bench.measure import device_name  # noqa: E402
from spd_kernels.stats import STAT_SCALE  # noqa: E402

SPD_LINES = ["spd_bf16a", "spd_bf16", "spd_fp8"]
FAR_GRAD = 1e6  # the grad of element 0, about 1 from its anchor: it makes c < 0
PROJECTION_LAMBDA = 1e-3  # the SPD lines' lambda here (theirs is 1): see Tensor1
MIN_ELEMENTS = 4096  # n lr^2 > 2 lr with room (lr = 1e-3, the lines' own)


class Tensor1:
    """One line on one fresh tensor: its optimizer, anchor and whether its grads fire SPD's projection."""

    def __init__(self, name: str, rows: int, cols: int, fire: bool, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.p = torch.nn.Parameter(torch.randn(rows, cols, generator=gen))
        # The lines keep bf16 anchors: one that bf16 holds exactly is the anchor they see, so that
        # g = -(p - a) holds for theirs too (a rounded one would leave g the noise alone at step 1,
        # and c's sign to chance).
        self.anchor = self.p.detach().to(torch.bfloat16).float()
        if rows * cols < MIN_ELEMENTS:
            raise ValueError(f"rows * cols: {rows * cols} elements, under {MIN_ELEMENTS}: too few for the "
                             f"projection to fire at every step")
        if fire:
            self.anchor.view(-1)[0] = (self.anchor.view(-1)[0] - 1.0).to(torch.bfloat16).float()  # about 1 away
        self.fire, self.gen, self.steps = fire, gen, 0
        self.opt = LINES[name].make([self.p], [self.anchor.clone()], [self.anchor], torch.device("cpu"))
        if isinstance(self.opt, AdamSPD):
            # lambda sets how far a projection pulls, not what it costs: at the lines' lambda = 1 each one
            # shrinks p - a by 1 - r, element 0's distance with it, until c turns positive (in about 16
            # steps on 3072 x 768); at 1e-3 the distance falls by lr a step and holds for hundreds
            for group in self.opt.param_groups:
                group["weight_decay"] = PROJECTION_LAMBDA

    def set_grad(self) -> None:
        g = self.anchor - self.p.detach()
        if self.fire:
            g.view(-1)[0] = FAR_GRAD
        g += 1e-4 * torch.randn(g.shape, generator=self.gen)
        self.p.grad = g

    def step(self) -> float:
        """One step's seconds (the grads and the cache flush are the caller's, untimed)."""
        t0 = time.perf_counter()
        self.opt.step()
        seconds = time.perf_counter() - t0
        self.steps += 1
        self.check(self.steps)
        return seconds

    def check(self, step: int) -> None:
        if not isinstance(self.opt, AdamSPD):
            return
        scale = float(self.opt.last_step_stats()[self.p][STAT_SCALE])
        if (scale > 0) != self.fire:
            raise RuntimeError(f"step {step}: SPD's projection {'did not fire' if self.fire else 'fired'} "
                               f"(scale {scale}): the grads no longer hold c and r where this tool needs them")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3072)
    ap.add_argument("--cols", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds; the median is printed")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per line and round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per line before the rounds")
    args = ap.parse_args(argv)

    cases = {("adamw_fused", False): Tensor1("adamw_fused", args.rows, args.cols, False, 0)}
    for name in SPD_LINES:
        for fire in (False, True):
            cases[(name, fire)] = Tensor1(name, args.rows, args.cols, fire, 0)
    flush = torch.empty(32 << 20)  # 128 MB of fp32: four times a 32 MB last-level cache
    times = {key: [] for key in cases}

    def run(case, count: int):
        out = []
        for _ in range(count):
            case.set_grad()
            flush.fill_(float(case.steps))
            out.append(case.step())
        return out

    for case in cases.values():
        run(case, args.warmup)
    for r in range(args.rounds):
        order = list(cases.items())
        if r % 2:
            order.reverse()
        for key, case in order:
            times[key].append(statistics.median(run(case, args.steps)))

    n = args.rows * args.cols
    ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}
    print(f"{device_name(torch.device('cpu'))}, torch {torch.__version__}")
    print(f"one {args.rows} x {args.cols} fp32 tensor, cold; {args.rounds} rounds of {args.steps} steps; "
          f"bf16 anchors")
    fused = ms[("adamw_fused", False)]
    print(f"{'line':12s} {'no proj ms':>10s} {'GB/s':>6s} {'vs fused':>8s} {'proj ms':>8s} {'vs fused':>8s} "
          f"{'pass 2 ms':>9s} {'GB/s':>6s}")
    print(f"{'adamw_fused':12s} {fused:10.3f} {LINES['adamw_fused'].step_bytes(True) * n / fused / 1e6:6.1f} "
          f"{1.0:8.2f}")
    for name in SPD_LINES:
        line = LINES[name]
        off, on = ms[(name, False)], ms[(name, True)]
        second = on - off
        second_gbs = f"{line.projection_bytes(True) * n / second / 1e6:6.1f}" if second > 0 else f"{'-':>6s}"
        print(f"{name:12s} {off:10.3f} {line.step_bytes(True) * n / off / 1e6:6.1f} {off / fused:8.2f} "
              f"{on:8.3f} {on / fused:8.2f} {second:9.3f} {second_gbs}")


if __name__ == "__main__":
    main()
