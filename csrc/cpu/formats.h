// The moment formats of spd_kernels/formats/, one codec each, and the chunk step over coded
// moments. A codec turns one block of a moment (up to QBLOCK elements, starting on a block
// bound) into fp32 and back:
//
//   F32   fp32 values, used in place (DIRECT: no copy).
//   BF16  bf16, read and written inside the fp32 step's loop (math.h's stores); exp_avg rounded
//         to nearest even, exp_avg_sq stochastically: add the low 16 bits of the element's
//         random bits to the fp32 pattern, keep the upper 16 (spd_kernels/formats/rounding.py:
//         bits = lowbias32(i + lowbias32(4 t + k)) for element i of the whole tensor (a shard adds
//         its start, ``offset``), step
//         count t, moment k).
//   FP8   e4m3fn codes and one fp32 scale = absmax / 448 per block: code = e4m3(clamp(x *
//         (1 / scale), -448, 448)), nearest even, by integer arithmetic (no table, no gather);
//         value = float(code) * scale.
//   BNB8  bitsandbytes' dynamic-map codes and per-block absmax (quantizer.h).
//
// A chunk with a block format goes block by block: decode that moment into an fp32 buffer (L1),
// the fp32 step of math.h (q, kept in p's dtype, into p; the sums), encode it back. fp32 and
// bf16 moments need no buffer: they are one pass.
#pragma once

#include "quantizer.h"

namespace spd_kernels {
namespace {

// One tensor's moment: its codes and, for the block formats, one fp32 scale per block.
struct MomentView {
  void* codes = nullptr;
  float* scale = nullptr;
};

// The key of moment k's random bits at step count t (rounding.py's random_bits).
inline uint32_t rounding_key(uint32_t step, int moment) { return hash32(4u * step + static_cast<uint32_t>(moment)); }

// DIRECT formats are read and written inside the fp32 step's loop (Store<moment>: math.h's
// policies); the others go through an fp32 block buffer (decode, step, encode).
struct F32Format {
  using Code = float;
  static constexpr bool DIRECT = true;
  template <int MOMENT>
  using Store = F32Store;
};

struct BF16Format {
  using Code = uint16_t;
  static constexpr bool DIRECT = true;
  template <int MOMENT>
  using Store = std::conditional_t<MOMENT == 0, BF16NearestStore, BF16StochasticStore>;
};

// e4m3fn code of y, |y| <= 448 (finite), nearest even; branch-free so that the loop vectorizes.
inline uint8_t e4m3_code(float y) {
  const uint32_t bits = float_bits(y), sign = (bits >> 24) & 0x80u, mag = bits & 0x7FFFFFFFu;
  // normal e4m3 (|y| >= 2^-6): keep 3 mantissa bits, nearest even; the carry moves the exponent
  const uint32_t normal = ((mag + 0x7FFFFu + ((mag >> 20) & 1u)) >> 20) - (120u << 3);
  // subnormal (|y| < 2^-6): the code is |y| / 2^-9, nearest even (8 is the smallest normal)
  const uint32_t sub = static_cast<uint32_t>(std::nearbyint(bits_float(mag) * 512.0f));
  return static_cast<uint8_t>(sign | (mag < 0x3C800000u ? sub : normal));
}

inline float e4m3_value(uint8_t code) {
  const uint32_t exponent = (code >> 3) & 0xFu, mantissa = code & 7u;
  const float magnitude = exponent ? bits_float(((exponent + 120u) << 23) | (mantissa << 20))
                                   : static_cast<float>(mantissa) * (1.0f / 512.0f);
  return (code & 0x80u) ? -magnitude : magnitude;
}

struct FP8Format {
  using Code = uint8_t;
  static constexpr bool DIRECT = false;
  template <int MOMENT>
  using Store = F32Store;  // the step sees the fp32 block buffer
  static void decode(const void* codes, const float* scale, int64_t b0, int64_t len, int, const QMaps*, float* out) {
    const uint8_t* c = static_cast<const uint8_t*>(codes) + b0;
    const float s = scale[b0 / QBLOCK];
    int64_t j = 0;
#ifdef __AVX512F__
    // e4m3_value 16 lanes at a time: the exponent and mantissa moved into fp32's fields, the
    // subnormals (exponent 0) as mantissa * 2^-9, the sign on top
    const __m512 vs = _mm512_set1_ps(s), sub_unit = _mm512_set1_ps(1.0f / 512.0f);
    const __m512i seven = _mm512_set1_epi32(7), fifteen = _mm512_set1_epi32(15), bias = _mm512_set1_epi32(120);
    for (; j + 16 <= len; j += 16) {
      const __m512i code = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j)));
      const __m512i exponent = _mm512_and_si512(_mm512_srli_epi32(code, 3), fifteen);
      const __m512i mantissa = _mm512_and_si512(code, seven);
      const __m512i normal = _mm512_or_si512(_mm512_slli_epi32(_mm512_add_epi32(exponent, bias), 23),
                                             _mm512_slli_epi32(mantissa, 20));
      const __mmask16 is_sub = _mm512_cmpeq_epi32_mask(exponent, _mm512_setzero_si512());
      __m512 value = _mm512_mask_mul_ps(_mm512_castsi512_ps(normal), is_sub, _mm512_cvtepi32_ps(mantissa), sub_unit);
      const __m512i sign = _mm512_slli_epi32(_mm512_srli_epi32(code, 7), 31);
      value = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(value), sign));
      _mm512_storeu_ps(out + j, _mm512_mul_ps(value, vs));
    }
