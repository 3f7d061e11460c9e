"""Loader for the compiled CPU kernel (csrc/adam_spd_cpu.cpp, built by setup.py).

Importing ``spd_kernels._C`` registers the CPU kernels of ``torch.ops.spd_kernels.adam_spd_step``,
``adam_spd_partials`` and ``adam_spd_project``, whose schemas and fakes ``spd_kernels.ops.contract``
defines.
When the extension is missing or was built against another torch, ``import
spd_kernels`` still works: ``load_error()`` says why, and the backend registry
reports the CPU backend unavailable (``impl='auto'`` warns once and uses the
reference).

Loading also sets which cache the AVX-512 steps prefetch into (``spd_kernels.cpu_prefetch``).

The ops take the step's float settings as one list, ``hyper``, in
``spd_kernels.hyperparameters.PACKED`` order (the C++ ``HP_*`` slots).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from .bucket import Bucket
from . import cpu_prefetch, quantization
from .hyperparameters import PACKED


@functools.lru_cache(maxsize=None)
def load_error() -> str:
    """'' when the CPU kernel is loaded, else why it is not."""
    from .ops import contract  # noqa: F401  (the ops' schemas and fakes: the build registers kernels for them)

    try:
        from . import _C  # noqa: F401
    except Exception as exc:  # missing file, ABI mismatch with this torch, ...
        return f"{type(exc).__name__}: {exc}"
    if not hasattr(torch.ops.spd_kernels, "hyperparameter_names"):
        return "spd_kernels._C is an older build (no hyperparameter_names op)"
    names = tuple(torch.ops.spd_kernels.hyperparameter_names())
    if names != PACKED:
        return f"spd_kernels._C reads hyper as {names}, this spd_kernels packs {PACKED} (an older build?)"
    if not hasattr(torch.ops.spd_kernels, "set_prefetch_level"):
        return "spd_kernels._C is an older build (no set_prefetch_level op)"
    # the cache the AVX-512 steps prefetch into (a bad SPD_KERNELS_CPU_PREFETCH raises here, loudly)
    torch.ops.spd_kernels.set_prefetch_level(cpu_prefetch.LEVELS[cpu_prefetch.configured_level()])
    return ""


@functools.lru_cache(maxsize=None)
def qmaps() -> Tensor:
    """The two 8-bit maps as the ops take them: fp32 [2, 256], signed (first moment) then unsigned."""
    return quantization.maps()


def _state_args(bucket: Bucket):
    """The state lists after ``steps`` in the ops' schemas: each moment's per-block scales (empty for
    a format without) and, for bitsandbytes' format, the maps. The moments' dtypes name their formats."""
    return (bucket.exp_avg_scales or [], bucket.exp_avg_sq_scales or [],
            qmaps() if "bnb8" in bucket.formats else None)


def _offsets(bucket: Bucket):
    """Where each tensor's shard starts in its whole tensor (stochastic rounding's index), or [] (all 0)."""
    return bucket.index_offsets or []


def _host_args(bucket: Bucket):
    """(hyper, lr_tensor, 1/grad_scale, contiguous grads) as the ops take them.

    A tensor lr goes to the op as it is (read there, on the CPU): under
    torch.compile it stays a graph input, so changing it recompiles nothing.
    """
    lr_tensor = bucket.hp.lr_tensor
    if lr_tensor is not None:
        lr_tensor = lr_tensor.detach().reshape(()).to("cpu")
    # GradScaler.unscale_ multiplies by the fp32 reciprocal computed in fp64
    inv_scale = 1.0 if bucket.grad_scale is None else float(bucket.grad_scale.double().reciprocal().float())
    grads = bucket.grads
    if not all(map(Tensor.is_contiguous, grads)):
        grads = [g.contiguous() for g in grads]
    return bucket.hp.packed(), lr_tensor, inv_scale, grads


def adam_spd_cpu_step(bucket: Bucket) -> Tensor:
    """One AdamSPD step of a bucket of CPU tensors with the compiled kernel; returns stats [n, 5]."""
    if bucket.skipped():  # found_inf lives on the CPU here: reading it syncs nothing
        return bucket.last_stats()
    hyper, lr_tensor, inv_scale, grads = _host_args(bucket)
    return torch.ops.spd_kernels.adam_spd_step(
        bucket.params, grads, bucket.exp_avgs, bucket.exp_avg_sqs,
        bucket.max_exp_avg_sqs if bucket.hp.amsgrad else [],
        bucket.anchors if bucket.anchors is not None else [],
        bucket.steps, *_state_args(bucket), _offsets(bucket), hyper, inv_scale, lr_tensor,
    )


def adam_spd_cpu_partials(bucket: Bucket) -> Callable[[], Tensor]:
    """Split step: Adam and each tensor's local sums into ``bucket.sums`` now;
    the returned ``finish()`` projects from the all-reduced sums and returns the stats."""
    if bucket.skipped():
        bucket.sums.zero_()  # still joins the all-reduce: the other ranks skip too
        return bucket.last_stats
    hyper, lr_tensor, inv_scale, grads = _host_args(bucket)
    max_exp_avg_sqs = bucket.max_exp_avg_sqs if bucket.hp.amsgrad else []
    anchors = bucket.anchors if bucket.anchors is not None else []
    torch.ops.spd_kernels.adam_spd_partials(
        bucket.params, grads, bucket.exp_avgs, bucket.exp_avg_sqs, max_exp_avg_sqs, anchors, bucket.steps,
        *_state_args(bucket), _offsets(bucket), hyper, inv_scale, bucket.sums, lr_tensor,
    )

    def finish() -> Tensor:
        return torch.ops.spd_kernels.adam_spd_project(
            bucket.params, bucket.exp_avgs, bucket.exp_avg_sqs, max_exp_avg_sqs, anchors, bucket.steps,
            *_state_args(bucket), bucket.sums, hyper, lr_tensor,
        )

    return finish

