"""Backend registry: which function runs a bucket, and which one ``'auto'`` picks.

Each backend is ``fn(bucket) -> stats`` (see ``spd_kernels.bucket``). The
optimizer only ever talks to this module, never to a kernel directly.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Dict

import torch
from torch import Tensor

from .bucket import Bucket
from .reference import reference_step

IMPLS = ("auto", "reference", "triton", "cpu")

#: storage dtypes the fused kernels take for params and anchors (math is fp32)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def run_reference(bucket: Bucket) -> Tensor:
    if bucket.skipped():
        return bucket.last_stats()
    return reference_step(
        bucket.params,
        bucket.grads,
        bucket.exp_avgs,
        bucket.exp_avg_sqs,
        bucket.max_exp_avg_sqs,
        bucket.anchors,
        bucket.steps,
        lr=bucket.lr,
        beta1=bucket.beta1,
        beta2=bucket.beta2,
        eps=bucket.eps,
        weight_decay=bucket.weight_decay,
        amsgrad=bucket.amsgrad,
        max_scale=bucket.max_scale,
        grad_scale=bucket.grad_scale,
    )


def run_triton(bucket: Bucket) -> Tensor:
    from .ops.adam_spd import adam_spd_triton_step

    return adam_spd_triton_step(bucket)


def run_cpu(bucket: Bucket) -> Tensor:
    from ._cpu import adam_spd_cpu_step

    return adam_spd_cpu_step(bucket)


_RUNNERS: Dict[str, Callable[[Bucket], Tensor]] = {
    "reference": run_reference,
    "triton": run_triton,
    "cpu": run_cpu,
}


def cpu_kernel_error() -> str:
    """Why the compiled CPU kernel cannot be used here, or ''."""
    from . import _cpu

    return _cpu.load_error()


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str:
    """Why Triton cannot be used here, or '' when it can."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # any import failure means "not available"
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return ""


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_runs_on(device: torch.device) -> bool:
    """True when the Triton kernels can run on tensors of ``device``."""
    if triton_import_error():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreter_on()


def fused_supports(param: Tensor, anchor_dtype) -> bool:
    """Whether a fused kernel can take this parameter (dtype and layout)."""
    return (
        param.dtype in FUSED_DTYPES
        and (anchor_dtype is None or anchor_dtype in FUSED_DTYPES)
        and param.is_contiguous()
    )


def choose(impl: str, param: Tensor, anchor_dtype) -> str:
    """The backend that runs ``param`` under the optimizer's ``impl`` setting."""
    if impl != "auto":
        return impl
    if not fused_supports(param, anchor_dtype):
        return "reference"
    if param.device.type == "cuda" and triton_runs_on(param.device):
        return "triton"
    if param.device.type == "cpu":
        if not cpu_kernel_error():
            return "cpu"
        from . import _cpu

        _cpu.warn_fallback()
    return "reference"


def run(name: str, bucket: Bucket) -> Tensor:
    return _RUNNERS[name](bucket)
