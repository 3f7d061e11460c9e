"""From ``param_groups`` to buckets: gather the params with grads, then group them for the backends.

``gather`` checks every grad and what each group holds now (its params, a ZeRO
flat partition, or something it refuses) and mutates nothing. ``buckets`` then
puts the tensors of one group, backend, device, dtypes and reduction into one
``Bucket`` (the local shards of DTensors, the fragments of a ZeRO partition)
and plans the all-reduces of their split steps. Neither creates state: the
optimizer makes it in between (``spd_kernels.state``).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import backends, checks, distributed, zero
from .anchors import GroupOrigin, origin
from .backends import Backend
from .bucket import Bucket
from .hyperparameters import Hyperparameters
from .formats import DTYPE_KEYS, GROUP_KEYS, MomentFormat, names
from .state import formats_for, held_formats


@dataclass
class Work:
    """One group's share of a step."""

    index: int
    group: Dict[str, Any]
    #: (position in the group, param) of the params with grads
    params: List[Tuple[int, Tensor]]
    #: the ZeRO flat partition the group holds instead of its params, or None
    partition: Optional[zero.Partition] = None


def gather(param_groups: List[Dict[str, Any]], state: Dict[Tensor, Dict[str, Any]],
           backend: Optional[Backend]) -> List[Work]:
    """Check every grad and each group's params; the work of this step. Mutates nothing."""
    work = []
    for gi, group in enumerate(param_groups):
        record = origin(group)
        partition = None if record.matches(group["params"]) else _partition(group, record, f"param_groups[{gi}]")
        with_grad = []
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            checks.grad(p, f"param_groups[{gi}]['params'][{pi}]", backend)
            given = record.anchors[pi] if partition is None and "anchor" not in state.get(p, {}) else None
            if given is not None and not group["anchor_free"]:  # placed at this step: check it now
                distributed.check_placement(p, given, f"param_groups[{gi}]['pre'][{pi}]")
            with_grad.append((pi, p))
        if with_grad:
            work.append(Work(gi, group, with_grad, partition))
    return work


def _partition(group: Dict[str, Any], record: GroupOrigin, where: str) -> zero.Partition:
    """The ZeRO-1/2 partition a group holds instead of the params it was built with; a named error
    for anything else that replaced them."""
    if any(zero.is_zero3_param(p) for p in record.params):
        raise RuntimeError(zero.zero3_error(where))
    params = group["params"]
    partition = zero.partition_of(params[0], record) if len(params) == 1 and params[0].dim() == 1 else None
    if partition is None:
        raise RuntimeError(
            f"{where}['params'] no longer holds the params the group was built with "
            f"({len(record.shapes)} of shapes {[tuple(s) for s in record.shapes][:4]}..., now {len(params)} of "
            f"shapes {[tuple(p.shape) for p in params][:4]}...). AdamSPD follows params replaced by sharded "
            "versions of themselves (FSDP2 DTensors, as Accelerate and the Trainer swap them in) and "
            "DeepSpeed ZeRO-1/2's flat partitions; anything else would change the tensors SPD's per-tensor "
            "sums run over. Build the optimizer for the params as they are now")
    chosen = {k: group.get(k) for k in ("optim_bits", *DTYPE_KEYS) if group.get(k) not in (None, 32, "float32")}
    if chosen:
        raise ValueError(f"{where}: compressed moments ({chosen}) under DeepSpeed ZeRO are not supported (a flat partition cuts "
                         "their blocks and DeepSpeed keeps its own fp32 copies); use fp32 moments, or FSDP2 "
                         "for compressed ones")
    return partition


def model_params(group: Dict[str, Any]) -> List[Tensor]:
    """The model params a group stands for: its params, or under DeepSpeed ZeRO-1/2 the params its
    flat partition holds pieces of."""
    params, record = group["params"], origin(group)
    if not record.matches(params) and len(params) == 1 and zero.partition_of(params[0], record):
        return record.params
    return params


