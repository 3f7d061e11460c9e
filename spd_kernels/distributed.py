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
DeepSpeed ZeRO-1/2's flat partitions reduce the same way, keyed by
DeepSpeed's data-parallel process group (``group_key``, ``spd_kernels.zero``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import quantization

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch build without distributed: no param can be a DTensor
    dist = None
    DTensor = None

#: (device mesh, sharded mesh dims), or (PROCESS_GROUP, a process group): the params whose sums are
#: all-reduced together
ReduceKey = Tuple[Any, Any]

#: the first half of a ReduceKey that names a process group directly (DeepSpeed's data-parallel group)
PROCESS_GROUP = "process group"


def group_key(process_group: Any) -> ReduceKey:
    """The key of tensors whose sums are all-reduced over ``process_group`` (None: the default group)."""
    return (PROCESS_GROUP, process_group)


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


def copy_to(value: Tensor, device: torch.device) -> Tensor:
    """A detached copy of ``value`` on ``device``; a DTensor stays one, placed as it was."""
    if not is_dtensor(value):
        return value.detach().to(device=device, copy=True)
    return DTensor.from_local(value.to_local().detach().to(device=device, copy=True), value.device_mesh,
                              value.placements, run_check=False, shape=value.shape, stride=value.stride())


def wrap_like(param: Tensor, local_value: Tensor) -> Tensor:
    """``local_value`` (this rank's part of a state shaped like ``param``'s shard) as a DTensor
    placed like ``param``; a plain param takes it as it is."""
    if not is_dtensor(param):
        return local_value
    return DTensor.from_local(local_value, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def _block_layout(param: Tensor) -> Tuple[int, int]:
    """(shards, blocks per shard) of a sharded param's 8-bit absmax: every shard gets room for
    the blocks of the largest shard (torch.chunk's first), so the absmax is an even split."""
    shape = list(param.shape)
    shards = 1
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():
            n = param.device_mesh.size(mesh_dim)
            shape[placement.dim] = -(-shape[placement.dim] // n)
            shards *= n
    largest = 1
    for size in shape:
        largest *= size
    return shards, quantization.num_blocks(largest)


def new_absmax(param: Tensor) -> Tensor:
    """A zero absmax for ``param``'s 8-bit moments, one fp32 per block of its local shard
    (``quantization.BLOCK_SIZE`` elements). For a DTensor param: a 1-D DTensor of ``shards * blocks`` entries split
    evenly over the param's sharded mesh dims (replicated over the others), so
    ``torch.distributed.checkpoint`` saves and restores every rank's blocks; a shard with fewer
    blocks than the largest leaves its tail unused (``local_absmax`` cuts it off)."""
    local_param = local(param)
    if not is_dtensor(param):
        return torch.zeros(quantization.num_blocks(local_param.numel()), dtype=torch.float32,
                           device=local_param.device)
    from torch.distributed.tensor import Replicate, Shard

    shards, blocks = _block_layout(param)
    placements = [Shard(0) if pl.is_shard() else Replicate() for pl in param.placements]
    values = torch.zeros(blocks, dtype=torch.float32, device=local_param.device)
    return DTensor.from_local(values, param.device_mesh, placements, run_check=False, shape=(shards * blocks,),
                              stride=(1,))


def local_absmax(absmax: Tensor, param: Tensor) -> Tensor:
    """The blocks of this rank's shard (a view: the kernels write through it)."""
    if not is_dtensor(absmax):
        return absmax
    return absmax.to_local()[: quantization.num_blocks(local(param).numel())]


def flat_start(param: Tensor) -> Optional[int]:
    """Where this rank's shard starts in the flattened whole tensor, when the shard is one stretch of it
    (a plain tensor: 0; a DTensor sharded on dim 0 only); None when it is not."""
    if not is_dtensor(param):
        return 0
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(pl.is_shard() and not (type(pl) is Shard and pl.dim == 0) for pl in param.placements):
        return None
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return offset[0] * math.prod(param.shape[1:]) if param.dim() else 0


def shard_of_blocks(param: Tensor, codes: Tensor, absmax: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """This rank's codes and absmax cut from a whole tensor's 8-bit state, when its shard is one
    stretch of the flattened tensor (sharded on dim 0 only) that starts where a block starts and
    ends where one ends (or at the tensor's end): its blocks are then the whole tensor's, exactly.
    None otherwise (the caller re-quantizes)."""
    start = flat_start(param)  # elements before this shard
    if start is None:
        return None
    numel, block = local(param).numel(), quantization.BLOCK_SIZE
    if start % block or (numel % block and start + numel != param.numel()):
        return None
    first = start // block
    return (codes.reshape(-1)[start:start + numel].reshape(local(param).shape),
            absmax[first:first + quantization.num_blocks(numel)])


def absmax_error(param: Tensor, absmax: Tensor) -> str:
    """Why a saved absmax cannot serve ``param`` ("" when it can)."""
    if is_dtensor(param):
        if not is_dtensor(absmax):
            return ""  # a full-tensor checkpoint: dequantized and re-quantized per shard on load
        shards, blocks = _block_layout(param)
        if absmax.shape != (shards * blocks,) or absmax.device_mesh != param.device_mesh:
            return (f"sharded absmax of {tuple(absmax.shape)} on {absmax.device_mesh}; this param needs "
                    f"({shards * blocks},) on {param.device_mesh} (a checkpoint of the same world size)")
        return ""
    if is_dtensor(absmax):
        return "a sharded (DTensor) absmax for a param that is a plain tensor"
    need = quantization.num_blocks(param.numel())
    return "" if absmax.numel() == need else f"{absmax.numel()} blocks, param needs {need}"


def process_groups(key: ReduceKey) -> List[Any]:
    """The groups whose all-reduce sums over the sharded dims of ``key``: one if it can be.

    Flattening creates a process group, a collective call: it happens when the
    buckets are built, at the same point of the same step on every rank.
    """
    mesh, dims = key
    if mesh == PROCESS_GROUP:
        return [dims]
    if len(dims) == 1:
        return [mesh.get_group(dims[0])]
    names = mesh.mesh_dim_names
    if names is not None and hasattr(mesh, "_flatten"):
        return [mesh[tuple(names[d] for d in dims)]._flatten().get_group()]
    return [mesh.get_group(d) for d in dims]


class RowCounter:
    """Rows of each reduction's buffer, handed out in param-group order (the same on every rank)."""

    def __init__(self) -> None:
        self.count: Dict[ReduceKey, int] = {}
        self.device: Dict[ReduceKey, torch.device] = {}

    def take(self, key: ReduceKey, n: int, device: torch.device) -> int:
        """The first of ``n`` new rows of ``key``'s buffer."""
        first = self.count.get(key, 0)
        self.count[key] = first + n
        self.device.setdefault(key, device)
        return first


@dataclass
class SumsReduction:
    """One all-reduce of the split-step sums of every bucket sharing a ``ReduceKey``.

    ``buffer`` holds one row per tensor in param-group order; each part is a
    bucket and the buffer rows of its tensors (several entries may add into one
    row: the fragments of one tensor). A single bucket whose rows are the whole
    buffer in order uses the buffer as its ``sums`` (no copies). A rank that
    holds none of the tensors (no parts) still joins with zeros.
    """

    key: ReduceKey
    buffer: Tensor
    groups: List[Any]
    parts: List[Tuple[Any, Optional[Tensor]]] = field(default_factory=list)

    def all_reduce_(self) -> None:
        if not self.parts or self.parts[0][1] is not None:  # rows no local entry covers add zeros
            self.buffer.zero_()
        for bucket, rows in self.parts:
            if rows is not None:
                self.buffer.index_add_(0, rows, bucket.sums)
        for group in self.groups:  # one, unless an unnamed mesh has several sharded dims
            dist.all_reduce(self.buffer, group=group)
        for bucket, rows in self.parts:
            if rows is not None:
                torch.index_select(self.buffer, 0, rows, out=bucket.sums)

    def any_(self, local: Tensor) -> bool:
        """Whether ``local`` (a 0-d flag) is nonzero on any rank of this reduction (a collective)."""
        flag = local.to(device=self.buffer.device, dtype=torch.float64).reshape(1)
        for group in self.groups:
            dist.all_reduce(flag, group=group)
        return bool(flag.item() != 0)


def plan_reductions(sharded: List[Tuple[Any, ReduceKey, List[int]]], rows: RowCounter) -> List[SumsReduction]:
    """Give each split-step bucket its ``sums`` and group the buckets into reductions.

    ``sharded`` lists (bucket, key, buffer rows of its tensors) in the order the
    buckets were built; ``rows`` counts each key's rows. Keys are reduced in
    first-seen order, the same on every rank, including keys no local bucket has.
    """
    reductions = {key: SumsReduction(key, torch.zeros((n, 3), dtype=torch.float64, device=rows.device[key]),
                                     process_groups(key)) for key, n in rows.count.items()}
    for bucket, key, bucket_rows in sharded:
        reductions[key].parts.append((bucket, bucket_rows))
    for red in reductions.values():
        parts = red.parts
        whole = len(parts) == 1 and parts[0][1] == list(range(red.buffer.shape[0]))
        new_parts = []
        for bucket, bucket_rows in parts:
            if whole:
                bucket.sums = red.buffer
                new_parts.append((bucket, None))
            else:
                bucket.sums = torch.zeros((len(bucket_rows), 3), dtype=torch.float64, device=bucket.device)
                new_parts.append((bucket, torch.tensor(bucket_rows, dtype=torch.int64, device=bucket.device)))
        red.parts = new_parts
    return list(reductions.values())
