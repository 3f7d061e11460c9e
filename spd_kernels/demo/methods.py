"""The methods the demo compares, each swept along its own knob into a curve of (ID, OOD) points.

Every method of a seed starts from that seed's pre-trained model and sees the
same minibatches (one generator per seed), so the seeds pair the methods.

- AdamW: decoupled decay toward zero; knobs: weight decay (one curve each) and
  the number of steps (each curve is measured along its run, from step 0).
- WiSE-FT (Wortsman et al., CVPR 2022): theta(alpha) = (1 - alpha) theta0 +
  alpha theta_ft, theta_ft the first AdamW curve's final model; knob alpha.
- LP-FT (Kumar et al., ICLR 2022): Adam on the head alone, then AdamW on every
  layer; knob: fine-tuning steps after the probe (step 0 is the probe alone).
- L2-SP: Adam on loss + alpha/2 ||theta - theta0||^2; knob alpha.
- AdamSPD: knob lambda (``weight_decay``). Uncapped up to ``CAP_ABOVE``,
  ``cap_projection=True`` above: a projection moves p to q - lam r (q - a),
  whose distance from the anchor is |1 - lam r| ||q - a||, so uncapped
  lam r > 2 ends a layer farther from its anchor than the plain step would
  and flips it to the far side; at large lambda the uncapped rule diverges
  (what collapsed the earlier demo's lambda = 8 runs). The cap takes min(lam r, 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..optim import AdamSPD
from .model import Evaluator, Point, SmallCNN, copy_of

BATCH = 20
CAP_ABOVE = 2.0
METHODS = ("AdamW", "WiSE-FT", "LP-FT", "L2-SP", "AdamSPD", "AdamSPD 8-bit")


@dataclass(frozen=True)
class Grid:
    """Where each method's knob is measured."""

    finetune_steps: int
    checkpoints: Sequence[int]  # steps at which the AdamW and LP-FT runs are measured (0 is added)
    adamw_wd: Sequence[float]
    l2sp_alpha: Sequence[float]
    spd_lambda: Sequence[float]
    wise_alpha: Sequence[float]
    probe_steps: int
    record_lambda: float  # the SPD run whose per-layer projections are recorded (seed 0)


@dataclass
class Curve:
    label: str  # e.g. "wd=0.01"
    knob: str  # what varies along it: steps, alpha, lambda
    points: List[Point]


@dataclass
class SeedResult:
    seed: int
    pretrained: Point
    curves: Dict[str, List[Curve]]
    projections: Optional[dict] = field(default=None)  # layer names and per-step 0/1 of one SPD run


def train(model, opt, few, steps: int, seed: int, evaluate: Optional[Evaluator] = None,
          measure_at: Sequence[int] = (), penalty: Optional[Callable] = None,
          after_step: Optional[Callable] = None, stream: int = 2000) -> List[Point]:
    """Minibatch training on the few-shot set; measures the model after each step in ``measure_at``."""
    g = torch.Generator().manual_seed(stream + seed)
    x, y = few
    points = [evaluate(model, 0)] if 0 in measure_at else []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y), (BATCH,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if penalty is not None:
            loss = loss + penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(opt)
        if step in measure_at:
            points.append(evaluate(model, step))
    return points


def adamw_curves(pre, few, evaluate, grid: Grid, lr: float, seed: int):
    """One curve per weight decay, measured along the run; returns them and the first run's final model."""
    curves, final = [], None
    for wd in grid.adamw_wd:
        model = copy_of(pre)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
        points = train(model, opt, few, grid.finetune_steps, seed, evaluate, (0, *grid.checkpoints))
        curves.append(Curve(f"wd={wd:g}", "steps", points))
        final = model if final is None else final
    return curves, final


def wise_ft_curve(pre: SmallCNN, tuned: SmallCNN, evaluate, grid: Grid) -> Curve:
    points = []
    for alpha in grid.wise_alpha:
        mixed = SmallCNN()
        with torch.no_grad():
            for p, p0, q in zip(mixed.parameters(), pre.parameters(), tuned.parameters()):
                p.copy_(torch.lerp(p0, q, alpha))
        points.append(evaluate(mixed, alpha))
    return Curve(f"theta_ft = AdamW wd={grid.adamw_wd[0]:g}", "alpha", points)


def lp_ft_curve(pre, few, evaluate, grid: Grid, lr: float, seed: int) -> Curve:
    model = copy_of(pre)
    backbone = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    for p in backbone:
        p.requires_grad_(False)
    train(model, torch.optim.Adam(model.head.parameters(), lr=lr), few, grid.probe_steps, seed, stream=3000)
    for p in backbone:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=grid.adamw_wd[0])
    points = train(model, opt, few, grid.finetune_steps, seed, evaluate, (0, *grid.checkpoints))
    return Curve(f"probe {grid.probe_steps} steps, then AdamW wd={grid.adamw_wd[0]:g}", "steps", points)


