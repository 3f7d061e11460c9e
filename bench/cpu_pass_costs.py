"""What one large tensor's step costs on the CPU out of cache, pass by pass: ``python bench/cpu_pass_costs.py``.

The bench report times whole parameter sets, where the projection pass's share is a guess from the
bytes it moves and the floor a guess from AdamW's speed. Here one tensor (default 3072 x 768: vit_b's
MLP weights, its largest) steps on this process's threads, cold at every step (128 MB, four times a
32 MB last-level cache, is written before each), and each SPD line steps twice over:
- with grads ``g = -(p - a)``: c = -sum(g (p - a)) > 0, so SPD never projects: Adam and the sums
  alone (the first pass);
- with grads that fire the projection at every step: one element sits about 1 from its anchor with grad
  +1e6 (so c < 0), the rest as above, moving away from the anchor: each step adds about n lr^2 to
  |q - a|^2 and the one element takes 2 lr off, so |q - a| > |p - a| and r > 0 from the first step
  (lr = 1e-3: n over 2000 elements). lambda is 1e-3 here, not the lines' 1, so that a projection
  barely moves p and the next step still projects; what a projection costs does not depend on it.

The difference is the projection pass alone, which re-reads q and the anchor and writes p again
(``Line.projection_bytes``) right after the first pass wrote them: where the tensor fits the
last-level cache it reads them there, not from memory. Its floor ("projection floor", timed the same
way) is ``projection_pass`` of the same .cpp file right after a floor pass (below) over the same
arrays: p read and written and the anchor read, with one multiply-add a value, wherever that pass
left them. The kernel's pass 2 over it ("2/floor") is what its projection adds over the bytes.

Two more timings per line, in the same rounds, say what the first pass's time is made of:
- **fixed**: the same line stepping a 64 x 64 tensor, cold alike: what a step costs apart from its
  elements (Python, dispatch, and the caches those run from, emptied by the flush). The first
  pass's "net" time is the step's less this.
- **floor**: ``bench/cpu_stream_floor.cpp``, a pass over the line's arrays in its layout and the
  kernel's thread split with one multiply-add or so a value: what memory gives that layout with
  the compute taken away (built at start, about 15 s).

Lines interleave round by round; each figure is the median over rounds of a round's median step.
GB/s counts ``Line.step_bytes`` for the first pass and ``Line.projection_bytes`` for the second, per
param. A step that should have projected and did not (or the reverse) stops the run with an error.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils.cpp_extension import load_inline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from spd_kernels import AdamSPD  # noqa: E402
from spd_kernels.bench.lines import LINES  # noqa: E402
from spd_kernels.bench.measure import device_name  # noqa: E402
from spd_kernels.stats import STAT_SCALE  # noqa: E402

SPD_LINES = ["spd_bf16a", "spd_bf16", "spd_fp8"]
FIXED_SHAPE = (64, 64)  # the tensor a line's fixed cost is timed on: MIN_ELEMENTS, the least the tool takes
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


# Each line's arrays as the floor pass takes them (m, v, anchor): 'f32', 'bf16' (patterns as int16),
# 'u8' (fp8 m's codes) or None. Their bytes are the line's step_bytes (checked at start).
LAYOUTS = {
    "adamw_fused": ("f32", "f32", None),
    "spd_bf16a": ("f32", "f32", "bf16"),
    "spd_bf16": ("bf16", "bf16", "bf16"),
    "spd_fp8": ("u8", "bf16", "bf16"),
}
_DTYPES = {"f32": (torch.float32, 4), "bf16": (torch.int16, 2), "u8": (torch.uint8, 1)}

# The floor pass registered as an op (built without torch/extension.h, as bench/cpu_block_costs.py's)
REGISTRATION = """
#include <torch/library.h>
TORCH_LIBRARY(spd_stream_floor, m) {
  m.def("stream_pass", &stream_pass);
  m.def("projection_pass", &projection_pass);
}
"""


def build_floor():
    """``stream_pass(p, g, m, v, a)``: bench/cpu_stream_floor.cpp over the kernel's own headers (the op
    namespace also holds ``projection_pass(p, a)``)."""
    with open(os.path.join(ROOT, "bench", "cpu_stream_floor.cpp")) as f:
        source = f.read()
    load_inline("spd_stream_floor", cpp_sources=[source, REGISTRATION], is_python_module=False,
                no_implicit_headers=True, extra_include_paths=[os.path.join(ROOT, "csrc")],
                extra_cflags=["-O3", "-fno-math-errno", "-fopenmp", "-march=native"], extra_ldflags=["-fopenmp"])
    return torch.ops.spd_stream_floor.stream_pass


def layout_bytes(name: str) -> int:
    """Bytes a param the floor pass moves for line ``name``: p and g read, p written, m and v read and
    written, the anchor read."""
    m, v, a = LAYOUTS[name]
    return 12 + 2 * _DTYPES[m][1] + 2 * _DTYPES[v][1] + (_DTYPES[a][1] if a else 0)


class Floor:
    """The floor pass over fresh arrays in line ``name``'s layout."""

    def __init__(self, stream_pass, name: str, rows: int, cols: int):
        n = rows * cols
        gen = torch.Generator().manual_seed(1)

        def array(kind):
            dtype = _DTYPES[kind][0]
            if kind == "u8":
                return torch.randint(0, 8, (n,), dtype=dtype, generator=gen)
            x = torch.rand(n, generator=gen)
            return x if kind == "f32" else x.to(torch.bfloat16).view(torch.int16)

        m, v, a = LAYOUTS[name]
        self.stream_pass, self.steps = stream_pass, 0
        self.arrays = (torch.rand(n, generator=gen), 1e-3 * torch.rand(n, generator=gen), array(m), array(v),
                       array(a) if a else None)

    def set_grad(self) -> None:
        pass

    def step(self) -> float:
        t0 = time.perf_counter()
        self.stream_pass(*self.arrays)
        self.steps += 1
        return time.perf_counter() - t0


