"""Blockwise 8-bit storage for Adam's moments (the reference definition).

A moment tensor of n elements is stored as n ``uint8`` codes plus one fp32
``absmax`` per block of ``BLOCK_SIZE`` consecutive elements of the flattened
tensor (the last block may be short). A code indexes a 256-entry map of values
in [-1, 1]; the element's value is ``map[code] * absmax[block]``. This is
bitsandbytes' blockwise scheme (same block size, same maps), so our 8-bit Adam
and its ``Adam8bit`` agree step for step at lambda = 0.

Quantizing a block (fp32 values x)::

    absmax = max |x|                       (0 for an all-zero block)
    y      = clamp(x * (1 / absmax), -1, 1)   (y = 0 when absmax = 0; 1/absmax rounded once)
    code   = number of midpoints m_i < y     (m_i = (map[i] + map[i+1]) / 2, fp32)

so a value exactly on a midpoint takes the lower code: every backend applies
this one tie rule and produces the same codes. One exception, for the second
moment (the unsigned map): a positive value takes at least code 1, the
smallest nonzero value (3.25e-7 of the block's absmax). Rounded to 0, it would
make the next step's update ``m / sqrt(v)`` divide by a second moment that
forgot its history: on the demo's task at lambda = 0 that made the weights
drift 6-8x farther than fp32 Adam's with the same accuracy, and this rule brings them
back (bitsandbytes' quantizer, which is not exactly nearest, does not round
such values to 0 either).

The maps are bitsandbytes' "dynamic" maps (Dettmers 2015, "8-Bit Approximations
for Parallelism in Deep Learning"): signed for the first moment, unsigned for
the second. ``dynamic_map`` builds them here with the same fp32 arithmetic, so
they are equal bit for bit (a test holds them to it).
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import Tensor

#: elements per absmax block (bitsandbytes' optimizer block size)
BLOCK_SIZE = 256


def num_blocks(numel: int) -> int:
    return -(-numel // BLOCK_SIZE)


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool) -> Tensor:
    # 7 exponent levels 10^-6 .. 10^0; at level i the fraction takes 2^i (signed) or
    # 2^(i+1) (unsigned) values: the midpoints of an even split of [0.1, 1]. Plus 0 and 1.
    exponent_levels, non_sign_bits = 7, 7
    values = []
    for i in range(exponent_levels):
        count = 2 ** (i + non_sign_bits - exponent_levels + (0 if signed else 1)) + 1
        edges = torch.linspace(0.1, 1, count, dtype=torch.float32)
        fractions = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(exponent_levels - 1) + i)
        values += (scale * fractions).tolist()
        if signed:
            values += (-scale * fractions).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))  # the unsigned map is full; the signed one pads with zeros
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(signed: bool, device=None) -> Tensor:
    """The 256 sorted fp32 values a code stands for (signed: first moment; unsigned: second)."""
    return _dynamic_map_cpu(signed).to(device) if device is not None else _dynamic_map_cpu(signed)


def midpoints(qmap: Tensor) -> Tensor:
    """The 255 decision boundaries between neighbouring codes, in fp32."""
    return (qmap[:-1] + qmap[1:]) / 2


def zero_code(signed: bool) -> int:
    """The code whose value is 0 (what a fresh moment holds)."""
    return int((dynamic_map(signed) == 0).nonzero()[0])


def _blocks(x: Tensor) -> Tuple[Tensor, int]:
    """``x`` flattened and zero-padded to whole blocks, shaped [blocks, BLOCK_SIZE]."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % BLOCK_SIZE
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK_SIZE), pad


def quantize_(codes: Tensor, absmax: Tensor, x: Tensor, signed: bool) -> None:
    """Store fp32 ``x`` as ``codes`` (uint8, x's shape) and ``absmax`` (fp32 [blocks]), in place."""
    blocks, pad = _blocks(x.float())
    amax = blocks.abs().amax(dim=1)
    inv = torch.where(amax > 0, torch.reciprocal(amax), torch.zeros_like(amax))
    scaled = (blocks * inv[:, None]).clamp_(-1.0, 1.0)
    index = torch.bucketize(scaled, midpoints(dynamic_map(signed, x.device)))  # ties: the lower code
    if not signed:  # a positive second moment never becomes 0 (see the module docstring)
        index = torch.where((index == 0) & (scaled > 0), 1, index)
    flat = index.reshape(-1)
    if pad:
        flat = flat[: flat.numel() - pad]
    codes.copy_(flat.view(codes.shape))
    absmax.copy_(amax)


