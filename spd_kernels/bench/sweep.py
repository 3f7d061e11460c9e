"""``python -m spd_kernels bench --sweep size|count``: how a step's cost grows with the work.

- ``size``: total params from ~1M up to what fits (beyond what every line can hold
  at once, the AdamSPD lines and ``AdamW(fused=True)`` only), as transformer-shaped sets
  (``param_sets.transformer``: blocks of qkv, out, a 4x MLP, biases and norms);
- ``count``: a fixed total split into 10 ... 20,000 equal tensors (``param_sets.split``).

Each point runs every line interleaved, as the bench report does (``report.bench_set``:
warm-up, rounds of A B C ..., medians), so ratios within a point are comparable.
Lines: AdamSPD (fp32 anchors, bf16 anchors, 8-bit moments + bf16 anchors),
``AdamW(fused=True)``, ``AdamW(foreach=True)``, the ``torch.compile``d per-tensor
SPD, and the reference loop at the small points only. Per point: median step
time, effective GB/s at each line's own byte count (``lines.Line.step_bytes``), that
as % of the bandwidth measured in the same run, peak extra memory (CUDA) and
state bytes per param. Writes a table, JSON, CSV and one log-log PNG per sweep.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import asdict
from typing import List, Optional, Sequence

import torch

from . import param_sets, report
from .lines import LINES as REGISTRY
from .lines import available
from .measure import bandwidth_gbs, device_name, free_memory

LINES = ("spd", "spd_bf16a", "spd_8bit", "adamw_fused", "adamw_foreach", "spd_compiled", "spd_reference")
#: the reference loop is timed only up to this many params (it is 30-100x slower)
REFERENCE_MAX_PARAMS = 4_000_000
#: the lines kept at sizes where every line cannot be held at once: AdamSPD's formats and the baseline
CORE_LINES = ("spd", "spd_8bit", "adamw_fused")
#: share of free memory a point may take with every line; with the core lines only
ALL_LINES_SHARE, CORE_SHARE = 0.4, 0.7
#: bytes per param every line of a point holds at once (p, g, two moments, an anchor: ~20 B)
BYTES_PER_PARAM_PER_LINE = 20


def fits(total: int, n_lines: int, free: int, share: float = ALL_LINES_SHARE) -> bool:
    """Whether ``n_lines`` lines of ``total`` params each fit ``share`` of ``free`` bytes."""
    return total * BYTES_PER_PARAM_PER_LINE * n_lines <= share * free


def size_points(device: torch.device, small: bool, n_lines: int, free: int) -> List[int]:
    """Total params for the size sweep: 1M x 4^k up to the top size, while at least the core
    lines fit in ``free`` bytes (larger points run only those)."""
    top = {True: 16_000_000 if device.type == "cpu" else 64_000_000,
           False: 300_000_000 if device.type == "cpu" else 2_000_000_000}[small]
    points, total = [], 1_000_000
    while total <= top and fits(total, min(n_lines, len(CORE_LINES)), free, CORE_SHARE):
        points.append(total)
        total *= 4
    return points


def count_points(small: bool) -> List[int]:
    return [10, 100, 1000, 5000] if small else [10, 100, 1000, 5000, 20000]


def count_total(small: bool, n_lines: int, free: int) -> int:
    """The fixed total of the count sweep: 64M (8M with --small), less if ``free`` bytes say so."""
    want = 8_000_000 if small else 64_000_000
    return int(min(want, ALL_LINES_SHARE * free / (BYTES_PER_PARAM_PER_LINE * n_lines)))


def sweep_points(kind: str, device: torch.device, small: bool, n_lines: int, free: int) -> List[tuple]:
    """The points of sweep ``kind`` as (x, shapes), smallest first, for ``free`` bytes."""
    if kind == "size":
        return [(total, param_sets.transformer(total)) for total in size_points(device, small, n_lines, free)]
    total = count_total(small, n_lines, free)
    return [(count, param_sets.split(total, count)) for count in count_points(small)]


def lines_at(n: int, lines: Sequence[str], free: int) -> List[str]:
    """The lines a point of ``n`` params runs: the reference only at small points, the core
    lines only where every line cannot be held at once, and always the baseline."""
    here = [line for line in lines if line != "spd_reference" or n <= REFERENCE_MAX_PARAMS]
    if not fits(n, len(here), free):
        here = [line for line in here if line in CORE_LINES]
    if "adamw_fused" not in here:
        here.append("adamw_fused")
    return here


def run_point(kind: str, x: int, shapes: List[tuple], device: torch.device, rounds: int, warmup: int,
              lines: Sequence[str], free: int, bw: float, progress) -> List[dict]:
    """One point of sweep ``kind`` ('size' or 'count'): one row per line, interleaved."""
    here = lines_at(param_sets.numel(shapes), lines, free)
    rows = [{"sweep": kind, "x": x, **asdict(row)}
            for row in report.bench_set(f"{kind}={x}", shapes, here, device, rounds, warmup, bw, progress,
                                       fresh_grads=False)]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def format_table(rows: List[dict]) -> str:
    head = (f"{'sweep':6s} {'x':>11s} {'impl':14s} {'tensors':>7s} {'params':>9s} {'ms/step':>10s} "
            f"{'vs fused':>8s} {'GB/s':>7s} {'% bw':>6s} {'state B/p':>9s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        state = f"{r['state_bytes_per_param']:9.2f}" if r["state_bytes_per_param"] is not None else f"{'-':>9s}"
        lines.append(f"{r['sweep']:6s} {r['x']:11d} {r['impl']:14s} {r['tensors']:7d} {r['params_m']:8.1f}M "
                     f"{r['ms']:10.3f} {r['vs_adamw_fused']:8.2f} {r['gbs']:7.1f} {r['pct_bandwidth']:6.1f} {state}")
    return "\n".join(lines)


def plot(rows: List[dict], kind: str, meta: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = [r for r in rows if r["impl"] == impl]
        xs = [r["x"] for r in mine]
        axes[0].plot(xs, [r["ms"] for r in mine], marker="o", label=impl)
        axes[1].plot(xs, [r["pct_bandwidth"] for r in mine], marker="o", label=impl)
    xlabel = "total params" if kind == "size" else f"tensors (total {rows[0]['params_m']:.0f}M params)"
    for ax, title in zip(axes, ("ms per step (log-log)", "% of measured bandwidth, at each line's bytes")):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].axhline(100.0, color="k", lw=0.8)  # the bandwidth line
    axes[1].legend(fontsize=8)
    sizes = ("--small" if meta.get("small") else "full") + ("" if meta.get("complete", True) else ", partial")
    fig.suptitle(f"AdamSPD sweep '{kind}' ({sizes}): {meta['device_name']}, torch {meta['torch']}"
                 + (f", triton {meta['triton']}" if meta.get("triton") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows: List[dict], kind: str, meta: dict, out_dir: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"sweep-{kind}.{ext}") for ext in ("json", "csv", "png")]
    with open(paths[0], "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, kind, meta, paths[2])
    return paths


def main(kind: str, device: torch.device, small: bool, rounds: int, warmup: int, out_dir: str,
         lines: Sequence[str] = LINES, budget_s: Optional[float] = None) -> int:
    """Runs the sweep and writes its outputs after every point, so a run cut short (a time
    limit, a crash at a large point) keeps what it measured; with ``budget_s``, no point
    starts once that many seconds have passed (the first always runs) and the meta says
    which points were left out."""
    from tqdm import tqdm

    start = time.perf_counter()
    lines = [line for line in lines if line in available(device, tuple(REGISTRY))]
    bw = bandwidth_gbs(device)
    triton_version = None
    if device.type == "cuda":
        import triton

        triton_version = triton.__version__
    meta = dict(sweep=kind, device=str(device), device_name=device_name(device), torch=torch.__version__,
                triton=triton_version, bandwidth_gbs=bw,
                bandwidth_kind="copy" if device.type == "cuda" else "in-place add", rounds=rounds, small=small,
                date=time.strftime("%Y-%m-%d"), budget_s=budget_s, complete=False, left_out=[])
    print(f"{meta['device_name']}, torch {torch.__version__}; {meta['bandwidth_kind']} bandwidth {bw:.1f} GB/s")
    # memory is read once, before any point: what this process freed after a point can stay
    # with it (the allocator keeps mid-sized blocks), and would shrink the later points' lines
    free = free_memory(device)
    points = sweep_points(kind, device, small, len(lines), free)
    rows: List[dict] = []
    paths: List[str] = []
    with tqdm(desc=f"sweep {kind}", unit="step", file=sys.stderr, disable=None) as bar:
        for done, (x, shapes) in enumerate(points):
            if done and budget_s is not None and time.perf_counter() - start > budget_s:
                meta["left_out"] = [x for x, _ in points[done:]]
            else:
                rows += run_point(kind, x, shapes, device, rounds, warmup, lines, free, bw, lambda: bar.update(1))
                meta["complete"] = done + 1 == len(points)
            paths = write_outputs(rows, kind, meta, out_dir)
            if meta["left_out"]:
                break
    print(format_table(rows))
    if meta["left_out"]:
        print(f"time budget of {budget_s:g} s spent: points {meta['left_out']} left out")
    for path in paths:
        print(f"wrote {path}")
    return 0
