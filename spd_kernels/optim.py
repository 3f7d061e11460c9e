"""``AdamSPD``: Adam with Selective Projection Decay, a ``torch.optim.Optimizer``.

This module is the glue, as ``torch.optim.Adam``'s ``_init_group`` only gathers:
the checks are in ``spd_kernels.checks``, what a param's state holds and how it
is made in ``spd_kernels.state`` (the anchors' sources until then in
``spd_kernels.anchors``), the grouping of the params with grads into buckets
in ``spd_kernels.bucketing``, the plans reused across steps in
``spd_kernels.plan``, checkpoint loading in ``spd_kernels.checkpoint``, and the
math in the backends (``spd_kernels.backends``). The algorithm is in the class
docstring and docs/design.md.

Constructor and meaning follow the official ``adamSPD.py``: param groups may
carry ``pre``, a list of anchors (one per param), or ``pre: None`` for an
anchor-free group (a = 0: LoRA factors and other new parameters).
``weight_decay`` is SPD's lambda and is not scaled by lr. DTensor params (FSDP2,
HSDP) are stepped through their local shards, with the per-tensor sums
all-reduced between the two halves of the step (``spd_kernels.distributed``);
DeepSpeed ZeRO-1/2's flat partitions fragment by fragment (``spd_kernels.zero``).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import anchors, backends, bucketing, checkpoint, checks, distributed, formats, state
from .anchors import ORIGIN_KEY, SNAPSHOT
from .backends import Backend
from .bucket import Bucket
from .hyperparameters import Hyperparameters
from .plan import PlanCache, StepPlan, all_lr_zero
from .stats import STAT_C, STAT_NAMES


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


class AdamSPD(Optimizer):
    """Adam with Selective Projection Decay (Tian, Huang, Kira, NeurIPS 2024).

    Per parameter tensor θ ("layer") with anchor a (its pre-trained value;
    a = 0 anchor-free), each step::

        m ← β1 m + (1 - β1) g;   v ← β2 v + (1 - β2) g²        (amsgrad: v_max ← max(v_max, v))
        q ← θ - γ (m / (1 - β1^t)) / (sqrt(v / (1 - β2^t)) + ε)  (the plain Adam step)
        c ← -Σ g ⊙ (θ - a)                                       (θ before the step)
        if c < 0:
            r ← clamp((‖q - a‖ - ‖θ - a‖) / ‖q - a‖, 0, 1)      (0 if ‖q - a‖ = 0)
            q ← q - λ r (q - a)                                  (cap_projection: min(λ r, 1))
        θ ← q

    The sums run over the whole tensor (across ranks when sharded); math is
    fp32 whatever the storage. Details: docs/design.md.

    Args:
        params: parameters (``(name, param)`` pairs key ``spd_stats()`` by name) or param groups.
            A group may carry ``pre``, one anchor per param (same shape and device), or ``None``
            for anchor-free. The anchor rule: a param's anchor is the one given for it, else its
            value before its first update. State is made at that first step, as in
            ``torch.optim.Adam``, for the tensor ``param_groups`` holds then and placed as it
            is (a framework may swap in DTensors or DeepSpeed's flat partitions before that:
            docs/design.md). ``pin_anchors()`` takes the snapshots early. A frozen param costs
            nothing until it has a grad. torch.distributed.checkpoint's template step (zero grads
            at lr 0 before any state exists) makes the state and counts no step.
        lr, betas, eps, amsgrad: as in ``torch.optim.Adam``; ``lr`` may be a 0-d tensor.
        weight_decay: SPD's lambda (strength of the projection), not scaled by lr; 0 is Adam.
        anchor_dtype: dtype of the stored anchors (``torch.bfloat16`` halves them). Default:
            the param's for snapshots, the given one for ``pre`` anchors.
        impl: ``'auto'`` (fused Triton for CUDA tensors, the compiled CPU kernel for CPU
            tensors, the reference for anything they do not take), ``'reference'``,
            ``'triton'`` or ``'cpu'``.
        capturable: keep ``step`` on the param's device (Triton always does), per group.
        cap_projection: cap the pull at s = min(lambda * r, 1), so a projection never moves a
            layer past its anchor (off: the paper's rule; turn it on when sweeping lambda > 1,
            where lambda * r > 2 ends farther from the anchor than before).
        exp_avg_dtype, exp_avg_sq_dtype: the moments' formats (Transformer Engine's names), per
            group: ``torch.float32`` (default), ``torch.bfloat16`` (the second moment rounded
            stochastically, reproducibly) or, for ``exp_avg`` only, ``torch.float8_e4m3fn``
            (256 elements share one fp32 scale; tensors under ``min_8bit_size`` elements stay
            fp32). ``exp_avg_dtype=torch.float8_e4m3fn, exp_avg_sq_dtype=torch.bfloat16`` keeps
            3 bytes per param instead of 8. Formats: ``spd_kernels.formats``, docs/formats.md.
        optim_bits, min_8bit_size: 32, or 8 for bitsandbytes' blockwise 8-bit format (uint8 codes
            with an fp32 absmax per 256 elements, its names) on tensors of at least
            ``min_8bit_size`` elements. Not with exp_avg_dtype/exp_avg_sq_dtype; compressed
            moments not with amsgrad.
    """

    #: torch.amp.GradScaler hands us grad_scale / found_inf instead of unscaling grads itself
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        anchor_dtype: Optional[torch.dtype] = None,
        impl: str = "auto",
        capturable: bool = False,
        cap_projection: bool = False,
        optim_bits: int = 32,
        min_8bit_size: int = 4096,
        exp_avg_dtype: torch.dtype = torch.float32,
        exp_avg_sq_dtype: torch.dtype = torch.float32,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, capturable=capturable,
                        cap_projection=cap_projection, optim_bits=optim_bits, min_8bit_size=min_8bit_size,
                        exp_avg_dtype=formats.dtype_name(exp_avg_dtype),
                        exp_avg_sq_dtype=formats.dtype_name(exp_avg_sq_dtype))
        checks.hyperparameters(defaults, "AdamSPD")
        if impl not in backends.IMPLS:
            raise ValueError(f"AdamSPD: impl must be one of {backends.IMPLS}, got {impl!r}")
        # the backend every param runs on, or None for impl='auto' (chosen per param at its first step)
        self._backend: Optional[Backend] = None if impl == "auto" else backends.get(impl)
        if self._backend is not None and self._backend.unavailable():
            raise RuntimeError(f"AdamSPD: impl={impl!r} but {self._backend.unavailable()}")
        if anchor_dtype is not None and not (isinstance(anchor_dtype, torch.dtype) and anchor_dtype.is_floating_point):
            raise TypeError(f"AdamSPD: anchor_dtype must be a floating-point torch.dtype, got {anchor_dtype!r}")
        backends.make_eager_only()  # before any step can be traced by torch.compile
        self.impl = impl
        self.anchor_dtype = anchor_dtype
        self._plans = PlanCache()
        self._explicit_lambdas: List[bool] = []  # per group added by __init__: did it set its own weight_decay
        super().__init__(params, defaults)
        checks.lambda_overridden(weight_decay, self.param_groups, self._explicit_lambdas)
        del self._explicit_lambdas

    def __getstate__(self) -> Dict[str, Any]:
        return {**super().__getstate__(), "impl": self.impl, "anchor_dtype": self.anchor_dtype}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("impl", "auto")
        self.__dict__.setdefault("anchor_dtype", None)
        self._backend = None if self.impl == "auto" else backends.get(self.impl)
        self._plans = PlanCache()

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group; validates everything first, so a bad group changes nothing. No state is
        created here: each param gets its state at its first step (the class docstring)."""
        where = f"param_groups[{len(self.param_groups)}]"
        group = {k: formats.dtype_name(v) if k in formats.DTYPE_KEYS else v
                 for k, v in param_group.items() if k not in ("pre", ORIGIN_KEY)}
        pre = param_group.get("pre", SNAPSHOT)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]  # (name, param) pairs too
        for i, p in enumerate(tensors):
            checks.param(p, f"{where}['params'][{i}]")
        merged = {**self.defaults, **group}
        if isinstance(merged["betas"], list):
            group["betas"] = merged["betas"] = tuple(merged["betas"])
        checks.hyperparameters(merged, where)
        for i, p in enumerate(tensors):
            checks.backend_takes(self._backend, p, self.anchor_dtype, state.formats_for(p, merged),
                                 f"{where}['params'][{i}]")
        given = checks.anchors(pre, tensors, where, self._backend, self.anchor_dtype)
        group["params"], group["anchor_free"] = params, pre is None
        super().add_param_group(group)  # raises on duplicates before anything is kept
        added = self.param_groups[-1]
        added[ORIGIN_KEY] = anchors.GroupOrigin.of(added["params"], given)  # the list torch keeps
        self._plans.retire()
        if hasattr(self, "_explicit_lambdas"):
            self._explicit_lambdas.append("weight_decay" in param_group)

    def pin_anchors(self) -> None:
        """Take every anchor that is not yet taken or given now, from the params' current values.

        By default a param's anchor is its value at its first step (before its first update).
        Call this after building the optimizer when something changes the params before the first
        step that must not move the anchors. A pinned anchor is kept as a given one is: in
        ``anchor_dtype``, placed as the param is at its first step.
        """
        for group in self.param_groups:
            if group["anchor_free"]:
                continue
            origin = anchors.origin(group)
            for i, p in enumerate(bucketing.model_params(group)):  # under ZeRO: the model params
                if origin.anchors[i] is None and "anchor" not in self.state.get(p, {}):
                    origin.anchors[i] = anchors.snapshot(p, self.anchor_dtype)

    # -------------------------------------------------------------------- step

    def _plan(self) -> StepPlan:
        """This call's plan: the last one for these groups while the same params have grads, else a new
        one (the checks first, then the state this step needs, then the buckets)."""
        groups, key = tuple(map(id, self.param_groups)), bucketing.cache_key(self.param_groups)
        plan = self._plans.get(groups, key)
        hps = [Hyperparameters.from_group(g) for g in self.param_groups]
        if plan is not None and all(bucket.refresh(hps[gi]) for _, gi, bucket in plan.buckets):
            return plan
        work = bucketing.gather(self.param_groups, self.state, self._backend)
        self._plans.retire(groups)
        for item in work:
            self._make_state(item)
        return self._plans.put(groups, StepPlan(key, *bucketing.buckets(work, self.state, self.impl)))

    def _make_state(self, item: bucketing.Work) -> None:
        """The state of a group's params that have none (the anchor rule: the class docstring)."""
        group, origin = item.group, anchors.origin(item.group)
        for pi, p in item.params:
            entry = self.state[p]
            if not group["anchor_free"] and "anchor" not in entry:
                entry["anchor"] = (
                    state.fragment_anchor(p, item.partition, origin, self.anchor_dtype) if item.partition else
                    state.stored_anchor(p, origin.take(pi), self.anchor_dtype, f"param_groups[{item.index}]['pre'][{pi}]"))
            state.make(entry, p, group, bucketing.step_device(self.impl, p, entry, group))

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamSPD step over every param that has a grad; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            checks.hyperparameters(group, f"param_groups[{gi}]")
        # torch.distributed.checkpoint's test for a state that is not built yet: its template step follows
        fresh = not self.state
        plan = self._plan()  # every check happens before any state or param changes
        idle = plan.all_zero_grads() if fresh and all_lr_zero(self.param_groups) else set()
        # Set by torch.amp.GradScaler.step around this call (device tensors, never read here).
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        plan.last = []
        for backend, _, bucket in plan.buckets:
            if id(bucket) in idle:
                continue
            bucket.grad_scale, bucket.found_inf = _on(grad_scale, bucket.device), _on(found_inf, bucket.device)
            if bucket.projections is None:
                bucket.take_counts(self._plans.counts)
            if bucket.sums is None:
                self._finish(plan, backend, bucket, backend.run(bucket))
        reductions = [r for r in plan.reductions if id(r) not in idle]
        if reductions:
            self._split_steps(plan, reductions)
        for _, _, bucket in plan.buckets:
            # the next step points the buckets at its own grads; holding these would keep a second copy
            # of every grad alive through the next backward (the Trainer frees grads with zero_grad)
            bucket.grads = []
        return loss

    @backends.eager_only(reason=(
        "AdamSPD: sharded (DTensor) params take a split step around an all-reduce, which runs eagerly; "
        "compile without fullgraph=True, or keep opt.step() out of the compiled region"
    ))
    def _split_steps(self, plan: StepPlan, reductions: List[distributed.SumsReduction]) -> None:
        """Sharded buckets: the Adam half and local sums, the all-reduces, then the projections."""
        finishes = [(backend, bucket, backend.start(bucket)) for reduction in reductions
                    for bucket, _ in reduction.parts for backend in [plan.backend_of(bucket)]]
        for reduction in reductions:
            reduction.all_reduce_()
        for backend, bucket, finish in finishes:
            self._finish(plan, backend, bucket, finish())

    @staticmethod
    def _finish(plan: StepPlan, backend: Backend, bucket: Bucket, stats: Tensor) -> None:
        bucket.record(stats, counted=backend.counts_projections)
        plan.last.append((bucket.stat_keys, stats, bucket.projections))

    def buckets(self) -> List[Tuple[Backend, Bucket]]:
        """The (backend, bucket) pairs the last steps ran, pointed at the params' current grads: each
        bucket is what one backend call updates (``spd_kernels.bucket``). For tools that time the kernels
        alone (``bench --kernels-only``) and tests; valid until the set of params with grads changes."""
        for _, _, bucket in self._plans.buckets():
            bucket.refresh(bucket.hp)  # at the params' current grads, with the last step's settings
        return [(backend, bucket) for backend, _, bucket in self._plans.buckets()]

    # ------------------------------------------------------------------ stats

    def spd_stats(self) -> Dict[str, Dict[str, Tensor]]:
        """Per-layer SPD stats of the last ``step()``, keyed by parameter name.

        Names come from ``named_parameters()`` when the optimizer was given
        them, else ``"<group>.<index>"``. Each entry maps ``c``, ``norm_p_a``,
        ``norm_q_a``, ``r``, ``scale`` (0-d fp32 tensors), ``projected``
        (``c < 0``, a bool tensor) and ``projections`` (steps that fired so far
        in this optimizer's life; not saved in ``state_dict``). Everything stays
        on the device: nothing here syncs. ``spd_kernels.stats.to_log_dict``
        turns the result into plain floats for a logger.
        """
        last = self.last_step_stats()
        counts = {p: c for params, _, cs in self._plans.last() for p, c in zip(params, cs.unbind(0))}
        out: Dict[str, Dict[str, Tensor]] = {}
        for name, _, p in self.named_params():
            row = last.get(p)
            if row is not None:
                out[name] = {**{stat: row[i] for i, stat in enumerate(STAT_NAMES)},
                             "projected": row[STAT_C] < 0, "projections": counts[p]}
        return out

    def named_params(self):
        """(name, group, param) of every param, in group order; the names ``spd_stats()`` uses.
        Under DeepSpeed ZeRO-1/2 these are the model params, not the flat partition that stands for them."""
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for pi, p in enumerate(bucketing.model_params(group)):
                yield (names[pi] if names else f"{gi}.{pi}"), group, p

    def last_step_stats(self) -> Dict[Tensor, Tensor]:
        """Per-param stats rows of the last ``step()`` (columns: ``spd_kernels.stats``).

        Rows stay on the params' device; reading them is what syncs, not ``step()``.
        """
        return {p: stats[i] for params, stats, _ in self._plans.last() for i, p in enumerate(params)}

    # -------------------------------------------------------------- state dict

    def state_dict(self) -> Dict[str, Any]:
        """``torch.optim.Optimizer.state_dict()``, without the groups' private records (anchors not yet
        placed stay with the running optimizer: a state only exists from a param's first step)."""
        out = super().state_dict()
        out["param_groups"] = [{k: v for k, v in g.items() if k != ORIGIN_KEY} for g in out["param_groups"]]
        return out

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load our own state_dict or one saved by the official ``adamSPD.py`` (``spd_kernels.checkpoint``).

        Unlike ``Optimizer.load_state_dict``, fp32 moments of low-precision
        params stay fp32 and anchors keep their dtype. The moments' format is
        this optimizer's (``exp_avg_dtype``, ``exp_avg_sq_dtype``, ``optim_bits``,
        ``min_8bit_size``): saved moments in another format are converted through fp32.
        """
        state_dict = checkpoint.from_official_format(state_dict)
        checkpoint.check(state_dict, self.param_groups)
        state_dict = checkpoint.with_running_settings(state_dict, self.param_groups)
        origins = [anchors.origin(group) for group in self.param_groups]
        self._plans.reset()  # the buckets hold the state tensors about to be replaced
        super().load_state_dict(state_dict)
        for group, origin in zip(self.param_groups, origins):
            group[ORIGIN_KEY] = origin
        checkpoint.restore(self.state, self.param_groups, state_dict, self.anchor_dtype)
