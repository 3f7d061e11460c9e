"""Where each param's anchor comes from, kept with its param group until the param's first step.

AdamSPD creates a param's state (step, moments, anchor) at the first step that
updates it, as ``torch.optim.Adam`` does, not when it is built: Accelerate's
FSDP2 preparation, DeepSpeed ZeRO and the like replace the params in
``param_groups`` after the optimizer is built (DTensors, flat partitions), and
state made for the old params would stay behind at full size. Until that first
step a group remembers, per position in its ``params`` list, what it was built
with (``GroupOrigin``):

- the param's global shape, to notice a param that was replaced by something
  else than a sharded copy of itself;
- the list object the group's params were in. DeepSpeed puts a new list in
  the group (its flat partition) and leaves this one holding the model params,
  through which the partition is cut back into tensors (``spd_kernels.zero``).
  Accelerate swaps placeholders into this very list before it shards, so the
  unsharded params are not kept alive by it. (Weak references would not do:
  ``torch.utils.swap_tensors``, which ``Module.to`` uses for DTensor params,
  refuses a tensor that has one.)
- its anchor source: the tensor given in ``pre`` or pinned by
  ``AdamSPD.pin_anchors()``, or None for a snapshot of the param's value at its
  first step, its value before its first update.

A given or pinned anchor is placed as the param is at its first step (sliced
like a DTensor, cut into DeepSpeed fragments) and then dropped from here, so
the group holds it no longer than the state needs it. The record lives in the
group under ``ORIGIN_KEY``, which ``state_dict()`` leaves out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

#: the param-group key that holds the group's GroupOrigin (never saved)
ORIGIN_KEY = "_spd_origin"

#: ``pre`` of a group given without one: each anchor is its param's value before its first update
SNAPSHOT = object()


@dataclass(eq=False)
class GroupOrigin:
    #: each param's global shape when the group was added
    shapes: List[torch.Size]
    #: the list the group's params were added in (shared with the group until a framework replaces it)
    params: List[Tensor]
    #: per position: the anchor to use at the param's first step (given or pinned), or None to snapshot
    anchors: List[Optional[Tensor]]

    @classmethod
    def of(cls, params: List[Tensor], anchors: Optional[List[Optional[Tensor]]]) -> "GroupOrigin":
        return cls([p.shape for p in params], params,
                   list(anchors) if anchors is not None else [None] * len(params))

    def matches(self, params: List[Tensor]) -> bool:
        """Whether ``params`` are, position by position, tensors of the shapes the group was built with
        (the same params, or sharded versions of them, as FSDP2 makes)."""
        return len(params) == len(self.shapes) and all(p.shape == s for p, s in zip(params, self.shapes))

    def take(self, position: int) -> Optional[Tensor]:
        """The anchor kept for ``position`` (None: snapshot), released from the group."""
        anchor, self.anchors[position] = self.anchors[position], None
        return anchor

    def __repr__(self) -> str:
        kept = sum(a is not None for a in self.anchors)
        return f"GroupOrigin({len(self.shapes)} params, {kept} anchors kept until their first step)"


def origin(group: Dict[str, Any]) -> GroupOrigin:
    """The group's record; a group put in ``param_groups`` by hand gets one from its params now."""
    record = group.get(ORIGIN_KEY)
    if record is None:
        record = group[ORIGIN_KEY] = GroupOrigin.of(group["params"], None)
    return record


def snapshot(p: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    """A copy of ``p``'s value, placed like ``p``, in ``dtype`` (default: ``p``'s)."""
    return p.detach().to(dtype=dtype or p.dtype, copy=True)
