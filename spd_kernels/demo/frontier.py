"""OOD accuracy at matched ID accuracy: reading each method's frontier at fixed ID gains.

A method's curve is the polyline through its measured (ID, OOD) points in knob
order. At a target ID the method's OOD is read off every segment of every one
of its curves that spans that ID (linear interpolation) and the best is kept:
the upper envelope, the OOD the method can keep at that ID by choosing its
knob. Targets are fractions of the ID gain that plain fine-tuning buys on
that seed (AdamW's first curve, final model: the theta_ft of WiSE-FT): ID =
pre-trained ID + f * (theta_ft's ID - pre-trained ID). The headroom differs
a lot between seeds (pre-trained models at 78-88% ID), so a fixed number of
points would read some seeds near their ceiling and others far below. A method that
never reaches a target on a seed has no value there (``n`` counts the seeds
that do). Methods with more curves (AdamW: one per weight decay) get more
segments to choose from; that favours them, never SPD.
"""
from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Sequence

from .methods import Curve, SeedResult

LEVELS = (0.5, 0.75, 0.9)  # fractions of theta_ft's ID gain over the pre-trained model
BASELINE = "AdamW"


def ood_at_id(curves: Sequence[Curve], target: float) -> Optional[float]:
    best = None
    for curve in curves:
        pts = curve.points
        segments = list(zip(pts, pts[1:])) or [(pts[0], pts[0])]
        for a, b in segments:
            lo, hi = sorted((a.id_acc, b.id_acc))
            if not lo <= target <= hi:
                continue
            if hi == lo:
                ood = max(a.ood_acc, b.ood_acc)
            else:
                ood = a.ood_acc + (b.ood_acc - a.ood_acc) * (target - a.id_acc) / (b.id_acc - a.id_acc)
            best = ood if best is None else max(best, ood)
    return best


def spread(values: List[float]) -> dict:
    """Mean, sample std and count (std 0 for fewer than two values; None mean for none)."""
    if not values:
        return dict(mean=None, std=None, n=0)
    return dict(mean=statistics.mean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                n=len(values))


def tuned_gain(seed: SeedResult) -> float:
    """ID points that plain fine-tuning (AdamW's first curve, its final model) gains on this seed."""
    return seed.curves[BASELINE][0].points[-1].id_acc - seed.pretrained.id_acc


def target_id(seed: SeedResult, fraction: float) -> float:
    return seed.pretrained.id_acc + fraction * tuned_gain(seed)


def matched_table(seeds: List[SeedResult], levels: Sequence[float] = LEVELS) -> List[dict]:
    """One row per method: OOD at each ID level over seeds, and its paired difference from AdamW."""
    methods = list(dict.fromkeys(m for s in seeds for m in s.curves))
    rows = [dict(method="pre-trained", best_id_gain=spread([0.0] * len(seeds)),
                 id=spread([s.pretrained.id_acc for s in seeds]), ood=spread([s.pretrained.ood_acc for s in seeds]),
                 tuned_gain=spread([tuned_gain(s) for s in seeds]), levels=[])]
    for method in methods:
        row = dict(method=method, levels=[],
                   best_id_gain=spread([max(p.id_acc for c in s.curves[method] for p in c.points) - s.pretrained.id_acc
                                        for s in seeds]))
        for fraction in levels:
            ours: Dict[int, float] = {}
            paired: List[float] = []
            for s in seeds:
                target = target_id(s, fraction)
                value = ood_at_id(s.curves[method], target)
                if value is None:
                    continue
                ours[s.seed] = value
                base = ood_at_id(s.curves[BASELINE], target)
                if base is not None:
                    paired.append(value - base)
            row["levels"].append(dict(fraction=fraction, ood=spread(list(ours.values())), delta=spread(paired),
                                      per_seed=ours))
        rows.append(row)
    return rows


def band(seeds: List[SeedResult], method: str, fractions: Sequence[float]) -> List[Optional[dict]]:
    """Mean and std over seeds of the OOD change from the pre-trained model at each ID level,
    where every seed reaches it (for the plot: each seed's own OOD level taken out)."""
    out = []
    for fraction in fractions:
        values = [ood_at_id(s.curves[method], target_id(s, fraction)) for s in seeds]
        ok = all(v is not None for v in values)
        out.append(spread([v - s.pretrained.ood_acc for v, s in zip(values, seeds)]) if ok else None)
    return out
