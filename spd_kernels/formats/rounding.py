"""Reproducible stochastic rounding: the random bits every backend computes alike.

A value stored with stochastic rounding is rounded up with probability equal to
its distance from the lower neighbour, so the stored moment is right in
expectation and a small change (a second moment moves by 1 - beta2 = 0.1% of
itself per step, under bf16's 0.4% resolution) is kept on average instead of
being rounded away every step.

The bits come from a counter-based hash, not from a generator, so a step is a
pure function of its inputs: for element ``i`` of a tensor (its index in the
flattened whole tensor: a shard of an FSDP2 param, sharded on dim 0, adds its
start, so a sharded run rounds as the single process does) at step ``t`` (the count after this step's increment)
and moment ``k`` (0: exp_avg, 1: exp_avg_sq)::

    key  = lowbias32(4 t + k)                      (uint32 arithmetic, wrapping)
    h    = lowbias32((floor((i mod 2^32) / 2) + key) mod 2^32)
    bits = the low 16 bits of h for an even i, its high 16 bits for an odd i

``lowbias32`` is Chris Wellons' 32-bit integer hash (two multiplies, three
xor-shifts); a hash serves two neighbours, 16 bits each (its halves are mixed
by the final xor-shift and the multiplies before it), which halves the
kernels' integer multiplies (5-7% off the CPU step's instructions on an Intel
Xeon: docs/results/cpu.md). The kernels (``csrc/cpu/``, the Triton step) compute the same bits;
``tests/test_formats.py`` holds them to these. Tensors share the bits of an
index: the rounding of one layer is independent of its own values' history,
not of another layer's (what matters for a moment's expectation).

bf16 with stochastic rounding: add ``bits`` to the fp32 value's bit pattern
and keep its upper 16 bits (for a finite value this rounds up exactly when the
random 16 bits exceed the 16 bits dropped, as torchao's ``_fp32_to_bf16_sr``
does).
"""
from __future__ import annotations

import torch
from torch import Tensor

_MASK = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2^32`` for int64 ``x`` in [0, 2^32), without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK


def lowbias32(x: Tensor) -> Tensor:
    """The hash of int64 ``x`` (values in [0, 2^32)), as int64 in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_bits(numel: int, step: int, moment: int, device=None, offset: int = 0) -> Tensor:
    """The 16 random bits of each element of a tensor of ``numel`` elements (int64 in [0, 2^16)) whose
    first element is element ``offset`` of the whole tensor (a shard's start)."""
    key = lowbias32(torch.tensor(4 * step + moment, dtype=torch.int64, device=device) & _MASK)
    index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device) & _MASK  # as uint32 kernels
    return (lowbias32(((index >> 1) + key) & _MASK) >> ((index & 1) * 16)) & 0xFFFF


def to_bf16_stochastic(x: Tensor, step: int, moment: int, offset: int = 0) -> Tensor:
    """fp32 ``x`` rounded to bf16 stochastically (the bits of ``random_bits``)."""
    bits = x.detach().float().contiguous().view(torch.int32).to(torch.int64) & _MASK
    noise = random_bits(x.numel(), step, moment, x.device, offset).view(x.shape)
    upper = ((bits + noise) >> 16) & 0xFFFF
    upper = torch.where(upper >= 0x8000, upper - 0x10000, upper)  # as a signed 16-bit pattern
    return upper.to(torch.int16).view(torch.bfloat16)
