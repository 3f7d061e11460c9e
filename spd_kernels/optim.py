"""``AdamSPD``: Adam with Selective Projection Decay, a ``torch.optim.Optimizer``.

The math is in docs/design.md and the class docstring (see also ``spd_kernels.reference``). This module
owns argument checks, param groups, anchors, state and ``state_dict``; it groups
the tensors that have gradients into buckets and hands each bucket to one
backend (``spd_kernels.backends``). It knows nothing of kernels.

Constructor and meaning follow the official ``adamSPD.py``: param groups may
carry ``pre``, a list of anchors (one per param), or ``pre: None`` for an
anchor-free group (a = 0: LoRA factors and other new parameters). A group
without ``pre`` takes each param's value before its first update as its
anchor. ``weight_decay`` is SPD's lambda and is not scaled by lr.

State per parameter follows ``torch.optim.Adam``: ``step`` (0-d fp32 tensor),
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad), all in fp32 (or the
param dtype when wider), plus ``anchor`` for anchored groups, so that
``state_dict()`` saves it and sharded checkpointing shards it. As in
``torch.optim.Adam`` it is created at a param's first step, for the param that
``param_groups`` holds then, so frameworks that swap params in after the
optimizer is built (Accelerate's FSDP2, DeepSpeed ZeRO) leave no stale state
(``spd_kernels.anchors``).

DTensor params (FSDP2, HSDP) are updated through their local shards; the
per-tensor sums are all-reduced between the two halves of the step (see
``spd_kernels.distributed``), and states and anchors are DTensors placed like
their params, so ``torch.distributed.checkpoint`` saves and loads them.
DeepSpeed ZeRO-1/2's flat partitions are stepped fragment by fragment
(``spd_kernels.zero``).
"""
from __future__ import annotations

import numbers
import warnings
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import anchors, backends, distributed, quantization, zero
from .anchors import ORIGIN_KEY
from .backends import Backend
from .bucket import Bucket
from .hyperparameters import Hyperparameters
from .plan import StepPlan
from .reference import compute_dtype
from .stats import STAT_C, STAT_NAMES

#: marks a group given without 'pre': each anchor is its param's value before its first update
_SNAPSHOT = object()

_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
#: 8-bit moments: the per-block absmax beside each code tensor (spd_kernels.quantization)
_ABSMAX_KEYS = {"exp_avg": "exp_avg_absmax", "exp_avg_sq": "exp_avg_sq_absmax"}
_SIGNED = {"exp_avg": True, "exp_avg_sq": False}
#: group keys that choose the state format: a loaded checkpoint keeps the running optimizer's
_FORMAT_KEYS = ("optim_bits", "min_8bit_size")


