"""The pure-PyTorch oracle for one AdamSPD step (DESIGN.md section 1).

A per-tensor loop written to be read, not to be fast: every backend is tested
against it. For one parameter tensor ``p`` ("layer") with gradient ``g`` and
anchor ``a`` (the frozen pre-trained copy; ``a = 0`` in anchor-free mode)::

    t  += 1;  bc1 = 1 - b1^t;  bc2 = 1 - b2^t
    m   = b1*m + (1-b1)*g
    v   = b2*v + (1-b2)*g*g          (amsgrad: vmax = max(vmax, v); use vmax)
    q   = p - (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)
    c   = -sum(g * (p - a))          # p BEFORE the step
    if c < 0:
        r = clamp((||q-a|| - ||p-a||) / ||q-a||, 0, 1)   # r = 0 if ||q-a|| = 0
        q = q - lam * r * (q - a)    # lam is weight_decay, not scaled by lr
                                     # (optional cap: lam * r <= max_scale)
    p = q

All math is fp32 (or the parameter's dtype when that is wider), whatever the
storage dtype: bf16/fp16 parameters are loaded, updated in fp32 and rounded
once on store. The three reductions accumulate in fp64. The Adam part uses the same operations in the same order as
``torch.optim.Adam(foreach=False)``, so with ``lam = 0`` an fp32 run matches it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .stats import NUM_STATS, STAT_C, STAT_NORM_P_A, STAT_NORM_Q_A, STAT_R, STAT_SCALE


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in for a tensor stored as ``dtype``: fp32 or wider."""
    return torch.promote_types(dtype, torch.float32)


def adam_spd_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Optional[Tensor],
    anchor: Optional[Tensor],
    step: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    max_scale: float = math.inf,
    grad_scale: Optional[Tensor] = None,
) -> Tensor:
    """One AdamSPD step of one tensor, in place. Returns its stats row.

    ``max_scale`` caps s = lam * r (1.0: a projection never moves past the anchor).
    ``grad_scale`` (AMP) divides the grad first, as ``GradScaler.unscale_`` would.

    ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` hold the moments in the
    compute dtype; ``step`` is a 0-d tensor incremented here. The returned
    1-d tensor has ``NUM_STATS`` entries (see ``spd_kernels.stats``).
    """
    cdt = compute_dtype(param.dtype)
    step += 1
    t = float(step.item())
    bias_correction1 = 1.0 - beta1**t
    bias_correction2 = 1.0 - beta2**t

    p = param.detach().to(cdt)
    g = grad.to(cdt)
    if grad_scale is not None:
        # GradScaler.unscale_ multiplies by the fp32 reciprocal computed in fp64
        g = g * grad_scale.double().reciprocal().to(cdt)

    # Adam, as torch.optim.Adam's single-tensor path writes it.
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    if amsgrad:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    else:
        second_moment = exp_avg_sq
    denom = (second_moment.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    q = p.addcdiv(exp_avg, denom, value=-(lr / bias_correction1))

    # Selective projection: the three reductions use p before the step. They are
    # accumulated in fp64 so the oracle is more accurate than any backend's sums.
    a = anchor.to(cdt) if anchor is not None else torch.zeros((), dtype=cdt, device=p.device)
    p_minus_a = p - a
    q_minus_a = q - a
    acc = torch.promote_types(cdt, torch.float64)
    condition = -(g.to(acc) * p_minus_a.to(acc)).sum()
    norm_p_a = torch.linalg.vector_norm(p_minus_a.to(acc))
    norm_q_a = torch.linalg.vector_norm(q_minus_a.to(acc))

    ratio = torch.zeros((), dtype=acc, device=p.device)
    scale = torch.zeros((), dtype=acc, device=p.device)
    if condition < 0:
        if norm_q_a > 0:
            ratio = ((norm_q_a - norm_p_a) / norm_q_a).clamp(0.0, 1.0)
        scale = (weight_decay * ratio).clamp(max=max_scale)
        q = q - scale.to(cdt) * q_minus_a

    param.copy_(q)
    stats = torch.empty(NUM_STATS, dtype=torch.float32, device=p.device)
    stats[STAT_C] = condition
    stats[STAT_NORM_P_A] = norm_p_a
    stats[STAT_NORM_Q_A] = norm_q_a
    stats[STAT_R] = ratio
    stats[STAT_SCALE] = scale
    return stats


def reference_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Optional[Sequence[Tensor]],
    anchors: Optional[Sequence[Tensor]],
    steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    max_scale: float = math.inf,
    grad_scale: Optional[Tensor] = None,
) -> Tensor:
    """The reference over a list of tensors: returns stats of shape ``[n, NUM_STATS]``."""
    if isinstance(lr, Tensor):
        lr = float(lr.item())
    rows = []
    for i, param in enumerate(params):
        rows.append(
            adam_spd_step_(
                param,
                grads[i],
                exp_avgs[i],
                exp_avg_sqs[i],
                max_exp_avg_sqs[i] if amsgrad else None,
                anchors[i] if anchors is not None else None,
                steps[i],
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=weight_decay,
                amsgrad=amsgrad,
                max_scale=max_scale,
                grad_scale=grad_scale,
            )
        )
    if not rows:
        return torch.empty((0, NUM_STATS), dtype=torch.float32)
    return torch.stack(rows)
