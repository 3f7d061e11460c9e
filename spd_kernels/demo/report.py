"""The demo's outputs: the matched-ID table (text), the frontier PNG and the JSON record."""
from __future__ import annotations

import json
import platform
from dataclasses import asdict
from typing import List, Optional

import torch
import torch.nn.functional as F

from .frontier import BASELINE, band
from .methods import SeedResult


def _pm(s: dict, digits: int = 1, signed: bool = False, total: Optional[int] = None) -> str:
    if s["mean"] is None:
        return "n/a"
    sign = "+" if signed else ""
    text = f"{s['mean']:{sign}.{digits}f} +- {s['std']:.{digits}f}"
    return text + (f" ({s['n']})" if total is not None and s["n"] < total else "")


def format_table(rows: List[dict], seeds: int, tuned_wd: float) -> str:
    pre, methods = rows[0], rows[1:]
    fractions = [lv["fraction"] for lv in methods[0]["levels"]] if methods else []
    head = f"{'method':17s} {'best ID gain':>13s}" + "".join(
        f" {f'OOD @ {f:.0%}':>18s} {'vs ' + BASELINE:>16s}" for f in fractions)
    lines = [
        "OOD accuracy % at matched ID. 'OOD @ 75%': at the ID where 75% of plain fine-tuning's ID gain is kept",
        f"(theta_ft: {BASELINE} wd={tuned_wd:g}, final model; per seed). Mean +- std over {seeds} seeds; '(k)': only k "
        "seeds reach that ID;",
        f"'vs {BASELINE}': paired difference from {BASELINE}'s frontier on the same seed. 'best ID gain': points over "
        "the pre-trained model.",
        f"pre-trained: ID {_pm(pre['id'])}, OOD {_pm(pre['ood'])}; theta_ft gains {_pm(pre['tuned_gain'])} ID points",
        "",
        head,
        "-" * len(head),
    ]
    for r in methods:
        cells = "".join(
            f" {_pm(lv['ood'], total=seeds):>18s} "
            f"{('--' if r['method'] == BASELINE else _pm(lv['delta'], signed=True, total=seeds)):>16s}"
            for lv in r["levels"])
        lines.append(f"{r['method']:17s} {_pm(r['best_id_gain'], signed=True):>13s}{cells}")
    return "\n".join(lines)


def environment() -> dict:
    """What the figures depend on: library versions, the CPU's kernels and thread count."""
    import numpy
    import sklearn

    return dict(torch=torch.__version__, numpy=numpy.__version__, scikit_learn=sklearn.__version__,
                python=platform.python_version(), machine=platform.processor() or platform.machine(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads())


def write_json(path: str, args: dict, rows: List[dict], seeds: List[SeedResult], seconds: float) -> None:
    with open(path, "w") as f:
        json.dump(dict(args=args, environment=environment(), seconds=round(seconds, 1), table=rows,
                       seeds=[asdict(s) for s in seeds]), f, indent=1)


def plot(seeds: List[SeedResult], rows: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    fractions = [i / 40 for i in range(49)]  # 0 .. 120% of theta_ft's gain
    for r in rows[1:]:
        stats = band(seeds, r["method"], fractions)
        xs = [f for f, s in zip(fractions, stats) if s]
        if not xs:
            continue
        mean = torch.tensor([s["mean"] for s in stats if s])
        std = torch.tensor([s["std"] for s in stats if s])
        (line,) = ax1.plot(xs, mean.tolist(), label=r["method"])
        ax1.fill_between(xs, (mean - std).tolist(), (mean + std).tolist(), color=line.get_color(), alpha=0.15)
    ax1.plot([0], [0], "k*", markersize=10, label="pre-trained")
    for lv in rows[1]["levels"] if len(rows) > 1 else []:
        ax1.axvline(lv["fraction"], color="grey", lw=0.5, ls=":")
    ax1.set_xlabel("ID gain over the pre-trained model, as a fraction of plain fine-tuning's (AdamW's) gain")
    ax1.set_ylabel("OOD accuracy change from the pre-trained model (points)")
    ax1.set_title(f"frontiers: OOD at matched ID (mean +- std over {len(seeds)} seeds, where all reach it)", fontsize=10)
    ax1.legend(fontsize=8)
    recorded = next((s.projections for s in seeds if s.projections), None)
    if recorded:
        freq = torch.tensor(recorded["fired"])  # [layers, steps] of 0/1
        window = max(1, freq.shape[1] // 15)
        smooth = F.avg_pool1d(freq.unsqueeze(0), window, stride=1).squeeze(0)
        for name, line in zip(recorded["layers"], smooth):
            ax2.plot(line.tolist(), label=name)
        ax2.set_xlabel("fine-tuning step")
        ax2.set_ylabel(f"projection frequency (moving mean over {window} steps)")
        ax2.set_title(f"per-layer projections: {recorded['method']}, seed {recorded['seed']}")
        ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
