"""bitsandbytes' blockwise 8-bit moments (``optim_bits=8``), 1 byte per element + 4 per 256.

uint8 codes into the dynamic maps (signed for ``exp_avg``, unsigned for
``exp_avg_sq``) and one fp32 absmax per block of 256 elements in
``exp_avg_absmax``/``exp_avg_sq_absmax``; the rule and its tie and zero-code
details are ``spd_kernels.quantization``'s. Chosen by ``optim_bits=8`` (it is
not a dtype), for tensors of at least ``min_8bit_size`` elements.
"""
from __future__ import annotations

import torch

from .. import quantization
from .record import MomentFormat


def _zeros(p, moment):
    return torch.full_like(p, quantization.zero_code(moment == 0), dtype=torch.uint8,
                           memory_format=torch.contiguous_format)


def _encode_(codes, scale, values, moment, step, offset=0):
    quantization.quantize_(codes, scale, values, signed=moment == 0)


FORMAT = MomentFormat(
    name="bnb8", dtype=None, storage=torch.uint8, block=quantization.BLOCK_SIZE, scale_suffix="absmax",
    bytes_per_element=1.0 + 4.0 / quantization.BLOCK_SIZE, rounding=("nearest", "nearest"),
    applies=lambda numel, group: group.get("optim_bits", 32) == 8 and numel >= group.get("min_8bit_size", 4096),
    zeros=_zeros, decode=lambda codes, scale, moment: quantization.dequantize(codes, scale, signed=moment == 0),
    encode_=_encode_,
)
