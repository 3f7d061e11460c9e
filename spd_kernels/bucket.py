"""A bucket: the tensors of one param group that one backend call updates.

The optimizer groups the parameters that have gradients by (param group,
device, dtypes, backend) and hands each bucket to its backend as a whole. It
keeps the same bucket objects from step to step while the set of params with
grads stays the same, refreshing only ``grads`` and ``hp``, so a
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

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import distributed
from .hyperparameters import Hyperparameters
from .stats import NUM_STATS, STAT_C

#: the per-tensor lists a backend reads and updates
TENSOR_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "anchors", "steps",
                "exp_avg_scales", "exp_avg_sq_scales")


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
    #: the (exp_avg, exp_avg_sq) formats of every tensor's moments (``spd_kernels.formats``)
    formats: Tuple[str, str] = ("fp32", "fp32")
    #: per tensor, the per-block fp32 scales of a moment whose format has them (fp8: absmax / 448,
    #: bnb8: absmax; one per block of 256 elements); None for a moment without
    exp_avg_scales: Optional[List[Tensor]] = None
    exp_avg_sq_scales: Optional[List[Tensor]] = None
    #: per tensor, where its local shard starts in the whole flattened tensor (stochastic rounding's
    #: element index, so a sharded run rounds as the single process); None: all 0
    index_offsets: Optional[List[int]] = None
    #: the step's scalar settings, one record for every backend
    hp: Hyperparameters = field(default_factory=Hyperparameters)
    #: AMP (torch.amp.GradScaler): grads are divided by grad_scale; a nonzero
    #: found_inf skips the step (0-d fp32 tensors, read on the device)
    grad_scale: Optional[Tensor] = None
    found_inf: Optional[Tensor] = None
    #: the stats of the last step the backend ran (returned again when a step is skipped)
    stats: Optional[Tensor] = None
    #: per tensor, how many steps fired the projection condition (kept by the optimizer)
    projections: Optional[Tensor] = None
    #: the optimizer's params the entries' grads come from (DTensors for sharded params)
    owners: List[Tensor] = field(default_factory=list)
    #: the tensor each entry stands for in stats and projection counts: its owner, or for a
    #: fragment of a DeepSpeed flat partition the model param (spd_kernels.zero); None: ``owners``
    keys: Optional[List[Tensor]] = None
    #: per entry, the (first element, count) of its owner's flattened grad it takes; None: all of it
    grad_slices: Optional[List[tuple]] = None
    #: split step only: fp64 [n, 3], each tensor's sum g*(p-a), |p-a|^2, |q-a|^2 (local, then all-reduced)
    sums: Optional[Tensor] = None
    #: private to the backend: what it derived from this bucket (e.g. device tables)
    backend_cache: Optional[object] = None

    def tensor_lists(self) -> dict:
        """The per-tensor lists by name (``TENSOR_LISTS``); None where a list is unused."""
        return {name: getattr(self, name) for name in TENSOR_LISTS}

    # ------------------------------------------------------------ lifecycle
    # A bucket lives from the step that builds it until the set of params with
    # grads changes: each later step points it at the new grads and settings
    # (``refresh``); projection counts move in when it is built (``take_counts``)
    # and back out, per param, when it is retired (``give_back_counts``).

    def refresh(self, hp: Hyperparameters) -> bool:
        """Point at this step's grads of ``owners`` and the settings ``hp``.

        Returns False, changing nothing, if a grad is sparse or not placed like
        its param (the optimizer then rebuilds the buckets, which names the error).
        """
        grads = [p.grad for p in self.owners]
        if any(g is None or g.is_sparse or distributed.is_dtensor(g) != distributed.is_dtensor(p)
               for g, p in zip(grads, self.owners)):
            return False
        self.grads = self.entry_grads(grads)
        self.hp = hp
        return True

    def entry_grads(self, grads: List[Tensor]) -> List[Tensor]:
        """Each entry's grad from its owner's (``grads``, one per entry): the local shard, or a fragment."""
        local = [distributed.local(g) for g in grads]
        if self.grad_slices is None:
            return local
        return [g.view(-1).narrow(0, start, numel) for g, (start, numel) in zip(local, self.grad_slices)]

    @property
    def stat_keys(self) -> List[Tensor]:
        """The tensor each entry's stats row and projection count belong to."""
        return self.owners if self.keys is None else self.keys

    def take_counts(self, carried: Dict[Tensor, Tensor]) -> None:
        """Start ``projections``, continuing the counts its params carried from retired buckets."""
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        self.projections = torch.stack([carried.pop(p, zero).to(self.device) for p in self.stat_keys])

    def give_back_counts(self, carried: Dict[Tensor, Tensor]) -> None:
        """Hand each param's projection count back (the bucket is being retired)."""
        if self.projections is not None:
            for p, count in zip(self.stat_keys, self.projections.unbind(0)):
                carried[p] = count

    def record(self, stats: Tensor, counted: bool) -> None:
        """Keep a step's stats; add its fired flags (c < 0) to the counts unless the
        backend ``counted`` them itself. A couple of ops, no sync."""
        self.stats = stats
        if counted:
            return
        fired = (stats[:, STAT_C] < 0).to(torch.float32)
        if self.found_inf is not None:  # a skipped step fired nothing
            fired = fired * (self.found_inf == 0).to(torch.float32)
        self.projections += fired

    @property
    def eight_bit(self) -> bool:
        """Whether the moments are bitsandbytes' 8-bit codes with per-block absmax."""
        return self.formats == ("bnb8", "bnb8")

    @property
    def coded(self) -> bool:
        """Whether a moment is stored other than as its fp32 value (q is then kept in p's dtype)."""
        return self.formats != ("fp32", "fp32")

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
