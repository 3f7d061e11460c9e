"""Fused AdamSPD over a bucket of tensors: Triton kernels and their host launcher.

Math (docs/design.md, "The algorithm"), per tensor p with grad g, moments m, v, anchor a
(a = 0 when anchor-free), step t, in fp32 whatever the storage dtype::

    t += 1;  bc1 = 1 - b1^t;  bc2 = 1 - b2^t          (fp64 scalars, per tensor)
    m  = m + (1-b1)*(g - m);  v = b2*v + (1-b2)*g*g     (amsgrad: vmax = max(vmax, v))
    q  = p - (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)
    partial sums over the tensor: sum g*(p-a), sum (p-a)^2, sum (q-a)^2
    c = -sum g*(p-a);  r = clamp((|q-a| - |p-a|)/|q-a|, 0, 1) (0 if |q-a| = 0)
    s = min(lam*r, max_scale) if c < 0 else 0;   p = q - s*(q - a)

Memory layout. Every tensor of the bucket is contiguous and reached through a
pointer table ``ptrs`` (int64 data_ptrs, shape [NUM_ROWS, n], rows ``ROW_*``), its
element count in ``numels`` [n]. Work is cut into chunks of ``BLOCK * TILES``
elements; the chunk table ``chunks`` (int64 [2, num_chunks]: tensor index, first
element) maps each phase-1 program to one chunk. Chunks of multi-chunk tensors
come first, so phase 2's grid is a prefix of the same table.

Launches (no atomics anywhere, so every sum has a fixed order and two runs are
bitwise identical):

1. ``_phase1_kernel``, one program per chunk: the Adam update; writes m, v and
   q into p (fp32 params), and the chunk's three partial sums into its own row
   of ``partials`` [num_chunks, 3]. A tensor that fits one chunk is finished
   right there: the program reduces, finalizes and projects before it exits
   (the re-read of q hits cache), so small tensors take one launch.
2. ``_finalize_kernel``, one program per multi-chunk tensor: sums its partials
   in chunk order; writes stats [n, 5] (c, |p-a|, |q-a|, r, s) and t + 1, and
   adds 1 to the tensor's projection count [n] when c < 0.
3. ``_phase2_kernel``, one program per multi-chunk chunk: exits at once when
   s == 0, else applies p = q - s*(q - a). For bf16/fp16 params phase 1 does not
   store q (that would round it twice); phase 2 recomputes q from the old p and
   the new m, v and rounds once on store.

Split step (sharded params: each rank holds a slice of every tensor, and the
sums must cover the whole tensor). Phase 1 runs with ``single_max = -1`` so no
tensor finishes in place; ``_sum_partials_kernel`` (one program per tensor)
writes each tensor's local sums to an fp64 [n, 3] buffer that the caller
all-reduces; ``_finalize_sums_kernel`` turns the reduced sums into the stats,
steps and counts; phase 2 then covers every chunk. An empty shard has no
chunks and sums to 0.

Per element, fp32 params move p, g, m, v, a in and p, m, v out: 32 bytes.
Hyperparameters are runtime scalars (one compile serves every lr); only the
storage dtypes and feature switches are ``tl.constexpr``.
"""
from __future__ import annotations

import math
from typing import Callable, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import quantization, stats
from ..bucket import Bucket

#: rows of the pointer table ([NUM_ROWS, n] int64 data_ptrs), as the kernels read them
ROW_P = tl.constexpr(0)
ROW_G = tl.constexpr(1)
ROW_M = tl.constexpr(2)
ROW_V = tl.constexpr(3)
ROW_VMAX = tl.constexpr(4)
ROW_A = tl.constexpr(5)
ROW_STEP = tl.constexpr(6)
ROW_M_ABSMAX = tl.constexpr(7)  # 8-bit moments: fp32 absmax per block of 256 (0 otherwise)
ROW_V_ABSMAX = tl.constexpr(8)
NUM_ROWS = 9

#: the stats row layout of spd_kernels.stats, for the kernels
NUM_STATS = tl.constexpr(stats.NUM_STATS)
STAT_C = tl.constexpr(stats.STAT_C)
STAT_NORM_P_A = tl.constexpr(stats.STAT_NORM_P_A)
STAT_NORM_Q_A = tl.constexpr(stats.STAT_NORM_Q_A)
STAT_R = tl.constexpr(stats.STAT_R)
STAT_SCALE = tl.constexpr(stats.STAT_SCALE)

#: elements per tile; 256 threads x 4 fp32 = one 16-byte access per thread per tensor
BLOCK = 1024
#: tiles per phase-1 program: a chunk is BLOCK * TILES elements
TILES = 4
NUM_WARPS = 8
#: phase 1 with 8-bit moments: the per-block reductions and table reads hold more values per
#: thread; 16 warps (2 elements a thread) keep every variant free of spills on sm_80 and sm_90a
NUM_WARPS_8BIT = 16
#: partial rows summed per iteration by the finalize program
FINALIZE_BLOCK = 256

#: 8-bit moments (spd_kernels.quantization): elements per absmax block, and the bucket keys
QBLOCK = tl.constexpr(quantization.BLOCK_SIZE)
KEY_MIN = tl.constexpr(quantization.KEY_MIN)
KEY_MAX = tl.constexpr(quantization.KEY_MAX)
NUM_KEYS = tl.constexpr(quantization.NUM_KEYS)
FIELD_MASK = tl.constexpr(quantization.FIELD_MASK)

_TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _table_ptr(ptrs_ptr, row, n_tensors, tid, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to tensor ``tid`` of table row ``row``, typed ``DTYPE``."""
    addr = tl.load(ptrs_ptr + row * n_tensors + tid)
    ptr = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every base is 16-byte aligned: lets full tiles use 128-bit accesses
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _step_scalars(t, lr, ln_beta1, ln_beta2):
    """(step_size, 1/sqrt(bc2)) for step count ``t`` (already incremented).

    bc = 1 - b^t is computed as 1 - exp(t ln b) in fp64: in fp32 the
    subtraction loses most digits of bc2 at small t (b2 = 0.999).
    """
    t64 = t.to(tl.float64)
    bc1 = 1.0 - tl.exp(t64 * tl.cast(ln_beta1, tl.float64))
    bc2 = 1.0 - tl.exp(t64 * tl.cast(ln_beta2, tl.float64))
    step_size = (tl.cast(lr, tl.float64) / bc1).to(tl.float32)
    inv_sqrt_bc2 = (1.0 / tl.sqrt(bc2)).to(tl.float32)
    return step_size, inv_sqrt_bc2


@triton.jit
def _adam_q(p, m, v, step_size, inv_sqrt_bc2, eps):
    """The plain Adam step q from p and the updated moments (v: vmax under amsgrad)."""
    return p - step_size * m / (tl.sqrt(v) * inv_sqrt_bc2 + eps)


@triton.jit
def _load(ptr, mask, MASKED: tl.constexpr):
    """Load as fp32; masked only for a tensor's last, partial tile (a mask of
    unknown length would stop 128-bit vector accesses on full tiles)."""
    if MASKED:
        x = tl.load(ptr, mask=mask, other=0.0)
    else:
        x = tl.load(ptr)
    return x.to(tl.float32)


@triton.jit
def _store(ptr, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty))


@triton.jit
def _sum_terms(p, g, q, a_ptr, offs, mask, HAS_ANCHOR: tl.constexpr, MASKED: tl.constexpr):
    """The per-element terms of SPD's three sums: g*(p-a), (p-a)^2, (q-a)^2 (a = 0 anchor-free)."""
    if HAS_ANCHOR:
        a = _load(a_ptr + offs, mask, MASKED)
        d = p - a
        e = q - a
    else:
        d = p
        e = q
    return g * d, d * d, e * e


@triton.jit
def _phase1_tile(
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, a_ptr, offs, mask, inv_scale,
    one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_sqrt_bc2,
    HAS_ANCHOR: tl.constexpr, AMSGRAD: tl.constexpr, STORE_Q: tl.constexpr, MASKED: tl.constexpr,
):
    """Adam on one tile: stores m, v (vmax) and, if STORE_Q, q; returns the three
    per-element terms g*(p-a), (p-a)^2, (q-a)^2 (zero on masked lanes)."""
    p = _load(p_ptr + offs, mask, MASKED)
    g = _load(g_ptr + offs, mask, MASKED) * inv_scale
    m = _load(m_ptr + offs, mask, MASKED)
    v = _load(v_ptr + offs, mask, MASKED)
    m = m + one_minus_beta1 * (g - m)  # torch's lerp for a weight < 0.5
    v = beta2 * v + one_minus_beta2 * g * g
    _store(m_ptr + offs, m, mask, MASKED)
    _store(v_ptr + offs, v, mask, MASKED)
    if AMSGRAD:
        v = tl.maximum(_load(vmax_ptr + offs, mask, MASKED), v)
        _store(vmax_ptr + offs, v, mask, MASKED)
    q = _adam_q(p, m, v, step_size, inv_sqrt_bc2, eps)
    if MASKED:
        q = tl.where(mask, q, 0.0)  # dead lanes hold 0/0 when eps = 0; keep them out of the sums
    if STORE_Q:
        _store(p_ptr + offs, q, mask, MASKED)
    return _sum_terms(p, g, q, a_ptr, offs, mask, HAS_ANCHOR, MASKED)


@triton.jit
def _project_tile(
    p_ptr, m_ptr, v_ptr, a_ptr, offs, mask, scale, eps, step_size, inv_sqrt_bc2,
    HAS_ANCHOR: tl.constexpr, RECOMPUTE_Q: tl.constexpr, MASKED: tl.constexpr,
):
    """p = q - s*(q - a) on one tile; q is read from p, or rebuilt from the old p
    and the new m, v (v: vmax under amsgrad) when RECOMPUTE_Q."""
    q = _load(p_ptr + offs, mask, MASKED)
    if RECOMPUTE_Q:
        m = _load(m_ptr + offs, mask, MASKED)
        v = _load(v_ptr + offs, mask, MASKED)
        q = _adam_q(q, m, v, step_size, inv_sqrt_bc2, eps)
    if HAS_ANCHOR:
        q = q - scale * (q - _load(a_ptr + offs, mask, MASKED))
    else:
        q = q - scale * q
    _store(p_ptr + offs, q, mask, MASKED)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to ``DTYPE`` (to nearest, ties to even, as torch) and back to fp32.

    bf16 by its bits: the interpreter's bf16 cast truncates, and this must agree everywhere."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float32:
        return x
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _nearest_code(y, table_ptr, K: tl.constexpr):
    """Code of y in [-1, 1] in map K: the number of its midpoints below y (a value on a
    midpoint takes the lower code; a positive second moment, K = 1, at least code 1). One
    read of the bucket table (spd_kernels.quantization): the count below y's bucket (sign,
    exponent, 7 mantissa bits), plus one if the bucket's midpoint, whose upper 16 bits are
    y's, is below y: a compare of low 16 bits, flipped for negative y."""
    bits = y.to(tl.int32, bitcast=True)
    key = tl.minimum(tl.maximum((bits & 0x7FFFFFFF) >> 16, KEY_MIN), KEY_MAX) - KEY_MIN
    sign = (bits >> 31) & 1
    entry = tl.load(table_ptr + (K * 2 + sign) * NUM_KEYS + key)
    ylow = (bits & 0xFFFF) ^ (sign * 0xFFFF)
    code = ((entry >> 24) & 0xFF) + ((entry & FIELD_MASK) < ylow).to(tl.int32)
    if K == 1:  # the second moment: a positive value never takes the zero code
        code = tl.where((code == 0) & (y > 0.0), 1, code)
    return code


#: moment formats as the kernels name them (spd_kernels.formats): the m and v rows' element types
FMT_FP32 = tl.constexpr(0)
FMT_BF16 = tl.constexpr(1)  # bf16 bits as uint16; m rounded to nearest even, v stochastically
FMT_FP8 = tl.constexpr(2)  # e4m3fn bits as uint8, one fp32 scale = absmax / 448 per block
FMT_BNB8 = tl.constexpr(3)  # bitsandbytes' dynamic-map codes, one fp32 absmax per block
FORMAT_CODES = {"fp32": 0, "bf16": 1, "fp8": 2, "bnb8": 3}
_CODE_TYPES = {0: tl.float32, 1: tl.uint16, 2: tl.uint8, 3: tl.uint8}


