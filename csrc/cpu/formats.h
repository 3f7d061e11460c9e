// The moment formats of spd_kernels/formats/, one codec each (coded_step.h runs the step over
// them). A codec turns one block of a moment (up to QBLOCK elements, starting on a block bound)
// into fp32 and back:
//
//   F32   fp32 values, used in place.
//   BF16  bf16, read and written inside the fp32 step's loop (math.h's moment objects); exp_avg
//         rounded to nearest even, exp_avg_sq stochastically: add the low 16 bits of the
//         element's random bits to the fp32 pattern, keep the upper 16
//         (spd_kernels/formats/rounding.py: h = lowbias32(i / 2 + lowbias32(4 t + k)) for element
//         i of the whole tensor (a shard adds its start, ``offset``), step count t, moment k; the
//         bits are h's low half for an even i, its high half for an odd one).
//   FP8   e4m3fn codes and one fp32 scale = absmax / 448 per block: code = e4m3(clamp(x *
//         (1 / scale), -448, 448)), nearest even; value = float(code) * scale. Both by bit
//         arithmetic, or through fp16's hardware conversions with AVX-512 (no table, no gather).
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

// e4m3fn code of y (|y| <= 448 or NaN), nearest even; branch-free so that the loop vectorizes. A
// NaN takes the NaN code (0x7F with y's sign), as torch's cast gives it.
inline uint8_t e4m3_code(float y) {
  const uint32_t bits = float_bits(y), sign = (bits >> 24) & 0x80u, mag = bits & 0x7FFFFFFFu;
  // normal e4m3 (|y| >= 2^-6): keep 3 mantissa bits, nearest even; the carry moves the exponent
  const uint32_t normal = ((mag + 0x7FFFFu + ((mag >> 20) & 1u)) >> 20) - (120u << 3);
  // subnormal (|y| < 2^-6): the code is |y| / 2^-9, nearest even (8 is the smallest normal)
  const uint32_t sub = static_cast<uint32_t>(std::nearbyint(bits_float(mag) * 512.0f));
  const uint32_t magnitude_code = mag > 0x7F800000u ? 0x7Fu : (mag < 0x3C800000u ? sub : normal);
  return static_cast<uint8_t>(sign | magnitude_code);
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

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define SPD_KERNELS_FP8_SIMD 1
// The e4m3 codec 32 values at a time, through fp16 and its hardware conversions (vcvtph2ps,
// vcvtps2ph: AVX-512F). An e4m3fn code's 7 magnitude bits put at fp16's bits 7-13 make the fp16
// of value(code) * 2^-8, subnormals included: the exponent fields start at the same bit and the
// subnormal ranges line up (fp16's 2^-24 steps are e4m3's 2^-9 times 2^-8, its 2^-14 smallest
// normal e4m3's 2^-6 times 2^-8), so at every |x| fp16's grid is e4m3's with 7 more bits.
// Half the instructions of the fp32 bit arithmetic (two fp16 patterns per dword lane), and no
// compare-and-blend for the subnormals.
namespace fp8_simd {

// value(code) * scale of 32 codes, in two 16-lane halves; scale_256 = scale * 256. The byte
// sign-extended to 16 bits and shifted left 7 has the sign in bits 14-15 and the magnitude in
// 7-13; clearing bit 14 leaves the fp16 of value / 256, which vcvtph2ps makes fp32 exactly (fp16
// subnormal inputs are converted, not flushed: MXCSR's DAZ is for fp32 inputs). (value / 256) *
// (scale * 256) is value * scale's exact product, so it rounds as e4m3_value(code) * scale does.
inline void decode32(__m256i codes, __m512 scale_256, __m512* out) {
  const __m512i word = _mm512_slli_epi16(_mm512_cvtepi8_epi16(codes), 7);
  const __m512i half = _mm512_and_si512(word, _mm512_set1_epi16(static_cast<short>(0xBFFF)));
  out[0] = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(half)), scale_256);
  out[1] = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(half, 1)), scale_256);
}

