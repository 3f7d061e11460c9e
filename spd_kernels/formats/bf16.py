"""bf16 moments (Transformer Engine's ``FusedAdam(exp_avg_dtype=torch.bfloat16, ...)``), 2 bytes per element.

``exp_avg`` is rounded to nearest (ties to even: the plain cast). ``exp_avg_sq``
is rounded stochastically (``spd_kernels.formats.rounding``): with round-to-
nearest a second moment changes by 1 - beta2 = 0.1% of itself per step, under
bf16's resolution of 0.4%, so it stops following the gradients (measured: 1000
steps at lambda = 0 drift 2.5x farther from fp32 Adam than with stochastic
rounding; docs/formats.md). The first moment changes by 1 - beta1 = 10% per step
and is better rounded to nearest (stochastic rounding only adds noise there).
No scale: bf16 has fp32's exponent range, so no moment underflows.
"""
from __future__ import annotations

import torch

from .record import MomentFormat
from .rounding import to_bf16_stochastic


def _encode_(codes, scale, values, moment, step, offset=0):
    codes.copy_(values.to(torch.bfloat16) if moment == 0 else to_bf16_stochastic(values, step, moment, offset))


FORMAT = MomentFormat(
    name="bf16", dtype=torch.bfloat16, storage=torch.bfloat16, block=0, scale_suffix="", bytes_per_element=2.0,
    rounding=("nearest", "stochastic"), applies=lambda numel, group: True,
    zeros=lambda p, moment: torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format),
    decode=lambda codes, scale, moment: codes.float(), encode_=_encode_,
)
