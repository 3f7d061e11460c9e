"""The plan of one ``AdamSPD.step()`` call: its buckets and the all-reduces of their split steps.

The optimizer keeps a plan while the same params have grads (``key``), so a
step only points the buckets at the new grads and settings. A plain training
loop has one plan. DeepSpeed ZeRO calls ``step()`` once per param group, with
``param_groups`` cut to that group, so the optimizer keeps one plan per set of
groups a call covers (``PlanCache``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor

from .backends import Backend
from .bucket import Bucket
from .distributed import SumsReduction


def all_lr_zero(groups: List[Dict[str, Any]]) -> bool:
    """Whether every group's lr is 0, as in torch.distributed.checkpoint's template step (read only
    for floats and CPU tensors: a device lr is never read)."""
    for group in groups:
        lr = group["lr"]
        if isinstance(lr, Tensor) and (lr.device.type != "cpu" or torch.compiler.is_compiling()):
            return False
        if float(lr) != 0.0:
            return False
    return True


@dataclass
class StepPlan:
    #: what decided the buckets (``AdamSPD._cache_key``)
    key: Tuple
    #: (backend, index of the bucket's group in this call's param_groups, bucket)
    buckets: List[Tuple[Backend, int, Bucket]]
    reductions: List[SumsReduction]
    #: the last step's (stat keys, stats, projection counts) of each bucket it ran
    last: List[Tuple[List[Tensor], Tensor, Tensor]] = field(default_factory=list)

    def backend_of(self, bucket: Bucket) -> Backend:
        return next(backend for backend, _, b in self.buckets if b is bucket)

    def all_zero_grads(self) -> Set[int]:
        """Ids of the buckets and reductions whose grads are all zero, on every rank they span.

        For the template step of ``torch.distributed.checkpoint`` (lr 0, zero grads, on a fresh
        optimizer): those create their state and count no step. A reduction decides for all its
        buckets from every rank's grads (one small all-reduce over its own groups, which all its
        ranks reach together), so the shards of a tensor never disagree.
        """
        def nonzero(bucket: Bucket) -> Tensor:
            return torch.stack([g.ne(0).any() for g in bucket.grads]).any()

        idle: Set[int] = set()
        reduced: Set[int] = set()
        for reduction in self.reductions:
            local = torch.zeros((), dtype=torch.bool)
            for bucket, _ in reduction.parts:
                local = local | nonzero(bucket).cpu()
                reduced.add(id(bucket))
            if not reduction.any_(local):
                idle.add(id(reduction))
                idle.update(id(bucket) for bucket, _ in reduction.parts)
        for _, _, bucket in self.buckets:
            if id(bucket) not in reduced and not bool(nonzero(bucket)):
                idle.add(id(bucket))
        return idle


class PlanCache:
    """The plans of the last ``step()`` calls, by the ids of the groups each covers, and the projection
    counts of params whose buckets were retired (a bucket keeps its params' counts while it lives)."""

    def __init__(self) -> None:
        self.plans: Dict[Tuple[int, ...], StepPlan] = {}
        self.counts: Dict[Tensor, Tensor] = {}

    def get(self, groups: Tuple[int, ...], key: Tuple) -> Optional[StepPlan]:
        plan = self.plans.get(groups)
        return plan if plan is not None and plan.key == key else None

    def put(self, groups: Tuple[int, ...], plan: StepPlan) -> StepPlan:
        """Keep ``plan`` for ``groups``, retiring every plan that shares a group with it."""
        self.retire(groups)
        self.plans[groups] = plan
        return plan

    def retire(self, overlapping: Optional[Tuple[int, ...]] = None) -> None:
        """Drop the plans sharing a group with ``overlapping`` (all when None), keeping their counts."""
        for groups in list(self.plans):
            if overlapping is None or set(groups) & set(overlapping):
                for _, _, bucket in self.plans.pop(groups).buckets:
                    bucket.give_back_counts(self.counts)

    def reset(self) -> None:
        """Forget the plans and the counts (the state they point at is being replaced)."""
        self.plans, self.counts = {}, {}

    def buckets(self) -> List[Tuple[Backend, int, Bucket]]:
        return [entry for plan in self.plans.values() for entry in plan.buckets]

    def last(self) -> List[Tuple[List[Tensor], Tensor, Tensor]]:
        """(stat keys, stats, projection counts) of every bucket the last steps ran."""
        return [entry for plan in self.plans.values() for entry in plan.last]
