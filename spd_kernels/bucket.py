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
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Union

import torch
from torch import Tensor


@dataclass
class Bucket:
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
    #: private to the backend: what it derived from this bucket (e.g. device tables)
    backend_cache: Optional[object] = None

    def __len__(self) -> int:
        return len(self.params)

    @property
    def device(self) -> torch.device:
        return self.params[0].device
