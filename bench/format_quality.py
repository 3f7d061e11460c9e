"""How far compressed moments drift from fp32 Adam: ``python bench/format_quality.py``.

At lambda = 0 AdamSPD is Adam, so a moment format's quality is how far it takes the weights
from ``torch.optim.Adam``'s: the distance after N steps relative to the distance fp32 Adam
moved (the 8-bit test's measure), on three tensors whose grads have per-row scales spread
over three decades, for several seeds. Rows:

- the accepted formats, through ``AdamSPD`` (the CPU kernel);
- the peers: bitsandbytes' ``Adam8bit`` (blockwise 8-bit) and torchao's ``AdamWFp8`` (fp8 e4m3
  for both moments, 256-element blocks, nearest), which both run on the CPU;
- the candidates we measured and did not take (fp8 second moments, nearest rounding for a bf16
  second moment, stochastic rounding for the first, sqrt(v) stored in fp8), emulated here by a
  small Adam loop that stores each moment through the rule named (the same rounding bits).

Prints a markdown table and writes ``--out`` (JSON) when given. A few minutes for 1000 steps
(torchao compiles its step first).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spd_kernels import AdamSPD  # noqa: E402
from spd_kernels.bench import machine  # noqa: E402
from spd_kernels.formats import rounding  # noqa: E402

KW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn


def setup(steps, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(256, 128), (64, 512), (300,)]
    p0 = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    rows = [torch.logspace(-3, 0, s[0])[torch.randperm(s[0], generator=gen)].view(-1, *([1] * (len(s) - 1)))
            for s in shapes]
    grads = [[torch.randn(s, generator=gen) * r * (0.01 + 0.01 * (t % 3)) for s, r in zip(shapes, rows)]
             for t in range(steps)]
    return p0, grads


def run_optimizer(make, p0, grads):
    params = [torch.nn.Parameter(p.clone()) for p in p0]
    opt = make(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return torch.cat([p.detach().flatten() for p in params])


# ------------------------------------------------------------------ candidates (emulated)

def _e4m3_stochastic(y, u):
    """|y| <= 448 to an e4m3 value, rounded up with probability of its distance from the lower one."""
    a = y.abs()
    exponent = ((a.view(torch.int32) >> 23) & 0xFF) - 127
    ulp = torch.exp2((torch.clamp(exponent, min=-6) - 3).float())
    return torch.copysign((torch.floor(a / ulp + u) * ulp).clamp(max=448.0), y)


def _bits32(numel, step, moment):
    """32 random bits an element (the candidate's 24-bit uniform needs more than the kernels' 16)."""
    key = rounding.lowbias32(torch.tensor(4 * step + moment, dtype=torch.int64))
    return rounding.lowbias32((torch.arange(numel, dtype=torch.int64) + key) & 0xFFFFFFFF)


def store_fp8(x, stochastic, step, moment):
    flat = x.reshape(-1)
    pad = (-flat.numel()) % 256
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 256)
    scale = blocks.abs().amax(1, keepdim=True) / 448.0
    y = torch.where(scale > 0, blocks / scale, torch.zeros_like(blocks))
    if stochastic:
        u = (_bits32(blocks.numel(), step, moment).view(blocks.shape) >> 8).float() * 2.0**-24
        y = _e4m3_stochastic(y, u)
    y = y.to(FP8).float()
    if moment == 1:  # a positive second moment never becomes 0 (the 8-bit format's rule)
        y = torch.where((y == 0) & (blocks > 0), 2.0**-9, y)
    return (y * scale).reshape(-1)[: flat.numel()].view(x.shape)


def store(kind, rule, x, step, moment):
    if kind == "fp32":
        return x
    if kind == "bf16":
        return (rounding.to_bf16_stochastic(x, step, moment) if rule == "sr" else x.to(BF16)).float()
    return store_fp8(x, rule == "sr", step, moment)


def run_candidate(m_kind, m_rule, v_kind, v_rule, p0, grads, sqrt_v=False, min_size=4096):
    b1, b2 = KW["betas"]
    ps = [p.clone() for p in p0]
    ms = [torch.zeros_like(p) for p in p0]
    vs = [torch.zeros_like(p) for p in p0]
    for t, step_grads in enumerate(grads, 1):
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        for i, (p, g) in enumerate(zip(ps, step_grads)):
            m = ms[i].lerp(g, 1 - b1)
            v = vs[i] * b2 + (1 - b2) * g * g
            p.addcdiv_(m, v.sqrt() / math.sqrt(bc2) + KW["eps"], value=-KW["lr"] / bc1)
            big = p.numel() >= min_size
            ms[i] = store(m_kind if big or m_kind == "bf16" else "fp32", m_rule, m, t, 0)
            v_kind_i = v_kind if big or v_kind == "bf16" else "fp32"
            vs[i] = store(v_kind_i, v_rule, v.sqrt(), t, 1) ** 2 if sqrt_v and v_kind_i != "fp32" else \
                store(v_kind_i, v_rule, v, t, 1)
    return torch.cat([p.flatten() for p in ps])


def rows():
    """(label, what it is, run(p0, grads) -> final params)."""
    spd = [
        ("AdamSPD bf16 m and v", "accepted", dict(exp_avg_dtype=BF16, exp_avg_sq_dtype=BF16)),
        ("AdamSPD fp8 m + bf16 v", "accepted", dict(exp_avg_dtype=FP8, exp_avg_sq_dtype=BF16)),
        ("AdamSPD fp32 m + bf16 v", "accepted", dict(exp_avg_sq_dtype=BF16)),
        ("AdamSPD fp8 m + fp32 v", "accepted", dict(exp_avg_dtype=FP8)),
        ("AdamSPD optim_bits=8", "accepted", dict(optim_bits=8)),
    ]
    out = [(label, kind, lambda p0, g, s=s: run_optimizer(lambda ps: AdamSPD(ps, weight_decay=0.0, **KW, **s), p0, g))
           for label, kind, s in spd]

    def bnb(p0, g):
        import bitsandbytes

        return run_optimizer(lambda ps: bitsandbytes.optim.Adam8bit(ps, min_8bit_size=4096, **KW), p0, g)

    def torchao_fp8(p0, g):
        from torchao.optim import AdamWFp8

        return run_optimizer(lambda ps: AdamWFp8(ps, weight_decay=0.0, **KW), p0, g)

    out += [("bitsandbytes Adam8bit", "peer", bnb), ("torchao AdamWFp8", "peer", torchao_fp8)]
    candidates = [
        ("bf16 m and v, v nearest", ("bf16", "nearest", "bf16", "nearest")),
        ("bf16 m stochastic, v stochastic", ("bf16", "sr", "bf16", "sr")),
        ("fp8 m stochastic + bf16 v", ("fp8", "sr", "bf16", "sr")),
        ("fp8 m + fp8 v, nearest (floor for v)", ("fp8", "nearest", "fp8", "nearest")),
        ("fp8 m + fp8 v stochastic (floor for v)", ("fp8", "nearest", "fp8", "sr")),
        ("fp8 m + fp8 sqrt(v) stochastic", ("fp8", "nearest", "fp8", "sr", True)),
    ]
    out += [(label, "candidate", lambda p0, g, c=c: run_candidate(*c[:4], p0, g, sqrt_v=len(c) > 4))
            for label, c in candidates]
    return out


def measure(steps_list, seeds):
    results = {}
    for steps in steps_list:
        for seed in range(seeds):
            p0, grads = setup(steps, seed)
            start = torch.cat([p.flatten() for p in p0])
            fp32 = run_optimizer(lambda ps: torch.optim.Adam(ps, **KW), p0, grads)
            for label, kind, run in rows():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        final = run(p0, grads)
                    except ImportError as exc:
                        print(f"skip {label}: {exc}", file=sys.stderr)
                        continue
                drift = float((final - fp32).norm() / (fp32 - start).norm())
                entry = results.setdefault(label, {"kind": kind})
                entry.setdefault(str(steps), []).append(drift)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 1000])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    results = measure(args.steps, args.seeds)
    cpu = machine.cpu_model()
    print(f"drift from fp32 Adam / distance moved, lambda = 0, mean (min-max) over {args.seeds} seeds; "
          f"torch {torch.__version__}, {cpu}\n")
    print("| moments | kind | " + " | ".join(f"{s} steps" for s in args.steps) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in args.steps) + " |")
    for label, entry in results.items():
        cells = []
        for s in args.steps:
            xs = entry.get(str(s), [])
            cells.append(f"{statistics.mean(xs):.4f} ({min(xs):.4f}-{max(xs):.4f})" if xs else "-")
        print(f"| {label} | {entry['kind']} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu": cpu, "torch": torch.__version__, "seeds": args.seeds, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
