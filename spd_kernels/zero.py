"""DeepSpeed ZeRO-1/2: a rank's flat fp32 partition cut back into the tensors whose pieces it holds.

ZeRO stages 1 and 2 give the optimizer one flat fp32 tensor per param group and
rank (``param_groups[i]['params'] = [flat]``): the rank's slice of all the
group's params laid end to end, plus alignment padding on the last rank. SPD's
sums must run per model tensor, so AdamSPD steps each fragment of the flat
partition (a contiguous 1-D view: one model param's elements that this rank
holds) as a tensor of its own, adds each fragment's three sums into its
param's row, all-reduces the rows once over the data-parallel group, and
projects each fragment with its param's totals. Padding belongs to no
fragment and is never touched.

DeepSpeed links each model param to its fragment (``param._hp_mapping``,
``deepspeed/utils/tensor_fragment.py``): ``hp_fragment`` is the view of the flat
partition, ``hp_fragment_address.start`` where it starts there, and
``lp_fragment_address.start`` where it starts in the param's flattened
elements, which is where its anchor comes from. A param with no elements on
this rank has no mapping; its row gets zeros from this rank. Every param of
the group has a row, in group order, so all ranks' rows agree.

ZeRO-3 swaps flat slices of many tensors into the group around each
``step()``, one sub-group at a time, and links no fragments: AdamSPD refuses it
with a named error (``zero3_error``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

from torch import Tensor

from .anchors import GroupOrigin


@dataclass(frozen=True)
class Fragment:
    #: the model param's position in its group, which is its row in the step's reduction
    row: int
    #: the model param (stats and projection counts are keyed by it)
    key: Tensor
    #: first element of the fragment in the flat partition
    start: int
    #: first element of the fragment in the model param's flattened elements
    offset: int
    numel: int


@dataclass(frozen=True)
class Partition:
    """How one flat partition splits into fragments, and over which group their sums reduce."""

    fragments: List[Fragment]
    #: the group's param count: the rows of its reduction, the same on every rank
    rows: int
    #: DeepSpeed's data-parallel process group of these params
    process_group: Any


def _in_storage(view: Tensor, flat: Tensor) -> bool:
    return view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def is_zero3_param(p: Optional[Tensor]) -> bool:
    """A param partitioned by ZeRO-3 (``deepspeed.zero.Init`` or stage 3 of ``deepspeed.initialize``)."""
    return p is not None and hasattr(p, "ds_id")


def zero3_error(where: str) -> str:
    return (f"{where}: DeepSpeed ZeRO-3 is not supported: it steps flat slices of many tensors one "
            "sub-group at a time and links no per-tensor fragments, so SPD's per-tensor sums cannot be "
            "formed. Use ZeRO stage 1 or 2 (exact: one all-reduce of the sums per step), or FSDP2 "
            "(torch fully_shard, or Accelerate / the Trainer with fsdp_version=2)")


def partition_of(flat: Tensor, origin: GroupOrigin) -> Optional[Partition]:
    """The fragments of ``flat`` when it is a ZeRO-1/2 partition of the group's params, else None."""
    originals = origin.params
    fragments, process_group, linked = [], None, False
    for row, p in enumerate(originals):
        if p is None or not hasattr(p, "_dp_group"):
            continue
        linked = True
        process_group = p._dp_group
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None or not _in_storage(mapping.hp_fragment, flat):
            continue
        fragments.append(Fragment(row=row, key=p, start=mapping.hp_fragment_address.start,
                                  offset=mapping.lp_fragment_address.start, numel=mapping.hp_fragment_address.numel))
    if not linked:
        return None
    return Partition(fragments=sorted(fragments, key=lambda f: f.start), rows=len(originals),
                     process_group=process_group)