// e4m3_code(x * inv) of 32 values (two halves), inv_256 = inv / 256. z = x * inv_256 is
// x * inv's fp32 result divided by 256 (inv_256 a normal number or 0, see fp8_simd_ok); it goes
// to fp16 rounded to odd (truncated, then its lowest bit set when the conversion was inexact,
// found by converting back), then the fp16 pattern is rounded to nearest even at bit 7: rounding
// to odd with at least two more bits, then to nearest, is the nearest (no double rounding).
// A NaN takes the NaN code; |x * inv| must be at most 448 (FP8Format::finish's scale keeps it).
inline __m256i encode32(__m512 x0, __m512 x1, __m512 inv_256) {
  const __m512 z0 = _mm512_mul_ps(x0, inv_256), z1 = _mm512_mul_ps(x1, inv_256);
  const __m256i t0 = _mm512_cvt_roundps_ph(z0, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m256i t1 = _mm512_cvt_roundps_ph(z1, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __mmask32 inexact = _mm512_kunpackw(_mm512_cmp_ps_mask(_mm512_cvtph_ps(t1), z1, _CMP_NEQ_UQ),
                                            _mm512_cmp_ps_mask(_mm512_cvtph_ps(t0), z0, _CMP_NEQ_UQ));
  __m512i t = _mm512_inserti64x4(_mm512_castsi256_si512(t0), t1, 1);
  t = _mm512_mask_mov_epi16(t, inexact, _mm512_or_si512(t, _mm512_set1_epi16(1)));  // rounded to odd
  const __m512i mag = _mm512_and_si512(t, _mm512_set1_epi16(0x7FFF));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi16(mag, 7), _mm512_set1_epi16(1));
  __m512i code = _mm512_srli_epi16(_mm512_add_epi16(_mm512_add_epi16(mag, _mm512_set1_epi16(63)), lsb), 7);
  code = _mm512_min_epu16(code, _mm512_set1_epi16(0x7F));  // fp16 NaNs (above 0x7C00) give 0x7F
  constexpr int TAKE_C_ELSE_A = 0xD8;                         // bitwise c ? b : a, b the sign at bit 7
  code = _mm512_ternarylogic_epi32(code, _mm512_srli_epi16(t, 8), _mm512_set1_epi16(0x80), TAKE_C_ELSE_A);
  return _mm512_cvtepi16_epi8(code);
}

// Whether encode32 is exact for 1 / scale = inv: inv / 256 must not be an fp32 subnormal (nor
// inv infinite: a scale below 2^-128, where x * inv overflows and e4m3_code's clamp is needed).
inline bool ok(float inv) { return inv == 0.0f || (inv >= 0x1p-118f && inv <= 0x1p127f); }

}  // namespace fp8_simd
#endif

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
    int64_t j = 0;
#ifdef SPD_KERNELS_FP8_SIMD
    const __m512 s_256 = _mm512_set1_ps(s * 256.0f);
    for (; j + 32 <= len; j += 32) {
      __m512 x[2];
      fp8_simd::decode32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + j)), s_256, x);
      _mm512_storeu_ps(buf + j, x[0]);
      _mm512_storeu_ps(buf + j + 16, x[1]);
    }
#endif
#pragma omp simd
    for (int64_t i = j; i < len; ++i) buf[i] = e4m3_value(c[i]) * s;
    return BufferedMoment{buf};
  }
  // The block at b0: scale = absmax / 448 into view.scale, codes e4m3(clamp(x * (1 / scale), -448, 448)),
  // nearest even; an all-zero block gets scale 0 and codes 0.
  template <int MOMENT>
  static void finish(MomentView view, int64_t b0, int64_t len, const float* in, float absmax, const QMaps*) {
    const float s = absmax / 448.0f;
    view.scale[b0 / QBLOCK] = s;
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    uint8_t* c = static_cast<uint8_t*>(view.codes) + b0;
    int64_t j = 0;
#ifdef SPD_KERNELS_FP8_SIMD
    if (fp8_simd::ok(inv)) {
      const __m512 inv_256 = _mm512_set1_ps(inv * 0x1p-8f);
      for (; j + 32 <= len; j += 32)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + j),
                            fp8_simd::encode32(_mm512_loadu_ps(in + j), _mm512_loadu_ps(in + j + 16), inv_256));
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
