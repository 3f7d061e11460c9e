"""The fused Triton backend (``spd_kernels.ops``): CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1`` (the real kernels, slowly, for testing).

Takes contiguous fp32/bf16/fp16 tensors. Keeps ``step`` on the device (the
kernels read and increment it there: no host sync) and counts projections in
its finalize, with no extra launch. Triton is imported on first use, after a
command line has had the chance to set ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch
from torch import Tensor

from ..bucket import Bucket
from .record import FLOAT_STORAGE, Backend


@functools.lru_cache(maxsize=None)
def unavailable() -> str:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # any import failure means "not available"
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return ""


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_on(device: torch.device) -> bool:
    """True when the Triton kernels can run on tensors of ``device``."""
    if unavailable():
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreter_on())


def device_error(device: torch.device) -> str:
    if device.type == "cuda" or (device.type == "cpu" and interpreter_on()):
        return ""
    hint = (" (TRITON_INTERPRET=1 runs the kernels on CPU tensors, slowly, for testing)"
            if device.type == "cpu" else "")
    return f"impl='triton' needs a CUDA device, got a param on {device}{hint}"


def run(bucket: Bucket) -> Tensor:
    if torch.compiler.is_compiling():
        # Dynamo cannot trace the launcher's pointer tables: the compiled graph calls an opaque op
        from ..ops.triton_custom_op import run_bucket

        return run_bucket(bucket)
    from ..ops.adam_spd import adam_spd_triton_step

    return adam_spd_triton_step(bucket)


def start(bucket: Bucket) -> Callable[[], Tensor]:
    from ..ops.adam_spd import adam_spd_triton_partials

    return adam_spd_triton_partials(bucket)


BACKEND = Backend(
    name="triton", run=run, start=start, unavailable=unavailable, device_error=device_error,
    auto_devices=("cuda",), dtypes=FLOAT_STORAGE, contiguous_only=True,
    step_on_device=True, counts_projections=True, formats=("fp32", "bf16", "fp8", "bnb8"),
)
