"""The scalar settings of one step, as one record every backend takes whole.

``AdamSPD`` builds a ``Hyperparameters`` once per param group and step (an lr
scheduler may change the group between steps); the reference, the Triton
launcher and custom op, and the compiled CPU op all read this one record, as
torch's ``_single_tensor_adam``/``_multi_tensor_adam``/``_fused_adam`` share one
signature. The C++ op cannot take a Python object, so the float settings
travel to it as one list in ``PACKED`` order (``packed()``); the C++ side names
the same slots (``HP_*`` in ``csrc/cpu/common.h``) and checks the length.

Adding a setting: a field here (and in ``PACKED`` if it is a float the kernels
read), where ``AdamSPD`` takes and checks it, and its use in the reference,
the Triton kernels and the C++ kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from torch import Tensor

#: the float settings in the order the C++ op's ``hyper`` list holds them
PACKED = ("lr", "beta1", "beta2", "eps", "weight_decay", "max_scale")


@dataclass(frozen=True)
class Hyperparameters:
    #: a float, or a one-element tensor (read on its device by the fused kernels)
    lr: Union[float, Tensor] = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    #: SPD's lambda: the strength of the projection, not scaled by lr
    weight_decay: float = 0.0
    amsgrad: bool = False
    #: cap on the projection scale s = min(lambda * r, max_scale); inf keeps the paper's rule
    max_scale: float = math.inf

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> "Hyperparameters":
        """The record of an ``AdamSPD`` param group (already checked)."""
        beta1, beta2 = (float(b) for b in group["betas"])  # tensor betas are CPU scalars
        return cls(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            amsgrad=bool(group["amsgrad"]),
            max_scale=1.0 if group.get("cap_projection", False) else math.inf,
        )

    @property
    def lr_tensor(self) -> Optional[Tensor]:
        """The lr when it is a tensor, else None."""
        return self.lr if isinstance(self.lr, Tensor) else None

    def lr_value(self) -> float:
        """The lr as a host float (reads a tensor lr: a sync for a device tensor)."""
        return float(self.lr.item()) if isinstance(self.lr, Tensor) else float(self.lr)

    def packed(self) -> List[float]:
        """The float settings in ``PACKED`` order; a tensor lr packs as 0 and travels as ``lr_tensor``."""
        return [0.0 if name == "lr" and self.lr_tensor is not None else float(getattr(self, name))
                for name in PACKED]

    @classmethod
    def from_packed(cls, values: Sequence[float], amsgrad: bool,
                    lr_tensor: Optional[Tensor] = None) -> "Hyperparameters":
        """The inverse of ``packed()`` (for the custom op, which receives the list)."""
        if len(values) != len(PACKED):
            raise ValueError(f"hyper: expected {len(PACKED)} values {PACKED}, got {len(values)}")
        named: Dict[str, Any] = dict(zip(PACKED, values))
        if lr_tensor is not None:
            named["lr"] = lr_tensor
        return cls(amsgrad=amsgrad, **named)