def l2sp_curve(pre, few, evaluate, grid: Grid, lr: float, seed: int) -> Curve:
    ref = [p.detach().clone() for p in pre.parameters()]
    points = []
    for alpha in sorted(grid.l2sp_alpha):
        model = copy_of(pre)

        def penalty(m, alpha=alpha):
            return 0.5 * alpha * sum((p - a).pow(2).sum() for p, a in zip(m.parameters(), ref))

        train(model, torch.optim.Adam(model.parameters(), lr=lr), few, grid.finetune_steps, seed, penalty=penalty)
        points.append(evaluate(model, alpha))
    return Curve("alpha", "alpha", points)


#: the compressed-moment frontiers ``demo --formats`` adds (``--eight-bit``: the 8-bit one alone): the
#: large tensors (conv2/conv3 weights, >= min_8bit_size) take fp8 and 8-bit; smaller ones stay fp32
FORMAT_RUNS = {
    "AdamSPD 8-bit": dict(optim_bits=8),
    "AdamSPD bf16": dict(exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16),
    "AdamSPD fp8/bf16": dict(exp_avg_dtype=torch.float8_e4m3fn, exp_avg_sq_dtype=torch.bfloat16),
}


def spd_curve(pre, few, evaluate, grid: Grid, lr: float, seed: int, moments: Optional[dict] = None,
              record: bool = False):
    """Final models along lambda; with ``record``, the per-layer projections of the ``record_lambda`` run."""
    points, projections = [], None
    for lam in sorted(grid.spd_lambda):
        model = copy_of(pre)
        opt = AdamSPD(model.named_parameters(), lr=lr, weight_decay=lam, cap_projection=lam > CAP_ABOVE,
                      **(moments or {}))
        fired: List[List[float]] = []
        watch = record and lam == grid.record_lambda
        after = (lambda o: fired.append([float(s["projected"]) for s in o.spd_stats().values()])) if watch else None
        train(model, opt, few, grid.finetune_steps, seed, after_step=after)
        points.append(evaluate(model, lam))
        if watch:
            projections = dict(method=f"AdamSPD lambda={lam:g}", seed=seed, layers=list(opt.spd_stats()),
                               fired=[list(col) for col in zip(*fired)])
    return Curve(f"uncapped up to lambda={CAP_ABOVE:g}, capped above", "lambda", points), projections


def run_seed(pre: SmallCNN, few, evaluate: Evaluator, grid: Grid, lr: float, seed: int,
             formats: Sequence[str] = (), log: Callable[[str], None] = lambda s: None) -> SeedResult:
    """Every method's curves for one seed's pre-trained model."""
    record = seed == 0
    curves: Dict[str, List[Curve]] = {}
    curves["AdamW"], tuned = adamw_curves(pre, few, evaluate, grid, lr, seed)
    curves["WiSE-FT"] = [wise_ft_curve(pre, tuned, evaluate, grid)]
    curves["LP-FT"] = [lp_ft_curve(pre, few, evaluate, grid, lr, seed)]
    curves["L2-SP"] = [l2sp_curve(pre, few, evaluate, grid, lr, seed)]
    log("AdamW, WiSE-FT, LP-FT, L2-SP done")
    spd, projections = spd_curve(pre, few, evaluate, grid, lr, seed, record=record)
    curves["AdamSPD"] = [spd]
    for name in formats:  # FORMAT_RUNS' names, each its own frontier
        curves[name] = [spd_curve(pre, few, evaluate, grid, lr, seed, moments=FORMAT_RUNS[name])[0]]
    return SeedResult(seed, evaluate(pre, 0.0), curves, projections)
