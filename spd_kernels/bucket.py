"""A bucket: the tensors of one param group that one backend call updates.

The optimizer groups the parameters that have gradients by (param group,
device, dtypes, backend) and hands each bucket to its backend as a whole. It
keeps the same bucket objects from step to step while the set of params with
grads stays the same, refreshing only ``grads`` and the hyperparameters, so a
backend may cache what it derives from the state tensors in ``backend_cache``. A
backend is one function ``fn(bucket) -> stats`` that updates ``params``,
``exp_avgs``, ``exp_avg_sqs``, ``max_exp_avg_sqs`` and ``steps`` in place and
returns the per-tensor stats (``spd_kernels.stats``) as an ``[n, NUM_STATS]``
fp32 tensor on the bucket's device.

A bucket of sharded tensors (each rank holds a slice; ``sums`` is set) runs as
a split step instead: ``start(bucket)`` does the Adam half and writes each
tensor's three local sums into ``sums``; the optimizer all-reduces them; the
``finish()`` that ``start`` returned projects and returns the stats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Union

import torch
from torch import Tensor

from .stats import NUM_STATS


#: the scalar settings of one step, as Bucket fields (every backend reads them all)
HYPERPARAMETERS = ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "max_scale")
#: the per-tensor lists a backend reads and updates
TENSOR_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "anchors", "steps")


@dataclass
class Bucket:
    #: the tensors the backend updates: the params themselves, or their local shards
    params: List[Tensor] = field(default_factory=list)
    grads: List[Tensor] = field(default_factory=list)
    exp_avgs: List[Tensor] = field(default_factory=list)
    exp_avg_sqs: List[Tensor] = field(default_factory=list)
    #: one per tensor when amsgrad, else None
    max_exp_avg_sqs: Optional[List[Tensor]] = None
    #: one per tensor, or None for an anchor-free group (a = 0, nothing read)
    anchors: Optional[List[Tensor]] = None
    #: 0-d fp32 step counters, incremented by the backend
    steps: List[Tensor] = field(default_factory=list)
    lr: Union[float, Tensor] = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    #: cap on the projection scale s = min(lam * r, max_scale); inf keeps the paper's rule
    max_scale: float = math.inf
    #: AMP (torch.amp.GradScaler): grads are divided by grad_scale; a nonzero
    #: found_inf skips the step (0-d fp32 tensors, read on the device)
    grad_scale: Optional[Tensor] = None
    found_inf: Optional[Tensor] = None
    #: the stats of the last step the backend ran (returned again when a step is skipped)
    stats: Optional[Tensor] = None
    #: per tensor, how many steps fired the projection condition (kept by the optimizer)
    projections: Optional[Tensor] = None
    #: the optimizer's params these entries belong to (DTensors for sharded params)
    owners: List[Tensor] = field(default_factory=list)
    #: split step only: fp64 [n, 3], each tensor's sum g*(p-a), |p-a|^2, |q-a|^2 (local, then all-reduced)
    sums: Optional[Tensor] = None
    #: private to the backend: what it derived from this bucket (e.g. device tables)
    backend_cache: Optional[object] = None

    def hyperparameters(self) -> dict:
        """The step's scalar settings by name (``HYPERPARAMETERS``)."""
        return {name: getattr(self, name) for name in HYPERPARAMETERS}

    def tensor_lists(self) -> dict:
        """The per-tensor lists by name (``TENSOR_LISTS``); None where a list is unused."""
        return {name: getattr(self, name) for name in TENSOR_LISTS}

    def skipped(self) -> bool:
        """Host-side check of found_inf, for the backends that run on the host (reference, CPU)."""
        return self.found_inf is not None and bool(self.found_inf.item() != 0)

    def last_stats(self) -> Tensor:
        if self.stats is not None:
            return self.stats
        return torch.zeros((len(self.params), NUM_STATS), dtype=torch.float32, device=self.device)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def device(self) -> torch.device:
        return self.params[0].device
