"""``python -m spd_kernels bench``: the microbenchmark report.

For each parameter set (vit_b, a llama-like set sized to the device's memory,
many_small, lora anchor-free) every line gets its own copy of the params,
grads and state; then rounds run them interleaved (A B C A B C ...) after a
warm-up, with new random grads before every timed step (untimed), so SPD's
condition fires at a realistic rate and its projection pass is in the figure
(``--same-grads``: the same grads every step, SPD's best case). The table shows
per line the median ms/step, the ratio to ``torch.optim.AdamW(fused=True)``,
the effective GB/s at the line's minimal byte count, that rate as % of the
bandwidth measured in the same run (a device copy on CUDA, an in-place add on
CPU), the peak extra memory of one step (CUDA only), the optimizer state's
bytes per param, the share of params SPD projected and the GB/s counting that
projection pass too (p and anchor read, p written again), and the line's bytes
(that pass included) over AdamW fused's: the ratio a step moving its bytes at
AdamW fused's own rate would have, the floor of a memory-bound step. Writes the same figures
as JSON, CSV and a PNG plot. The lines, and what each moves per param:
``spd_kernels.bench.lines``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch

from . import lines, param_sets
from .measure import (bandwidth_gbs, device_name, free_memory, params_of, peak_extra_mb, projected_share,
                      state_bytes_per_param, sync, time_once)

SETS = param_sets.NAMES


@dataclass
class Row:
    set: str
    impl: str
    tensors: int
    params_m: float
    ms: float
    vs_adamw_fused: float
    gbs: float
    pct_bandwidth: float
    peak_extra_mb: Optional[float]
    #: optimizer state (moments, anchors, absmax, steps) in bytes per param, each storage counted once
    state_bytes_per_param: Optional[float] = None
    #: AdamSPD lines: % of the params whose tensor SPD projected (s > 0), mean over the timed
    #: steps. ``gbs`` counts one pass (``Line.step_bytes``); a projected tensor that does not stay in
    #: cache is read and written again (p and anchor in, p out: up to 12 B/param more)
    projected_pct: Optional[float] = None
    #: AdamSPD lines: the GB/s at the step's bytes plus the projection pass's
    #: (``Line.projection_bytes``) for ``projected_pct`` of the params
    gbs_with_projection: Optional[float] = None
    #: the line's bytes per param (its projection share included) over AdamW fused's: its ratio
    #: to AdamW fused were it to move its bytes at AdamW fused's GB/s, the floor a memory-bound
    #: step meets (None without an AdamW fused line in the run, or for an SPD line whose
    #: projections go uncounted: the compiled and kernels-only ones)
    bytes_vs_adamw_fused: Optional[float] = None


# ------------------------------------------------------------------ the sets


def sized_shapes(name: str, device: torch.device, n_impls: int, small: bool) -> List[tuple]:
    if small:  # CI: the same structure, tiny
        return {
            "vit_b": param_sets.vit_b()[:12],
            "llama_like": [(512, 64), (64, 64), (128, 64), (64, 128), (64,), (512, 64)],
            "many_small": param_sets.many_small(50, 256),
            "lora": param_sets.lora(layers=2, width=64, rank=4),
        }[name]
    if name != "llama_like":
        return param_sets.get(name)
    # every implementation holds p, g, m, v (and a): keep all of them within ~40% of memory
    budget = 0.4 * free_memory(device) / (20 * n_impls)
    layers, vocab = 16, 32000
    while layers > 1 and param_sets.numel(param_sets.llama_like(layers, vocab)) > budget:
        layers //= 2
    while vocab > 1000 and param_sets.numel(param_sets.llama_like(layers, vocab)) > budget:
        vocab //= 2
    return param_sets.llama_like(layers, vocab)


# --------------------------------------------------------------- measurement


def bench_set(name, shapes, impls, device, rounds, warmup, bw, progress, fresh_grads=True) -> List[Row]:
    anchored = name != "lora"
    opts = {impl: lines.build(impl, shapes, device, anchored) for impl in impls}
    for impl, opt in opts.items():  # warm-up: compiles, tables, lazy state
        for _ in range(warmup if impl != "spd_reference" else 1):
            opt.step()
            progress()
    sync(device)
    peaks = {impl: peak_extra_mb(opt.step, device) for impl, opt in opts.items()}
    times: Dict[str, List[float]] = {impl: [] for impl in impls}
    projected: Dict[str, List[float]] = {impl: [] for impl in impls}
    n = param_sets.numel(shapes)
    for r in range(rounds):
        for impl, opt in opts.items():  # interleaved: drift and noise hit every impl alike
            if impl == "spd_reference" and r >= max(3, rounds // 4):
                continue  # the oracle is slow and its ratio needs no more precision
            if fresh_grads:  # new grads, untimed: SPD's condition then fires at a realistic rate
                for p in params_of(opt):
                    p.grad.normal_(0.0, 1e-2)
            times[impl].append(time_once(opt.step, device))
            share = projected_share(opt, n)
            if share is not None:
                projected[impl].append(share)
            progress()
    fused = statistics.median(times["adamw_fused"]) if times.get("adamw_fused") else None
    fused_bytes = lines.LINES["adamw_fused"].step_bytes(anchored)
    rows = []
    for impl in impls:
        sec = statistics.median(times[impl])
        line = lines.LINES[impl]
        gbs = n * line.step_bytes(anchored) / sec / 1e9
        share = statistics.mean(projected[impl]) if projected[impl] else None
        moved = line.step_bytes(anchored) + (0.0 if share is None else share * line.projection_bytes(anchored))
        uncounted = share is None and line.projects  # an SPD step whose projections the line does not count
        with_projection = None if share is None else n * moved / sec / 1e9
        rows.append(Row(name, impl, len(shapes), n / 1e6, sec * 1e3, sec / fused if fused else float("nan"),
                        gbs, 100 * gbs / bw, peaks[impl], state_bytes_per_param(opts[impl], n),
                        None if share is None else 100 * share, with_projection,
                        moved / fused_bytes if fused and not uncounted else None))
    del opts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------- output


def format_table(rows: List[Row]) -> str:
    head = (f"{'set':11s} {'impl':14s} {'tensors':>7s} {'params':>8s} {'ms/step':>9s} {'vs fused':>8s} "
            f"{'GB/s':>7s} {'% bw':>6s} {'peak MB':>8s} {'state B/p':>9s} {'proj %':>6s} {'GB/s+proj':>9s} "
            f"{'B vs fused':>10s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = f"{r.peak_extra_mb:8.1f}" if r.peak_extra_mb is not None else f"{'-':>8s}"
        state = f"{r.state_bytes_per_param:9.2f}" if r.state_bytes_per_param is not None else f"{'-':>9s}"
        projected = f"{r.projected_pct:6.1f}" if r.projected_pct is not None else f"{'-':>6s}"
        with_projection = f"{r.gbs_with_projection:9.1f}" if r.gbs_with_projection is not None else f"{'-':>9s}"
        floor = f"{r.bytes_vs_adamw_fused:10.2f}" if r.bytes_vs_adamw_fused is not None else f"{'-':>10s}"
        lines.append(f"{r.set:11s} {r.impl:14s} {r.tensors:7d} {r.params_m:7.1f}M {r.ms:9.3f} "
                     f"{r.vs_adamw_fused:8.2f} {r.gbs:7.1f} {r.pct_bandwidth:6.1f} {peak} {state} {projected} "
                     f"{with_projection} {floor}")
    return "\n".join(lines)


def write_outputs(rows: List[Row], meta: dict, out_dir: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f) for f in ("bench.json", "bench.csv", "bench.png")]
    with open(paths[0], "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    plot(rows, meta, paths[2])
    return paths


def plot_title(meta: dict) -> str:
    """The PNG's title: the machine, torch, and whether the sets were the tiny ``--small`` ones."""
    sizes = "--small (tiny sets)" if meta.get("small") else "full-size sets"
    return f"AdamSPD bench: {meta['device_name']}, torch {meta['torch']}, {sizes}"