#endif
    for (; j < len; ++j) out[j] = e4m3_value(c[j]) * s;
  }
  static void encode(void* codes, float* scale, int64_t b0, int64_t len, int, const QMaps*, uint32_t,
                     const float* in) {
    uint8_t* c = static_cast<uint8_t*>(codes) + b0;
    const float s = max_abs(in, len) / 448.0f;
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    scale[b0 / QBLOCK] = s;
    int64_t j = 0;
#ifdef __AVX512F__
    // e4m3_code 16 lanes at a time (the same integer steps; the subnormal case rounds in the
    // conversion, nearest even by default)
    const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-448.0f), hi = _mm512_set1_ps(448.0f),
                 sub_scale = _mm512_set1_ps(512.0f);
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), half = _mm512_set1_epi32(0x7FFFF),
                  one = _mm512_set1_epi32(1), rebias = _mm512_set1_epi32(120 << 3),
                  min_normal = _mm512_set1_epi32(0x3C800000);
    for (; j + 16 <= len; j += 16) {
      const __m512 y = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(in + j), vinv), lo), hi);
      const __m512i bits = _mm512_castps_si512(y), mag = _mm512_and_si512(bits, magnitude);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(mag, 20), one);
      const __m512i normal = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(mag, half), odd), 20),
                                              rebias);
      const __m512i sub = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(mag), sub_scale));
      const __mmask16 is_sub = _mm512_cmplt_epi32_mask(mag, min_normal);
      __m512i code = _mm512_mask_blend_epi32(is_sub, normal, sub);
      code = _mm512_or_si512(code, _mm512_slli_epi32(_mm512_srli_epi32(bits, 31), 7));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(c + j), _mm512_cvtepi32_epi8(code));
    }
#endif
    for (; j < len; ++j) c[j] = e4m3_code(std::min(std::max(in[j] * inv, -448.0f), 448.0f));
  }
};

struct Bnb8Format {
  using Code = uint8_t;
  static constexpr bool DIRECT = false;
  template <int MOMENT>
  using Store = F32Store;  // the step sees the fp32 block buffer
  static void decode(const void* codes, const float* absmax, int64_t b0, int64_t len, int moment, const QMaps* maps,
                     float* out) {
    dequantize_block(static_cast<const uint8_t*>(codes) + b0, len, *maps, moment, absmax[b0 / QBLOCK], out);
  }
  static void encode(void* codes, float* absmax, int64_t b0, int64_t len, int moment, const QMaps* maps, uint32_t,
                     const float* in) {
    const float amax = max_abs(in, len);
    quantize_block(in, len, amax > 0.0f ? 1.0f / amax : 0.0f, *maps, moment, static_cast<uint8_t*>(codes) + b0);
    absmax[b0 / QBLOCK] = amax;
  }
};

