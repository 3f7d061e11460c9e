"""A param's optimizer state: its moments' formats, and how it is made and kept.

Keys follow ``torch.optim.Adam``: ``step`` (a 0-d fp32 tensor), ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad), plus ``anchor`` in anchored
groups. Each moment is kept in a format (``spd_kernels.formats``): fp32 (the
param's dtype when it is wider), bf16, block-scaled fp8 e4m3 or bitsandbytes'
blockwise 8-bit, whose per-block fp32 scales sit beside it (``exp_avg_scale``,
``exp_avg_absmax``, ...), one per block of 256 elements of the local shard
(``spd_kernels.distributed.new_absmax``).

``formats_for`` decides a tensor's formats from its group; ``formats.held`` reads
them from a state. State is made at a param's first step (``make``), for the
tensor the group holds then (``spd_kernels.anchors``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from . import distributed, formats, zero
from .anchors import GroupOrigin, snapshot
from .formats import MOMENTS, MomentFormat

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
#: every key that holds a block format's per-block scales
SCALE_KEYS = formats.scale_keys()


def formats_for(p: Tensor, group: Dict[str, Any]) -> formats.Pair:
    """The (exp_avg, exp_avg_sq) formats ``group`` gives ``p``, decided by the whole tensor's size."""
    return formats.for_tensor(p.numel(), group)


def held_formats(state: Dict[str, Any]) -> Optional[formats.Pair]:
    """The formats a state's moments are in (None: no moments yet)."""
    m, v = formats.held(state, 0), formats.held(state, 1)
    return None if m is None else (m, v)


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


def _new_moment(state: Dict[str, Any], p: Tensor, fmt: MomentFormat, moment: int) -> None:
    """A zero moment in ``fmt``, placed like ``p``: a sharded param's codes like it, its scales split
    evenly over its shards (blocks are local to a shard)."""
    for other in formats.FORMATS.values():  # the scales of the format the moment was in
        if other.scale_key(moment):
            state.pop(other.scale_key(moment), None)
    if not fmt.coded:
        state[MOMENTS[moment]] = fmt.zeros(p, moment)  # zeros_like keeps a DTensor's placement
        return
    state[MOMENTS[moment]] = distributed.wrap_like(p, fmt.zeros(distributed.local(p), moment))
    if fmt.block:
        assert fmt.block == formats.FORMATS["bnb8"].block  # distributed.new_absmax's block size
        state[fmt.scale_key(moment)] = distributed.new_absmax(p)


def make(state: Dict[str, Any], p: Tensor, group: Dict[str, Any], step_device: torch.device) -> None:
    """Give ``p`` its step and moments if it has none; bring what it has to ``p``'s device, the
    step's device, the group's formats, and amsgrad's third moment when the group asks for it."""
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
        for moment, fmt in enumerate(formats_for(p, group)):
            _new_moment(state, p, fmt, moment)
    elif state["step"].device != step_device:
        state["step"] = state["step"].to(step_device)
    # State built before the model moved (model.to(device) after a load) follows its param.
    for key in (*MOMENT_KEYS, *SCALE_KEYS, "anchor"):
        t = state.get(key)
        if t is not None and t.device != p.device:
            state[key] = t.to(p.device)
    match_format(state, p, group)
    if group["amsgrad"] and "max_exp_avg_sq" not in state:
        # amsgrad switched on mid-run starts its max from the current v, as if it had been on.
        state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()


def match_format(state: Dict[str, Any], p: Tensor, group: Dict[str, Any]) -> None:
    """Convert ``p``'s moments to the formats its group asks for, through fp32: a checkpoint saved
    in one format loads into an optimizer running another (one more rounding)."""
    have = held_formats(state)
    if have is None:
        return
    for moment, (held, want) in enumerate(zip(have, formats_for(p, group))):
        if held is want:  # nothing is read from the device unless a moment converts
            continue
        step = int(float(state["step"])) if "step" in state else 0  # stochastic rounding's key
        codes, scale = formats.state_of(state, held, moment)
        scale = distributed.local_absmax(scale, p) if scale is not None else None
        values = held.decode(distributed.local(codes), scale, moment).float()
        _new_moment(state, p, want, moment)
        if not want.coded:
            distributed.local(state[MOMENTS[moment]]).copy_(values)
            continue
        codes, scale = formats.state_of(state, want, moment)
        want.encode_(distributed.local(codes), distributed.local_absmax(scale, p) if scale is not None else None,
                     values, moment, step, distributed.flat_start(p) or 0)
