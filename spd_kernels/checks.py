"""What ``AdamSPD`` checks before it changes anything: arguments, params, anchors, grads.

Each check raises a named error (the group and param index it is about, what
was wrong) and mutates nothing, so a bad input leaves the model and the
optimizer as they were; ``lambda_overridden`` only warns. Checkpoints are
checked in ``spd_kernels.checkpoint``.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from . import distributed, formats
from .anchors import SNAPSHOT
from .backends import Backend


def hyperparameters(group: Dict[str, Any], where: str) -> None:
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
    formats.check(group, where)
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


def param(p: Any, where: str) -> None:
    """A param AdamSPD can step: a real floating-point tensor, placed so its sums can be reduced."""
    if not isinstance(p, Tensor):
        raise TypeError(f"{where}: expected a Tensor, got {type(p).__name__}")
    if p.is_complex():
        raise TypeError(f"{where}: AdamSPD needs real floating-point parameters, got {p.dtype}")
    if not p.is_floating_point():
        raise TypeError(f"{where}: AdamSPD needs floating-point parameters, got {p.dtype}")
    if getattr(p, "_fsdp_flattened", False):
        raise ValueError(f"{where}: a parameter flattened by FSDP1 (FullyShardedDataParallel); its shards mix "
                         "pieces of many tensors, and SPD needs per-tensor sums. Use FSDP2 (fully_shard)")
    distributed.reduce_key(p, where)  # raises for placements we cannot reduce


def anchors(pre: Any, params: List[Tensor], where: str, backend: Optional[Backend],
            anchor_dtype: Optional[torch.dtype]) -> Optional[List[Optional[Tensor]]]:
    """Validate ``pre`` against ``params``. Returns None for an anchor-free group, else one entry
    per param: the given anchor (detached), or None for its value before its first update."""
    if pre is None:
        return None
    if pre is SNAPSHOT:
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
        if backend is not None and anchor_dtype is None:
            error = backend.layout_error(p_local, a.dtype)
            if error:
                raise ValueError(f"{at}: {error}")
    return [a.detach() for a in pre]


def backend_takes(backend: Optional[Backend], p: Tensor, anchor_dtype: Optional[torch.dtype],
                  moment_formats: formats.Pair, where: str) -> None:
    """With a fixed ``impl``: its backend runs ``p``'s device, layout, dtypes and moment formats."""
    error = backend and (backend.device_error(p.device) or
                         backend.layout_error(distributed.local(p), anchor_dtype, formats.names(moment_formats)))
    if error:
        raise ValueError(f"{where}: {error}")


def lambda_overridden(lam: float, groups: List[Dict[str, Any]], explicit: List[bool]) -> None:
    """Warn when the lambda given to the constructor runs nowhere because every group set its own
    (the Hugging Face Trainer builds two groups, weight_decay=args.weight_decay and 0.0)."""
    if lam > 0 and explicit and all(explicit) and all(g["weight_decay"] != lam for g in groups):
        warnings.warn(
            f"AdamSPD: weight_decay={lam} (SPD's lambda) was given, but every param group sets its own "
            f"weight_decay ({[g['weight_decay'] for g in groups]}), so SPD runs with those "
            "lambdas, 0 meaning none (plain Adam). A framework that builds its own groups overrides it: "
            "the Hugging Face Trainer does (from args.weight_decay); use "
            "Trainer(optimizer_cls_and_kwargs=spd_kernels.hf.optimizer_cls_and_kwargs(lr=..., "
            "weight_decay=...)), or groups without 'weight_decay'.", UserWarning, stacklevel=3)


def grad(p: Tensor, where: str, backend: Optional[Backend]) -> None:
    """A grad the step can take for ``p`` (and, with a fixed ``impl``, ``p`` still on a device it runs)."""
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
    error = backend.device_error(p.device) if backend is not None else ""
    if error:  # the param moved since construction
        raise RuntimeError(f"{where}: {error}")