def dequantize(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The fp32 values that ``codes`` and ``absmax`` stand for, in ``codes``' shape."""
    values, pad = _blocks(dynamic_map(signed, codes.device)[codes.long()])
    out = (values * absmax[:, None]).reshape(-1)
    if pad:
        out = out[: out.numel() - pad]
    return out.view(codes.shape)


#: The kernels find a value's code without a search: a float's sign, exponent and top 7
#: mantissa bits (the upper 16 bits of its magnitude, its key) pick a bucket narrower than
#: any gap between two midpoints of either map, so at most one midpoint lies in a bucket, and
#: that midpoint shares the bucket's upper 16 bits. ``bucket_table`` packs, per bucket, the
#: number of midpoints below its smallest value (bits 24-31) and where its midpoint is (bits
#: 0-16): the low 16 bits of the midpoint's magnitude for a positive bucket, 0xFFFF minus
#: them for a negative one, NO_MID when there is none. A value y then takes the count, plus
#: one if that field is below ylow, y's own low 16 bits flipped the same way: |mid| < |y|
#: for y > 0 and |mid| > |y| for y < 0. One table read per value. Magnitudes below 2^-24
#: share the lowest bucket (which reaches down to 0 and holds no midpoint). The C++ kernel
#: builds the same table.
KEY_MIN = 103 << 7
KEY_MAX = 0x3F80
NUM_KEYS = KEY_MAX - KEY_MIN + 1
NO_MID = 0x10000  # no midpoint in the bucket: a field no 16-bit ylow exceeds
FIELD_MASK = 0x1FFFF


@functools.lru_cache(maxsize=None)
def _bucket_table_cpu() -> Tensor:
    keys = torch.arange(KEY_MIN, KEY_MAX + 1, dtype=torch.int64)
    lo = (keys << 16).to(torch.int32).view(torch.float32).clone()
    lo[0] = 0.0  # the lowest bucket reaches down to 0
    hi = ((keys << 16) | 0xFFFF).to(torch.int32).view(torch.float32).clone()
    hi[-1] = 1.0  # the top bucket is 1.0 itself
    table = torch.empty((2, 2, NUM_KEYS), dtype=torch.int64)
    for k, signed in enumerate((True, False)):
        mids = midpoints(dynamic_map(signed))
        mid_bits = mids.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
        for sign, (smallest, largest) in enumerate(((lo, hi), (-hi, -lo))):
            below = torch.searchsorted(mids, smallest, side="left")  # midpoints < smallest
            inside = torch.searchsorted(mids, largest, side="left") - below
            assert bool((inside <= 1).all())
            has = inside == 1
            bits = mid_bits[below.clamp(max=mids.numel() - 1)]
            assert bool(((bits[has] >> 16) == keys[has]).all()) and not bool(has[0])  # shares the bucket's key
            low = bits & 0xFFFF
            field = torch.where(has, 0xFFFF - low if sign else low, NO_MID)
            table[k, sign] = (below << 24) | field
    # the same 32 bits as int32 (bit 31 is set for a count of 128 or more)
    return torch.where(table >= 2**31, table - 2**32, table).to(torch.int32)


def bucket_table(device=None) -> Tensor:
    """int32 [2 maps (signed, unsigned), 2 signs, NUM_KEYS]: per bucket, the midpoints below
    it (bits 24-31) and its midpoint's place (bits 0-16; see above)."""
    table = _bucket_table_cpu()
    return table.to(device) if device is not None else table


def maps(device=None) -> Tensor:
    """fp32 [2, 256]: the signed map (first moment), then the unsigned one (second)."""
    out = torch.stack([dynamic_map(True), dynamic_map(False)])
    return out.to(device) if device is not None else out
