"""What SPD's projection pass adds to a whole parameter set's step: ``python bench/projection_share.py``.

Each SPD line steps twice over, as the bench report builds it (fresh grads ``N(0, 1e-2)`` before
every step, untimed), once with its own lambda and once with lambda = 0: then s = 0 for every
tensor and the kernels skip the projection pass, so the step is the first pass alone (Adam and the
three sums). Both run interleaved with ``AdamW(fused=True)`` in the same rounds; each figure is a
median over rounds. The difference is what the projection costs at the share of params it fired on
(the "proj %" the report gives). Nothing here changes a step's results: lambda = 0 is a setting.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from spd_kernels.bench import lines, param_sets  # noqa: E402
from spd_kernels.bench.measure import device_name, params_of, projected_share, time_once  # noqa: E402

DEFAULT_LINES = ["spd_bf16", "spd_fp8"]


def without_projection(opt):
    """``opt`` with lambda = 0 in every group: s = 0, so no tensor projects."""
    for group in opt.param_groups:
        group["weight_decay"] = 0.0
    return opt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="vit_b", help="a parameter set of the bench (spd_kernels/bench/param_sets.py)")
    ap.add_argument("--lines", default=",".join(DEFAULT_LINES), help="comma-separated SPD lines of the bench")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    names = [n for n in args.lines.split(",") if n]
    for name in names:
        if name not in lines.LINES or not lines.LINES[name].counts_projections:
            ap.error(f"--lines: {name!r} is not an SPD line whose projections the bench counts; choose from "
                     f"{[n for n, line in lines.LINES.items() if line.counts_projections]}")
    shapes = param_sets.get(args.set)
    n = param_sets.numel(shapes)
    anchored = args.set != "lora"  # as the report builds it: LoRA's adapters start at 0, anchor-free
    opts = {("adamw_fused", True): lines.build("adamw_fused", shapes, device, anchored)}
    for name in names:
        opts[(name, True)] = lines.build(name, shapes, device, anchored)
        opts[(name, False)] = without_projection(lines.build(name, shapes, device, anchored))
    for opt in opts.values():
        for _ in range(args.warmup):
            opt.step()
    times = {key: [] for key in opts}
    shares = {key: [] for key in opts}
    for r in range(args.rounds):
        order = list(opts.items()) if r % 2 == 0 else list(opts.items())[::-1]
        for key, opt in order:
            for p in params_of(opt):
                p.grad.normal_(0.0, 1e-2)
            times[key].append(time_once(opt.step, device))
            share = projected_share(opt, n)
            if share is not None:
                shares[key].append(share)
    ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}
    fused = ms[("adamw_fused", True)]
    print(f"{device_name(device)}, torch {torch.__version__}")
    print(f"{args.set}: {len(shapes)} tensors, {n / 1e6:.1f}M params; fresh grads; {args.rounds} rounds; "
          f"AdamW fused {fused:.2f} ms")
    print(f"{'line':12s} {'ms':>8s} {'vs fused':>8s} {'proj %':>6s} {'first pass ms':>13s} {'vs fused':>8s} "
          f"{'projection ms':>13s} {'vs fused':>8s}")
    for name in names:
        on, off = ms[(name, True)], ms[(name, False)]
        share = 100 * statistics.mean(shares[(name, True)])
        assert max(shares[(name, False)]) == 0.0, "lambda = 0 projected a tensor"
        print(f"{name:12s} {on:8.2f} {on / fused:8.3f} {share:6.1f} {off:13.2f} {off / fused:8.3f} "
              f"{on - off:13.2f} {(on - off) / fused:8.3f}")


if __name__ == "__main__":
    main()
