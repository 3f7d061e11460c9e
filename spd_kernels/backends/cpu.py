"""The compiled CPU kernel backend (``csrc/adam_spd_cpu.cpp`` through ``spd_kernels._cpu``).

Takes contiguous fp32/bf16/fp16 CPU tensors. The extension is loaded on first
use; when it is missing (or built against another torch) the backend reports
itself unavailable and ``impl='auto'`` warns once and uses the reference.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..bucket import Bucket
from .record import FLOAT_STORAGE, Backend


def unavailable() -> str:
    from .. import _cpu

    error = _cpu.load_error()
    return (f"the compiled CPU kernel is not available ({error}); "
            "rebuild it with `pip install --no-build-isolation -e .`") if error else ""


def device_error(device: torch.device) -> str:
    return "" if device.type == "cpu" else f"impl='cpu' runs CPU tensors only, got a param on {device}"


def run(bucket: Bucket) -> Tensor:
    from .._cpu import adam_spd_cpu_step

    return adam_spd_cpu_step(bucket)


def start(bucket: Bucket) -> Callable[[], Tensor]:
    from .._cpu import adam_spd_cpu_partials

    return adam_spd_cpu_partials(bucket)


BACKEND = Backend(
    name="cpu", run=run, start=start, unavailable=unavailable, device_error=device_error,
    auto_devices=("cpu",), dtypes=FLOAT_STORAGE, contiguous_only=True, formats=("fp32", "bf16", "fp8", "bnb8"),
)