class ProjectionFloor(Floor):
    """The floor pass as above, untimed, then the projection's floor over its p and anchor, timed: where
    the first pass left them, as the kernel's projection finds q and a."""

    def step(self) -> float:
        self.stream_pass(*self.arrays)
        t0 = time.perf_counter()
        torch.ops.spd_stream_floor.projection_pass(self.arrays[0], self.arrays[4])
        self.steps += 1
        return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3072)
    ap.add_argument("--cols", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds; the median is printed")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per line and round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per line before the rounds")
    args = ap.parse_args(argv)
    for name in LAYOUTS:  # the floor moves what the line's byte count says
        assert layout_bytes(name) == LINES[name].step_bytes(True), name

    stream_pass = build_floor()
    names = ["adamw_fused", *SPD_LINES]
    cases = {}
    for name in names:
        for fire in ((False, True) if name in SPD_LINES else (False,)):
            cases[(name, "fire" if fire else "step")] = Tensor1(name, args.rows, args.cols, fire, 0)
        cases[(name, "fixed")] = Tensor1(name, *FIXED_SHAPE, False, 0)
        cases[(name, "floor")] = Floor(stream_pass, name, args.rows, args.cols)
        if name in SPD_LINES:
            cases[(name, "projection floor")] = ProjectionFloor(stream_pass, name, args.rows, args.cols)
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
    net = {name: ms[(name, "step")] - ms[(name, "fixed")] for name in names}

    def gbs(bytes_per_param: int, milliseconds: float) -> str:
        return f"{bytes_per_param * n / milliseconds / 1e6:6.1f}" if milliseconds > 0 else f"{'-':>6s}"

    print(f"{device_name(torch.device('cpu'))}, torch {torch.__version__}")
    print(f"one {args.rows} x {args.cols} fp32 tensor, cold; {args.rounds} rounds of {args.steps} steps; "
          f"bf16 anchors; fixed: a {FIXED_SHAPE[0]} x {FIXED_SHAPE[1]} tensor's step")
    print("first pass (no projection):")
    print(f"{'line':12s} {'B':>3s} {'step ms':>8s} {'fixed':>6s} {'net ms':>7s} {'GB/s':>6s} {'vs fused':>8s} "
          f"{'floor ms':>8s} {'GB/s':>6s} {'vs fused':>8s} {'net/floor':>9s}")
    fused_net, fused_floor = net["adamw_fused"], ms[("adamw_fused", "floor")]
    for name in names:
        b, floor = LINES[name].step_bytes(True), ms[(name, "floor")]
        print(f"{name:12s} {b:3d} {ms[(name, 'step')]:8.3f} {ms[(name, 'fixed')]:6.3f} {net[name]:7.3f} "
              f"{gbs(b, net[name])} {net[name] / fused_net:8.2f} {floor:8.3f} {gbs(b, floor)} "
              f"{floor / fused_floor:8.2f} {net[name] / floor:9.2f}")
    print("with the projection at every step:")
    print(f"{'line':12s} {'B':>3s} {'step ms':>8s} {'vs fused':>8s} {'pass 2 ms':>9s} {'GB/s':>6s} "
          f"{'floor ms':>8s} {'GB/s':>6s} {'2/floor':>7s}")
    for name in SPD_LINES:
        line, b = LINES[name], LINES[name].projection_bytes(True)
        on, floor = ms[(name, "fire")], ms[(name, "projection floor")]
        second = on - ms[(name, "step")]
        print(f"{name:12s} {b:3d} {on:8.3f} {(on - ms[(name, 'fixed')]) / fused_net:8.2f} "
              f"{second:9.3f} {gbs(b, second)} {floor:8.3f} {gbs(b, floor)} {second / floor:7.2f}")


if __name__ == "__main__":
    main()
