"""Per-tensor SPD statistics: the row layout every backend writes.

A backend returns one fp32 row per tensor of its bucket, on the tensors'
device, with these columns:

    STAT_C         c = -sum(g * (p - a)), with p before the step
    STAT_NORM_P_A  ||p - a||  (p before the step)
    STAT_NORM_Q_A  ||q - a||  (q = the plain Adam step)
    STAT_R         r = clamp((||q-a|| - ||p-a||) / ||q-a||, 0, 1) when c < 0, else 0
    STAT_SCALE     s = lam * r when c < 0, else 0; the step applied p = q - s * (q - a)

The condition fired ("projected") exactly when c < 0.
"""
from __future__ import annotations

STAT_C = 0
STAT_NORM_P_A = 1
STAT_NORM_Q_A = 2
STAT_R = 3
STAT_SCALE = 4
NUM_STATS = 5

STAT_NAMES = ("c", "norm_p_a", "norm_q_a", "r", "scale")


def to_log_dict(stats, prefix: str = "spd/") -> dict:
    """Plain floats from ``AdamSPD.spd_stats()``, for a logger (this is where it syncs, once).

    Keys: ``{prefix}{name}/{stat}`` per layer, plus ``{prefix}projected_fraction``
    (share of layers whose condition fired in the last step).
    """
    import torch

    keys, values = [], []
    for name, entry in stats.items():
        for stat, value in entry.items():
            keys.append(f"{prefix}{name}/{stat}")
            values.append(value.float().reshape(()))
    if not values:
        return {}
    flat = torch.stack([v.cpu() for v in values]).tolist()
    out = dict(zip(keys, flat))
    fired = [out[f"{prefix}{name}/projected"] for name in stats]
    out[f"{prefix}projected_fraction"] = sum(fired) / len(fired)
    return out