@triton.jit
def _hash32(x):
    """lowbias32 of uint32 ``x`` (spd_kernels/formats/rounding.py: the rounding bits every backend draws)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _e4m3_value(code):
    """fp32 value of e4m3fn codes (int32): exponent and mantissa into fp32's fields, subnormals
    (exponent 0) as mantissa * 2^-9 (integer arithmetic: no fp8 type, the same on every GPU)."""
    exponent = (code >> 3) & 15
    mantissa = code & 7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    value = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)
    return tl.where((code & 0x80) != 0, -value, value)


@triton.jit
def _e4m3_code(y):
    """e4m3fn code (int32) of fp32 ``y`` with |y| <= 448, nearest even: 3 mantissa bits kept by an
    integer add (its carry moves the exponent); below 2^-6 the subnormal code |y| / 2^-9, rounded
    by adding and removing 1.5 * 2^23 (fp32's own nearest-even rounding)."""
    bits = y.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)
    scaled = mag.to(tl.float32, bitcast=True) * 512.0
    sub = ((scaled + 12582912.0) - 12582912.0).to(tl.int32)
    code = tl.where(mag < 0x3C800000, sub, normal)
    return code | (((bits >> 31) & 1) << 7)


@triton.jit
def _block_scales(x, tile_start, BLOCK: tl.constexpr, SCALE_OF_MAX: tl.constexpr):
    """Per block of QBLOCK elements of one tile (dead lanes 0): the stored scale (absmax /
    SCALE_OF_MAX, correctly rounded) and the factor 1 / scale broadcast to the tile (0 for a zero block)."""
    NB: tl.constexpr = BLOCK // QBLOCK
    amax = tl.max(tl.reshape(tl.abs(x), (NB, QBLOCK)), axis=1)
    if SCALE_OF_MAX == 1.0:
        scale = amax
    else:
        scale = tl.math.div_rn(amax, tl.full((NB,), SCALE_OF_MAX, tl.float32))
    inv = tl.where(scale > 0.0, tl.math.div_rn(tl.full((NB,), 1.0, tl.float32), scale), 0.0)
    return scale, tl.reshape(tl.broadcast_to(inv[:, None], (NB, QBLOCK)), (BLOCK,))


