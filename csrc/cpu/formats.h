// The moment formats of spd_kernels/formats/, one codec each (coded_step.h runs the step over
// them). A codec turns one block of a moment (up to QBLOCK elements, starting on a block bound)
// into fp32 and back:
//
//   F32   fp32 values, used in place.
//   BF16  bf16, read and written inside the fp32 step's loop (math.h's moment objects); exp_avg
//         rounded to nearest even, exp_avg_sq stochastically: add the low 16 bits of the
//         element's random bits to the fp32 pattern, keep the upper 16
//         (spd_kernels/formats/rounding.py: bits = lowbias32(i + lowbias32(4 t + k)) for element
//         i of the whole tensor (a shard adds its start, ``offset``), step count t, moment k).
//   FP8   e4m3fn codes and one fp32 scale = absmax / 448 per block: code = e4m3(clamp(x *
//         (1 / scale), -448, 448)), nearest even; value = float(code) * scale. Both by bit
//         arithmetic (no table, no gather).
//   BNB8  bitsandbytes' dynamic-map codes and per-block absmax (quantizer.h).
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

// How a format meets the step (adam_chunk_coded below):
//   moment<k>(view, b0, len, buf, key, maps)  the moment object (math.h) for moment k's elements
//                                        from b0 on (len of them, for a block): codes read in
//                                        place, or decoded into ``buf`` first;
//   finish<k>(view, b0, len, buf, absmax, maps)  a block format's encode of what the step stored
//                                        in ``buf`` (absmax: its max |x|, reduced by the step);
//   BLOCKED                              whether the step must go block by block (finish needs
//                                        the block's absmax before it can encode).
struct F32Format {
  static constexpr bool BLOCKED = false;
  template <int MOMENT>
  static F32Moment moment(MomentView view, int64_t b0, int64_t, float*, uint32_t, const QMaps*) {
    return F32Moment{static_cast<float*>(view.codes) + b0};
  }
  template <int MOMENT>
  static void finish(MomentView, int64_t, int64_t, const float*, float, const QMaps*) {}
};

