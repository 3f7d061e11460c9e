"""The reference backend: ``spd_kernels.reference`` over a bucket, one tensor at a time.

Runs any floating-point dtype, layout and device, so ``impl='auto'`` falls back
to it for whatever the fused kernels do not take. It reads each tensor's
condition c on the host, so it cannot be traced by torch.compile.
"""
from __future__ import annotations

from typing import Callable, List

import torch
from torch import Tensor

from ..bucket import Bucket
from ..reference import adam_q_, reference_step, spd_finalize, spd_project_, spd_sums
from .record import Backend, eager_only


@eager_only(reason=(
    "AdamSPD: the reference backend branches on each tensor's c < 0 on the host and cannot be traced; "
    "a compiled step needs impl='cpu' or impl='triton' (fp32/bf16/fp16 contiguous params), "
    "or compile without fullgraph=True and the reference runs eagerly"
))
def run(bucket: Bucket) -> Tensor:
    if bucket.skipped():
        return bucket.last_stats()
    return reference_step(
        bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs, bucket.max_exp_avg_sqs,
        bucket.anchors, bucket.steps, bucket.hp, bucket.grad_scale, bucket.exp_avg_scales,
        bucket.exp_avg_sq_scales, bucket.formats, bucket.index_offsets,
    )


def start(bucket: Bucket) -> Callable[[], Tensor]:
    """Split step: the Adam half and each tensor's local sums now, the projection in ``finish``."""
    if bucket.skipped():
        bucket.sums.zero_()  # still joins the all-reduce: the other ranks skip too
        return bucket.last_stats
    hp = bucket.hp
    anchors = bucket.anchors or [None] * len(bucket)
    m_absmax = bucket.exp_avg_scales or [None] * len(bucket)
    v_absmax = bucket.exp_avg_sq_scales or [None] * len(bucket)
    qs: List[Tensor] = []
    for i, param in enumerate(bucket.params):
        p, g, q = adam_q_(
            param, bucket.grads[i], bucket.exp_avgs[i], bucket.exp_avg_sqs[i],
            bucket.max_exp_avg_sqs[i] if hp.amsgrad else None, bucket.steps[i], hp, bucket.grad_scale,
            m_absmax[i], v_absmax[i], bucket.formats, bucket.index_offsets[i] if bucket.index_offsets else 0,
        )
        bucket.sums[i] = spd_sums(p, g, q, anchors[i])
        qs.append(q)

    def finish() -> Tensor:
        rows = []
        for i, (param, q) in enumerate(zip(bucket.params, qs)):
            row = spd_finalize(bucket.sums[i], hp)
            spd_project_(param, q, anchors[i], row)
            rows.append(row.float())
        return torch.stack(rows)

    return finish


BACKEND = Backend(name="reference", run=run, start=start, formats=("fp32", "bf16", "fp8", "bnb8"))
