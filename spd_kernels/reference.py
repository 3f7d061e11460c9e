"""The pure-PyTorch oracle for one AdamSPD step (docs/design.md, "The algorithm").

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
once on store.

Compressed moments (``spd_kernels.formats``: bf16, block-scaled fp8, bitsandbytes'
8-bit): each step decodes them to fp32, updates in fp32, computes q from the fp32
moments, then stores them back in their format. As the moments are not kept in
fp32, q is kept in the param's storage dtype (a no-op for fp32 params), so a
kernel can store it and project it later. The three reductions accumulate in fp64. The Adam part uses the same operations in the same order as
``torch.optim.Adam(foreach=False)``, so with ``lam = 0`` an fp32 run matches it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import formats as moment_formats
from .hyperparameters import Hyperparameters
from .stats import NUM_STATS, STAT_C, STAT_NORM_P_A, STAT_NORM_Q_A, STAT_R, STAT_SCALE


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in for a tensor stored as ``dtype``: fp32 or wider."""
    return torch.promote_types(dtype, torch.float32)


def adam_q_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Optional[Tensor],
    step: Tensor,
    hp: Hyperparameters,
    grad_scale: Optional[Tensor] = None,
    exp_avg_scale: Optional[Tensor] = None,
    exp_avg_sq_scale: Optional[Tensor] = None,
    formats: Tuple[str, str] = ("fp32", "fp32"),
    index_offset: int = 0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The Adam half of a step: increments ``step``, updates the moments in place
    and returns ``(p, g, q)`` in the compute dtype (p before the step, the
    unscaled grad, the plain Adam step). ``param`` itself is not written.

    ``formats`` names the moments' formats (``spd_kernels.formats``); compressed ones, with their
    per-block ``exp_avg_scale``/``exp_avg_sq_scale`` where they have them, are updated through
    fp32 and stored back; ``index_offset`` is where ``param`` starts in its whole flattened tensor
    (a shard's start: stochastic rounding's element index)."""
    cdt = compute_dtype(param.dtype)
    lr, beta1, beta2 = hp.lr_value(), hp.beta1, hp.beta2
    step += 1
    t = float(step.item())
    bias_correction1 = 1.0 - beta1**t
    bias_correction2 = 1.0 - beta2**t

    p = param.detach().to(cdt)
    g = grad.to(cdt)
    if grad_scale is not None:
        # GradScaler.unscale_ multiplies by the fp32 reciprocal computed in fp64
        g = g * grad_scale.double().reciprocal().to(cdt)

    fmts = [moment_formats.FORMATS[name] for name in formats]
    codes, scales = (exp_avg, exp_avg_sq), (exp_avg_scale, exp_avg_sq_scale)
    exp_avg, exp_avg_sq = (fmt.decode(c, sc, k) for k, (fmt, c, sc) in enumerate(zip(fmts, codes, scales)))
    # Adam, as torch.optim.Adam's single-tensor path writes it.
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    if hp.amsgrad:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    else:
        second_moment = exp_avg_sq
    denom = (second_moment.sqrt() / math.sqrt(bias_correction2)).add_(hp.eps)
    q = p.addcdiv(exp_avg, denom, value=-(lr / bias_correction1))
    for k, (fmt, value) in enumerate(zip(fmts, (exp_avg, exp_avg_sq))):
        fmt.encode_(codes[k], scales[k], value, k, int(t), index_offset)
    if any(fmt.coded for fmt in fmts):
        q = q.to(param.dtype).to(cdt)
    return p, g, q


def _minus_anchor(x: Tensor, anchor: Optional[Tensor]) -> Tensor:
    return x - anchor.to(x.dtype) if anchor is not None else x


def spd_sums(p: Tensor, g: Tensor, q: Tensor, anchor: Optional[Tensor]) -> Tensor:
    """The three sums SPD needs, in fp64: ``[sum g*(p-a), ||p-a||^2, ||q-a||^2]``.

    They add over pieces of a tensor: the sums of a sharded tensor are the sum
    of its shards' sums (accumulated in fp64 so the oracle is more accurate than
    any backend)."""
    acc = torch.promote_types(p.dtype, torch.float64)
    d = _minus_anchor(p, anchor).to(acc)
    e = _minus_anchor(q, anchor).to(acc)
    return torch.stack([(g.to(acc) * d).sum(), (d * d).sum(), (e * e).sum()])


def spd_finalize(sums: Tensor, hp: Hyperparameters) -> Tensor:
    """The stats row (``spd_kernels.stats`` layout) of a tensor from its three
    whole-tensor sums, in the sums' dtype (the backends' rows are fp32)."""
    condition = -sums[0]
    norm_p_a = sums[1].sqrt()
    norm_q_a = sums[2].sqrt()
    ratio = torch.zeros((), dtype=sums.dtype, device=sums.device)
    scale = torch.zeros((), dtype=sums.dtype, device=sums.device)
    if condition < 0:
        if norm_q_a > 0:
            ratio = ((norm_q_a - norm_p_a) / norm_q_a).clamp(0.0, 1.0)
        scale = (hp.weight_decay * ratio).clamp(max=hp.max_scale)
    stats = torch.empty(NUM_STATS, dtype=sums.dtype, device=sums.device)
    stats[STAT_C] = condition
    stats[STAT_NORM_P_A] = norm_p_a
    stats[STAT_NORM_Q_A] = norm_q_a
    stats[STAT_R] = ratio
    stats[STAT_SCALE] = scale
    return stats


def spd_project_(param: Tensor, q: Tensor, anchor: Optional[Tensor], stats: Tensor) -> None:
    """``param = q - s*(q - a)`` with s from ``stats`` (no change to q when s = 0)."""
    scale = stats[STAT_SCALE]
    if scale != 0:
        q = q - scale.to(q.dtype) * _minus_anchor(q, anchor)
    param.copy_(q)


def adam_spd_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Optional[Tensor],
    anchor: Optional[Tensor],
    step: Tensor,
    hp: Hyperparameters,
    grad_scale: Optional[Tensor] = None,
    exp_avg_scale: Optional[Tensor] = None,
    exp_avg_sq_scale: Optional[Tensor] = None,
    formats: Tuple[str, str] = ("fp32", "fp32"),
    index_offset: int = 0,
) -> Tensor:
    """One AdamSPD step of one tensor, in place, with the settings ``hp``. Returns its stats row.

    ``hp.max_scale`` caps s = lam * r (1.0: a projection never moves past the anchor).
    ``grad_scale`` (AMP) divides the grad first, as ``GradScaler.unscale_`` would.

    ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` hold the moments in the
    compute dtype; ``step`` is a 0-d tensor incremented here. The returned
    1-d tensor has ``NUM_STATS`` entries (see ``spd_kernels.stats``).
    """
    p, g, q = adam_q_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, hp, grad_scale,
                      exp_avg_scale, exp_avg_sq_scale, formats, index_offset)
    # The selective projection: its sums use p before the step.
    stats = spd_finalize(spd_sums(p, g, q, anchor), hp)
    spd_project_(param, q, anchor, stats)
    return stats.float()


def reference_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Optional[Sequence[Tensor]],
    anchors: Optional[Sequence[Tensor]],
    steps: Sequence[Tensor],
    hp: Hyperparameters,
    grad_scale: Optional[Tensor] = None,
    exp_avg_scales: Optional[Sequence[Optional[Tensor]]] = None,
    exp_avg_sq_scales: Optional[Sequence[Optional[Tensor]]] = None,
    formats: Tuple[str, str] = ("fp32", "fp32"),
    index_offsets: Optional[Sequence[int]] = None,
) -> Tensor:
    """The reference over a list of tensors: returns stats of shape ``[n, NUM_STATS]``.

    ``formats`` names the moments' formats (every tensor's); ``exp_avg_scales``/``exp_avg_sq_scales``
    hold one per-block scale per tensor for the formats that have them; ``index_offsets`` where each
    tensor starts in its whole tensor (shards; default 0)."""
    if hp.lr_tensor is not None:
        hp = dataclasses.replace(hp, lr=hp.lr_value())  # read once, not once per tensor
    rows = []
    for i, param in enumerate(params):
        rows.append(
            adam_spd_step_(
                param,
                grads[i],
                exp_avgs[i],
                exp_avg_sqs[i],
                max_exp_avg_sqs[i] if hp.amsgrad else None,
                anchors[i] if anchors is not None else None,
                steps[i],
                hp,
                grad_scale,
                exp_avg_scales[i] if exp_avg_scales else None,
                exp_avg_sq_scales[i] if exp_avg_sq_scales else None,
                formats,
                index_offsets[i] if index_offsets else 0,
            )
        )
    if not rows:
        return torch.empty((0, NUM_STATS), dtype=torch.float32)
    return torch.stack(rows)