struct BF16Format {  // exp_avg nearest even, exp_avg_sq stochastic (rounding.py)
  static constexpr bool BLOCKED = false;
  template <int MOMENT>
  static auto moment(MomentView view, int64_t b0, int64_t, float*, uint32_t key, const QMaps*) {
    uint16_t* codes = static_cast<uint16_t*>(view.codes) + b0;
    if constexpr (MOMENT == 0) return BF16NearestMoment{codes};
    else return BF16StochasticMoment{codes, key};
  }
  template <int MOMENT>
  static void finish(MomentView, int64_t, int64_t, const float*, float, const QMaps*) {}
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

// The value of e4m3fn code c, branch-free so that the decode loop vectorizes: the
// magnitude's exponent E and mantissa M moved into fp32's fields with the bias difference added
// give 2^(E-7) (1 + M/8); for E = 0 that is 2^-7 + M 2^-10, and the subnormal M 2^-9 is twice it
// less 2^-6, exactly. No fp32 subnormal is formed, so flush-to-zero modes change nothing.
inline float e4m3_value(uint32_t code) {
  const uint32_t k = code & 0x7Fu;
  const float x = bits_float((k << 20) + (120u << 23));
  const float magnitude = k >= 8u ? x : 2.0f * x - 0x1p-6f;
  return bits_float(float_bits(magnitude) | ((code & 0x80u) << 24));
}

// A block's values in an fp32 buffer (read and written there): the fp8 and 8-bit formats, decoded
// before the step and encoded after it.
struct BufferedMoment {
  static constexpr bool ABSMAX = true;
  float* x;
  float load(int64_t i) const { return x[i]; }
  void store(int64_t i, float y, uint32_t) const { x[i] = y; }
};

struct FP8Format {
  static constexpr bool BLOCKED = true;
  template <int MOMENT>
  static BufferedMoment moment(MomentView view, int64_t b0, int64_t len, float* buf, uint32_t, const QMaps*) {
    const uint8_t* c = static_cast<const uint8_t*>(view.codes) + b0;
    const float s = view.scale[b0 / QBLOCK];
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) buf[j] = e4m3_value(c[j]) * s;
    return BufferedMoment{buf};
  }
  // scale = absmax / 448; code = e4m3(clamp(x / scale, -448, 448)), nearest even
  template <int MOMENT>
  static void finish(MomentView view, int64_t b0, int64_t len, const float* in, float absmax, const QMaps*) {
    uint8_t* c = static_cast<uint8_t*>(view.codes) + b0;
    const float s = absmax / 448.0f;
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    view.scale[b0 / QBLOCK] = s;
    int64_t j = 0;
#ifdef __AVX512F__
    // 16 lanes at a time. The fp32 add rounds: with c = 1.5 * 2^(e+20), e = max(exponent of |y|,
    // -6), |y| + c lands in c's binade, whose spacing 2^(e-3) is e4m3's at |y| (2^-9 for its
    // subnormals), and c is an even multiple of it, so (|y| + c) - c is |y| on e4m3's grid, nearest
    // even. A normal r's code is its fp32 exponent and top 3 mantissa bits less the bias
    // difference; a subnormal r becomes r/2 + 2^-7 first (e4m3_value's rule backwards).
    const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-448.0f), hi = _mm512_set1_ps(448.0f);
    const __m512 half = _mm512_set1_ps(0.5f), min_normal = _mm512_set1_ps(0x1p-6f), sub_bias = _mm512_set1_ps(0x1p-7f);
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), exponent = _mm512_set1_epi32(0x7F800000),
                  min_exponent = _mm512_set1_epi32(121 << 23), to_c = _mm512_set1_epi32((20 << 23) | 0x400000),
                  rebias = _mm512_set1_epi32(120 << 3), sign_bit = _mm512_set1_epi32(0x80);
    for (; j + 16 <= len; j += 16) {
      const __m512 y = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(in + j), vinv), lo), hi);
      const __m512i bits = _mm512_castps_si512(y), mag = _mm512_and_si512(bits, magnitude);
      const __m512i e = _mm512_max_epu32(_mm512_and_si512(mag, exponent), min_exponent);
      const __m512 c_ = _mm512_castsi512_ps(_mm512_add_epi32(e, to_c));
      __m512 r = _mm512_sub_ps(_mm512_add_ps(_mm512_castsi512_ps(mag), c_), c_);
      r = _mm512_mask_fmadd_ps(r, _mm512_cmp_ps_mask(r, min_normal, _CMP_LT_OQ), half, sub_bias);
      __m512i code = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_castps_si512(r), 20), rebias);
      code = _mm512_ternarylogic_epi32(code, _mm512_srli_epi32(bits, 24), sign_bit, 0xF8);  // code | (b & 0x80)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(c + j), _mm512_cvtepi32_epi8(code));
    }
#endif
    for (; j < len; ++j) c[j] = e4m3_code(std::min(std::max(in[j] * inv, -448.0f), 448.0f));
  }
};

struct Bnb8Format {  // bitsandbytes' dynamic-map codes and per-block absmax (quantizer.h)
  static constexpr bool BLOCKED = true;
  template <int MOMENT>
  static BufferedMoment moment(MomentView view, int64_t b0, int64_t len, float* buf, uint32_t, const QMaps* maps) {
    dequantize_block(static_cast<const uint8_t*>(view.codes) + b0, len, *maps, MOMENT, view.scale[b0 / QBLOCK], buf);
    return BufferedMoment{buf};
  }
  template <int MOMENT>
  static void finish(MomentView view, int64_t b0, int64_t len, const float* in, float absmax, const QMaps* maps) {
    quantize_block(in, len, absmax > 0.0f ? 1.0f / absmax : 0.0f, *maps, MOMENT, static_cast<uint8_t*>(view.codes) + b0);
    view.scale[b0 / QBLOCK] = absmax;
  }
};

}  // namespace
}  // namespace spd_kernels