@triton.jit
def _store_scales(scale_ptr, scale, tile_start, numel, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    blocks = tile_start // QBLOCK + tl.arange(0, BLOCK // QBLOCK)
    if MASKED:
        tl.store(scale_ptr + blocks, scale, mask=blocks * QBLOCK < numel)
    else:
        tl.store(scale_ptr + blocks, scale)


@triton.jit
def _load_moment(ptr, scale_ptr, maps_ptr, offs, mask, FMT: tl.constexpr, K: tl.constexpr, MASKED: tl.constexpr):
    """Moment K (0: m, 1: v) of one tile as fp32, from its format FMT."""
    if FMT == FMT_FP32:
        return _load(ptr + offs, mask, MASKED)
    if MASKED:
        code = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
    else:
        code = tl.load(ptr + offs).to(tl.int32)
    if FMT == FMT_BF16:
        return (code << 16).to(tl.float32, bitcast=True)
    elif FMT == FMT_FP8:
        return _e4m3_value(code) * _load(scale_ptr + offs // QBLOCK, mask, MASKED)
    else:
        return tl.load(maps_ptr + K * 256 + code) * _load(scale_ptr + offs // QBLOCK, mask, MASKED)


@triton.jit
def _store_moment(x, ptr, scale_ptr, table_ptr, offs, index, mask, tile_start, numel, key,
                  FMT: tl.constexpr, K: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """Store fp32 moment K of one tile (dead lanes 0) in format FMT: bf16 (m nearest even, v
    stochastically from the element's bits), fp8 or 8-bit with one scale per block."""
    if FMT == FMT_FP32:
        _store(ptr + offs, x, mask, MASKED)
        return
    if FMT == FMT_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        if K == 0:
            code = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            code = tl.where(x != x, 0x7FC0, code)  # NaN stays NaN, as torch's cast
        else:
            # rounding.py's bits: a hash for two neighbours, its low half the even one's
            pair = _hash32((index >> 1) + key)
            code = (bits + tl.where((index & 1) == 0, pair & 0xFFFF, pair >> 16)) >> 16
        code = code.to(tl.uint16)
    elif FMT == FMT_FP8:
        scale, inv = _block_scales(x, tile_start, BLOCK, 448.0)
        code = _e4m3_code(tl.minimum(tl.maximum(x * inv, -448.0), 448.0)).to(tl.uint8)
        _store_scales(scale_ptr, scale, tile_start, numel, MASKED, BLOCK)
    else:
        absmax, inv = _block_scales(x, tile_start, BLOCK, 1.0)
        code = _nearest_code(tl.minimum(tl.maximum(x * inv, -1.0), 1.0), table_ptr, K).to(tl.uint8)
        _store_scales(scale_ptr, absmax, tile_start, numel, MASKED, BLOCK)
    if MASKED:
        tl.store(ptr + offs, code, mask=mask)
    else:
        tl.store(ptr + offs, code)


@triton.jit
def _phase1_tile_coded(
    p_ptr, g_ptr, m_ptr, v_ptr, m_scale_ptr, v_scale_ptr, a_ptr, maps_ptr, table_ptr,
    offs, mask, tile_start, numel, inv_scale, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_sqrt_bc2,
    m_key, v_key, offset, M_FMT: tl.constexpr, V_FMT: tl.constexpr,
    HAS_ANCHOR: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Adam on one tile with compressed moments (formats M_FMT, V_FMT): decode m, v; update in
    fp32; q (rounded to p's dtype) into p; encode m, v (per block for the scaled formats).
    Returns the three per-element sum terms."""
    p = _load(p_ptr + offs, mask, MASKED)
    g = _load(g_ptr + offs, mask, MASKED) * inv_scale
    m_old = _load_moment(m_ptr, m_scale_ptr, maps_ptr, offs, mask, M_FMT, 0, MASKED)
    v_old = _load_moment(v_ptr, v_scale_ptr, maps_ptr, offs, mask, V_FMT, 1, MASKED)
    m = m_old + one_minus_beta1 * (g - m_old)
    v = beta2 * v_old + one_minus_beta2 * g * g
    q = _round_to(_adam_q(p, m, v, step_size, inv_sqrt_bc2, eps), p_ptr.dtype.element_ty)
    if MASKED:  # dead lanes: out of the sums and of the blocks' scales
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
        q = tl.where(mask, q, 0.0)
    _store(p_ptr + offs, q, mask, MASKED)
    # the sum terms first: p, g, q and a are then dead while the moments are encoded
    gd, dd, qq = _sum_terms(p, g, q, a_ptr, offs, mask, HAS_ANCHOR, MASKED)
    index = (offs + offset).to(tl.uint32)  # the element's index in the whole tensor: the rounding bits'
    _store_moment(m, m_ptr, m_scale_ptr, table_ptr, offs, index, mask, tile_start, numel, m_key, M_FMT, 0, MASKED,
                  BLOCK)
    _store_moment(v, v_ptr, v_scale_ptr, table_ptr, offs, index, mask, tile_start, numel, v_key, V_FMT, 1, MASKED,
                  BLOCK)
    return gd, dd, qq


@triton.jit
def _finalize(sum_gd, sum_dd, sum_qq, weight_decay, max_scale, stats_ptr, counts_ptr, tid, step_ptr, t):
    """From a tensor's three sums: write its stats row, step t and projection count; return the scale s."""
    c = -sum_gd
    norm_p_a = tl.sqrt(sum_dd)
    norm_q_a = tl.sqrt(sum_qq)
    fired = c < 0.0
    ratio = tl.where(norm_q_a > 0.0, (norm_q_a - norm_p_a) / norm_q_a, 0.0)
    ratio = tl.where(fired, tl.minimum(tl.maximum(ratio, 0.0), 1.0), 0.0)
    scale = tl.where(fired, tl.minimum(weight_decay * ratio, max_scale), 0.0)
    row = stats_ptr + tid * NUM_STATS
    tl.store(row + STAT_C, c)
    tl.store(row + STAT_NORM_P_A, norm_p_a)
    tl.store(row + STAT_NORM_Q_A, norm_q_a)
    tl.store(row + STAT_R, ratio)
    tl.store(row + STAT_SCALE, scale)
    tl.store(step_ptr, t)
    tl.store(counts_ptr + tid, tl.load(counts_ptr + tid) + tl.where(fired, 1.0, 0.0))
    return scale


@triton.jit
def _phase1_kernel(
    ptrs_ptr,  # int64 [NUM_ROWS, n_tensors]: data_ptrs of p, g, m, v, vmax, a, step per tensor
    numels_ptr,  # int64 [n_tensors]: elements of each tensor
    offsets_ptr,  # int64 [n_tensors]: where each tensor's shard starts in its whole tensor (rounding bits)
    chunks_ptr,  # int64 [2, n_chunks]: (tensor index, first element) of each program's chunk
    partials_ptr,  # fp32 [n_chunks, 3]: this program's sums g.(p-a), |p-a|^2, |q-a|^2
    stats_ptr,  # fp32 [n_tensors, 5]: written here for single-chunk tensors
    counts_ptr,  # fp32 [n_tensors]: steps whose condition fired, incremented here for single-chunk tensors
    lr_ptr,  # fp32 [1] device lr, read when LR_IS_TENSOR
    grad_scale_ptr,  # fp32 [1] AMP loss scale: grads are multiplied by 1/scale (1 when no scaler)
    found_inf_ptr,  # fp32 [1] AMP: nonzero means inf/NaN grads, and the whole step is skipped
    maps_ptr,  # 8-bit: fp32 [2, 256] code values (signed map for m, unsigned for v)
    table_ptr,  # 8-bit: int32 [2, 2, NUM_KEYS] each bucket's count below and midpoint (quantization.bucket_table)
    n_tensors,
    n_chunks,
    single_max,  # tensors of at most this many elements finish here; -1 (split step): none do
    lr,  # host lr (float), used unless LR_IS_TENSOR
    one_minus_beta1,  # host: 1 - beta1 in fp64, as torch rounds it
    beta2,
    one_minus_beta2,  # host: 1 - beta2
    ln_beta1,  # ln(beta1), host: math.log(beta1) (-inf for 0)
    ln_beta2,  # ln(beta2), host: math.log(beta2)
    eps,
    weight_decay,  # SPD lambda
    max_scale,  # cap on s = lam * r (inf: the paper's rule)
    P_DTYPE: tl.constexpr,  # storage dtype of p (and g)
    G_DTYPE: tl.constexpr,
    A_DTYPE: tl.constexpr,  # storage dtype of the anchors
    HAS_ANCHOR: tl.constexpr,
    AMSGRAD: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    STORE_Q: tl.constexpr,  # fp32 p or 8-bit moments: store q now; else q is rebuilt and rounded once later
    M_FMT: tl.constexpr,  # the moments' formats (FMT_*): compressed ones use their scale rows
    V_FMT: tl.constexpr,
    M_TYPE: tl.constexpr,  # the element types of the m and v rows (_CODE_TYPES)
    V_TYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
):
    if tl.load(found_inf_ptr) != 0.0:
        return  # AMP found inf/NaN grads: params, states, steps and stats stay as they are
    pid = tl.program_id(0)
    tid = tl.load(chunks_ptr + pid)
    start = tl.multiple_of(tl.load(chunks_ptr + n_chunks + pid), BLOCK)  # chunks start on tile bounds
    numel = tl.load(numels_ptr + tid)
    single = numel <= single_max  # this program owns the whole tensor and may finish it
    # GradScaler's scales are powers of two, so 1/scale is exact however the division rounds
    inv_scale = 1.0 / tl.load(grad_scale_ptr)

    p_ptr = _table_ptr(ptrs_ptr, ROW_P, n_tensors, tid, P_DTYPE, ALIGNED)
    g_ptr = _table_ptr(ptrs_ptr, ROW_G, n_tensors, tid, G_DTYPE, ALIGNED)
    CODED: tl.constexpr = M_FMT != FMT_FP32 or V_FMT != FMT_FP32
    if CODED:
        m_ptr = _table_ptr(ptrs_ptr, ROW_M, n_tensors, tid, M_TYPE, ALIGNED)
        v_ptr = _table_ptr(ptrs_ptr, ROW_V, n_tensors, tid, V_TYPE, ALIGNED)
        m_scale_ptr = _table_ptr(ptrs_ptr, ROW_M_ABSMAX, n_tensors, tid, tl.float32, False)
        v_scale_ptr = _table_ptr(ptrs_ptr, ROW_V_ABSMAX, n_tensors, tid, tl.float32, False)
    else:
        m_ptr = _table_ptr(ptrs_ptr, ROW_M, n_tensors, tid, tl.float32, ALIGNED)
        v_ptr = _table_ptr(ptrs_ptr, ROW_V, n_tensors, tid, tl.float32, ALIGNED)
    vmax_ptr = _table_ptr(ptrs_ptr, ROW_VMAX, n_tensors, tid, tl.float32, ALIGNED)
    a_ptr = _table_ptr(ptrs_ptr, ROW_A, n_tensors, tid, A_DTYPE, ALIGNED)
    step_ptr = _table_ptr(ptrs_ptr, ROW_STEP, n_tensors, tid, tl.float32, False)

    if LR_IS_TENSOR:
        lr = tl.load(lr_ptr)
    t = tl.load(step_ptr) + 1.0
    step_size, inv_sqrt_bc2 = _step_scalars(t, lr, ln_beta1, ln_beta2)
    if CODED:  # stochastic rounding's keys: the step count and the moment (rounding.py)
        m_key = _hash32(t.to(tl.uint32) * 4)
        v_key = _hash32(t.to(tl.uint32) * 4 + 1)
        offset = tl.load(offsets_ptr + tid)

    acc_gd = tl.zeros([BLOCK], dtype=tl.float32)
    acc_dd = tl.zeros([BLOCK], dtype=tl.float32)
    acc_qq = tl.zeros([BLOCK], dtype=tl.float32)
    for tile in tl.range(TILES):
        tile_start = start + tile * BLOCK
        offs = tile_start + tl.arange(0, BLOCK)
        if CODED:
            if tile_start + BLOCK <= numel:
                gd, dd, qq = _phase1_tile_coded(
                    p_ptr, g_ptr, m_ptr, v_ptr, m_scale_ptr, v_scale_ptr, a_ptr, maps_ptr, table_ptr,
                    offs, None, tile_start, numel, inv_scale, one_minus_beta1, beta2, one_minus_beta2, eps,
                    step_size, inv_sqrt_bc2, m_key, v_key, offset, M_FMT, V_FMT, HAS_ANCHOR, False, BLOCK,
                )
            else:
                gd, dd, qq = _phase1_tile_coded(
                    p_ptr, g_ptr, m_ptr, v_ptr, m_scale_ptr, v_scale_ptr, a_ptr, maps_ptr, table_ptr,
                    offs, offs < numel, tile_start, numel, inv_scale, one_minus_beta1, beta2, one_minus_beta2, eps,
                    step_size, inv_sqrt_bc2, m_key, v_key, offset, M_FMT, V_FMT, HAS_ANCHOR, True, BLOCK,
                )
        elif tile_start + BLOCK <= numel:
            gd, dd, qq = _phase1_tile(
                p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, a_ptr, offs, None, inv_scale,
                one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_sqrt_bc2, HAS_ANCHOR, AMSGRAD, STORE_Q, False,
            )
        else:
            gd, dd, qq = _phase1_tile(
                p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, a_ptr, offs, offs < numel, inv_scale,
                one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_sqrt_bc2, HAS_ANCHOR, AMSGRAD, STORE_Q, True,
            )
        acc_gd += gd
        acc_dd += dd
        acc_qq += qq

    sum_gd = tl.sum(acc_gd, axis=0)
    sum_dd = tl.sum(acc_dd, axis=0)
    sum_qq = tl.sum(acc_qq, axis=0)
    if single:
        scale = _finalize(sum_gd, sum_dd, sum_qq, weight_decay, max_scale, stats_ptr, counts_ptr, tid, step_ptr, t)
        if AMSGRAD:
            v_ptr = vmax_ptr  # q is built from vmax
        if STORE_Q:
            if scale != 0.0:
                tl.debug_barrier()  # q was stored above by other threads of this program
                for tile in tl.range(TILES):
                    offs = start + tile * BLOCK + tl.arange(0, BLOCK)
                    _project_tile(
                        p_ptr, m_ptr, v_ptr, a_ptr, offs, offs < numel, scale, eps, step_size,
                        inv_sqrt_bc2, HAS_ANCHOR, False, True,
                    )
        else:
            # bf16/fp16: q is rebuilt from the old p and the new moments and
            # rounded once, projected or not (reads hit the cache just filled)
            tl.debug_barrier()
            for tile in tl.range(TILES):
                offs = start + tile * BLOCK + tl.arange(0, BLOCK)
                _project_tile(
                    p_ptr, m_ptr, v_ptr, a_ptr, offs, offs < numel, scale, eps, step_size,
                    inv_sqrt_bc2, HAS_ANCHOR, True, True,
                )
    else:
        tl.store(partials_ptr + pid * 3 + 0, sum_gd)
        tl.store(partials_ptr + pid * 3 + 1, sum_dd)
        tl.store(partials_ptr + pid * 3 + 2, sum_qq)


@triton.jit
def _sum_rows(partials_ptr, first, count, FINALIZE_BLOCK: tl.constexpr):
    """The three column sums of partial rows [first, first + count), in row order."""
    acc_gd = tl.zeros([FINALIZE_BLOCK], dtype=tl.float32)
    acc_dd = tl.zeros([FINALIZE_BLOCK], dtype=tl.float32)
    acc_qq = tl.zeros([FINALIZE_BLOCK], dtype=tl.float32)
    for i in tl.range(0, count, FINALIZE_BLOCK):
        rows = first + i + tl.arange(0, FINALIZE_BLOCK)
        mask = i + tl.arange(0, FINALIZE_BLOCK) < count
        acc_gd += tl.load(partials_ptr + rows * 3 + 0, mask=mask, other=0.0)
        acc_dd += tl.load(partials_ptr + rows * 3 + 1, mask=mask, other=0.0)
        acc_qq += tl.load(partials_ptr + rows * 3 + 2, mask=mask, other=0.0)
    return tl.sum(acc_gd, axis=0), tl.sum(acc_dd, axis=0), tl.sum(acc_qq, axis=0)


@triton.jit
def _finalize_kernel(
    ptrs_ptr,  # int64 [NUM_ROWS, n_tensors]: data_ptrs (the step row is used here)
    multi_ptr,  # int64 [3, n_multi]: (tensor index, first chunk, chunk count) per multi-chunk tensor
    partials_ptr,  # fp32 [n_chunks, 3]
    stats_ptr,  # fp32 [n_tensors, 5]
    counts_ptr,  # fp32 [n_tensors]: steps whose condition fired
    found_inf_ptr,  # fp32 [1] AMP: nonzero skips the step
    n_tensors,
    n_multi,
    weight_decay,
    max_scale,
    FINALIZE_BLOCK: tl.constexpr,
):
    if tl.load(found_inf_ptr) != 0.0:
        return
    pid = tl.program_id(0)
    tid = tl.load(multi_ptr + pid)
    first = tl.load(multi_ptr + n_multi + pid)
    count = tl.load(multi_ptr + 2 * n_multi + pid)
    sum_gd, sum_dd, sum_qq = _sum_rows(partials_ptr, first, count, FINALIZE_BLOCK)
    step_ptr = tl.load(ptrs_ptr + ROW_STEP * n_tensors + tid).to(tl.pointer_type(tl.float32))
    t = tl.load(step_ptr) + 1.0
    _finalize(sum_gd, sum_dd, sum_qq, weight_decay, max_scale, stats_ptr, counts_ptr, tid, step_ptr, t)


@triton.jit
def _sum_partials_kernel(
    multi_ptr,  # int64 [3, n_tensors]: (tensor index, first chunk, chunk count); every tensor (split step)
    partials_ptr,  # fp32 [n_chunks, 3]
    sums_ptr,  # fp64 [n_tensors, 3]: each tensor's sums over its (local) chunks; 0 for an empty shard
    n_tensors,
    FINALIZE_BLOCK: tl.constexpr,
):
    """Split step: a tensor's sums over this rank's chunks, for the caller to all-reduce."""
    pid = tl.program_id(0)
    tid = tl.load(multi_ptr + pid)
    first = tl.load(multi_ptr + n_tensors + pid)
    count = tl.load(multi_ptr + 2 * n_tensors + pid)
    sum_gd, sum_dd, sum_qq = _sum_rows(partials_ptr, first, count, FINALIZE_BLOCK)
    tl.store(sums_ptr + tid * 3 + 0, sum_gd.to(tl.float64))
    tl.store(sums_ptr + tid * 3 + 1, sum_dd.to(tl.float64))
    tl.store(sums_ptr + tid * 3 + 2, sum_qq.to(tl.float64))


@triton.jit
def _finalize_sums_kernel(
    ptrs_ptr,  # int64 [NUM_ROWS, n_tensors]: data_ptrs (the step row is used here)
    sums_ptr,  # fp64 [n_tensors, 3]: whole-tensor sums (all-reduced over the shards)
    stats_ptr,  # fp32 [n_tensors, 5]
    counts_ptr,  # fp32 [n_tensors]
    found_inf_ptr,  # fp32 [1] AMP: nonzero skips the step
    n_tensors,
    weight_decay,
    max_scale,
):
    """Split step: stats, step and projection count of one tensor from its whole-tensor sums."""
    if tl.load(found_inf_ptr) != 0.0:
        return
    tid = tl.program_id(0)
    sum_gd = tl.load(sums_ptr + tid * 3 + 0).to(tl.float32)
    sum_dd = tl.load(sums_ptr + tid * 3 + 1).to(tl.float32)
    sum_qq = tl.load(sums_ptr + tid * 3 + 2).to(tl.float32)
    step_ptr = tl.load(ptrs_ptr + ROW_STEP * n_tensors + tid).to(tl.pointer_type(tl.float32))
    t = tl.load(step_ptr) + 1.0
    _finalize(sum_gd, sum_dd, sum_qq, weight_decay, max_scale, stats_ptr, counts_ptr, tid, step_ptr, t)


@triton.jit
def _phase2_kernel(
    ptrs_ptr,  # int64 [NUM_ROWS, n_tensors]
    numels_ptr,  # int64 [n_tensors]
    chunks_ptr,  # int64 [2, n_chunks]: this grid covers its first n_multi_chunks columns
    stats_ptr,  # fp32 [n_tensors, 5]: s in column 4, t already incremented by finalize
    lr_ptr,
    found_inf_ptr,  # fp32 [1] AMP: nonzero skips the step (stats are last step's then)
    n_tensors,
    n_chunks,
    lr,
    ln_beta1,
    ln_beta2,
    eps,
    P_DTYPE: tl.constexpr,
    A_DTYPE: tl.constexpr,
    HAS_ANCHOR: tl.constexpr,
    AMSGRAD: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    RECOMPUTE_Q: tl.constexpr,  # p still holds the old p (bf16/fp16): rebuild q from m, v
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
):
    if tl.load(found_inf_ptr) != 0.0:
        return
    pid = tl.program_id(0)
    tid = tl.load(chunks_ptr + pid)
    start = tl.multiple_of(tl.load(chunks_ptr + n_chunks + pid), BLOCK)  # chunks start on tile bounds
    scale = tl.load(stats_ptr + tid * NUM_STATS + STAT_SCALE)
    if RECOMPUTE_Q or scale != 0.0:
        numel = tl.load(numels_ptr + tid)
        p_ptr = _table_ptr(ptrs_ptr, ROW_P, n_tensors, tid, P_DTYPE, ALIGNED)
        m_ptr = _table_ptr(ptrs_ptr, ROW_M, n_tensors, tid, tl.float32, ALIGNED)
        v_ptr = _table_ptr(ptrs_ptr, ROW_V, n_tensors, tid, tl.float32, ALIGNED)
        vmax_ptr = _table_ptr(ptrs_ptr, ROW_VMAX, n_tensors, tid, tl.float32, ALIGNED)
        a_ptr = _table_ptr(ptrs_ptr, ROW_A, n_tensors, tid, A_DTYPE, ALIGNED)
        step_ptr = _table_ptr(ptrs_ptr, ROW_STEP, n_tensors, tid, tl.float32, False)
        if LR_IS_TENSOR:
            lr = tl.load(lr_ptr)
        step_size, inv_sqrt_bc2 = _step_scalars(tl.load(step_ptr), lr, ln_beta1, ln_beta2)
        if AMSGRAD:
            v_ptr = vmax_ptr  # q was built from vmax
        for tile in tl.range(TILES):
            tile_start = start + tile * BLOCK
            offs = tile_start + tl.arange(0, BLOCK)
            if tile_start + BLOCK <= numel:
                _project_tile(
                    p_ptr, m_ptr, v_ptr, a_ptr, offs, None, scale, eps, step_size, inv_sqrt_bc2,
                    HAS_ANCHOR, RECOMPUTE_Q, False,
                )
            else:
                _project_tile(
                    p_ptr, m_ptr, v_ptr, a_ptr, offs, offs < numel, scale, eps, step_size, inv_sqrt_bc2,
                    HAS_ANCHOR, RECOMPUTE_Q, True,
                )


# --------------------------------------------------------------------- launcher


class _Plan:
    """Device tables and buffers for one bucket; rebuilt when a param or grad storage changes.

    The state tensors (m, v, vmax, anchors, steps) of a bucket never change
    storage: the optimizer builds a new bucket when its state is replaced.
    For a split step (``split``) every tensor, whatever its size, goes through
    partials, so its sums can be all-reduced before the finalize.
    """

    def __init__(self, bucket: Bucket, chunk: int, key: Tuple, split: bool) -> None:
        _check_bucket(bucket)
        self.key = key
        device = bucket.device
        n = len(bucket)
        numels = [p.numel() for p in bucket.params]
        zero = [0] * n
        rows = [  # in ROW_* order
            [t.data_ptr() for t in bucket.params],
            [t.data_ptr() for t in bucket.grads],
            [t.data_ptr() for t in bucket.exp_avgs],
            [t.data_ptr() for t in bucket.exp_avg_sqs],
            [t.data_ptr() for t in bucket.max_exp_avg_sqs] if bucket.hp.amsgrad else zero,
            [t.data_ptr() for t in bucket.anchors] if bucket.anchors is not None else zero,
            [t.data_ptr() for t in bucket.steps],
            [t.data_ptr() for t in bucket.exp_avg_scales] if bucket.exp_avg_scales else zero,
            [t.data_ptr() for t in bucket.exp_avg_sq_scales] if bucket.exp_avg_sq_scales else zero,
        ]
        self.aligned = all(ptr % 16 == 0 for row in rows[:6] for ptr in row)
        self.single_max = -1 if split else chunk
        multi_chunks, single_chunks, multi = [], [], []
        for tid, numel in enumerate(numels):
            if numel <= self.single_max:
                single_chunks.append((tid, 0))
            else:  # an empty shard has no chunks: its sums are 0
                first = len(multi_chunks)
                multi_chunks.extend((tid, s) for s in range(0, numel, chunk))
                multi.append((tid, first, len(multi_chunks) - first))
        chunks = multi_chunks + single_chunks
        self.n_tensors = n
        self.n_chunks = len(chunks)
        self.n_multi = len(multi)
        self.n_multi_chunks = len(multi_chunks)

        def upload(values, dtype=torch.int64):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        self.ptrs = upload(rows)
        self.numels = upload(numels)
        self.offsets = upload(bucket.index_offsets or zero)
        self.chunks = upload([[c[0] for c in chunks], [c[1] for c in chunks]])
        self.multi = upload([[m[i] for m in multi] for i in range(3)] if multi else [[], [], []])
        # zeros: a split step that AMP skips still hands finite sums (from here) to the all-reduce
        self.partials = torch.zeros((max(self.n_multi_chunks, 1), 3), dtype=torch.float32, device=device)
        self.stats = torch.zeros((n, stats.NUM_STATS), dtype=torch.float32, device=device)
        # (grad_scale, found_inf) when no GradScaler drives the step: scale 1, nothing found
        self.amp_default = torch.tensor([1.0, 0.0], dtype=torch.float32).to(device)
        self.counts = torch.zeros(n, dtype=torch.float32, device=device)


def _get_plan(bucket: Bucket, chunk: int, split: bool) -> _Plan:
    ptr = Tensor.data_ptr
    key = (chunk, split, tuple(map(ptr, bucket.params)), tuple(map(ptr, bucket.grads)))
    plan = bucket.backend_cache
    if not isinstance(plan, _Plan) or plan.key != key:
        old = plan
        plan = bucket.backend_cache = _Plan(bucket, chunk, key, split)
        if isinstance(old, _Plan):
            # a step that AMP skips must leave the last stats in place: carry them over
            plan.stats.copy_(old.stats)
    return plan


_QUANT_TABLES: dict = {}


def _quantization_tables(device: torch.device) -> Tuple[Tensor, Tensor]:
    """The 8-bit maps and the bucket table on ``device`` (made once)."""
    tables = _QUANT_TABLES.get(device)
    if tables is None:
        tables = _QUANT_TABLES[device] = (quantization.maps(device), quantization.bucket_table(device))
    return tables


def _amp_arg(value, default: Tensor) -> Tensor:
    """A GradScaler tensor as a one-element fp32 buffer on the bucket's device (no sync)."""
    if value is None:
        return default
    if value.dtype != torch.float32 or value.device != default.device:
        value = value.to(device=default.device, dtype=torch.float32, non_blocking=True)
    return value.reshape(1)


def _ln(beta: float) -> float:
    return math.log(beta) if beta > 0.0 else -math.inf


#: the torch dtype of each moment format's codes
_MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "bnb8": torch.uint8}


def _check_bucket(bucket: Bucket) -> None:
    for i, p in enumerate(bucket.params):
        if p.dtype not in _TORCH_TO_TL or not p.is_contiguous():
            raise ValueError(f"triton backend: tensor {i} must be contiguous fp32/bf16/fp16, got {p.dtype}")
        g = bucket.grads[i]
        if g.shape != p.shape or g.dtype not in _TORCH_TO_TL or g.device != p.device:
            raise ValueError(f"triton backend: grad {i} must match its param, got {g.dtype} {tuple(g.shape)}")
        for k, (name, t) in enumerate((("exp_avg", bucket.exp_avgs[i]), ("exp_avg_sq", bucket.exp_avg_sqs[i]))):
            moment = _MOMENT_DTYPES[bucket.formats[k]]
            if t.dtype != moment or not t.is_contiguous():
                raise ValueError(f"triton backend: {name} of tensor {i} must be contiguous {moment} "
                                 f"({bucket.formats[k]} moments)")


class _Step:
    """The launch arguments of one step of one bucket (host side, no sync)."""

    def __init__(self, bucket: Bucket, plan: _Plan, block: int, tiles: int, num_warps: int) -> None:
        self.bucket, self.plan = bucket, plan
        self.block, self.tiles, self.num_warps = block, tiles, num_warps
        self.p_dtype = _TORCH_TO_TL[bucket.params[0].dtype]
        self.g_dtype = _TORCH_TO_TL[bucket.grads[0].dtype]
        self.anchored = bucket.anchors is not None
        self.a_dtype = _TORCH_TO_TL[bucket.anchors[0].dtype] if self.anchored else tl.float32
        hp = self.hp = bucket.hp
        lr = hp.lr
        self.lr_is_tensor = isinstance(lr, Tensor)
        if self.lr_is_tensor and lr.device.type == "cpu" and bucket.device.type != "cpu":
            lr, self.lr_is_tensor = float(lr.item()), False
        # a float lr travels as a scalar argument; the pointer argument then only needs to be valid
        self.lr_buf = lr.reshape(1).to(torch.float32) if self.lr_is_tensor else plan.stats
        self.lr_value = 0.0 if self.lr_is_tensor else float(lr)
        # projection counts: the optimizer's vector for this bucket, else a scratch one of the plan
        self.counts = bucket.projections if bucket.projections is not None else plan.counts
        self.grad_scale = _amp_arg(bucket.grad_scale, plan.amp_default[0:1])
        self.found_inf = _amp_arg(bucket.found_inf, plan.amp_default[1:2])
        self.ln_b1, self.ln_b2 = _ln(hp.beta1), _ln(hp.beta2)
        self.m_fmt, self.v_fmt = (FORMAT_CODES[name] for name in bucket.formats)
        self.coded = bucket.coded
        # compressed moments: q is defined in p's dtype and stored now (the fp32 moments are gone after phase 1)
        self.store_q = self.p_dtype == tl.float32 or self.coded
        self.qmaps, self.qtable = _quantization_tables(bucket.device)

    def phase1(self) -> None:
        hp, plan = self.hp, self.plan
        if plan.n_chunks == 0:  # every tensor an empty shard
            return
        _phase1_kernel[(plan.n_chunks,)](
            plan.ptrs, plan.numels, plan.offsets, plan.chunks, plan.partials, plan.stats, self.counts, self.lr_buf,
            self.grad_scale, self.found_inf, self.qmaps, self.qtable,
            plan.n_tensors, plan.n_chunks, plan.single_max, self.lr_value,
            1.0 - hp.beta1, hp.beta2, 1.0 - hp.beta2, self.ln_b1, self.ln_b2, hp.eps, hp.weight_decay,
            hp.max_scale, P_DTYPE=self.p_dtype, G_DTYPE=self.g_dtype, A_DTYPE=self.a_dtype,
            HAS_ANCHOR=self.anchored, AMSGRAD=hp.amsgrad, LR_IS_TENSOR=self.lr_is_tensor, STORE_Q=self.store_q,
            M_FMT=self.m_fmt, V_FMT=self.v_fmt, M_TYPE=_CODE_TYPES[self.m_fmt], V_TYPE=_CODE_TYPES[self.v_fmt],
            ALIGNED=plan.aligned,
            BLOCK=self.block, TILES=self.tiles, num_warps=NUM_WARPS_8BIT if self.coded else self.num_warps,
        )

    def finalize(self) -> None:
        hp, plan = self.hp, self.plan
        _finalize_kernel[(plan.n_multi,)](
            plan.ptrs, plan.multi, plan.partials, plan.stats, self.counts, self.found_inf, plan.n_tensors,
            plan.n_multi, hp.weight_decay, hp.max_scale, FINALIZE_BLOCK=FINALIZE_BLOCK, num_warps=4,
        )

    def sum_partials(self, sums: Tensor) -> None:
        plan = self.plan
        _sum_partials_kernel[(plan.n_tensors,)](
            plan.multi, plan.partials, sums, plan.n_tensors, FINALIZE_BLOCK=FINALIZE_BLOCK, num_warps=4,
        )

    def finalize_sums(self, sums: Tensor) -> None:
        hp, plan = self.hp, self.plan
        _finalize_sums_kernel[(plan.n_tensors,)](
            plan.ptrs, sums, plan.stats, self.counts, self.found_inf, plan.n_tensors, hp.weight_decay, hp.max_scale,
            num_warps=1,
        )

    def phase2(self) -> None:
        hp, plan = self.hp, self.plan
        if plan.n_multi_chunks == 0:
            return
        _phase2_kernel[(plan.n_multi_chunks,)](
            plan.ptrs, plan.numels, plan.chunks, plan.stats, self.lr_buf, self.found_inf,
            plan.n_tensors, plan.n_chunks, self.lr_value, self.ln_b1, self.ln_b2, hp.eps,
            P_DTYPE=self.p_dtype, A_DTYPE=self.a_dtype, HAS_ANCHOR=self.anchored, AMSGRAD=hp.amsgrad,
            LR_IS_TENSOR=self.lr_is_tensor, RECOMPUTE_Q=not self.store_q, ALIGNED=plan.aligned,
            BLOCK=self.block, TILES=self.tiles, num_warps=self.num_warps,
        )


def _prepare(bucket: Bucket, split: bool, block: int, tiles: int, num_warps: int) -> _Step:
    # grads may come in another layout (e.g. transposed); the kernels need them dense like p
    if not all(map(Tensor.is_contiguous, bucket.grads)):
        bucket.grads = [g.contiguous() for g in bucket.grads]
    return _Step(bucket, _get_plan(bucket, block * tiles, split), block, tiles, num_warps)


def adam_spd_triton_step(
    bucket: Bucket, *, block: int = BLOCK, tiles: int = TILES, num_warps: int = NUM_WARPS
) -> Tensor:
    """Run one AdamSPD step on ``bucket`` with the fused kernels; return its stats [n, 5].

    No host-device sync: step counts and lr (if a tensor) stay on the device.
    """
    step = _prepare(bucket, False, block, tiles, num_warps)
    step.phase1()
    if step.plan.n_multi:
        step.finalize()
        step.phase2()
    return step.plan.stats


def adam_spd_triton_partials(
    bucket: Bucket, *, block: int = BLOCK, tiles: int = TILES, num_warps: int = NUM_WARPS
) -> Callable[[], Tensor]:
    """First half of a split step: Adam on every tensor and its three sums into
    ``bucket.sums`` (fp64 [n, 3]). Returns ``finish``, to call once the caller has
    all-reduced ``bucket.sums``: it finalizes, projects and returns the stats."""
    step = _prepare(bucket, True, block, tiles, num_warps)
    step.phase1()
    step.sum_partials(bucket.sums)

    def finish() -> Tensor:
        step.finalize_sums(bucket.sums)
        step.phase2()
        return step.plan.stats

    return finish
