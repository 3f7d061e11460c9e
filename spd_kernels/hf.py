"""AdamSPD in the Hugging Face Trainer, single-process, DDP or FSDP2: one argument.

    from spd_kernels.hf import optimizer_cls_and_kwargs

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(lr=1e-4, weight_decay=1.0,
                                                                        new=("classifier.",)))

Why not ``optimizer_cls_and_kwargs=(AdamSPD, {...})``: given an optimizer
class, the Trainer builds two param groups of its own, ``weight_decay =
args.weight_decay`` (0.0 by default) and 0.0 for biases and norms, and a
group's ``weight_decay`` is SPD's lambda, so SPD would run with those (AdamSPD
warns), and without parameter names. And under FSDP the Trainer refuses
``optimizers=(opt, scheduler)``. A callable that is not an ``Optimizer``
subclass is a factory to transformers: it calls ``factory()(model, **kwargs)``
(``transformers.trainer_optimizer.is_optimizer_factory``), on the model before
Accelerate prepares it. This module's factory builds the groups as
``fine_tuning_param_groups`` does, with names, with lambda as given on every
pre-trained weight. Under FSDP2 Accelerate then swaps the sharded params into
those groups, and AdamSPD creates its state for them at the first step
(``spd_kernels.anchors``).

Nothing here imports transformers.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from .groups import NEW_POLICIES, fine_tuning_param_groups
from .optim import AdamSPD

#: what the factory takes besides AdamSPD's own arguments
_GROUPING = ("new", "new_policy", "new_group_options")


class AdamSPDFactory:
    """What the Trainer instantiates (without arguments) and calls with the model and the kwargs."""

    def __call__(self, model: torch.nn.Module, *, new: Iterable[str] = ("lora_",), new_policy: str = "plain",
                 new_group_options: Optional[Dict[str, Any]] = None, **adamspd_kwargs: Any) -> AdamSPD:
        groups = fine_tuning_param_groups(model, new=new, new_policy=new_policy, **(new_group_options or {}))
        return AdamSPD(groups, **adamspd_kwargs)


def optimizer_cls_and_kwargs(*, new: Iterable[str] = ("lora_",), new_policy: str = "plain",
                             new_group_options: Optional[Dict[str, Any]] = None,
                             **adamspd_kwargs: Any) -> Tuple[type, Dict[str, Any]]:
    """The pair for ``Trainer(optimizer_cls_and_kwargs=...)``.

    Args:
        new, new_policy, new_group_options: which params are new (a fresh head, adapters:
            name fragments) and what they get, as in ``fine_tuning_param_groups``: by default
            plain Adam (lambda 0); ``new_policy="anchor_free"`` gives them SPD with a = 0.
        adamspd_kwargs: ``AdamSPD``'s arguments, passed as they are (``weight_decay`` is SPD's
            lambda on every pre-trained weight; ``anchor_dtype``, ``optim_bits``, ``impl``, ...).
            ``lr`` is required: the Trainer hands ``args.learning_rate`` to an optimizer class,
            not to a factory, and its scheduler starts from the lr given here.

    Everything is checked here, so a bad argument fails before training starts.
    """
    accepted = set(inspect.signature(AdamSPD.__init__).parameters) - {"self", "params"}
    unknown = sorted(set(adamspd_kwargs) - accepted)
    if unknown:
        raise TypeError(f"optimizer_cls_and_kwargs: unknown AdamSPD argument(s) {unknown}; "
                        f"it takes {sorted(accepted)} and {list(_GROUPING)}")
    if "lr" not in adamspd_kwargs:
        raise TypeError("optimizer_cls_and_kwargs: lr is required (the Trainer does not pass "
                        "args.learning_rate to an optimizer factory)")
    if new_policy not in NEW_POLICIES:
        raise ValueError(f"optimizer_cls_and_kwargs: new_policy must be one of {NEW_POLICIES}, got {new_policy!r}")
    if isinstance(new, str):
        raise TypeError(f"optimizer_cls_and_kwargs: new must be a list of name fragments, got the string {new!r}")
    AdamSPD([torch.nn.Parameter(torch.zeros(1))], **adamspd_kwargs)  # the constructor's own checks, named
    kwargs = dict(new=tuple(new), new_policy=new_policy, new_group_options=dict(new_group_options or {}),
                  **adamspd_kwargs)
    return AdamSPDFactory, kwargs


def adamspd_of(optimizer: Any) -> Optional[AdamSPD]:
    """The AdamSPD inside whatever wraps it (Accelerate's ``AcceleratedOptimizer``), or None."""
    while optimizer is not None and not isinstance(optimizer, AdamSPD):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer
