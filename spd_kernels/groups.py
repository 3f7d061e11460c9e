"""Param groups for fine-tuning: SPD toward the pre-trained weights, none for new modules.

Pulling a freshly initialised head or a LoRA adapter back toward its random
init (or toward zero) fights the fit it must learn, so the convention is:
pre-trained weights get anchored SPD; newly added parameters are anchor-free
(a = 0) or plain Adam (lambda = 0).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List

import torch

NEW_POLICIES = ("plain", "anchor_free")


def fine_tuning_param_groups(
    model: torch.nn.Module,
    new: Iterable[str] = ("lora_",),
    new_policy: str = "plain",
    **new_group_options: Any,
) -> List[Dict[str, Any]]:
    """Groups for ``AdamSPD(groups, ...)`` from a model's trainable parameters.

    Args:
        model: the model being fine-tuned; frozen parameters (``requires_grad``
            False, e.g. a LoRA base) are left out.
        new: name fragments of newly added parameters (a fresh head, adapters):
            a parameter whose name contains any of them is "new".
        new_policy: ``"plain"`` (default): new params get ``weight_decay=0``,
            i.e. Adam; ``"anchor_free"``: SPD with a = 0 (``pre: None``).
        new_group_options: more options for the new params' group (e.g. ``lr``).

    Returns ``[pre-trained group, new group]`` (empty groups dropped), with
    ``(name, param)`` pairs so that ``AdamSPD.spd_stats()`` is keyed by name.
    The pre-trained group snapshots its anchors when the optimizer is built.
    """
    if new_policy not in NEW_POLICIES:
        raise ValueError(f"new_policy must be one of {NEW_POLICIES}, got {new_policy!r}")
    fragments = tuple(new)
    pretrained, fresh = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (fresh if any(f in name for f in fragments) else pretrained).append((name, p))
    groups: List[Dict[str, Any]] = []
    if pretrained:
        groups.append({"params": pretrained})
    if fresh:
        group: Dict[str, Any] = {"params": fresh}
        if new_policy == "plain":
            group["weight_decay"] = 0.0
        group["pre"] = None  # nothing to anchor to: a = 0 (with weight_decay 0 this is exactly Adam)
        group.update(new_group_options)
        groups.append(group)
    return groups
