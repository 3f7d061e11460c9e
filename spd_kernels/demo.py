"""``python -m spd_kernels demo``: robust fine-tuning in miniature, SPD against its peers.

The protocol of the paper, shrunk to scikit-learn's bundled 8x8 digits (no
download): pre-train a small CNN on one split with strong augmentation
(rotation, scale, shift, blur, noise), keep its head, fine-tune on a few clean
examples per class, then measure in-distribution accuracy on clean held-out
digits (ID) and out-of-distribution accuracy on corrupted copies of them (OOD:
mean over rotation, shift, zoom, noise and blur). Methods: AdamW (decay toward
zero), L2-SP (Adam plus a penalty pulling toward the pre-trained weights) and
AdamSPD at a few lambdas; every method starts from the same pre-trained model
of each seed. Prints a table (mean +- std over seeds) and writes a PNG: OOD
accuracy against the distance from the pre-trained weights per method, and the
per-layer projection frequency over the steps of one SPD run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .optim import AdamSPD

SIZE = 16  # digits are upsampled from 8x8 so that rotations and shifts stay meaningful
CORRUPTIONS = ("rotate", "shift", "zoom", "noise", "blur")


# ---------------------------------------------------------------------- data


def load_digits_tensors():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return x, torch.tensor(d.target, dtype=torch.long)


def splits(x, y, seed: int, shots: int):
    """Pre-train split, a few clean examples per class to fine-tune on, held-out test."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    pre, rest = order[:900], order[900:]
    few = torch.cat([rest[y[rest] == c][:shots] for c in range(10)])
    test = rest[~torch.isin(rest, few)]
    return (x[pre], y[pre]), (x[few], y[few]), (x[test], y[test])


def affine(x, angle, scale, dx, dy):
    """Rotate (radians), scale and shift (in [-1, 1] image units) a batch, per image."""
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, dx], 1), torch.stack([sin, cos, dy], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def blur(x, sigma):
    """Gaussian blur with one sigma per image (sigma 0 leaves the image as it is)."""
    r = torch.arange(-2, 3, dtype=torch.float32)
    s = sigma.clamp_min(1e-3).view(-1, 1)
    k1 = torch.exp(-(r.view(1, -1) ** 2) / (2 * s**2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1.unsqueeze(2) * k1.unsqueeze(1)).unsqueeze(1)  # [n, 1, 5, 5]
    out = F.conv2d(x.transpose(0, 1), k2, padding=2, groups=x.shape[0]).transpose(0, 1)
    return out


def augment(x, g):
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)  # noqa: E731
    x = affine(x, u(-0.6, 0.6), u(0.75, 1.3), u(-0.3, 0.3), u(-0.3, 0.3))
    x = blur(x, u(0.0, 1.3))
    return x + u(0.0, 0.35).view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g)


def corrupt(x, kind: str, g):
    n = x.shape[0]
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    zero, one = torch.zeros(n), torch.ones(n)
    if kind == "rotate":
        return affine(x, sign * 0.55, one, zero, zero)
    if kind == "shift":
        return affine(x, zero, one, sign * 0.3, -sign * 0.3)
    if kind == "zoom":
        return affine(x, zero, torch.where(sign > 0, 1.3, 0.72), zero, zero)
    if kind == "noise":
        return x + 0.35 * torch.randn(x.shape, generator=g)
    if kind == "blur":
        return blur(x, torch.full((n,), 1.3))
    raise ValueError(kind)


