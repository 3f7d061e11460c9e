"""Block-scaled fp8 e4m3 moments (torchao's ``AdamWFp8`` layout), 1 byte per element + 4 per 256.

The flattened local tensor is cut into blocks of ``BLOCK`` elements; each block
keeps one fp32 ``scale = absmax / 448`` (448: e4m3's largest finite value) in
``exp_avg_scale``, and each element the e4m3 code of ``x / scale``::

    scale = max|x| / 448            (0 for an all-zero block)
    inv   = 1 / scale               (fp32, once per block; 0 when scale = 0)
    code  = e4m3(clamp(x * inv, -448, 448))   (round to nearest, ties to even:
                                              torch's cast, the hardware's)
    x'    = float(code) * scale

Only the first moment: the second is refused. Its values span the squares of
the gradients' range, and e4m3 holds 2^-9 / 448 = 4.4e-6 of a block's maximum
at the least, so small second moments become 0 (the step m / eps) and, with
e4m3's 12.5% resolution, the rest stop following the gradients. Measured
(docs/formats.md, bench/format_quality.py): 1000 steps at lambda = 0 drift
0.115 of the distance moved from fp32 Adam with stochastic rounding and a floor
(our 8-bit format: 0.097), 0.055 with bf16 second moments; torchao's
``AdamWFp8`` (fp8 for both, nearest) drifts 7.8 times the distance moved.
"""
from __future__ import annotations

import torch

from .. import quantization
from .record import MomentFormat, blocks_of, unblock

BLOCK = quantization.BLOCK_SIZE
E4M3_MAX = 448.0


def _decode(codes, scale, moment):
    values, pad = blocks_of(codes.float(), BLOCK)
    return unblock(values * scale[:, None], pad, codes.shape)


def _encode_(codes, scale, values, moment, step, offset=0):
    blocks, pad = blocks_of(values.float(), BLOCK)
    new_scale = blocks.abs().amax(dim=1) / E4M3_MAX
    inv = torch.where(new_scale > 0, torch.reciprocal(new_scale), torch.zeros_like(new_scale))
    y = (blocks * inv[:, None]).clamp_(-E4M3_MAX, E4M3_MAX)
    codes.copy_(unblock(y.to(torch.float8_e4m3fn), pad, codes.shape))
    scale.copy_(new_scale)


def _refuses(moment: int) -> str:
    if moment == 0:
        return ""
    return ("exp_avg_sq_dtype=torch.float8_e4m3fn is refused: a second moment in e4m3 underflows to 0 "
            "below 4.4e-6 of its block's maximum (the step becomes m / eps) and, at 12.5% resolution, stops "
            "following the gradients (docs/formats.md); use torch.bfloat16 for exp_avg_sq")


FORMAT = MomentFormat(
    name="fp8", dtype=torch.float8_e4m3fn, storage=torch.float8_e4m3fn, block=BLOCK, scale_suffix="scale",
    bytes_per_element=1.0 + 4.0 / BLOCK, rounding=("nearest", "nearest"),
    applies=lambda numel, group: numel >= group.get("min_8bit_size", 4096),
    zeros=lambda p, moment: torch.zeros_like(p, dtype=torch.float8_e4m3fn, memory_format=torch.contiguous_format),
    decode=_decode, encode_=_encode_, refuses=_refuses,
)
