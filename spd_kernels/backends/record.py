"""What a backend is: one record of what it takes and how it runs a bucket.

The optimizer asks a backend's record (``Backend``) what it can do and never
compares names: whether it takes a tensor (device, dtypes, layout), whether it
keeps ``step`` on the device, whether it counts projections itself, and its two
entry points over a ``spd_kernels.bucket.Bucket``:

- ``run(bucket) -> stats``: a whole step;
- ``start(bucket) -> finish``: the split step of sharded tensors, around the
  caller's all-reduce of ``bucket.sums``; ``finish() -> stats``.

Each backend module builds its record once; ``spd_kernels.backends`` registers them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..bucket import Bucket

#: the storage dtypes the fused kernels take for params and anchors (math is fp32)
FLOAT_STORAGE = (torch.float32, torch.bfloat16, torch.float16)


def _no_error(*_args) -> str:
    return ""


@dataclass(frozen=True)
class Backend:
    name: str
    run: Callable[[Bucket], Tensor]
    start: Callable[[Bucket], Callable[[], Tensor]]
    #: why it cannot run at all in this process ('' when it can), e.g. a missing compiled library
    unavailable: Callable[[], str] = _no_error
    #: why it cannot run tensors on a device ('' when it can)
    device_error: Callable[[torch.device], str] = _no_error
    #: device types that impl='auto' hands to it (in registry order); None: any, as the last resort
    auto_devices: Optional[Tuple[str, ...]] = None
    #: storage dtypes it takes for params and anchors; None: any floating-point dtype
    dtypes: Optional[Tuple[torch.dtype, ...]] = None
    #: whether it needs contiguous params
    contiguous_only: bool = False
    #: the moment formats it runs, by name (``spd_kernels.formats``)
    formats: Tuple[str, ...] = ("fp32",)
    #: whether it keeps each param's ``step`` on the param's device (else on the CPU, as torch.optim.Adam)
    step_on_device: bool = False
    #: whether it adds the fired flags to ``bucket.projections`` itself (else the optimizer does, from the stats)
    counts_projections: bool = False

    def format_error(self, formats: Tuple[str, str] = ("fp32", "fp32")) -> str:
        """Why it cannot run moments in ``formats`` (exp_avg's, exp_avg_sq's), or ''."""
        missing = [name for name in formats if name not in self.formats]
        if not missing:
            return ""
        return (f"impl={self.name!r} does not run {'/'.join(dict.fromkeys(missing))} moments (yet; it runs "
                f"{', '.join(self.formats)})")

    def layout_error(self, param: Tensor, anchor_dtype: Optional[torch.dtype],
                     formats: Tuple[str, str] = ("fp32", "fp32")) -> str:
        """Why it cannot take ``param`` (a local tensor) with anchors of ``anchor_dtype`` and
        moments in ``formats``, or ''."""
        error = self.format_error(formats)
        if error:
            return error
        dtypes_ok = self.dtypes is None or (
            param.dtype in self.dtypes and (anchor_dtype is None or anchor_dtype in self.dtypes))
        if dtypes_ok and (param.is_contiguous() or not self.contiguous_only):
            return ""
        names = "/".join(str(d).replace("torch.", "") for d in self.dtypes or ())
        wants = " ".join(filter(None, ("contiguous" if self.contiguous_only else "", names)))
        return (f"impl={self.name!r} takes {wants} params (and anchors), got dtype {param.dtype}"
                + (f", anchors {anchor_dtype}" if anchor_dtype is not None else "")
                + f", contiguous={param.is_contiguous()}")


#: functions that run outside torch.compile graphs: (wrapper, function, reason)
_EAGER_ONLY: List[tuple] = []
_DISABLED: Dict[Callable, Callable] = {}


def eager_only(reason: str):
    """Run the decorated function outside any torch.compile graph; Dynamo shows
    ``reason`` at the graph break (and ``fullgraph=True`` raises it).

    ``torch.compiler.disable`` imports Dynamo, which imports triton: at ``import
    spd_kernels`` that would come before a command line has set
    ``TRITON_INTERPRET``. So the disabled versions are made by
    ``make_eager_only()``, which ``AdamSPD()`` calls, before any step is traced.
    """

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            disabled = _DISABLED.get(call)
            return disabled(*args, **kwargs) if disabled is not None else fn(*args, **kwargs)

        _EAGER_ONLY.append((call, fn, reason))
        return call

    return wrap


def make_eager_only() -> None:
    """Build the ``torch.compiler.disable`` versions of the ``eager_only`` functions (once)."""
    for call, fn, reason in _EAGER_ONLY:
        if call not in _DISABLED:
            _DISABLED[call] = torch.compiler.disable(fn, reason=reason)
