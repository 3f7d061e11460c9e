"""A param's optimizer state: which format its moments take, and how it is made and kept.

Keys follow ``torch.optim.Adam``: ``step`` (a 0-d fp32 tensor), ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad), plus ``anchor`` in anchored
groups. Two moment formats:

- 32-bit: fp32 moments (the param's dtype when it is wider), shaped like the param;
- 8-bit: ``exp_avg``/``exp_avg_sq`` as uint8 codes shaped like the param, and
  ``exp_avg_absmax``/``exp_avg_sq_absmax``, one fp32 per block of 256 elements
  of the local shard (``spd_kernels.quantization``, ``spd_kernels.distributed``).

``bits_for`` decides a tensor's format from its group; ``bits_held`` reads it from
a state. State is made at a param's first step (``make``), for the tensor the
group holds then (``spd_kernels.anchors``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from . import distributed, quantization, zero
from .anchors import GroupOrigin, snapshot
from .reference import compute_dtype

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
#: 8-bit moments: the per-block absmax beside each code tensor
ABSMAX_KEYS = {"exp_avg": "exp_avg_absmax", "exp_avg_sq": "exp_avg_sq_absmax"}
#: which moments take the signed map (the first can be negative)
SIGNED = {"exp_avg": True, "exp_avg_sq": False}


def bits_for(p: Tensor, group: Dict[str, Any]) -> int:
    """The moment format ``group`` gives ``p``: 8 for a tensor of at least ``min_8bit_size``
    elements in an ``optim_bits=8`` group, else 32. Decided by the whole tensor's size, so
    every rank of a sharded param decides alike."""
    eight = group.get("optim_bits", 32) == 8 and p.numel() >= group.get("min_8bit_size", 4096)
    return 8 if eight else 32


def bits_held(state: Dict[str, Any]) -> Optional[int]:
    """The format a state's moments are in (None: no moments yet)."""
    if "exp_avg" not in state:
        return None
    return 8 if ABSMAX_KEYS["exp_avg"] in state else 32


def stored_anchor(p: Tensor, given: Optional[Tensor], anchor_dtype: Optional[torch.dtype], where: str) -> Tensor:
    """The anchor kept in state: ``given`` placed like ``p`` in ``anchor_dtype``, or a snapshot of ``p``."""
    if given is None:
        return snapshot(p, anchor_dtype)
    a = distributed.place_like(p, given, where)
    if anchor_dtype is not None and a.dtype != anchor_dtype:
        a = a.to(anchor_dtype)
    return a


def fragment_anchor(flat: Tensor, partition: zero.Partition, origin: GroupOrigin,
                    anchor_dtype: Optional[torch.dtype]) -> Tensor:
    """The anchor of a ZeRO flat partition: its own values (the model's, before its first update),
    each fragment of a param given an anchor cut from that anchor. Releases the group's anchors."""
    anchor = snapshot(flat, anchor_dtype)
    for frag in partition.fragments:
        given = origin.anchors[frag.row]
        if given is not None:
            anchor.narrow(0, frag.start, frag.numel).copy_(given.reshape(-1).narrow(0, frag.offset, frag.numel))
    origin.anchors = [None] * len(origin.anchors)  # this rank's pieces are cut: the rest is other ranks'
    return anchor


def make(state: Dict[str, Any], p: Tensor, group: Dict[str, Any], step_device: torch.device) -> None:
    """Give ``p`` its step and moments if it has none; bring what it has to ``p``'s device, the
    step's device, the group's format, and amsgrad's third moment when the group asks for it."""
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
        if bits_for(p, group) == 8:
            # blocks are local to a shard: a sharded param's codes are placed like it, its
            # absmax is split evenly over its shards (distributed.new_absmax)
            for key, absmax_key in ABSMAX_KEYS.items():
                codes = torch.full_like(distributed.local(p), quantization.zero_code(SIGNED[key]),
                                        dtype=torch.uint8, memory_format=torch.contiguous_format)
                state[key] = distributed.wrap_like(p, codes)
                state[absmax_key] = distributed.new_absmax(p)
        else:
            moment_dtype = compute_dtype(p.dtype)
            state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
    elif state["step"].device != step_device:
        state["step"] = state["step"].to(step_device)
    # State built before the model moved (model.to(device) after a load) follows its param.
    for key in (*MOMENT_KEYS, *ABSMAX_KEYS.values(), "anchor"):
        t = state.get(key)
        if t is not None and t.device != p.device:
            state[key] = t.to(p.device)
    match_format(state, p, group)
    if group["amsgrad"] and "max_exp_avg_sq" not in state:
        # amsgrad switched on mid-run starts its max from the current v, as if it had been on.
        state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()


def match_format(state: Dict[str, Any], p: Tensor, group: Dict[str, Any]) -> None:
    """Convert ``p``'s moments to the format its group asks for: a 32-bit checkpoint loaded
    into an 8-bit optimizer is quantized, an 8-bit one into a 32-bit optimizer dequantized."""
    held, want = bits_held(state), bits_for(p, group)
    if held is None or held == want:
        return
    for key, absmax_key in ABSMAX_KEYS.items():
        value = distributed.local(state[key])
        if want == 8:
            codes = torch.empty(value.shape, dtype=torch.uint8, device=p.device)
            absmax = distributed.new_absmax(p)
            quantization.quantize_(codes, distributed.local_absmax(absmax, p), value.float(), SIGNED[key])
            state[key], state[absmax_key] = distributed.wrap_like(p, codes), absmax
        else:
            absmax = distributed.local_absmax(state.pop(absmax_key), p)
            fp32 = quantization.dequantize(value, absmax, SIGNED[key])
            state[key] = distributed.wrap_like(p, fp32.to(compute_dtype(p.dtype)))
