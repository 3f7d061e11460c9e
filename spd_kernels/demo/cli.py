"""``python -m spd_kernels demo``: the command line, the run over seeds, progress."""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict
from typing import Callable, List, Optional

import torch

from .data import corrupted_test_sets, load_digits_tensors, splits
from .frontier import LEVELS, matched_table
from .methods import CAP_ABOVE, FORMAT_RUNS, Grid, SeedResult, run_seed
from .model import Evaluator, pretrain

#: torch's CPU reductions split work by thread count, so the demo fixes it (on any core count)
THREADS = 2

DEFAULT = dict(
    seeds=5, pretrain_steps=1000,
    grid=Grid(finetune_steps=200, checkpoints=(5, 10, 20, 35, 50, 75, 100, 150, 200), adamw_wd=(0.01, 0.1, 1.0),
              l2sp_alpha=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
              spd_lambda=(0.1, 0.3, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
              wise_alpha=tuple(i / 10 for i in range(11)), probe_steps=100, record_lambda=1.0),
)
QUICK = dict(
    seeds=2, pretrain_steps=150,
    grid=Grid(finetune_steps=40, checkpoints=(10, 20, 40), adamw_wd=(0.01,), l2sp_alpha=(0.1, 1.0),
              spd_lambda=(0.5, 2.0, 8.0), wise_alpha=(0.0, 0.5, 1.0), probe_steps=20, record_lambda=2.0),
)


def run(seeds: int, pretrain_steps: int, grid: Grid, shots: int = 10, lr: float = 1e-3, formats=(),
        log: Callable[[str], None] = lambda s: print(s, flush=True)) -> List[SeedResult]:
    """Pre-train one model per seed and sweep every method from it; logs progress per seed."""
    x, y = load_digits_tensors()
    out: List[SeedResult] = []
    t0 = time.perf_counter()
    for seed in range(seeds):
        pre_split, few, test = splits(x, y, seed, shots)
        t = time.perf_counter()
        pre = pretrain(*pre_split, seed=seed, steps=pretrain_steps)
        evaluate = Evaluator(test, corrupted_test_sets(test, seed), pre)
        log(f"seed {seed + 1}/{seeds}: pre-trained in {time.perf_counter() - t:.1f}s")
        out.append(run_seed(pre, few, evaluate, grid, lr, seed, formats,
                            log=lambda s, seed=seed: log(f"seed {seed + 1}/{seeds}: {s}")))
        spent = time.perf_counter() - t0
        log(f"seed {seed + 1}/{seeds} done: {spent:.0f}s so far, about {spent / (seed + 1) * (seeds - seed - 1):.0f}s "
            "to go")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m spd_kernels demo`` (every option documented)."""
    from . import __doc__ as doc

    parser = argparse.ArgumentParser(prog="python -m spd_kernels demo", description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a reduced run for tests (2 seeds, short training, three points per knob; about 10 s)")
    parser.add_argument("--seeds", type=int, help=f"seeds (pre-trained models) per method (default {DEFAULT['seeds']})")
    parser.add_argument("--pretrain-steps", type=int,
                        help=f"steps of augmented pre-training per seed (default {DEFAULT['pretrain_steps']})")
    parser.add_argument("--shots", type=int, default=10, help="clean examples per class to fine-tune on (default 10)")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate, every method (default 1e-3)")
    parser.add_argument("--lambdas", help="comma-separated AdamSPD lambdas (default "
                        f"{','.join(format(v, 'g') for v in DEFAULT['grid'].spd_lambda)}); "
                        f"cap_projection=True above {CAP_ABOVE:g}")
    parser.add_argument("--eight-bit", action="store_true",
                        help="also sweep AdamSPD with 8-bit moments (optim_bits=8) as its own frontier")
    parser.add_argument("--formats", action="store_true",
                        help="also sweep AdamSPD in every compressed moment format, each its own frontier: "
                             "8-bit (optim_bits=8), bf16 moments, fp8 first + bf16 second moments")
    parser.add_argument("--out", default="demo-results", help="folder for demo.png and demo.json")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .report import format_table, plot, write_json

    args = build_parser().parse_args(argv)
    config = QUICK if args.quick else DEFAULT
    seeds = args.seeds or config["seeds"]
    grid = config["grid"]
    if args.lambdas:
        lambdas = tuple(float(v) for v in args.lambdas.split(","))
        grid = Grid(**{**asdict(grid), "spd_lambda": lambdas, "record_lambda": lambdas[len(lambdas) // 2]})
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    formats = list(FORMAT_RUNS) if args.formats else ["AdamSPD 8-bit"] if args.eight_bit else []
    results = run(seeds, args.pretrain_steps or config["pretrain_steps"], grid, args.shots, args.lr, formats)
    rows = matched_table(results, LEVELS)
    print()
    print(format_table(rows, seeds, grid.adamw_wd[0]))
    os.makedirs(args.out, exist_ok=True)
    png, js = os.path.join(args.out, "demo.png"), os.path.join(args.out, "demo.json")
    plot(results, rows, png)
    seconds = time.perf_counter() - t0
    write_json(js, vars(args), rows, results, seconds)
    print(f"wrote {png} and {js} in {seconds:.0f}s")
    return 0
