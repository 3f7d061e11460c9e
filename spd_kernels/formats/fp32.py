"""fp32 moments (the param's dtype when it is wider): ``torch.optim.Adam``'s state, 4 bytes per element.

The moment is its own value: ``decode`` returns the state tensor itself, so the
reference updates it in place with ``torch.optim.Adam``'s operations and
``encode_`` has nothing to store.
"""
from __future__ import annotations

import torch

from .record import MomentFormat


def _encode_(codes, scale, values, moment, step, offset=0):
    if values is not codes:
        codes.copy_(values)


FORMAT = MomentFormat(
    name="fp32", dtype=torch.float32, storage=None, block=0, scale_suffix="", bytes_per_element=4.0,
    rounding=("exact", "exact"), applies=lambda numel, group: True,
    zeros=lambda p, moment: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32), memory_format=torch.preserve_format),
    decode=lambda codes, scale, moment: codes, encode_=_encode_,
)
