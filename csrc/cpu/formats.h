// The moment formats of spd_kernels/formats/, one codec each, and the chunk step over coded
// moments. A codec turns one block of a moment (up to QBLOCK elements, starting on a block
// bound) into fp32 and back:
//
//   F32   fp32 values, used in place (DIRECT: no copy).
//   BF16  bf16; exp_avg rounded to nearest even, exp_avg_sq stochastically: add the low 16
//         bits of the element's random bits to the fp32 pattern, keep the upper 16
//         (spd_kernels/formats/rounding.py: bits = lowbias32(i + lowbias32(4 t + k)) for
//         element i of the local tensor, step count t, moment k).
//   FP8   e4m3fn codes and one fp32 scale = absmax / 448 per block: code = e4m3(clamp(x *
//         (1 / scale), -448, 448)), nearest even, by integer arithmetic (no table, no gather);
//         value = float(code) * scale.
//   BNB8  bitsandbytes' dynamic-map codes and per-block absmax (quantizer.h).
//
// A coded chunk goes block by block: decode m and v into fp32 buffers (L1), the fp32 step of
// math.h on them (q, kept in p's dtype, into p; the sums), encode them back.
#pragma once

#include "quantizer.h"

namespace spd_kernels {
namespace {

// One tensor's moment: its codes and, for the block formats, one fp32 scale per block.
struct MomentView {
  void* codes = nullptr;
  float* scale = nullptr;
};

inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The key of moment k's random bits at step count t (rounding.py's random_bits).
inline uint32_t rounding_key(uint32_t step, int moment) { return lowbias32(4u * step + static_cast<uint32_t>(moment)); }

struct F32Format {
  using Code = float;
  static constexpr bool DIRECT = true, BLOCKED = false;
};

struct BF16Format {
  using Code = uint16_t;
  static constexpr bool DIRECT = false, BLOCKED = false;
  static void decode(const void* codes, const float*, int64_t b0, int64_t len, int, const QMaps*, float* out) {
    const uint16_t* c = static_cast<const uint16_t*>(codes) + b0;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) out[j] = bits_float(static_cast<uint32_t>(c[j]) << 16);
  }
  static void encode(void* codes, float*, int64_t b0, int64_t len, int moment, const QMaps*, uint32_t key,
                     const float* in) {
    uint16_t* c = static_cast<uint16_t*>(codes) + b0;
    if (moment == 1) {  // stochastic: the element's 16 random bits decide
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const uint32_t noise = lowbias32(static_cast<uint32_t>(b0 + j) + key) & 0xFFFFu;
        c[j] = static_cast<uint16_t>((float_bits(in[j]) + noise) >> 16);
      }
      return;
    }
    int64_t j = 0;
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
    for (; j + 16 <= len; j += 16)  // vcvtneps2bf16: nearest even in hardware
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(in + j)));
#endif
    for (; j < len; ++j) c[j] = c10::BFloat16(in[j]).x;  // nearest even (c10's, as torch's cast)
  }
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
  static constexpr bool DIRECT = false, BLOCKED = true;
  static void decode(const void* codes, const float* scale, int64_t b0, int64_t len, int, const QMaps*, float* out) {
    const uint8_t* c = static_cast<const uint8_t*>(codes) + b0;
    const float s = scale[b0 / QBLOCK];
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) out[j] = e4m3_value(c[j]) * s;
  }
  static void encode(void* codes, float* scale, int64_t b0, int64_t len, int, const QMaps*, uint32_t,
                     const float* in) {
    uint8_t* c = static_cast<uint8_t*>(codes) + b0;
    const float s = max_abs(in, len) / 448.0f;
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    scale[b0 / QBLOCK] = s;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) c[j] = e4m3_code(std::min(std::max(in[j] * inv, -448.0f), 448.0f));
  }
};

struct Bnb8Format {
  using Code = uint8_t;
  static constexpr bool DIRECT = false, BLOCKED = true;
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
template <typename P, typename A, bool HAS_ANCHOR, typename MF, typename VF>
Sums adam_chunk_coded(P* __restrict p, const P* __restrict g, MomentView m, MomentView v, const A* __restrict a,
                      int64_t begin, int64_t end, const Scalars& s, const QMaps* maps) {
  Sums total;
  alignas(64) float mbuf[QBLOCK], vbuf[QBLOCK];
  const uint32_t m_key = rounding_key(s.step, 0), v_key = rounding_key(s.step, 1);
  for (int64_t b0 = begin; b0 < end; b0 += QBLOCK) {
    const int64_t len = std::min(QBLOCK, end - b0);
    float* mi = MF::DIRECT ? static_cast<float*>(m.codes) + b0 : mbuf;
    float* vi = VF::DIRECT ? static_cast<float*>(v.codes) + b0 : vbuf;
    if constexpr (!MF::DIRECT) MF::decode(m.codes, m.scale, b0, len, 0, maps, mbuf);
    if constexpr (!VF::DIRECT) VF::decode(v.codes, v.scale, b0, len, 1, maps, vbuf);
    total.add(adam_chunk<P, A, false, HAS_ANCHOR, true, true>(p + b0, g + b0, mi, vi, nullptr,
                                                               HAS_ANCHOR ? a + b0 : nullptr, 0, len, s));
    if constexpr (!MF::DIRECT) MF::encode(m.codes, m.scale, b0, len, 0, maps, m_key, mbuf);
    if constexpr (!VF::DIRECT) VF::encode(v.codes, v.scale, b0, len, 1, maps, v_key, vbuf);
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