def plot(rows: List[Row], meta: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r.set for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        xs, ms, pct = [], [], []
        for i, s in enumerate(sets):
            row = next((r for r in rows if r.set == s and r.impl == impl), None)
            if row is not None:
                xs.append(i + k * width)
                ms.append(row.vs_adamw_fused)
                pct.append(row.pct_bandwidth)
        axes[0].bar(xs, ms, width, label=impl)
        axes[1].bar(xs, pct, width, label=impl)
    for ax, title in zip(axes, ("step time / AdamW(fused) (log; lower is better)", "% of measured bandwidth")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sets))])
        ax.set_xticklabels(sets)
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[1].legend(fontsize=8)
    fig.suptitle(plot_title(meta))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m spd_kernels bench`` (every option documented)."""
    parser = argparse.ArgumentParser(prog="python -m spd_kernels bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to run on (default: cuda when there is a GPU, else cpu)")
    parser.add_argument("--sets", default=",".join(SETS),
                        help=f"comma-separated parameter sets, from {','.join(SETS)} (default: all)")
    parser.add_argument("--impls", default=None,
                        help=f"comma-separated lines from {','.join(lines.LINES)} (default: "
                             f"{','.join(lines.DEFAULT)}, those that run here; adamw_fused is always added, "
                             "as every ratio needs it)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 30 CUDA, 7 CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before the timed ones (default 3)")
    parser.add_argument("--state-formats", action="store_true",
                        help="add the state-format lines: spd_bf16a (bf16 anchors), spd_bf16 (bf16 moments), "
                             "spd_fp8 (fp8 first, bf16 second moments), spd_8bit (bitsandbytes' 8-bit format), "
                             "and the peers adamw_8bit_bnb (bitsandbytes' AdamW8bit) and adamw_fp8_torchao (torchao's "
                             "AdamWFp8), those installed; the state bytes per param column compares them")
    grads = parser.add_mutually_exclusive_group()
    grads.add_argument("--fresh-grads", action="store_true",
                       help="new random grads before every timed step (untimed), so SPD's condition fires "
                            "at a realistic rate and its projection pass is timed (the default)")
    grads.add_argument("--same-grads", action="store_true",
                       help="the same grads every step: SPD's condition stops firing, its best case")
    parser.add_argument("--kernels-only", action="store_true",
                        help="add the spd_kernels and spd_split lines: the fast backend's whole and split "
                             "step on AdamSPD's bucket, without step()'s bookkeeping")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="add the spd_graph line: AdamSPD(capturable=True).step() replayed from a CUDA graph")
    parser.add_argument("--small", action="store_true",
                        help="tiny versions of the sets (for CI; the PNG title says so)")
    parser.add_argument("--out", default="bench-results", help="folder for bench.json, bench.csv, bench.png")
    parser.add_argument("--sweep", choices=("size", "count"), default=None,
                        help="instead of the report: how a step's time grows with total params ('size', "
                             "transformer-shaped sets from 1M up to what fits) or with the number of tensors "
                             "('count', a fixed total split 10 ... 20,000 ways); every line per point, "
                             "interleaved; writes sweep-<kind>.json/.csv/.png (spd_kernels.bench.sweep)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="with --sweep: start no new point after this many seconds (the first always "
                             "runs); the outputs are rewritten after every point either way")
    parser.add_argument("--loaded", action="store_true",
                        help="instead of the report: a 16-tensor MLP's CPU step with 1 and all threads, on a "
                             "quiet machine and with every core busy (spd_kernels.bench.loaded)")
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """The report, for the parsed command line (``spd_kernels.bench.main`` dispatches the rest)."""
    bad_sets = [s for s in args.sets.split(",") if s not in SETS]
    if bad_sets:
        parser.error(f"--sets: unknown set(s) {bad_sets}; choose from {','.join(SETS)}")
    device = torch.device(args.device)
    impls = args.impls.split(",") if args.impls else lines.available(device)
    unknown = [i for i in impls if i not in lines.LINES]
    if unknown:
        parser.error(f"unknown impls {unknown}; choose from {tuple(lines.LINES)}")
    if args.cuda_graph and device.type != "cuda":
        parser.error("--cuda-graph needs a CUDA device")
    requested = ((lines.available(device, lines.FORMATS) if args.state_formats else [])
                 + list(lines.KERNELS if args.kernels_only else ()) + list(lines.GRAPH if args.cuda_graph else ()))
    impls += [i for i in requested if i not in impls]
    if "adamw_fused" not in impls:
        impls.append("adamw_fused")  # the baseline every ratio needs
    cannot = [i for i in impls if not lines.can_run(i, device)]
    if cannot:
        parser.error(f"{cannot} cannot run on {device} here")
    sets = args.sets.split(",")
    rounds = args.rounds or (30 if device.type == "cuda" else 7)
    from tqdm import tqdm

    bw = bandwidth_gbs(device)
    meta = dict(device=str(device), device_name=device_name(device), torch=torch.__version__,
                bandwidth_gbs=bw, bandwidth_kind="copy" if device.type == "cuda" else "in-place add",
                rounds=rounds, small=args.small, fresh_grads=not args.same_grads, date=time.strftime("%Y-%m-%d"))
    print(f"{meta['device_name']}, torch {torch.__version__}; {meta['bandwidth_kind']} bandwidth {bw:.1f} GB/s")
    rows: List[Row] = []
    total = len(sets) * len(impls) * (rounds + args.warmup)
    with tqdm(total=total, desc="bench", unit="step", file=sys.stderr, disable=None) as bar:
        for name in sets:
            shapes = sized_shapes(name, device, len(impls), args.small)
            bar.set_postfix_str(name)
            rows += bench_set(name, shapes, impls, device, rounds, args.warmup, bw, lambda: bar.update(1),
                              fresh_grads=not args.same_grads)
            paths = write_outputs(rows, meta, args.out)  # after every set: a run cut short keeps them
    print(format_table(rows))
    for path in paths:
        print(f"wrote {path}")
    return 0