// Adam on [begin, end) (begin on a block bound) with moments in formats MF and VF, block by
// block: decode, the fp32 step (q, kept in the param's dtype, into p; the sums), encode.
// ``offset``: where this tensor starts in its whole tensor (a shard's start), for the rounding bits.
template <typename P, typename A, bool HAS_ANCHOR, typename MF, typename VF>
Sums adam_chunk_coded(P* __restrict p, const P* __restrict g, MomentView m, MomentView v, const A* __restrict a,
                      int64_t begin, int64_t end, const Scalars& s, const QMaps* maps, int64_t offset = 0) {
  Sums total;
  const uint32_t m_key = rounding_key(s.step, 0), v_key = rounding_key(s.step, 1);
  if constexpr (MF::DIRECT && VF::DIRECT) {  // fp32/bf16 moments: one pass, no buffers
    using MS = typename MF::template Store<0>;
    using VS = typename VF::template Store<1>;
    return adam_chunk<P, A, false, HAS_ANCHOR, true, true, MS, VS>(
        p, g, static_cast<typename MS::Code*>(m.codes), static_cast<typename VS::Code*>(v.codes), nullptr, a, begin,
        end, s, offset, m_key, v_key);
  }
  // one block at a time: its buffers stay in L1 (runs of 8 blocks measured no faster for fp8 and
  // 14% slower for the 8-bit format)
  constexpr int64_t RUN = QBLOCK;
  alignas(64) float mbuf[RUN], vbuf[RUN];
  for (int64_t r0 = begin; r0 < end; r0 += RUN) {
    const int64_t rlen = std::min(RUN, end - r0);
    // a direct moment is read and written in place; a buffered one is decoded into fp32 first
    using MS = typename MF::template Store<0>;
    using VS = typename VF::template Store<1>;
    auto* mi = MF::DIRECT ? static_cast<typename MS::Code*>(m.codes) + r0 : reinterpret_cast<typename MS::Code*>(mbuf);
    auto* vi = VF::DIRECT ? static_cast<typename VS::Code*>(v.codes) + r0 : reinterpret_cast<typename VS::Code*>(vbuf);
    for (int64_t b = 0; b < rlen; b += QBLOCK) {
      const int64_t len = std::min(QBLOCK, rlen - b);
      if constexpr (!MF::DIRECT) MF::decode(m.codes, m.scale, r0 + b, len, 0, maps, mbuf + b);
      if constexpr (!VF::DIRECT) VF::decode(v.codes, v.scale, r0 + b, len, 1, maps, vbuf + b);
    }
    total.add(adam_chunk<P, A, false, HAS_ANCHOR, true, true, MS, VS>(
        p + r0, g + r0, mi, vi, nullptr, HAS_ANCHOR ? a + r0 : nullptr, 0, rlen, s, offset + r0, m_key, v_key));
    for (int64_t b = 0; b < rlen; b += QBLOCK) {
      const int64_t len = std::min(QBLOCK, rlen - b);
      if constexpr (!MF::DIRECT) MF::encode(m.codes, m.scale, r0 + b, len, 0, maps, m_key, mbuf + b);
      if constexpr (!VF::DIRECT) VF::encode(v.codes, v.scale, r0 + b, len, 1, maps, v_key, vbuf + b);
    }
  }
  return total;
}

// The 8-bit step of one chunk (bench/cpu_block_costs.cpp times it).
template <typename P, typename A, bool HAS_ANCHOR>
Sums adam_chunk8(P* __restrict p, const P* __restrict g, const Moments8& mo, const A* __restrict a, int64_t begin,
                 int64_t end, const Scalars& s, const QMaps& maps) {
  return adam_chunk_coded<P, A, HAS_ANCHOR, Bnb8Format, Bnb8Format>(p, g, MomentView{mo.m, mo.m_absmax},
                                                                    MomentView{mo.v, mo.v_absmax}, a, begin, end, s,
                                                                    &maps);
}

}  // namespace
}  // namespace spd_kernels
