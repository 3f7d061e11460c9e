"""The plan of one ``AdamSPD.step()`` call: its buckets and the all-reduces of their split steps.

The optimizer keeps a plan while the same params have grads (``key``), so a
step only points the buckets at the new grads and settings. A plain training
loop has one plan. DeepSpeed ZeRO calls ``step()`` once per param group, with
``param_groups`` cut to that group, so the optimizer keeps one plan per set of
groups a call covers (``AdamSPD._plans``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Set, Tuple

import torch
from torch import Tensor

from .backends import Backend
from .bucket import Bucket
from .distributed import SumsReduction


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
