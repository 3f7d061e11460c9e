// The bf16-moment step (fp32 params, bf16 m and v) written out in AVX-512, for CPUs with
// AVX-512 BF16 (Zen 4 and later; Intel Cooper Lake, Sapphire Rapids and later).
//
// The math of math.h's adam_chunk with BF16NearestMoment m and BF16StochasticMoment v, in the
// operation order the compiler gives that loop (its contractions included):
//   m' = fma(w1, g - m, m)                      exp_avg, stored nearest even
//   v' = fma(v, beta2, (w2 g) g)                exp_avg_sq, stored stochastically: the fp32
//                                               pattern plus the low 16 bits of
//                                               lowbias32(index + key), the upper 16 kept
//   q  = p - (step_size m') / fma(sqrt(v'), 1 / sqrt(bc2), eps)      into p
//   sums g (p - a), (p - a)^2, (q - a)^2: fp32 per lane over SUM_BLOCK runs, each run into fp64
// Layout: p, g fp32; m, v bf16 bit patterns (uint16); a fp32 or bf16; 32 elements a step (two
// 16-lane halves, so that one instruction rounds and packs both halves of m), the last step
// masked (lanes past the end load zeros, which add nothing to the sums).
//
// Why by hand: the compiler's loop spends 3.2 instructions an element. Here m's rounding is one
// instruction (vcvtne2ps2bf16) for 32 elements instead of about fifteen (shifts, mask, adds and
// the NaN test and blend per half), and each bf16 load is one widening load and a shift. The
// hardware rounding flushes subnormals to zero where the reference's cast keeps them, so a
// step whose m holds one takes the bit arithmetic instead (one test per 32 elements; a
// subnormal m is rare: a grad below 2^-126). A NaN stays a NaN either way (its code is
// not fixed: torch's own cast gives 0xFFFF or 0x7FC0 depending on its code path).
#pragma once

#include "math.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__BMI2__)
#define SPD_KERNELS_BF16_STEP 1

namespace spd_kernels {
namespace {
namespace bf16_step {

// 32 values as two 16-lane fp32 halves: fp32 loaded, bf16 patterns moved into the high words
// (one load and one zero-masked word permute a half)
inline void load32(const float* x, __mmask32 k, __m512* out) {
  out[0] = _mm512_maskz_loadu_ps(static_cast<__mmask16>(k), x);
  out[1] = _mm512_maskz_loadu_ps(static_cast<__mmask16>(k >> 16), x + 16);
}
inline void load32(const uint16_t* x, __mmask32 k, __m512* out) {
  const __m512i words = _mm512_maskz_loadu_epi16(k, x);
  const __m512i to_lo = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0, 5, 0, 4,
                                         0, 3, 0, 2, 0, 1, 0, 0, 0);
  const __m512i to_hi = _mm512_add_epi16(to_lo, _mm512_set1_epi32(16 << 16));
  constexpr __mmask32 HIGH_WORDS = 0xAAAAAAAAu;
  out[0] = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(HIGH_WORDS, to_lo, words));
  out[1] = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(HIGH_WORDS, to_hi, words));
}
inline void load32(const c10::BFloat16* x, __mmask32 k, __m512* out) {
  load32(reinterpret_cast<const uint16_t*>(x), k, out);
}

// the low words of lo's 16 dwords, then of hi's: 32 words in order
inline __m512i pack_low_words(__m512i lo, __m512i hi) {
  const __m512i even = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26,
                                        24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  return _mm512_permutex2var_epi16(lo, even, hi);
}

// the high words: the bf16 patterns of 32 fp32 values truncated (no shift needed)
inline __m512i pack_high_words(__m512i lo, __m512i hi) {
  const __m512i odd = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27,
                                       25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return _mm512_permutex2var_epi16(lo, odd, hi);
}

// BF16NearestMoment::store's rule by bit arithmetic (nearest even, NaN as 0x7FC0), in the low words
inline __m512i nearest_bits(__m512 y) {
  const __m512i b = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// 32 values (lo, then hi) rounded to bf16, nearest even
inline __m512i nearest32(__m512 lo, __m512 hi) {
  constexpr int SUBNORMAL = 0x20;  // vfpclassps's denormal class
  if (__builtin_expect(_mm512_fpclass_ps_mask(lo, SUBNORMAL) | _mm512_fpclass_ps_mask(hi, SUBNORMAL), 0))
    return pack_low_words(nearest_bits(lo), nearest_bits(hi));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // a vector cast: the same 512 bits
}

inline __m512i hash32(__m512i x) {  // math.h's hash32, 16 lanes
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7FEB352D));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846CA68Bu)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// BF16StochasticMoment::store's rule: bits + (random & 0xFFFF), whose high word is the code
inline __m512i stochastic_bits(__m512 y, __m512i index, __m512i key) {
  const __m512i r = _mm512_and_si512(hash32(_mm512_add_epi32(index, key)), _mm512_set1_epi32(0xFFFF));
  return _mm512_add_epi32(_mm512_castps_si512(y), r);
}

