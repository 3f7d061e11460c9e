"""The benchmarks behind ``python -m spd_kernels bench``, outside the optimizer's code.

- ``report``: the report (every line on every parameter set, interleaved rounds);
- ``lines``: the lines, one record each (how it is built, the bytes a step moves);
- ``measure``: time, bandwidth, memory, state bytes, projections;
- ``sweep``: ``--sweep size|count``, a step's cost against total params and tensor count;
- ``loaded``: ``--loaded``, a small CPU step on a busy machine;
- ``param_sets``, ``machine``: the parameter sets, and what machine a figure came from.

Nothing in ``spd_kernels`` outside this package imports it but the command line;
it reaches the optimizer through its public methods only (``AdamSPD.buckets()``
for the kernels-only lines).
"""
from __future__ import annotations

from typing import List, Optional


def build_parser():
    """The command line of ``python -m spd_kernels bench`` (``report.build_parser``)."""
    from .report import build_parser as build

    return build()


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m spd_kernels bench [options]``: the report, a sweep (``--sweep``) or ``--loaded``."""
    import torch

    from .report import run

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.loaded:
        from .loaded import format_report, measure

        print(format_report(measure(rounds=args.rounds or 5)))
        return 0
    if args.sweep:
        from . import sweep

        device = torch.device(args.device)
        return sweep.main(args.sweep, device, args.small, args.rounds or (10 if device.type == "cuda" else 5),
                          args.warmup, args.out, budget_s=args.budget_s)
    return run(args, parser)
