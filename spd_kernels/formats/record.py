"""What a moment format is: one record of how ``exp_avg`` or ``exp_avg_sq`` is stored.

A param's state keeps each moment in a format (``spd_kernels.formats`` lists
them). The record says everything the optimizer, the checkpoint code and the
backends need, so none of them branches on a format:

- ``name``, and ``dtype``: the value a user passes as ``exp_avg_dtype`` /
  ``exp_avg_sq_dtype`` (None: chosen another way, ``optim_bits=8``);
- ``applies(numel, group)``: whether it takes a tensor of that size (blocked
  formats keep small tensors in fp32);
- ``keys(moment)``: the state keys it owns for a moment (the codes, and a
  per-block scale for blocked formats);
- ``zeros``: a fresh moment's codes (its scales start at 0); ``decode``: its fp32 values; ``encode_``: fp32
  values stored back in place (``step`` picks stochastic rounding's bits);
- ``block``: elements per scale block (0: none). Blocks are local to a shard,
  so a sharded param's codes are placed like it and its scales split evenly
  over its shards (``spd_kernels.distributed.new_absmax``);
- ``bytes_per_element``: memory per element, the scales included.

``decode``/``encode_`` are the reference definition (the oracle's); the
kernels implement the same rule and are held to it bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

#: the moments, in kernel order: 0 is exp_avg (signed), 1 is exp_avg_sq (>= 0)
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class MomentFormat:
    name: str
    #: what exp_avg_dtype / exp_avg_sq_dtype name it by; None for the bitsandbytes format
    dtype: Optional[torch.dtype]
    #: the dtype of the stored codes (None: the param's compute dtype, fp32 or wider)
    storage: Optional[torch.dtype]
    #: elements per scale block; 0 for formats without a scale
    block: int
    #: the suffix of the per-block scale's state key ("absmax": exp_avg_absmax), '' if none
    scale_suffix: str
    bytes_per_element: float
    #: how a value is rounded on store, per moment: "nearest" or "stochastic"
    rounding: Tuple[str, str]
    #: whether it takes a tensor of ``numel`` elements in this group
    applies: Callable[[int, Mapping[str, Any]], bool]
    #: (local param, moment index) -> codes of zero, shaped like it (a zero scale decodes to 0)
    zeros: Callable[[Tensor, int], Tensor]
    #: (codes, scale, moment index) -> fp32 values, codes' shape
    decode: Callable[[Tensor, Optional[Tensor], int], Tensor]
    #: (codes, scale, fp32 values, moment index, step, offset) -> None: store in place; ``offset`` is
    #: where the codes start in the whole flattened tensor (a shard's start; stochastic rounding's index)
    encode_: Callable[..., None]
    #: why a moment cannot take this format ('' when it can), e.g. the second moment in fp8
    refuses: Callable[[int], str] = lambda moment: ""

    def scale_key(self, moment: int) -> Optional[str]:
        return f"{MOMENTS[moment]}_{self.scale_suffix}" if self.scale_suffix else None

    def keys(self, moment: int) -> Tuple[str, ...]:
        scale = self.scale_key(moment)
        return (MOMENTS[moment],) if scale is None else (MOMENTS[moment], scale)

    @property
    def coded(self) -> bool:
        """Whether the stored moment is not its fp32 value (its update goes through decode/encode)."""
        return self.storage is not None


def num_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def blocks_of(x: Tensor, block: int) -> Tuple[Tensor, int]:
    """``x`` flattened and zero-padded to whole blocks, shaped [blocks, block], and the padding."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block), pad


def unblock(blocks: Tensor, pad: int, shape) -> Tensor:
    flat = blocks.reshape(-1)
    if pad:
        flat = flat[: flat.numel() - pad]
    return flat.view(shape)


def state_of(state: Dict[str, Any], fmt: MomentFormat, moment: int) -> Tuple[Tensor, Optional[Tensor]]:
    scale = fmt.scale_key(moment)
    return state[MOMENTS[moment]], (state[scale] if scale else None)
