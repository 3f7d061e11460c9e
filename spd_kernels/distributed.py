"""Sharded parameters (FSDP2, HSDP, DTensor): what the optimizer needs of them.

SPD's three sums run over the whole logical tensor (docs/design.md), so a
rank holding a shard cannot finish a step alone. For DTensor params the
optimizer runs its backend on the local shards (``to_local()`` aliases the
param's storage) as a split step: each backend writes every tensor's three
local sums, the optimizer all-reduces them, then the backend projects. The
sums of all sharded tensors that share a reduction (the same mesh and the
same sharded mesh dims) travel in ONE ``[num_tensors, 3]`` fp64 buffer, over
the mesh's own process group for those dims: one collective per step for
FSDP2, none for replicated dims (HSDP's replicas already agree), none for
plain tensors (DDP). Several sharded dims of a named mesh (2-D FSDP + TP
sharding) reduce over their flattened sub-mesh, still one collective; an
unnamed mesh cannot be flattened and takes one per sharded dim. Rows follow
the param groups' order, which every rank shares; an empty shard adds zeros.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch build without distributed: no param can be a DTensor
    dist = None
    DTensor = None

#: (device mesh, sharded mesh dims): the params whose sums are all-reduced together
ReduceKey = Tuple[Any, Tuple[int, ...]]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The local shard of a DTensor (same storage), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def reduce_key(param: Tensor, where: str) -> Optional[ReduceKey]:
    """How a param's sums must be reduced: None when this rank holds it whole."""
    if not is_dtensor(param):
        return None
    dims = []
    for dim, placement in enumerate(param.placements):
        if placement.is_partial():
            raise ValueError(
                f"{where}: a DTensor param with a Partial placement ({param.placements}); "
                "AdamSPD takes Shard and Replicate placements"
            )
        if placement.is_shard():
            dims.append(dim)
    return (param.device_mesh, tuple(dims)) if dims else None


def check_grad(param: Tensor, grad: Tensor, where: str) -> None:
    """A DTensor param needs a DTensor grad placed like it, and a plain param a plain grad."""
    if is_dtensor(param) != is_dtensor(grad):
        kind = "a DTensor" if is_dtensor(param) else "a plain tensor"
        raise RuntimeError(f"{where}: the param is {kind} but its grad is {type(grad).__name__}")
    if is_dtensor(param) and (grad.device_mesh != param.device_mesh or grad.placements != param.placements):
        raise RuntimeError(
            f"{where}: grad placed as {grad.placements} on {grad.device_mesh}, "
            f"param as {param.placements} on {param.device_mesh}"
        )


def check_placement(param: Tensor, value: Tensor, where: str) -> None:
    """Raise, naming ``where``, unless ``place_like(param, value)`` can place ``value``."""
    if not is_dtensor(param):
        if is_dtensor(value):
            raise ValueError(f"{where}: a DTensor for a param that is a plain tensor")
        return
    if is_dtensor(value):
        if value.device_mesh != param.device_mesh or value.placements != param.placements:
            raise ValueError(
                f"{where}: DTensor placed as {value.placements} on {value.device_mesh}; its param is placed as "
                f"{param.placements} on {param.device_mesh}"
            )
    elif value.shape != param.shape:
        raise ValueError(
            f"{where}: full tensor of shape {tuple(value.shape)}; its sharded param's global shape is "
            f"{tuple(param.shape)}"
        )


def place_like(param: Tensor, value: Tensor, where: str) -> Tensor:
    """``value`` (an anchor or a saved state) placed like ``param``.

    A DTensor param takes a DTensor on its mesh with its placements, or a full
    tensor of its global shape, which is sliced locally (every rank must pass
    the same full tensor, as it loads the same pre-trained weights). A plain
    param takes a plain tensor. Anything else raises, naming ``where``.
    """
    check_placement(param, value, where)
    if not is_dtensor(param) or is_dtensor(value):
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def process_groups(key: ReduceKey) -> List[Any]:
    """The groups whose all-reduce sums over the sharded dims of ``key``: one if it can be.

    Flattening creates a process group, a collective call: it happens when the
    buckets are built, at the same point of the same step on every rank.
    """
    mesh, dims = key
    if len(dims) == 1:
        return [mesh.get_group(dims[0])]
    names = mesh.mesh_dim_names
    if names is not None and hasattr(mesh, "_flatten"):
        return [mesh[tuple(names[d] for d in dims)]._flatten().get_group()]
    return [mesh.get_group(d) for d in dims]


@dataclass
class SumsReduction:
    """One all-reduce of the split-step sums of every bucket sharing a ``ReduceKey``.

    ``buffer`` holds one row per tensor in param-group order; each part is a
    bucket and the buffer rows of its tensors. A single bucket whose rows are
    the whole buffer in order uses the buffer as its ``sums`` (no copies).
    """

    key: ReduceKey
    buffer: Tensor
    groups: List[Any]
    parts: List[Tuple[Any, Optional[Tensor]]] = field(default_factory=list)

    def all_reduce_(self) -> None:
        for bucket, rows in self.parts:
            if rows is not None:
                self.buffer.index_copy_(0, rows, bucket.sums)
        for group in self.groups:  # one, unless an unnamed mesh has several sharded dims
            dist.all_reduce(self.buffer, group=group)
        for bucket, rows in self.parts:
            if rows is not None:
                torch.index_select(self.buffer, 0, rows, out=bucket.sums)


def plan_reductions(sharded: List[Tuple[Any, ReduceKey, List[int]]], n_rows: dict) -> List[SumsReduction]:
    """Give each split-step bucket its ``sums`` and group the buckets into reductions.

    ``sharded`` lists (bucket, key, buffer rows of its tensors) in the order the
    buckets were built; ``n_rows`` maps each key to its row count. Keys are
    reduced in first-seen order, the same on every rank.
    """
    reductions: dict = {}
    for bucket, key, rows in sharded:
        red = reductions.get(key)
        if red is None:
            buffer = torch.zeros((n_rows[key], 3), dtype=torch.float64, device=bucket.device)
            red = reductions[key] = SumsReduction(key, buffer, process_groups(key))
        red.parts.append((bucket, rows))
    for red in reductions.values():
        parts = red.parts
        whole = len(parts) == 1 and parts[0][1] == list(range(red.buffer.shape[0]))
        new_parts = []
        for bucket, rows in parts:
            if whole:
                bucket.sums = red.buffer
                new_parts.append((bucket, None))
            else:
                bucket.sums = torch.zeros((len(rows), 3), dtype=torch.float64, device=bucket.device)
                new_parts.append((bucket, torch.tensor(rows, dtype=torch.int64, device=bucket.device)))
        red.parts = new_parts
    return list(reductions.values())