def _on(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


def _check_hyperparameters(group: Dict[str, Any], where: str) -> None:
    """Raise ValueError naming ``where`` if a hyperparameter is out of range."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}: lr as a tensor must have one element, got shape {tuple(lr.shape)}")
        # a device lr is not read back (that would sync), nor one being traced by torch.compile
        if lr.device.type == "cpu" and not torch.compiler.is_compiling():
            lr = lr.item()
    if not isinstance(lr, Tensor) and not (lr >= 0.0):
        raise ValueError(f"{where}: lr must be >= 0, got {lr}")
    if not (group["eps"] >= 0.0):
        raise ValueError(f"{where}: eps must be >= 0, got {group['eps']}")
    if not (group["weight_decay"] >= 0.0):
        raise ValueError(f"{where}: weight_decay must be >= 0, got {group['weight_decay']}")
    bits = group.get("optim_bits", 32)
    if isinstance(bits, bool) or bits not in (8, 32):
        raise ValueError(f"{where}: optim_bits must be 32 or 8, got {bits!r}")
    size = group.get("min_8bit_size", 4096)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{where}: min_8bit_size must be an int >= 0, got {size!r}")
    if bits == 8 and group["amsgrad"]:
        raise ValueError(f"{where}: amsgrad with optim_bits=8 is not supported (its max would need "
                         "a third 8-bit state); use optim_bits=32 for this group")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor):  # as torch.optim.Adam takes them: one value, read on the host
            if beta.numel() != 1 or beta.device.type != "cpu" or not beta.is_floating_point():
                raise ValueError(
                    f"{where}: betas[{i}] as a tensor must be a one-element floating-point CPU tensor, "
                    f"got shape {tuple(beta.shape)}, {beta.dtype} on {beta.device}"
                )
            if torch.compiler.is_compiling():
                continue
            beta = beta.item()
        if not isinstance(beta, numbers.Real):
            raise ValueError(f"{where}: betas[{i}] must be a float in [0, 1), got {type(beta).__name__} {beta!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{where}: betas[{i}] must be in [0, 1), got {beta}")


def _check_param_dtype(p: Tensor, where: str) -> None:
    if p.is_complex():
        raise TypeError(f"{where}: AdamSPD needs real floating-point parameters, got {p.dtype}")
    if not p.is_floating_point():
        raise TypeError(f"{where}: AdamSPD needs floating-point parameters, got {p.dtype}")
    if getattr(p, "_fsdp_flattened", False):
        raise ValueError(f"{where}: a parameter flattened by FSDP1 (FullyShardedDataParallel); its shards mix "
                         "pieces of many tensors, and SPD needs per-tensor sums. Use FSDP2 (fully_shard)")


def _all_lr_zero(groups: List[Dict[str, Any]]) -> bool:
    """Whether every group's lr is 0 (read only for floats and CPU tensors: a device lr is never read)."""
    for group in groups:
        lr = group["lr"]
        if isinstance(lr, Tensor) and (lr.device.type != "cpu" or torch.compiler.is_compiling()):
            return False
        if float(lr) != 0.0:
            return False
    return True


def _unwrap(param: Any) -> Tensor:
    """A param entry may be a tensor or a ``(name, tensor)`` pair."""
    return param[1] if isinstance(param, tuple) else param


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
        params: parameters (or ``(name, param)`` pairs, which key
            ``spd_stats()`` by name) or param groups. A group may carry
            ``pre``: a list of anchors (the pre-trained weights, one per
            param, same shape and device), or ``None`` for anchor-free.

            The anchor rule: a param's anchor is the ``pre`` anchor given for
            it, else its value before its first update, taken at its first
            step. State (step, moments, anchor) is created at that first step,
            as in ``torch.optim.Adam``, for the param ``param_groups`` holds
            then and placed as that param is: a framework that swaps params
            after the optimizer is built (Accelerate's and the Trainer's
            FSDP2 preparation swap in DTensors; DeepSpeed ZeRO-1/2 flat
            partitions) gets state for what it steps only, and a given anchor
            is sliced like its DTensor or cut into the ZeRO fragment. The
            snapshot equals one taken here unless something updates the
            params in between; ``pin_anchors()`` takes it early, for code
            that changes params before the first step. A frozen param
            (``requires_grad=False``, a LoRA base) costs nothing until it has
            a grad. A step before any state exists with lr = 0 everywhere
            (what ``torch.distributed.checkpoint`` runs to build a template)
            creates the state of tensors whose grads are all zero without
            counting a step for them.
        lr, betas, eps, amsgrad: as in ``torch.optim.Adam``. ``lr`` may be a
            0-d tensor.
        weight_decay: SPD's lambda (strength of the projection), not scaled
            by lr. 0 gives plain Adam.
        anchor_dtype: dtype for the anchors stored in state (e.g.
            ``torch.bfloat16`` halves their memory). Default: the param's
            dtype for snapshots, the given dtype for ``pre`` anchors.
        impl: ``'auto'`` (fused Triton for CUDA tensors, the compiled CPU
            kernel for CPU tensors, the reference for anything they do not
            take), ``'reference'``, ``'triton'`` or ``'cpu'``.
        capturable: keep ``step`` on the param's device (the Triton backend
            always does). Kept in each group like ``torch.optim.Adam``.
        cap_projection: cap the pull at s = min(lambda * r, 1), so a projection
            never moves a layer past its anchor. Off by default (the paper's
            rule). With lambda > 1, lambda * r > 1 overshoots the anchor and
            lambda * r > 2 moves the layer farther from it than before: turn
            this on when you sweep lambda above 1.
        optim_bits: 32 (fp32 moments) or 8: tensors with at least
            ``min_8bit_size`` elements keep ``exp_avg``/``exp_avg_sq`` as
            uint8 codes plus an fp32 absmax per block of 256 elements
            (``exp_avg_absmax``/``exp_avg_sq_absmax``), bitsandbytes' blockwise
            dynamic format: 2 bytes per param instead of 8. Smaller tensors
            stay fp32. Not with amsgrad. Kept in each group (bitsandbytes'
            names and default).
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
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            capturable=capturable,
            cap_projection=cap_projection,
            optim_bits=optim_bits,
            min_8bit_size=min_8bit_size,
        )
        _check_hyperparameters(defaults, "AdamSPD")
        if impl not in backends.IMPLS:
            raise ValueError(f"AdamSPD: impl must be one of {backends.IMPLS}, got {impl!r}")
        # the backend every param runs on, or None for impl='auto' (chosen per param at its first step)
        self._backend: Optional[Backend] = None if impl == "auto" else backends.get(impl)
        if self._backend is not None and self._backend.unavailable():
            raise RuntimeError(f"AdamSPD: impl={impl!r} but {self._backend.unavailable()}")
        if anchor_dtype is not None and not (
            isinstance(anchor_dtype, torch.dtype) and anchor_dtype.is_floating_point
        ):
            raise TypeError(f"AdamSPD: anchor_dtype must be a floating-point torch.dtype, got {anchor_dtype!r}")
        backends.make_eager_only()  # before any step can be traced by torch.compile
        self.impl = impl
        self.anchor_dtype = anchor_dtype
        # the plans of the last steps, by the groups they cover (ids): reused while the same params have
        # grads. One plan in a plain loop; DeepSpeed ZeRO steps its groups one call each, a plan per group.
        self._plans: Dict[Tuple[int, ...], StepPlan] = {}
        # How many steps fired the projection condition (c < 0): a vector per live
        # bucket (one add per step); per param here for params whose bucket was retired.
        self._projection_counts: Dict[Tensor, Tensor] = {}
        self._explicit_lambdas: List[bool] = []  # per group added by __init__: did it set its own weight_decay
        super().__init__(params, defaults)
        self._warn_if_lambda_overridden()
        del self._explicit_lambdas

    def __getstate__(self) -> Dict[str, Any]:
        return {**super().__getstate__(), "impl": self.impl, "anchor_dtype": self.anchor_dtype}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("impl", "auto")
        self.__dict__.setdefault("anchor_dtype", None)
        self._backend = None if self.impl == "auto" else backends.get(self.impl)
        self._plans: Dict[Tuple[int, ...], StepPlan] = {}
        self._projection_counts = {}

    def _warn_if_lambda_overridden(self) -> None:
        """Warn when the λ given to the constructor runs nowhere because every group set its own
        (the Hugging Face Trainer builds two groups, weight_decay=args.weight_decay and 0.0)."""
        lam = self.defaults["weight_decay"]
        if lam > 0 and self._explicit_lambdas and all(self._explicit_lambdas) and \
                all(g["weight_decay"] != lam for g in self.param_groups):
            warnings.warn(
                f"AdamSPD: weight_decay={lam} (SPD's lambda) was given, but every param group sets its own "
                f"weight_decay ({[g['weight_decay'] for g in self.param_groups]}), so SPD runs with those "
                "lambdas, 0 meaning none (plain Adam). A framework that builds its own groups overrides it: "
                "the Hugging Face Trainer does (from args.weight_decay); use "
                "Trainer(optimizer_cls_and_kwargs=spd_kernels.hf.optimizer_cls_and_kwargs(lr=..., "
                "weight_decay=...)), or groups without 'weight_decay'.", UserWarning, stacklevel=3)

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group; validates everything first, so a bad group changes nothing. No state is
        created here: each param gets its state at its first step (see the class docstring)."""
        index = len(self.param_groups)
        where = f"param_groups[{index}]"
        group = dict(param_group)
        group.pop(ORIGIN_KEY, None)
        pre = group.pop("pre", _SNAPSHOT)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        tensors = [_unwrap(p) for p in params]
        for i, p in enumerate(tensors):
            if not isinstance(p, Tensor):
                raise TypeError(f"{where}['params'][{i}]: expected a Tensor, got {type(p).__name__}")
            _check_param_dtype(p, f"{where}['params'][{i}]")
            distributed.reduce_key(p, f"{where}['params'][{i}]")  # raises for placements we cannot reduce
        merged = {**self.defaults, **group}
        if isinstance(merged["betas"], list):
            group["betas"] = merged["betas"] = tuple(merged["betas"])
        _check_hyperparameters(merged, where)
        if self._backend is not None:
            for i, p in enumerate(tensors):
                error = (self._backend.device_error(p.device)
                         or self._backend.layout_error(distributed.local(p), self.anchor_dtype,
                                                       8 if self._eight_bit(p, merged) else 32))
                if error:
                    raise ValueError(f"{where}['params'][{i}]: {error}")
        given = self._check_anchors(pre, tensors, where)

        group["params"] = params
        group["anchor_free"] = pre is None
        super().add_param_group(group)  # raises on duplicates before anything is kept
        added = self.param_groups[-1]
        added[ORIGIN_KEY] = anchors.GroupOrigin.of(added["params"], given)  # the list torch keeps
        self._retire_plans()
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
            # before the first step under DeepSpeed the group holds a flat partition: pin the model params
            params = group["params"] if origin.matches(group["params"]) else origin.params
            for i, p in enumerate(params):
                if origin.anchors[i] is None and "anchor" not in self.state.get(p, {}):
                    origin.anchors[i] = anchors.snapshot(p, self.anchor_dtype)

    def _check_anchors(self, pre: Any, params: List[Tensor], where: str) -> Optional[List[Optional[Tensor]]]:
        """Validate ``pre`` against ``params``. Returns None for an anchor-free group,
        else one entry per param: the given anchor (detached), or None to snapshot."""
        if pre is None:
            return None
        if pre is _SNAPSHOT:
            return [None] * len(params)
        if isinstance(pre, Tensor) or not isinstance(pre, (list, tuple)):
            raise TypeError(f"{where}['pre']: expected a list of anchor tensors or None, got {type(pre).__name__}")
        if len(pre) != len(params):
            raise ValueError(f"{where}['pre']: {len(pre)} anchors for {len(params)} params")
        for i, (p, a) in enumerate(zip(params, pre)):
            at = f"{where}['pre'][{i}]"
            if not isinstance(a, Tensor):
                raise TypeError(f"{at}: expected a Tensor, got {type(a).__name__}")
            if a.is_complex() or not a.is_floating_point():
                raise TypeError(f"{at}: anchors must be real floating-point, got {a.dtype}")
            if a.shape != p.shape:
                raise ValueError(f"{at}: shape {tuple(a.shape)} does not match its param's {tuple(p.shape)}")
            if a.device != p.device:
                raise ValueError(f"{at}: on {a.device}, its param is on {p.device}")
            distributed.check_placement(p, a, at)
            a_local, p_local = distributed.local(a), distributed.local(p)
            if p_local.numel() > 0 and a_local.data_ptr() == p_local.data_ptr():
                raise ValueError(f"{at}: the anchor shares storage with its param; pass a copy (p.detach().clone())")
            if self._backend is not None and self.anchor_dtype is None:
                error = self._backend.layout_error(p_local, a.dtype)
                if error:
                    raise ValueError(f"{at}: {error}")
        return [a.detach() for a in pre]

    def _stored_anchor(self, p: Tensor, given: Optional[Tensor], where: str) -> Tensor:
        """The anchor kept in state: ``given`` placed like ``p`` in ``anchor_dtype``, or a snapshot of ``p``."""
        if given is None:
            return anchors.snapshot(p, self.anchor_dtype)
        a = distributed.place_like(p, given, where)
        if self.anchor_dtype is not None and a.dtype != self.anchor_dtype:
            a = a.to(self.anchor_dtype)
        return a

    # -------------------------------------------------------------------- step

    def _gather(self) -> List[Tuple[int, Dict[str, Any], List[Tuple[int, Tensor]], Optional[zero.Partition]]]:
        """Check every grad and what each group holds now; return, per group with grads, its index,
        the group, its (position, param) pairs with grads, and its ZeRO partition (or None).
        Mutates nothing."""
        work = []
        for gi, group in enumerate(self.param_groups):
            origin = anchors.origin(group)
            partition = None if origin.matches(group["params"]) else self._partition(group, origin, gi)
            with_grad = []
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                where = f"param_groups[{gi}]['params'][{pi}]"
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError(f"{where}: AdamSPD does not support sparse gradients")
                if g.shape != p.shape:
                    raise RuntimeError(f"{where}: grad shape {tuple(g.shape)} != param shape {tuple(p.shape)}")
                if g.device != p.device:
                    raise RuntimeError(f"{where}: grad on {g.device}, param on {p.device}")
                if not g.is_floating_point():
                    raise RuntimeError(f"{where}: grad dtype {g.dtype} is not floating-point")
                distributed.check_grad(p, g, where)
                error = self._backend.device_error(p.device) if self._backend is not None else ""
                if error:  # the param moved since construction
                    raise RuntimeError(f"{where}: {error}")
                given = origin.anchors[pi] if partition is None and "anchor" not in self.state.get(p, {}) else None
                if given is not None and not group["anchor_free"]:  # placed at this step: check it now
                    distributed.check_placement(p, given, f"param_groups[{gi}]['pre'][{pi}]")
                with_grad.append((pi, p))
            if with_grad:
                work.append((gi, group, with_grad, partition))
        return work

    def _partition(self, group: Dict[str, Any], origin: anchors.GroupOrigin, gi: int) -> zero.Partition:
        """The ZeRO-1/2 partition a group now holds instead of the params it was built with; raises a
        named error for anything else that replaced them."""
        where = f"param_groups[{gi}]"
        if any(zero.is_zero3_param(p) for p in origin.params):
            raise RuntimeError(zero.zero3_error(where))
        params = group["params"]
        partition = zero.partition_of(params[0], origin) if len(params) == 1 and params[0].dim() == 1 else None
        if partition is None:
            raise RuntimeError(
                f"{where}['params'] no longer holds the params the group was built with "
                f"({len(origin.shapes)} of shapes {[tuple(s) for s in origin.shapes][:4]}..., now {len(params)} of "
                f"shapes {[tuple(p.shape) for p in params][:4]}...). AdamSPD follows params replaced by sharded "
                "versions of themselves (FSDP2 DTensors, as Accelerate and the Trainer swap them in) and "
                "DeepSpeed ZeRO-1/2's flat partitions; anything else would change the tensors SPD's per-tensor "
                "sums run over. Build the optimizer for the params as they are now")
        if group.get("optim_bits", 32) == 8:
            raise ValueError(f"{where}: optim_bits=8 under DeepSpeed ZeRO is not supported (its 8-bit blocks would "
                             "be cut by the flat partition); use optim_bits=32, or FSDP2 for 8-bit states")
        return partition

    def _materialize(self, work) -> None:
        """Create the state this step's params lack (the anchor rule: class docstring), and move
        existing state to where and into the format each param needs it."""
        for gi, group, positions, partition in work:
            origin = anchors.origin(group)
            anchored = not group["anchor_free"]
            if partition is not None:
                flat = positions[0][1]
                if anchored and "anchor" not in self.state[flat]:
                    self.state[flat]["anchor"] = self._fragment_anchors(flat, partition, origin)
                self._init_state(flat, group, self._step_device(flat, group))
                continue
            for pi, p in positions:
                if anchored and "anchor" not in self.state[p]:
                    self.state[p]["anchor"] = self._stored_anchor(p, origin.take(pi), f"param_groups[{gi}]['pre'][{pi}]")
                self._init_state(p, group, self._step_device(p, group))

    def _fragment_anchors(self, flat: Tensor, partition: zero.Partition, origin: anchors.GroupOrigin) -> Tensor:
        """The anchor of a ZeRO flat partition: its own values (the model's, before its first update),
        with each fragment of a param given an anchor cut from that anchor."""
        anchor = anchors.snapshot(flat, self.anchor_dtype)
        for frag in partition.fragments:
            given = origin.anchors[frag.row]
            if given is not None:
                anchor.narrow(0, frag.start, frag.numel).copy_(given.reshape(-1).narrow(0, frag.offset, frag.numel))
        origin.anchors = [None] * len(origin.anchors)  # this rank's pieces are cut: the rest is other ranks'
        return anchor

    def _backend_for(self, p: Tensor, group: Dict[str, Any]) -> Backend:
        anchor = self.state[p].get("anchor") if not group["anchor_free"] else None
        return backends.choose(self.impl, distributed.local(p), anchor.dtype if anchor is not None else None,
                               8 if self._eight_bit(p, group) else 32)

    def _step_device(self, p: Tensor, group: Dict[str, Any], backend: Optional[Backend] = None) -> torch.device:
        """Where ``step`` lives: on the param's device when its backend keeps it there or
        the group is capturable, else on the CPU (as torch.optim.Adam)."""
        backend = backend or self._backend_for(p, group)
        return p.device if backend.step_on_device or group["capturable"] else torch.device("cpu")

    def _init_state(self, p: Tensor, group: Dict[str, Any], step_device: torch.device) -> Dict[str, Any]:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
            if self._eight_bit(p, group):
                # blocks are local to a shard: a sharded param's codes are placed like it, its
                # absmax is split evenly over its shards (distributed.new_absmax)
                for key in _ABSMAX_KEYS:
                    codes = torch.full_like(distributed.local(p), quantization.zero_code(_SIGNED[key]),
                                            dtype=torch.uint8, memory_format=torch.contiguous_format)
                    state[key] = distributed.wrap_like(p, codes)
                    state[_ABSMAX_KEYS[key]] = distributed.new_absmax(p)
            else:
                moment_dtype = compute_dtype(p.dtype)
                state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
        elif state["step"].device != step_device:
            state["step"] = state["step"].to(step_device)
        # State built before the model moved (model.to(device) after the optimizer) follows its param.
        for key in (*_MOMENT_KEYS, *_ABSMAX_KEYS.values(), "anchor"):
            t = state.get(key)
            if t is not None and t.device != p.device:
                state[key] = t.to(p.device)
        self._match_format(p, group)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            # amsgrad switched on mid-run starts its max from the current v, as if it had been on.
            state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
        return state

    @staticmethod
    def _eight_bit(p: Tensor, group: Dict[str, Any]) -> bool:
        """Whether ``p``'s moments are 8-bit under ``group``'s settings (by its whole size, so
        every rank of a sharded param decides alike)."""
        return group.get("optim_bits", 32) == 8 and p.numel() >= group.get("min_8bit_size", 4096)

    def _match_format(self, p: Tensor, group: Dict[str, Any]) -> None:
        """Convert ``p``'s moments to the format its group asks for: a 32-bit checkpoint
        loaded into an 8-bit optimizer is quantized, an 8-bit one into a 32-bit optimizer
        dequantized."""
        state = self.state[p]
        if "exp_avg" not in state:
            return
        want_8bit = self._eight_bit(p, group)
        if want_8bit == (state["exp_avg"].dtype == torch.uint8):
            return
        for key, absmax_key in _ABSMAX_KEYS.items():
            value = distributed.local(state[key])
            if want_8bit:
                codes = torch.empty(value.shape, dtype=torch.uint8, device=p.device)
                absmax = distributed.new_absmax(p)
                quantization.quantize_(codes, distributed.local_absmax(absmax, p), value.float(), _SIGNED[key])
                state[key], state[absmax_key] = distributed.wrap_like(p, codes), absmax
            else:
                absmax = distributed.local_absmax(state.pop(absmax_key), p)
                fp32 = quantization.dequantize(value, absmax, _SIGNED[key])
                state[key] = distributed.wrap_like(p, fp32.to(compute_dtype(p.dtype)))

    def _buckets(self, work) -> Tuple[List[Tuple[Backend, int, Bucket]], List[distributed.SumsReduction]]:
        """The buckets of this step's params, and the all-reduces their split steps need.

        Params of one bucket share a group, a backend, a device, dtypes and (for
        sharded params) a reduction; the backend sees their local shards, or the
        fragments of a ZeRO partition. Only gathers: the state exists already.
        """
        buckets: Dict[Tuple, Tuple[Backend, int, Bucket]] = {}
        sharded_rows: Dict[Tuple, List[int]] = defaultdict(list)  # bucket key -> rows in its reduction
        rows = distributed.RowCounter()
        for gi, group, positions, partition in work:
            anchored = not group["anchor_free"]
            for pi, p in positions:
                state = self.state[p]
                backend = self._backend_for(p, group)
                anchor = state.get("anchor") if anchored else None
                eight_bit = "exp_avg_absmax" in state
                if partition is not None:
                    reduce = distributed.group_key(partition.process_group)
                    first = rows.take(reduce, partition.rows, p.device)
                else:
                    reduce = distributed.reduce_key(p, f"param_groups[{gi}]['params'][{pi}]")
                    first = rows.take(reduce, 1, p.device) if reduce is not None else None
                key = (gi, backend.name, p.device, p.dtype, p.grad.dtype, anchor.dtype if anchor is not None else None,
                       eight_bit, reduce)
                if key not in buckets:
                    bucket = Bucket(
                        max_exp_avg_sqs=[] if group["amsgrad"] else None,
                        anchors=[] if anchored else None,
                        exp_avg_absmaxs=[] if eight_bit else None,
                        exp_avg_sq_absmaxs=[] if eight_bit else None,
                        keys=[] if partition is not None else None,
                        grad_slices=[] if partition is not None else None,
                        hp=Hyperparameters.from_group(group),
                    )
                    buckets[key] = (backend, gi, bucket)
                b = buckets[key][2]
                if partition is not None:
                    self._add_fragments(b, p, partition, state, anchor, group["amsgrad"])
                    sharded_rows[key] += [first + frag.row for frag in partition.fragments]
                    continue
                b.owners.append(p)
                b.params.append(distributed.local(p))
                b.grads.append(distributed.local(p.grad))
                b.exp_avgs.append(distributed.local(state["exp_avg"]))
                b.exp_avg_sqs.append(distributed.local(state["exp_avg_sq"]))
                b.steps.append(state["step"])
                if group["amsgrad"]:
                    b.max_exp_avg_sqs.append(distributed.local(state["max_exp_avg_sq"]))
                if anchored:
                    b.anchors.append(distributed.local(anchor))
                if eight_bit:
                    b.exp_avg_absmaxs.append(distributed.local_absmax(state["exp_avg_absmax"], p))
                    b.exp_avg_sq_absmaxs.append(distributed.local_absmax(state["exp_avg_sq_absmax"], p))
                if first is not None:
                    sharded_rows[key].append(first)
        kept = {key: bucket for key, bucket in buckets.items() if len(bucket[2])}  # a rank may hold no fragment
        reductions = distributed.plan_reductions(
            [(kept[key][2], key[-1], r) for key, r in sharded_rows.items() if key in kept], rows)
        return list(kept.values()), reductions

    @staticmethod
    def _add_fragments(b: Bucket, flat: Tensor, partition: zero.Partition, state: Dict[str, Any],
                       anchor: Optional[Tensor], amsgrad: bool) -> None:
        """One entry per fragment of a ZeRO flat partition: 1-D views of the partition and its state,
        each with a step counter of its own (the kernels increment every entry's), which all advance
        together; ``state['step']`` is the first of them."""
        steps = state["step"].reshape(1).repeat(len(partition.fragments))
        if len(partition.fragments):
            state["step"] = steps[0]
        for j, frag in enumerate(partition.fragments):
            def piece(t: Tensor, frag=frag) -> Tensor:
                return t.view(-1).narrow(0, frag.start, frag.numel)

            b.owners.append(flat)
            b.keys.append(frag.key)
            b.grad_slices.append((frag.start, frag.numel))
            b.params.append(piece(flat))
            b.grads.append(piece(flat.grad))
            b.exp_avgs.append(piece(state["exp_avg"]))
            b.exp_avg_sqs.append(piece(state["exp_avg_sq"]))
            b.steps.append(steps[j])
            if amsgrad:
                b.max_exp_avg_sqs.append(piece(state["max_exp_avg_sq"]))
            if anchor is not None:
                b.anchors.append(piece(anchor))

    def _cache_key(self) -> Tuple:
        """What decides the buckets: each group's params, which of them have grads, where they
        live (a param moved in place, as ``Module.to`` may do, needs its checks again), its switches."""
        return tuple(
            (
                tuple(map(id, g["params"])),
                tuple(p.grad is None for p in g["params"]),
                tuple(p.device for p in g["params"]),
                g["amsgrad"],
                g["anchor_free"],
                g["capturable"],
                g.get("optim_bits", 32),
                g.get("min_8bit_size", 4096),
            )
            for g in self.param_groups
        )

    def _plan(self) -> StepPlan:
        """This call's plan: the last one for these groups while the same params have grads, else a new one
        (checks first, then the state this step needs, then the buckets)."""
        groups = tuple(map(id, self.param_groups))
        key = self._cache_key()
        plan = self._plans.get(groups)
        if plan is not None and plan.key == key and self._refresh(plan.buckets):
            return plan
        work = self._gather()
        self._retire_plans(overlapping=groups)
        self._materialize(work)
        plan = self._plans[groups] = StepPlan(key, *self._buckets(work))
        return plan

    def _refresh(self, buckets: List[Tuple[Backend, int, Bucket]]) -> bool:
        """Point cached buckets at this step's grads and settings (an lr scheduler may have
        changed them); False if one cannot be (``_gather`` then raises the named error)."""
        hps = [Hyperparameters.from_group(g) for g in self.param_groups]
        return all(bucket.refresh(hps[gi]) for _, gi, bucket in buckets)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamSPD step over every param that has a grad; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            _check_hyperparameters(group, f"param_groups[{gi}]")
        # torch.distributed.checkpoint's test for a state that is not built yet: its template step follows
        fresh = not self.state
        # All checks happen before any state or param changes. While the same
        # params have grads, the plan of the last step is reused as it is.
        plan = self._plan()
        idle = plan.all_zero_grads() if fresh and _all_lr_zero(self.param_groups) else set()
        # Set by torch.amp.GradScaler.step around this call (device tensors, never read here).
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        plan.last = []
        for backend, _, bucket in plan.buckets:
            if id(bucket) in idle:
                continue
            bucket.grad_scale = _on(grad_scale, bucket.device)
            bucket.found_inf = _on(found_inf, bucket.device)
            if bucket.projections is None:
                bucket.take_counts(self._projection_counts)
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

    def _retire_plans(self, overlapping: Optional[Tuple[int, ...]] = None) -> None:
        """Drop the cached plans (those sharing a group with ``overlapping``, or all), keeping
        their projection counts per param."""
        for groups in list(self._plans):
            if overlapping is None or set(groups) & set(overlapping):
                for _, _, bucket in self._plans.pop(groups).buckets:
                    bucket.give_back_counts(self._projection_counts)

    def buckets(self) -> List[Tuple[Backend, Bucket]]:
        """The (backend, bucket) pairs the last steps ran, pointed at the params' current grads: each
        bucket is what one backend call updates (``spd_kernels.bucket``). For tools that time the kernels
        alone (``bench --kernels-only``) and tests; valid until the set of params with grads changes."""
        out = []
        for plan in self._plans.values():
            for backend, _, bucket in plan.buckets:
                bucket.refresh(bucket.hp)  # at the params' current grads, with the last step's settings
                out.append((backend, bucket))
        return out

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
        counts = {p: c for plan in self._plans.values() for params, _, cs in plan.last
                  for p, c in zip(params, cs.unbind(0))}
        out: Dict[str, Dict[str, Tensor]] = {}
        for name, _, p in self.named_params():
            row = last.get(p)
            if row is None:
                continue
            entry = {stat: row[i] for i, stat in enumerate(STAT_NAMES)}
            entry["projected"] = row[STAT_C] < 0
            entry["projections"] = counts[p]
            out[name] = entry
        return out

    def named_params(self):
        """(name, group, param) of every param, in group order; the names ``spd_stats()`` uses.
        Under DeepSpeed ZeRO-1/2 these are the model params, not the flat partition that stands for them."""
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            params = group["params"]
            origin = anchors.origin(group)
            if not origin.matches(params) and len(params) == 1 and zero.partition_of(params[0], origin):
                params = origin.params
            for pi, p in enumerate(params):
                yield (names[pi] if names else f"{gi}.{pi}"), group, p

    def last_step_stats(self) -> Dict[Tensor, Tensor]:
        """Per-param stats rows of the last ``step()`` (columns: ``spd_kernels.stats``).

        Rows stay on the params' device; reading them is what syncs, not ``step()``.
        """
        out = {}
        for plan in self._plans.values():
            for params, stats, _ in plan.last:
                for i, p in enumerate(params):
                    out[p] = stats[i]
        return out

    # -------------------------------------------------------------- state dict

    def state_dict(self) -> Dict[str, Any]:
        """``torch.optim.Optimizer.state_dict()``, without the groups' private records (anchors not yet
        placed stay with the running optimizer: a state only exists from a param's first step)."""
        out = super().state_dict()
        out["param_groups"] = [{k: v for k, v in g.items() if k != ORIGIN_KEY} for g in out["param_groups"]]
        return out

    # -------------------------------------------------------------- state dict

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load our own state_dict or one saved by the official ``adamSPD.py``.

        Unlike ``Optimizer.load_state_dict``, fp32 moments of low-precision
        params stay fp32 and anchors keep their dtype. The moments' format is
        this optimizer's (``optim_bits``, ``min_8bit_size``): 32-bit saved
        moments are quantized into an 8-bit optimizer, 8-bit ones dequantized
        into a 32-bit optimizer.
        """
        state_dict = _from_official_format(state_dict)
        self._check_loadable(state_dict)
        # Groups saved by an older version (or edited by hand) may lack some of our
        # keys: they keep this optimizer's values, as torch.optim fills its defaults.
        # The state format is a choice of the running optimizer, not a training setting: it stays.
        state_dict = {**state_dict, "param_groups": [
            {**{k: v for k, v in group.items() if k not in ("params", ORIGIN_KEY)}, **saved,
             **{k: group[k] for k in _FORMAT_KEYS}}
            for saved, group in zip(state_dict["param_groups"], self.param_groups)
        ]}
        # the records of what each group was built with stay the running optimizer's (torch deep-copies
        # the saved groups: they must not pass through it)
        origins = [anchors.origin(group) for group in self.param_groups]
        self._plans = {}  # the buckets hold the state tensors about to be replaced
        self._projection_counts = {}
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        for group, origin in zip(self.param_groups, origins):
            group[ORIGIN_KEY] = origin
        # torch cast floating state to each param's dtype; put back the saved dtypes.
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            entry = saved_state.get(pid, {})
            if distributed.is_dtensor(p) and _ABSMAX_KEYS["exp_avg"] in entry and \
                    not distributed.is_dtensor(entry[_ABSMAX_KEYS["exp_avg"]]):
                entry = self._shard_8bit_state(p, entry)
            for key, value in entry.items():
                if isinstance(value, Tensor):
                    self.state[p][key] = self._loaded_tensor(key, value, p)
        for group in self.param_groups:
            for p in group["params"]:
                if p not in self.state:  # no state saved: it is made at the param's first step
                    continue
                step = self.state[p].get("step")
                if step is not None and not isinstance(step, Tensor):
                    self.state[p]["step"] = torch.tensor(float(step), dtype=torch.float32)
                self._match_format(p, group)

    def _shard_8bit_state(self, p: Tensor, entry: Dict[str, Any]) -> Dict[str, Any]:
        """A whole tensor's saved 8-bit moments for sharded ``p``: where this shard's blocks are
        the whole tensor's, its codes and absmax are cut out exactly (into ``self.state``);
        elsewhere the moments are dequantized, for ``_match_format`` to quantize in the shard's
        own blocks (one more rounding). Returns the entry left to load."""
        rest = {k: v for k, v in entry.items() if k not in _ABSMAX_KEYS and k not in _ABSMAX_KEYS.values()}
        for key, absmax_key in _ABSMAX_KEYS.items():
            cut = distributed.shard_of_blocks(p, entry[key], entry[absmax_key])
            if cut is None:
                rest[key] = quantization.dequantize(entry[key], entry[absmax_key], _SIGNED[key])
                self.state[p].pop(absmax_key, None)
                continue
            codes, blocks = cut
            absmax = distributed.new_absmax(p)
            distributed.local_absmax(absmax, p).copy_(blocks)
            self.state[p][key] = distributed.wrap_like(p, codes.to(p.device, copy=True).contiguous())
            self.state[p][absmax_key] = absmax
        return rest

    def _loaded_tensor(self, key: str, value: Tensor, p: Tensor) -> Tensor:
        if key == "step":
            # the first step moves it to where its backend wants it
            return distributed.local(value).detach().to(dtype=torch.float32, device="cpu", copy=True)
        if key in _ABSMAX_KEYS.values() or value.dtype == torch.uint8:  # 8-bit moments: codes and absmax
            return distributed.copy_to(value, p.device)
        if key in _MOMENT_KEYS:
            dtype = compute_dtype(value.dtype)
        elif key == "anchor":
            dtype = self.anchor_dtype or value.dtype
        else:
            dtype = value.dtype
        value = value.detach().to(dtype=dtype, device=p.device, copy=True)
        return distributed.place_like(p, value, f"load_state_dict: state {key!r} of a param")

    def _check_loadable(self, state_dict: Dict[str, Any]) -> None:
        """Raise before loading if the saved groups and anchors do not fit this optimizer."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"load_state_dict: {len(saved_groups)} saved param groups, optimizer has {len(self.param_groups)}"
            )
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"load_state_dict: param_groups[{gi}] has {len(saved['params'])} saved params, "
                    f"optimizer has {len(group['params'])}"
                )
            for pi, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                entry = state_dict["state"].get(pid, {})
                where = f"load_state_dict: param_groups[{gi}]['params'][{pi}]"
                for key, value in entry.items():
                    if key in _ABSMAX_KEYS.values():
                        error = distributed.absmax_error(p, value)
                        if error:
                            raise ValueError(f"{where}: saved {key}: {error}")
                    elif isinstance(value, Tensor) and key != "step":
                        if value.shape != p.shape:
                            raise ValueError(
                                f"{where}: saved {key} has shape {tuple(value.shape)}, param {tuple(p.shape)}"
                            )
                        distributed.check_placement(p, value, f"{where}: saved {key}")
                # a param frozen when saved has no entry; one that trained has its anchor
                if not saved.get("anchor_free", group["anchor_free"]) and "step" in entry and "anchor" not in entry:
                    raise ValueError(f"{where}: the saved group is anchored but has no anchor for this param")


def _from_official_format(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Convert a state_dict of the official ``adamSPD.py`` to ours; ours pass through.

    The official class keeps anchors in each group's ``pre`` list, an int
    ``step`` and an unused full-size ``hyper`` state per param.
    """
    groups = state_dict["param_groups"]
    if not any("pre" in g for g in groups):
        return state_dict
    state = defaultdict(dict, {k: dict(v) for k, v in state_dict["state"].items()})
    new_groups = []
    for gi, g in enumerate(groups):
        g = dict(g)
        pre = g.pop("pre", None)
        g.setdefault("capturable", False)
        g["anchor_free"] = pre is None
        if pre is not None:
            if len(pre) != len(g["params"]):
                raise ValueError(
                    f"load_state_dict: param_groups[{gi}]['pre'] has {len(pre)} anchors for {len(g['params'])} params"
                )
            for pid, a in zip(g["params"], pre):
                state[pid]["anchor"] = a
        new_groups.append(g)
    for entry in state.values():
        entry.pop("hyper", None)
        if "step" in entry and not isinstance(entry["step"], Tensor):
            entry["step"] = torch.tensor(float(entry["step"]), dtype=torch.float32)
    return {"state": dict(state), "param_groups": new_groups}
