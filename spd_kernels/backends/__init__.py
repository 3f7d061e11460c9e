"""The backend registry: every backend's record, and which one ``impl='auto'`` picks.

A backend is one module that builds one ``Backend`` record (``record.py``: what
it takes, where ``step`` lives, who counts projections, its whole and split
entry points); ``REGISTRY`` below is the one place they are registered. The
optimizer, ``verify``, ``bench`` and the tests all ask this module, never a
kernel, as torch's ``OptimizerInfo.supported_impls`` drives its optimizer tests.
"""
from __future__ import annotations

import functools
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import cpu, reference, triton
from .record import FLOAT_STORAGE, Backend, eager_only, make_eager_only

#: every backend, in the order impl='auto' considers them (the reference, which takes anything, last)
REGISTRY: Dict[str, Backend] = {b.name: b for b in (triton.BACKEND, cpu.BACKEND, reference.BACKEND)}

#: what ``AdamSPD(impl=...)`` accepts
IMPLS = ("auto", *REGISTRY)

__all__ = ["Backend", "FLOAT_STORAGE", "IMPLS", "REGISTRY", "available", "choose", "eager_only", "get",
           "make_eager_only"]


def get(name: str) -> Backend:
    return REGISTRY[name]


def available(device: torch.device) -> List[str]:
    """Names of the backends that can run tensors on ``device`` in this process, in registry order."""
    device = torch.device(device)
    return [name for name, b in REGISTRY.items() if not b.unavailable() and not b.device_error(device)]


@functools.lru_cache(maxsize=None)
def _warn_fallback(name: str, reason: str) -> None:
    warnings.warn(
        f"spd_kernels: impl='auto' would run {name!r} here, but {reason}; "
        "AdamSPD runs these tensors on the slow reference.",
        RuntimeWarning,
        stacklevel=4,
    )


def choose(impl: str, param: Tensor, anchor_dtype: Optional[torch.dtype],
           formats: Tuple[str, str] = ("fp32", "fp32")) -> Backend:
    """The backend that runs ``param`` (a local tensor) with moments in ``formats``
    under the optimizer's ``impl`` setting.

    For ``'auto'``: the first registered backend meant for the param's device type
    that takes its dtypes and layout and can run here; one whose library is
    missing is passed over with one warning.
    """
    if impl != "auto":
        return REGISTRY[impl]
    for backend in REGISTRY.values():
        if backend.auto_devices is not None and param.device.type not in backend.auto_devices:
            continue
        layout = backend.layout_error(param, anchor_dtype, formats)
        if layout:
            if backend.format_error(formats):  # a format it lacks, not a tensor it never takes: say so
                _warn_fallback(backend.name, layout)
            continue
        reason = backend.unavailable() or backend.device_error(param.device)
        if reason:
            _warn_fallback(backend.name, reason)
            continue
        return backend
    raise AssertionError("the registry ends with a backend that takes any tensor")