def backend_for(impl: str, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> Backend:
    anchor = state.get("anchor") if not group["anchor_free"] else None
    return backends.choose(impl, distributed.local(p), anchor.dtype if anchor is not None else None,
                           names(formats_for(p, group)))


def step_device(impl: str, p: Tensor, state: Dict[str, Any], group: Dict[str, Any]) -> torch.device:
    """Where ``step`` lives: on the param's device when its backend keeps it there or the group is
    capturable, else on the CPU (as torch.optim.Adam)."""
    backend = backend_for(impl, p, state, group)
    return p.device if backend.step_on_device or group["capturable"] else torch.device("cpu")


def cache_key(param_groups: List[Dict[str, Any]]) -> Tuple:
    """What decides the buckets: each group's params, which of them have grads, where they live (a
    param moved in place, as ``Module.to`` may do, needs its checks again), its switches."""
    return tuple(
        (tuple(map(id, g["params"])), tuple(p.grad is None for p in g["params"]), tuple(p.device for p in g["params"]),
         g["amsgrad"], g["anchor_free"], g["capturable"], *(g.get(k) for k in GROUP_KEYS))
        for g in param_groups
    )


def buckets(work: List[Work], state: Dict[Tensor, Dict[str, Any]],
            impl: str) -> Tuple[List[Tuple[Backend, int, Bucket]], List[distributed.SumsReduction]]:
    """The buckets of this step's params, and the all-reduces their split steps need.

    Params of one bucket share a group, a backend, a device, dtypes and (for sharded params) a
    reduction; the backend sees their local shards, or the fragments of a ZeRO partition.
    """
    out: Dict[Tuple, Tuple[Backend, int, Bucket]] = {}
    sharded_rows: Dict[Tuple, List[int]] = defaultdict(list)  # bucket key -> rows in its reduction
    rows = distributed.RowCounter()
    for item in work:
        group, anchored = item.group, not item.group["anchor_free"]
        for pi, p in item.params:
            st = state[p]
            backend = backend_for(impl, p, st, group)
            anchor = st.get("anchor") if anchored else None
            held = held_formats(st)
            if item.partition is not None:
                reduce = distributed.group_key(item.partition.process_group)
                first = rows.take(reduce, item.partition.rows, p.device)
            else:
                reduce = distributed.reduce_key(p, f"param_groups[{item.index}]['params'][{pi}]")
                first = rows.take(reduce, 1, p.device) if reduce is not None else None
            key = (item.index, backend.name, p.device, p.dtype, p.grad.dtype,
                   anchor.dtype if anchor is not None else None, names(held), reduce)
            if key not in out:
                out[key] = (backend, item.index, Bucket(
                    max_exp_avg_sqs=[] if group["amsgrad"] else None,
                    anchors=[] if anchored else None,
                    formats=names(held),
                    index_offsets=[] if any(f.coded for f in held) else None,
                    exp_avg_scales=[] if held[0].block else None,
                    exp_avg_sq_scales=[] if held[1].block else None,
                    keys=[] if item.partition is not None else None,
                    grad_slices=[] if item.partition is not None else None,
                    hp=Hyperparameters.from_group(group),
                ))
            b = out[key][2]
            if item.partition is not None:
                _add_fragments(b, p, item.partition, st, anchor, group["amsgrad"])
                sharded_rows[key] += [first + frag.row for frag in item.partition.fragments]
                continue
            _add_tensor(b, p, st, anchor, group["amsgrad"], held)
            if first is not None:
                sharded_rows[key].append(first)
    kept = {key: entry for key, entry in out.items() if len(entry[2])}  # a rank may hold no fragment
    reductions = distributed.plan_reductions(
        [(kept[key][2], key[-1], r) for key, r in sharded_rows.items() if key in kept], rows)
    return list(kept.values()), reductions


def _add_tensor(b: Bucket, p: Tensor, state: Dict[str, Any], anchor: Optional[Tensor], amsgrad: bool,
                held: Tuple[MomentFormat, MomentFormat]) -> None:
    b.owners.append(p)
    b.params.append(distributed.local(p))
    b.grads.append(distributed.local(p.grad))
    b.exp_avgs.append(distributed.local(state["exp_avg"]))
    b.exp_avg_sqs.append(distributed.local(state["exp_avg_sq"]))
    b.steps.append(state["step"])
    if amsgrad:
        b.max_exp_avg_sqs.append(distributed.local(state["max_exp_avg_sq"]))
    if anchor is not None:
        b.anchors.append(distributed.local(anchor))
    for moment, (fmt, scales) in enumerate(zip(held, (b.exp_avg_scales, b.exp_avg_sq_scales))):
        if fmt.block:
            scales.append(distributed.local_absmax(state[fmt.scale_key(moment)], p))
    if b.index_offsets is not None:
        b.index_offsets.append(distributed.flat_start(p) or 0)  # 0 for a shard that is no one stretch


def _add_fragments(b: Bucket, flat: Tensor, partition: zero.Partition, state: Dict[str, Any],
                   anchor: Optional[Tensor], amsgrad: bool) -> None:
    """One entry per fragment of a ZeRO flat partition: 1-D views of the partition and its state,
    each with a step counter of its own (the kernels increment every entry's), which all advance
    together; ``state['step']`` is the first of them."""
    steps = state["step"].reshape(1).repeat(len(partition.fragments))
    if len(partition.fragments):
        state["step"] = steps[0]
    for j, frag in enumerate(partition.fragments):
        def piece(t: Tensor, frag=frag) -> Tensor:
            return t.view(-1).narrow(0, frag.start, frag.numel)

        b.owners.append(flat)
        b.keys.append(frag.key)
        b.grad_slices.append((frag.start, frag.numel))
        b.params.append(piece(flat))
        b.grads.append(piece(flat.grad))
        b.exp_avgs.append(piece(state["exp_avg"]))
        b.exp_avg_sqs.append(piece(state["exp_avg_sq"]))
        b.steps.append(steps[j])
        if amsgrad:
            b.max_exp_avg_sqs.append(piece(state["max_exp_avg_sq"]))
        if anchor is not None:
            b.anchors.append(piece(anchor))