# --------------------------------------------------------------------- model


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = torch.nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.head(x.mean((2, 3)))


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def deviation(model, ref: Dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return math.sqrt(sum(float((p - ref[n]).pow(2).sum()) for n, p in model.named_parameters()))


# ---------------------------------------------------------------- training


def pretrain(x, y, seed: int, steps: int) -> SmallCNN:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = F.cross_entropy(model(augment(x[idx], g)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@dataclass
class Method:
    name: str
    kind: str  # none | adamw | l2sp | spd | spd_capped
    strength: float


@dataclass
class RunResult:
    method: str
    seed: int
    id_acc: float
    ood_acc: float
    deviation: float
    projection_freq: Optional[List[List[float]]] = field(default=None)  # [layer][step], SPD only
    layer_names: Optional[List[str]] = None


def finetune(pre: SmallCNN, method: Method, data, steps: int, lr: float, record: bool, seed: int, batch: int = 20):
    """Fine-tune a copy of ``pre`` on minibatches of the few-shot set (stochastic, as in real fine-tuning)."""
    g = torch.Generator().manual_seed(2000 + seed)
    model = SmallCNN()
    model.load_state_dict(pre.state_dict())
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = data
    if method.kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=method.strength)
    elif method.kind == "l2sp":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = AdamSPD(model.named_parameters(), lr=lr, weight_decay=method.strength,
                      cap_projection=method.kind == "spd_capped", optim_bits=8 if method.kind == "spd8" else 32)
    fired: List[List[float]] = []
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if method.kind == "l2sp":
            loss = loss + 0.5 * method.strength * sum((p - ref[n]).pow(2).sum() for n, p in model.named_parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if record and method.kind.startswith("spd"):
            stats = opt.spd_stats()
            fired.append([float(s["projected"]) for s in stats.values()])
    names = [n for n, _ in model.named_parameters()]
    freq = [list(col) for col in zip(*fired)] if fired else None
    return model, ref, freq, names


def evaluate(model, ref, test, seed: int):
    x, y = test
    g = torch.Generator().manual_seed(1000 + seed)
    ood = statistics.mean(accuracy(model, corrupt(x, kind, g), y) for kind in CORRUPTIONS)
    return accuracy(model, x, y), ood, deviation(model, ref)


def default_methods(lambdas: List[float], eight_bit: bool = False) -> List[Method]:
    return (
        [Method("pre-trained (no fine-tuning)", "none", 0.0), Method("AdamW wd=0.01", "adamw", 0.01),
         Method("L2-SP a=0.1", "l2sp", 0.1)]
        + [Method(f"AdamSPD lambda={lam:g}", "spd", lam) for lam in lambdas]
        + [Method(f"AdamSPD lambda={max(lambdas):g} capped", "spd_capped", max(lambdas))]
        # the same runs with 8-bit moments (the conv2/conv3 weights; smaller tensors stay fp32)
        + ([Method(f"AdamSPD lambda={lam:g} 8-bit", "spd8", lam) for lam in lambdas] if eight_bit else [])
    )


def run(seeds: int, pretrain_steps: int, finetune_steps: int, shots: int, lr: float, lambdas: List[float],
        log=print, eight_bit: bool = False) -> List[RunResult]:
    x, y = load_digits_tensors()
    results: List[RunResult] = []
    methods = default_methods(lambdas, eight_bit)
    for seed in range(seeds):
        pre_split, few, test = splits(x, y, seed, shots)
        t0 = time.perf_counter()
        pre = pretrain(*pre_split, seed=seed, steps=pretrain_steps)
        log(f"seed {seed}: pre-trained in {time.perf_counter() - t0:.1f}s")
        for method in methods:
            if method.kind == "none":
                ref = {n: p.detach().clone() for n, p in pre.named_parameters()}
                id_acc, ood, dev = evaluate(pre, ref, test, seed)
                results.append(RunResult(method.name, seed, id_acc, ood, dev))
                continue
            record = seed == 0 and method.kind.startswith("spd")
            model, ref, freq, names = finetune(pre, method, few, finetune_steps, lr, record, seed)
            id_acc, ood, dev = evaluate(model, ref, test, seed)
            results.append(RunResult(method.name, seed, id_acc, ood, dev, freq, names if freq else None))
    return results


# ------------------------------------------------------------------ report


def summarize(results: List[RunResult]) -> List[dict]:
    rows = []
    for name in dict.fromkeys(r.method for r in results):
        rs = [r for r in results if r.method == name]

        def ms(key):
            vals = [getattr(r, key) for r in rs]
            return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

        rows.append(dict(method=name, seeds=len(rs), id=ms("id_acc"), ood=ms("ood_acc"), deviation=ms("deviation")))
    return rows


def format_table(rows: List[dict]) -> str:
    head = f"{'method':30s} {'ID %':>13s} {'OOD %':>13s} {'||theta - theta0||':>19s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:30s} {r['id'][0]:6.1f} +- {r['id'][1]:4.1f} {r['ood'][0]:6.1f} +- "
                     f"{r['ood'][1]:4.1f} {r['deviation'][0]:10.3f} +- {r['deviation'][1]:5.3f}")
    return "\n".join(lines)


def plot(results: List[RunResult], rows: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in rows:
        ax1.errorbar(r["deviation"][0], r["ood"][0], xerr=r["deviation"][1], yerr=r["ood"][1], fmt="o",
                     capsize=3, label=r["method"])
    ax1.set_xlabel("||theta - theta0|| (distance from the pre-trained weights)")
    ax1.set_ylabel("OOD accuracy % (mean over 5 corruptions)")
    ax1.set_title("OOD accuracy vs deviation (mean +- std over seeds)")
    ax1.legend(fontsize=7)
    spd = [r for r in results if r.projection_freq]
    if spd:
        r = spd[1] if len(spd) > 1 else spd[0]  # the second lambda: a middle setting
        freq = torch.tensor(r.projection_freq)  # [layers, steps] of 0/1
        window = max(1, freq.shape[1] // 15)
        smooth = F.avg_pool1d(freq.unsqueeze(0), window, stride=1).squeeze(0)
        for name, line in zip(r.layer_names, smooth):
            ax2.plot(line.numpy(), label=name)
        ax2.set_xlabel("fine-tuning step")
        ax2.set_ylabel(f"projection frequency (moving mean over {window} steps)")
        ax2.set_title(f"per-layer projections: {r.method}, seed {r.seed}")
        ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m spd_kernels demo`` (every option documented)."""
    parser = argparse.ArgumentParser(prog="python -m spd_kernels demo", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3); mean +- std over them")
    parser.add_argument("--pretrain-steps", type=int, default=1000,
                        help="steps of augmented pre-training per seed (default 1000)")
    parser.add_argument("--finetune-steps", type=int, default=200,
                        help="fine-tuning steps per method and seed (default 200)")
    parser.add_argument("--shots", type=int, default=10, help="clean examples per class to fine-tune on (default 10)")
    parser.add_argument("--lr", type=float, default=3e-3, help="fine-tuning learning rate, every method (default 3e-3)")
    parser.add_argument("--lambdas", default="0.5,2,8",
                        help="comma-separated AdamSPD lambdas (weight_decay) to run (default 0.5,2,8)")
    parser.add_argument("--eight-bit", action="store_true",
                        help="also run each AdamSPD lambda with 8-bit moments (optim_bits=8), to compare "
                             "its ID/OOD accuracy with the 32-bit runs")
    parser.add_argument("--out", default="demo-results", help="folder for demo.png and demo.json")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    t0 = time.perf_counter()
    lambdas = [float(v) for v in args.lambdas.split(",")]
    results = run(args.seeds, args.pretrain_steps, args.finetune_steps, args.shots, args.lr, lambdas,
                  eight_bit=args.eight_bit)
    rows = summarize(results)
    print(format_table(rows))
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "demo.png")
    plot(results, rows, png)
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows, "runs": [asdict(r) for r in results]}, f, indent=1)
    print(f"wrote {png} and demo.json in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
