"""Loading a checkpoint into ``AdamSPD``: ours or the official ``adamSPD.py``'s, any moment format.

``AdamSPD.load_state_dict`` runs these around ``torch.optim.Optimizer.load_state_dict``:

1. ``from_official_format``: the official class keeps anchors in each group's ``pre``, an
   int ``step`` and an unused full-size ``hyper`` state;
2. ``check``: every saved tensor fits its param (shape, placement, scale blocks), before
   anything changes;
3. ``with_running_settings``: the groups keep what the running optimizer chose (its
   state format, keys an older checkpoint lacks, the records of ``spd_kernels.anchors``);
4. torch's load, which casts floating state to each param's dtype;
5. ``restore``: the saved dtypes back (fp32 moments of bf16 params stay fp32, anchors keep
   theirs or take ``anchor_dtype``), a whole tensor's block-scaled moments cut into a shard's blocks,
   and the moments in the running optimizer's format (``spd_kernels.state.match_format``).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from . import distributed, formats
from .anchors import ORIGIN_KEY
from .formats import MOMENTS
from .reference import compute_dtype
from .state import MOMENT_KEYS, SCALE_KEYS, match_format

#: group keys that choose the state format: a loaded checkpoint keeps the running optimizer's
FORMAT_KEYS = formats.GROUP_KEYS


def from_official_format(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Convert a state_dict of the official ``adamSPD.py`` to ours; ours pass through."""
    groups = state_dict["param_groups"]
    if not any("pre" in g for g in groups):
        return state_dict
    state = defaultdict(dict, {k: dict(v) for k, v in state_dict["state"].items()})
    new_groups = []
    for gi, g in enumerate(groups):
        g = dict(g)
        pre = g.pop("pre", None)
        g.setdefault("capturable", False)
        g["anchor_free"] = pre is None
        if pre is not None:
            if len(pre) != len(g["params"]):
                raise ValueError(
                    f"load_state_dict: param_groups[{gi}]['pre'] has {len(pre)} anchors for {len(g['params'])} params"
                )
            for pid, a in zip(g["params"], pre):
                state[pid]["anchor"] = a
        new_groups.append(g)
    for entry in state.values():
        entry.pop("hyper", None)
        if "step" in entry and not isinstance(entry["step"], Tensor):
            entry["step"] = torch.tensor(float(entry["step"]), dtype=torch.float32)
    return {"state": dict(state), "param_groups": new_groups}


def check(state_dict: Dict[str, Any], param_groups: List[Dict[str, Any]]) -> None:
    """Raise before loading if the saved groups and anchors do not fit this optimizer."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"load_state_dict: {len(saved_groups)} saved param groups, optimizer has {len(param_groups)}")
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"load_state_dict: param_groups[{gi}] has {len(saved['params'])} saved params, "
                             f"optimizer has {len(group['params'])}")
        for pi, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            entry = state_dict["state"].get(pid, {})
            where = f"load_state_dict: param_groups[{gi}]['params'][{pi}]"
            for key, value in entry.items():
                if key in SCALE_KEYS:
                    error = distributed.absmax_error(p, value)
                    if error:
                        raise ValueError(f"{where}: saved {key}: {error}")
                elif isinstance(value, Tensor) and key != "step":
                    if value.shape != p.shape:
                        raise ValueError(f"{where}: saved {key} has shape {tuple(value.shape)}, param {tuple(p.shape)}")
                    distributed.check_placement(p, value, f"{where}: saved {key}")
            # a param frozen when saved has no entry; one that trained has its anchor
            if not saved.get("anchor_free", group["anchor_free"]) and "step" in entry and "anchor" not in entry:
                raise ValueError(f"{where}: the saved group is anchored but has no anchor for this param")


def with_running_settings(state_dict: Dict[str, Any], param_groups: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The state_dict with each saved group completed by the running group's keys it lacks (as torch.optim
    fills its defaults) and the running state format: a format is the optimizer's choice, not a training
    setting. The groups' records stay out: torch deep-copies the saved groups."""
    return {**state_dict, "param_groups": [
        {**{k: v for k, v in group.items() if k not in ("params", ORIGIN_KEY)}, **saved,
         **{k: group[k] for k in FORMAT_KEYS if k in group}}
        for saved, group in zip(state_dict["param_groups"], param_groups)
    ]}


def restore(state: Dict[Tensor, Dict[str, Any]], param_groups: List[Dict[str, Any]], saved: Dict[str, Any],
            anchor_dtype: Optional[torch.dtype]) -> None:
    """After torch's load: the saved tensors in their own dtypes, 8-bit state cut into shards, formats matched."""
    saved_ids = [pid for g in saved["param_groups"] for pid in g["params"]]
    params = [p for g in param_groups for p in g["params"]]
    for pid, p in zip(saved_ids, params):
        entry = saved["state"].get(pid, {})
        if distributed.is_dtensor(p):
            entry = _shard_blocked_state(state[p], p, entry)
        coded = {MOMENTS[k] for k in range(2) if (formats.held(entry, k) or formats.FP32).coded}
        for key, value in entry.items():
            if isinstance(value, Tensor):
                state[p][key] = _loaded_tensor(key, value, p, anchor_dtype, key in coded)
    for group in param_groups:
        for p in group["params"]:
            if p not in state:  # no state saved: it is made at the param's first step
                continue
            step = state[p].get("step")
            if step is not None and not isinstance(step, Tensor):
                state[p]["step"] = torch.tensor(float(step), dtype=torch.float32)
            match_format(state[p], p, group)


def _shard_blocked_state(state: Dict[str, Any], p: Tensor, entry: Dict[str, Any]) -> Dict[str, Any]:
    """A whole tensor's saved block-scaled moments for sharded ``p``: where this shard's blocks are the
    whole tensor's, its codes and scales are cut out exactly (into ``state``); elsewhere the moments
    are decoded, for ``match_format`` to encode in the shard's own blocks (one more rounding).
    Returns the entry left to load."""
    rest = dict(entry)
    for moment in range(2):
        fmt = formats.held(entry, moment)
        if fmt is None or not fmt.block or distributed.is_dtensor(entry[fmt.scale_key(moment)]):
            continue
        key, scale_key = fmt.keys(moment)
        del rest[key], rest[scale_key]
        cut = distributed.shard_of_blocks(p, entry[key], entry[scale_key])
        if cut is None:
            rest[key] = fmt.decode(entry[key], entry[scale_key], moment)
            state.pop(scale_key, None)
            continue
        codes, blocks = cut
        scale = distributed.new_absmax(p)
        distributed.local_absmax(scale, p).copy_(blocks)
        state[key] = distributed.wrap_like(p, codes.to(p.device, copy=True).contiguous())
        state[scale_key] = scale
    return rest


def _loaded_tensor(key: str, value: Tensor, p: Tensor, anchor_dtype: Optional[torch.dtype], coded: bool) -> Tensor:
    if key == "step":
        # the first step moves it to where its backend wants it
        return distributed.local(value).detach().to(dtype=torch.float32, device="cpu", copy=True)
    if key in SCALE_KEYS or coded:  # a compressed moment's codes and scales: their own dtypes
        return distributed.copy_to(value, p.device)
    if key in MOMENT_KEYS:
        dtype = compute_dtype(value.dtype)
    elif key == "anchor":
        dtype = anchor_dtype or value.dtype
    else:
        dtype = value.dtype
    value = value.detach().to(dtype=dtype, device=p.device, copy=True)
    return distributed.place_like(p, value, f"load_state_dict: state {key!r} of a param")
