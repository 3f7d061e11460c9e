"""The moment formats: one record each (``record.MomentFormat``), and which one a tensor takes.

========  =====================  ==========================  ===============
name      chosen by              stored                      bytes / element
========  =====================  ==========================  ===============
fp32      the default            the value (compute dtype)   4
bf16      ``torch.bfloat16``     bf16; v rounded             2
                                 stochastically
fp8       ``torch.float8_e4m3fn``  e4m3 codes + fp32 scale    1 + 4/256
          (exp_avg only)         per 256 elements
bnb8      ``optim_bits=8``       uint8 dynamic-map codes +   1 + 4/256
                                 fp32 absmax per 256
========  =====================  ==========================  ===============

A group chooses each moment's format with ``exp_avg_dtype`` and
``exp_avg_sq_dtype`` (Transformer Engine's names; the group keeps the dtype's
name, ``"bfloat16"``, so that every checkpointer saves it), or both at once with
``optim_bits=8``; ``for_tensor`` applies the choice to one tensor (a format that
does not take the tensor, a blocked one below ``min_8bit_size``, leaves it
fp32). ``held`` reads the format a state is in, so a checkpoint in one format
loads into another (``spd_kernels.state.match_format``). Adding a format: a
module here with its record, its entry in ``FORMATS``, and its kernels.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from . import bf16, bnb8, fp8, fp32
from .record import MOMENTS, MomentFormat, state_of

#: every format by name, in the order the docs list them
FORMATS: Dict[str, MomentFormat] = {f.name: f for f in (fp32.FORMAT, bf16.FORMAT, fp8.FORMAT, bnb8.FORMAT)}
FP32 = fp32.FORMAT
#: what exp_avg_dtype / exp_avg_sq_dtype accept: a torch.dtype, or its name (as param groups keep it)
BY_DTYPE: Dict[torch.dtype, MomentFormat] = {f.dtype: f for f in FORMATS.values() if f.dtype is not None}
BY_DTYPE_NAME: Dict[str, MomentFormat] = {str(d).replace("torch.", ""): f for d, f in BY_DTYPE.items()}
#: the group keys that choose the formats (a loaded checkpoint keeps the running optimizer's)
GROUP_KEYS = ("optim_bits", "min_8bit_size", "exp_avg_dtype", "exp_avg_sq_dtype")
DTYPE_KEYS = ("exp_avg_dtype", "exp_avg_sq_dtype")

Pair = Tuple[MomentFormat, MomentFormat]

__all__ = ["BY_DTYPE", "BY_DTYPE_NAME", "DTYPE_KEYS", "dtype_name", "FORMATS", "FP32", "GROUP_KEYS", "MOMENTS", "MomentFormat", "Pair", "check",
           "for_tensor", "held", "names", "of_codes", "state_of"]


def dtype_name(value: Any) -> Any:
    """The name a group keeps for an exp_avg_dtype / exp_avg_sq_dtype (``torch.bfloat16`` ->
    ``"bfloat16"``): param groups hold plain values, which every checkpointer saves
    (torch.distributed.checkpoint's state-dict helpers refuse a ``torch.dtype``). Anything
    else comes back unchanged, for ``check`` to name."""
    if isinstance(value, torch.dtype) and value in BY_DTYPE:
        return str(value).replace("torch.", "")
    return value


def _format_of(value: Any) -> Optional[MomentFormat]:
    if isinstance(value, torch.dtype):
        return BY_DTYPE.get(value)
    return BY_DTYPE_NAME.get(value) if isinstance(value, str) else None


def check(group: Mapping[str, Any], where: str) -> None:
    """Raise ValueError naming ``where`` and the setting if the group's format choice is not one we run."""
    bits = group.get("optim_bits", 32)
    if isinstance(bits, bool) or bits not in (8, 32):
        raise ValueError(f"{where}: optim_bits must be 32 or 8, got {bits!r}")
    size = group.get("min_8bit_size", 4096)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{where}: min_8bit_size must be an int >= 0, got {size!r}")
    chosen = []
    for moment, key in enumerate(DTYPE_KEYS):
        dtype = group.get(key, "float32")
        fmt = _format_of(dtype)
        if fmt is None:
            names = ", ".join(str(d) for d in BY_DTYPE)
            raise ValueError(f"{where}: {key} must be one of {names} (or its name), got {dtype!r}")
        refusal = fmt.refuses(moment)
        if refusal:
            raise ValueError(f"{where}: {refusal}")
        chosen.append(fmt)
    if bits == 8 and any(f is not FP32 for f in chosen):
        raise ValueError(f"{where}: optim_bits=8 (bitsandbytes' 8-bit format for both moments) and "
                         f"exp_avg_dtype/exp_avg_sq_dtype ({group.get('exp_avg_dtype')}, "
                         f"{group.get('exp_avg_sq_dtype')}) both choose the moments' format; set one of them")
    if group.get("amsgrad") and (bits == 8 or any(f is not FP32 for f in chosen)):
        setting = "optim_bits=8" if bits == 8 else "compressed moments (exp_avg_dtype/exp_avg_sq_dtype)"
        raise ValueError(f"{where}: amsgrad with {setting} is not supported (its max would need a third "
                         "compressed state); use fp32 moments for this group")


def for_tensor(numel: int, group: Mapping[str, Any]) -> Pair:
    """The (exp_avg, exp_avg_sq) formats ``group`` gives a tensor of ``numel`` elements (the whole
    tensor's size, so every rank of a sharded param decides alike)."""
    if group.get("optim_bits", 32) == 8:
        fmt = bnb8.FORMAT if bnb8.FORMAT.applies(numel, group) else FP32
        return fmt, fmt
    out = []
    for key in DTYPE_KEYS:
        fmt = _format_of(group.get(key, "float32"))
        out.append(fmt if fmt.applies(numel, group) else FP32)
    return out[0], out[1]


def held(state: Mapping[str, Any], moment: int) -> Optional[MomentFormat]:
    """The format a state holds a moment in (None: no moments yet)."""
    value = state.get(MOMENTS[moment])
    if value is None:
        return None
    if bnb8.FORMAT.scale_key(moment) in state:
        return bnb8.FORMAT
    for fmt in (fp8.FORMAT, bf16.FORMAT):
        if value.dtype == fmt.storage:
            return fmt
    return FP32


def of_codes(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> Tuple[str, str]:
    """The format names of a bucket's moments from their codes' dtypes (what an op receives)."""
    by_storage = {torch.uint8: "bnb8", torch.float8_e4m3fn: "fp8", torch.bfloat16: "bf16"}
    return by_storage.get(exp_avg.dtype, "fp32"), by_storage.get(exp_avg_sq.dtype, "fp32")


def names(pair: Pair) -> Tuple[str, str]:
    return pair[0].name, pair[1].name


def scale_keys() -> Tuple[str, ...]:
    """Every state key that holds a per-block scale, of any format."""
    return tuple(k for f in FORMATS.values() for m in range(2) for k in [f.scale_key(m)] if k)