// Sixteen lanes' running sums
struct Acc {
  __m512 gd = _mm512_setzero_ps(), dd = _mm512_setzero_ps(), qq = _mm512_setzero_ps();
};

}  // namespace bf16_step

// adam_chunk's work for fp32 params with bf16 m and v (the layout above), on [begin, end) of
// the arrays; ``index0 + i`` is element i's index in its whole tensor (the rounding bits').
template <typename A, bool HAS_ANCHOR>
Sums adam_chunk_bf16(float* __restrict p, const float* __restrict g, uint16_t* __restrict m, uint16_t* __restrict v,
                     const A* __restrict a, int64_t begin, int64_t end, const Scalars& s, uint32_t v_key,
                     int64_t index0) {
  using namespace bf16_step;
  const __m512 w1 = _mm512_set1_ps(s.one_minus_beta1), b2 = _mm512_set1_ps(s.beta2),
               w2 = _mm512_set1_ps(s.one_minus_beta2), step_size = _mm512_set1_ps(s.step_size),
               inv_sqrt_bc2 = _mm512_set1_ps(s.inv_sqrt_bc2), eps = _mm512_set1_ps(s.eps),
               inv_grad_scale = _mm512_set1_ps(s.inv_grad_scale);
  const __m512i key = _mm512_set1_epi32(static_cast<int>(v_key));
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i sixteen = _mm512_set1_epi32(16);
  // 32 elements from i (those of masks k0, k1: the first and second 16)
  auto step32 = [&](int64_t i, __mmask32 k, Acc* acc) __attribute__((always_inline)) {
    const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(index0 + i))), lanes);
    __m512 gs[2], ps[2], ms[2], vs[2], as[2], mi[2], vi[2];
    load32(g + i, k, gs);
    load32(p + i, k, ps);
    load32(m + i, k, ms);
    load32(v + i, k, vs);
    if constexpr (HAS_ANCHOR) load32(a + i, k, as);
    for (int h = 0; h < 2; ++h) {
      const __m512 gi = _mm512_mul_ps(gs[h], inv_grad_scale), m0 = ms[h], pi = ps[h];
      mi[h] = _mm512_fmadd_ps(w1, _mm512_sub_ps(gi, m0), m0);
      vi[h] = _mm512_fmadd_ps(vs[h], b2, _mm512_mul_ps(_mm512_mul_ps(w2, gi), gi));
      const __m512 denom = _mm512_fmadd_ps(_mm512_sqrt_ps(vi[h]), inv_sqrt_bc2, eps);
      const __m512 q = _mm512_sub_ps(pi, _mm512_div_ps(_mm512_mul_ps(step_size, mi[h]), denom));
      __m512 d = pi, e = q;
      if constexpr (HAS_ANCHOR) {
        d = _mm512_sub_ps(pi, as[h]);
        e = _mm512_sub_ps(q, as[h]);
      }
      acc[h].gd = _mm512_fmadd_ps(gi, d, acc[h].gd);
      acc[h].dd = _mm512_fmadd_ps(d, d, acc[h].dd);
      acc[h].qq = _mm512_fmadd_ps(e, e, acc[h].qq);
      _mm512_mask_storeu_ps(p + i + 16 * h, static_cast<__mmask16>(k >> (16 * h)), q);
    }
    _mm512_mask_storeu_epi16(m + i, k, nearest32(mi[0], mi[1]));
    const __m512i v_words = pack_high_words(stochastic_bits(vi[0], index, key),
                                            stochastic_bits(vi[1], _mm512_add_epi32(index, sixteen), key));
    _mm512_mask_storeu_epi16(v + i, k, v_words);
  };
  Sums out;
  for (int64_t b0 = begin; b0 < end; b0 += SUM_BLOCK) {
    const int64_t b1 = std::min(b0 + SUM_BLOCK, end);
    Acc acc[2];
    int64_t i = b0;
    for (; i + 32 <= b1; i += 32) step32(i, 0xFFFFFFFFu, acc);
    if (i < b1) step32(i, static_cast<__mmask32>(_bzhi_u32(0xFFFFFFFFu, static_cast<uint32_t>(b1 - i))), acc);  // the last 1 to 31
    out.gd += _mm512_reduce_add_ps(_mm512_add_ps(acc[0].gd, acc[1].gd));
    out.dd += _mm512_reduce_add_ps(_mm512_add_ps(acc[0].dd, acc[1].dd));
    out.qq += _mm512_reduce_add_ps(_mm512_add_ps(acc[0].qq, acc[1].qq));
  }
  return out;
}

}  // namespace
}  // namespace spd_kernels

#endif
