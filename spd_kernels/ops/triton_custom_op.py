"""The fused Triton step as a ``torch.library`` custom op, for ``torch.compile``.

Eager ``step()`` calls the launcher in ``adam_spd.py`` directly. Under
``torch.compile`` that launcher cannot be traced: its kernels reach every tensor
through a device table of raw ``data_ptr()`` values, which Dynamo cannot see
through, and for the same reason ``torch.library.triton_op`` / ``wrap_triton``
(which need the compiler to see each tensor a kernel touches) do not apply. So
the compiled step calls this opaque op instead: the graph records which tensors
it mutates, a fake impl gives the stats' shape (both in ``spd_kernels.ops.contract``),
and at run time the op runs the same kernels. The settings travel as one float list, ``hyper``, in
``spd_kernels.hyperparameters.PACKED`` order (as the C++ op takes them); a
tensor ``lr`` is an op input, so changing it recompiles nothing.

Plans (the device tables) are cached by every pointer they hold, since the op,
unlike the optimizer's buckets, cannot know when a state tensor was replaced.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional

import torch
from torch import Tensor

from .. import formats
from ..bucket import Bucket
from ..hyperparameters import Hyperparameters
from . import contract

#: how many bucket plans the op keeps (a model's buckets, several optimizers)
_MAX_PLANS = 64
_plans: "OrderedDict[tuple, object]" = OrderedDict()


def _cached_plan(bucket: Bucket):
    ptr = Tensor.data_ptr
    key = tuple(
        tuple(map(ptr, ts))
        for ts in (bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs,
                   bucket.max_exp_avg_sqs or [], bucket.anchors or [], bucket.steps,
                   bucket.exp_avg_scales or [], bucket.exp_avg_sq_scales or [])
    )
    plan = _plans.get(key)
    if plan is not None:
        _plans.move_to_end(key)
    return key, plan


@torch.library.impl("spd_kernels::adam_spd_triton_step", ("CPU", "CUDA"), lib=contract._lib)
def _triton_step_kernel(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    max_exp_avg_sqs: List[Tensor],
    anchors: List[Tensor],
    steps: List[Tensor],
    exp_avg_scales: List[Tensor],
    exp_avg_sq_scales: List[Tensor],
    index_offsets: List[int],
    counts: Tensor,
    hyper: List[float],
    lr_tensor: Optional[Tensor],
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
) -> Tensor:
    """One fused step of a bucket (empty ``max_exp_avg_sqs``: no amsgrad; empty
    ``anchors``: anchor-free; the moments' dtypes name their formats, empty scale lists for those
    without scales); returns a fresh copy of the stats [n, 5]."""
    from .adam_spd import adam_spd_triton_step

    bucket = Bucket(
        params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
        max_exp_avg_sqs=max_exp_avg_sqs or None, anchors=anchors or None, steps=steps,
        exp_avg_scales=exp_avg_scales or None, exp_avg_sq_scales=exp_avg_sq_scales or None,
        formats=formats.of_codes(exp_avgs[0], exp_avg_sqs[0]) if params else ("fp32", "fp32"),
        index_offsets=list(index_offsets) or None,
        hp=Hyperparameters.from_packed(hyper, amsgrad=bool(max_exp_avg_sqs), lr_tensor=lr_tensor),
        grad_scale=grad_scale, found_inf=found_inf, projections=counts,
    )
    key, bucket.backend_cache = _cached_plan(bucket)
    stats = adam_spd_triton_step(bucket)
    _plans[key] = bucket.backend_cache
    while len(_plans) > _MAX_PLANS:
        _plans.popitem(last=False)
    # the plan's stats buffer is reused by the next step: an op output must be its own
    return stats.clone()


#: the op (schema and fake impl in ``spd_kernels.ops.contract``; CUDA, or CPU under the interpreter)
adam_spd_triton_step_op = torch.ops.spd_kernels.adam_spd_triton_step


def run_bucket(bucket: Bucket) -> Tensor:
    """The compiled step's call: the bucket's tensors through the op."""
    hp = bucket.hp
    counts = bucket.projections
    if counts is None:
        counts = torch.zeros(len(bucket), dtype=torch.float32, device=bucket.device)
    return adam_spd_triton_step_op(
        bucket.params, bucket.grads, bucket.exp_avgs, bucket.exp_avg_sqs,
        bucket.max_exp_avg_sqs if hp.amsgrad else [], bucket.anchors if bucket.anchors is not None else [],
        bucket.steps, bucket.exp_avg_scales or [], bucket.exp_avg_sq_scales or [], bucket.index_offsets or [],
        counts, hp.packed(),
        hp.lr_tensor, bucket.grad_scale, bucket.found_inf,
    )
