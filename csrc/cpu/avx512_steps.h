// The steps with a bf16 second moment (fp32 params; m in bf16, or in fp8 e4m3 blocks) written
// out in AVX-512, for CPUs with AVX-512 BF16 (Zen 4 and later; Intel Cooper Lake, Sapphire
// Rapids and later).
//
// The math of math.h's adam_chunk with BF16StochasticMoment v and BF16NearestMoment m (or
// formats.h's block-buffered fp8 m), in the operation order the compiler gives that loop (its
// contractions included):
//   m' = fma(w1, g - m, m)                      exp_avg, stored nearest even (bf16), or kept in
//                                               the block's fp32 buffer with its max |m'| for
//                                               FP8Format::finish (fp8)
//   v' = fma(v, beta2, (w2 g) g)                exp_avg_sq, stored stochastically: the fp32
//                                               pattern plus the element's 16 random bits
//                                               (math.h's rounding_bits), the upper 16 kept
//   q  = p - (step_size m') / fma(sqrt(v'), 1 / sqrt(bc2), eps)      into p
//   sums g (p - a), (p - a)^2, (q - a)^2: fp32 per lane over a run (SUM_BLOCK elements for bf16
//   m, one 256-block for fp8 m, as adam_chunk_coded's calls of adam_chunk), each run into fp64
// Layout: p, g fp32; v bf16 bit patterns (uint16); m bf16 patterns, or e4m3 codes and one fp32
// scale per 256-block; a fp32 or bf16. 32 elements a step (two 16-lane halves, so that one
// instruction rounds and packs both halves of m), one set of lane sums; only the last step of a
// run (or of a tensor's last fp8 block) is masked: lanes past the end load zeros, which add
// nothing to the sums. Whole steps use plain loads: masked loads from memory are slow on Zen 5
// (the fp8 step with every block masked ran at half speed out of memory, no slower in L2).
//
// Why by hand: the compiler's loop spends 3.2 instructions an element. Here m's bf16 rounding is
// one instruction (vcvtne2ps2bf16) for 32 elements instead of about fifteen (shifts, mask, adds and
// the NaN test and blend per half), a bf16 load is one load and a word permute per half, and the
// fp8 codes are decoded in registers (formats.h's fp8_simd, through fp16). The hardware rounding
// flushes subnormals to zero where the reference's cast keeps them, so a step whose m holds one
// takes the bit arithmetic instead (one test per 32 elements; a subnormal m is rare: a grad below
// 2^-126). A NaN stays a NaN either way (its code is not fixed: torch's own cast gives 0xFFFF or
// 0x7FC0 depending on its code path).
//
// Where the time goes (in L2, one thread, bench/cpu_block_costs.py): on a Zen 5 the steps are
// bound by the vector ALUs' throughput (a sqrt and a divide per element take about a third of the
// time). On this project's Intel Xeon (AVX-512 FP16, AMX) they are bound by the divider and the
// ALUs nearly alike: the sqrt and divide alone take 0.61-0.65 ns an element there, 60-68% of the
// bf16 step's time in the same runs, and with both replaced by a multiply the bf16 step ran
// 1.25-1.40x faster, the fp8 one 1.17-1.28x (two A/Bs, docs/results/cpu.md). An exact step needs
// both (the reference's rounding), and halves of 256 bits take the divider as long. fp8 m's
// encode is a fifth to a third of its step.
// A hash per element made a quarter of the update; one per two elements (rounding.py's bits) halves
// its multiplies and took 5-7% off both steps on the Xeon (docs/results/cpu.md). Shifts,
// multiplies, permutes and widening moves issue two a cycle on Zen 5, the fp16/bf16 conversions
// about one, adds and logic four: the code prefers the latter. Interleaving a block's encode with
// the next block's update (to overlap the two) measured no faster.
#pragma once

#include "formats.h"
#include "prefetch_level.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__BMI2__)
#define SPD_KERNELS_AVX512_STEPS 1

namespace spd_kernels {
namespace {
namespace avx512_steps {

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

// math.h's hash32 (lowbias32), 16 lanes
inline __m512i hash32(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7FEB352D));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846CA68Bu)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// math.h's rounding_bits of the 32 elements from ``index`` on, as two 16-lane halves. The hashes
// of the 16 pairs from index / 2 on are, read as 32 words, the elements' bits in order when index
// is even (a pair's low half is its even element's); an odd index (a shard starting at an odd
// element) starts one word later, so it takes a second hash and a word shift.
inline void rounding_bits32(uint32_t index, uint32_t key, __m512i lanes, __m512i* out) {
  const __m512i pairs = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>((index >> 1) + key)), lanes);
  __m512i words = hash32(pairs);
  if (__builtin_expect(index & 1u, 0)) {
    const __m512i from_1 = _mm512_set_epi16(32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15,
                                            14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1);
    words = _mm512_permutex2var_epi16(words, from_1, hash32(_mm512_add_epi32(pairs, _mm512_set1_epi32(16))));
  }
  out[0] = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(words));
  out[1] = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(words, 1));
}

constexpr int MAX_ABS = 0x0B;  // vrangeps: the larger magnitude, sign cleared

// How far ahead the steps prefetch p, g, v, a and fp8 m's codes, in elements (4 KB of p). With
// the hardware prefetchers alone the streams fell behind the compute: vit_b out of memory ran
// 5-20% slower without (docs/results/cpu.md).
constexpr int64_t PREFETCH = 1024;

// The cache line of x + PREFETCH into L1 or L2 (prefetch_level.h); an address, not a pointer:
// past an array's end it is never read, and a prefetch does not fault.
template <PrefetchInto INTO, typename T>
inline void prefetch_ahead(const T* x) {
  constexpr int LOCALITY = INTO == PrefetchInto::L1 ? 3 : 2;  // prefetcht0 : prefetcht1
  __builtin_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(x) + PREFETCH * sizeof(T)), 0, LOCALITY);
}

// Sixteen lanes' running sums
struct Acc {
  __m512 gd = _mm512_setzero_ps(), dd = _mm512_setzero_ps(), qq = _mm512_setzero_ps();
};

// The settings as vectors
struct Consts {
  __m512 w1, b2, w2, step_size, inv_sqrt_bc2, eps, inv_grad_scale;
  __m512i lanes;
  uint32_t key;
  explicit Consts(const Scalars& s, uint32_t v_key)
      : w1(_mm512_set1_ps(s.one_minus_beta1)), b2(_mm512_set1_ps(s.beta2)), w2(_mm512_set1_ps(s.one_minus_beta2)),
        step_size(_mm512_set1_ps(s.step_size)), inv_sqrt_bc2(_mm512_set1_ps(s.inv_sqrt_bc2)),
        eps(_mm512_set1_ps(s.eps)), inv_grad_scale(_mm512_set1_ps(s.inv_grad_scale)),
        lanes(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)), key(v_key) {}
};

// The step of the 32 elements from i (mask k) given their old m (two halves): p, v and the sums
// done here, the new m returned in mi for the caller's format to store. ``index``: element i's
// index in its whole tensor.
template <PrefetchInto INTO, typename A, bool HAS_ANCHOR, bool GRADS_SCALED>
__attribute__((always_inline)) inline void update32(const Consts& c, float* __restrict p, const float* __restrict g,
                                                    uint16_t* __restrict v, const A* __restrict a, int64_t i,
                                                    __mmask32 k, const __m512* m0, uint32_t index, Acc& acc,
                                                    __m512* mi) {
  __m512 gs[2], ps[2], vs[2], as[2], vi[2];
  prefetch_ahead<INTO>(g + i), prefetch_ahead<INTO>(g + i + 16), prefetch_ahead<INTO>(p + i);
  prefetch_ahead<INTO>(p + i + 16), prefetch_ahead<INTO>(v + i);
  if constexpr (HAS_ANCHOR) prefetch_ahead<INTO>(a + i);
  load32(g + i, k, gs);
  load32(p + i, k, ps);
  load32(v + i, k, vs);
  if constexpr (HAS_ANCHOR) load32(a + i, k, as);
  for (int h = 0; h < 2; ++h) {
    const __m512 gi = GRADS_SCALED ? _mm512_mul_ps(gs[h], c.inv_grad_scale) : gs[h], pi = ps[h];
    mi[h] = _mm512_fmadd_ps(c.w1, _mm512_sub_ps(gi, m0[h]), m0[h]);
    vi[h] = _mm512_fmadd_ps(vs[h], c.b2, _mm512_mul_ps(_mm512_mul_ps(c.w2, gi), gi));
    const __m512 denom = _mm512_fmadd_ps(_mm512_sqrt_ps(vi[h]), c.inv_sqrt_bc2, c.eps);
    const __m512 q = _mm512_sub_ps(pi, _mm512_div_ps(_mm512_mul_ps(c.step_size, mi[h]), denom));
    __m512 d = pi, e = q;
    if constexpr (HAS_ANCHOR) {
      d = _mm512_sub_ps(pi, as[h]);
      e = _mm512_sub_ps(q, as[h]);
    }
    acc.gd = _mm512_fmadd_ps(gi, d, acc.gd);
    acc.dd = _mm512_fmadd_ps(d, d, acc.dd);
    acc.qq = _mm512_fmadd_ps(e, e, acc.qq);
    _mm512_mask_storeu_ps(p + i + 16 * h, static_cast<__mmask16>(k >> (16 * h)), q);
  }
  __m512i bits[2];  // BF16StochasticMoment::store's rule: the pattern plus the bits, the high word kept
  rounding_bits32(index, c.key, c.lanes, bits);
  const __m512i v_words = pack_high_words(_mm512_add_epi32(_mm512_castps_si512(vi[0]), bits[0]),
                                          _mm512_add_epi32(_mm512_castps_si512(vi[1]), bits[1]));
  _mm512_mask_storeu_epi16(v + i, k, v_words);
}

// A run's fp32 lane sums into the fp64 totals. Forced inline: with both prefetch levels compiled
// GCC called it out of line, and the bf16 and fp8 steps ran 2-4% slower in L2 (docs/results/cpu.md).
__attribute__((always_inline)) inline void add_run(const Acc& acc, Sums& out) {
  out.gd += _mm512_reduce_add_ps(acc.gd);
  out.dd += _mm512_reduce_add_ps(acc.dd);
  out.qq += _mm512_reduce_add_ps(acc.qq);
}

inline __mmask32 first_n(int64_t n) {  // the mask of the first min(n, 32) lanes
  return n >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>(_bzhi_u32(0xFFFFFFFFu, static_cast<uint32_t>(n)));
}

}  // namespace avx512_steps

// adam_chunk's work for fp32 params with bf16 m and v (the layout above), on [begin, end) of
// the arrays; ``index0 + i`` is element i's index in its whole tensor (the rounding bits').
template <PrefetchInto INTO, typename A, bool HAS_ANCHOR, bool GRADS_SCALED>
Sums adam_chunk_bf16(float* __restrict p, const float* __restrict g, uint16_t* __restrict m, uint16_t* __restrict v,
                     const A* __restrict a, int64_t begin, int64_t end, const Scalars& s, uint32_t v_key,
                     int64_t index0) {
  using namespace avx512_steps;
  const Consts c(s, v_key);
  auto step32 = [&](int64_t i, __mmask32 k, Acc& acc) __attribute__((always_inline)) {
    __m512 m0[2], mi[2];
    load32(m + i, k, m0);
    update32<INTO, A, HAS_ANCHOR, GRADS_SCALED>(c, p, g, v, a, i, k, m0, static_cast<uint32_t>(index0 + i), acc, mi);
    _mm512_mask_storeu_epi16(m + i, k, nearest32(mi[0], mi[1]));
  };
  Sums out;
  for (int64_t b0 = begin; b0 < end; b0 += SUM_BLOCK) {
    const int64_t b1 = std::min(b0 + SUM_BLOCK, end);
    Acc acc;
    int64_t i = b0;
    for (; i + 32 <= b1; i += 32) step32(i, 0xFFFFFFFFu, acc);
    if (i < b1) step32(i, first_n(b1 - i), acc);  // the last 1 to 31
    add_run(acc, out);
  }
  return out;
}

// The same with fp8 m (``m``: e4m3 codes and one fp32 scale per 256-block; [begin, end) starts
// on a block bound): block by block, m decoded in registers, the new m kept in an L1 buffer with
// its max |m|, then the block encoded (FP8Format::finish).
template <PrefetchInto INTO, typename A, bool HAS_ANCHOR, bool GRADS_SCALED>
Sums adam_chunk_fp8_bf16(float* __restrict p, const float* __restrict g, MomentView m, uint16_t* __restrict v,
                         const A* __restrict a, int64_t begin, int64_t end, const Scalars& s, uint32_t v_key,
                         int64_t index0) {
  using namespace avx512_steps;
  const Consts c(s, v_key);
  const uint8_t* codes = static_cast<const uint8_t*>(m.codes);
  alignas(64) float buf[QBLOCK];
  Sums out;
  // one block (for_each_block: a whole one's loads and stores unmasked)
  auto block = [&](int64_t b0, auto len) __attribute__((always_inline)) {
    const __m512 scale_256 = _mm512_set1_ps(m.scale[b0 / QBLOCK] * 256.0f);
    __m512 absmax = _mm512_setzero_ps();
    Acc acc;
    constexpr bool WHOLE = std::is_same<decltype(len), WholeBlock>::value;
    for (int64_t j = 0; j < len; j += 32) {
      const __mmask32 k = WHOLE ? 0xFFFFFFFFu : first_n(len - j);
      __m512 m0[2], mi[2];
      prefetch_ahead<INTO>(codes + b0 + j);  // (update32 prefetches the other streams)
      fp8_simd::decode32(WHOLE ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + b0 + j))
                               : _mm256_maskz_loadu_epi8(k, codes + b0 + j),
                         scale_256, m0);
      update32<INTO, A, HAS_ANCHOR, GRADS_SCALED>(c, p, g, v, a, b0 + j, k, m0, static_cast<uint32_t>(index0 + b0 + j),
                                                  acc, mi);
      for (int h = 0; h < 2; ++h) {  // masked-off lanes hold 0: they leave the max alone
        _mm512_store_ps(buf + j + 16 * h, mi[h]);
        absmax = _mm512_range_ps(absmax, mi[h], MAX_ABS);
      }
    }
    add_run(acc, out);
    FP8Format::finish<0>(m, b0, len, buf, _mm512_reduce_max_ps(absmax), nullptr);
  };
  for_each_block(begin, end, block);
  return out;
}

}  // namespace
}  // namespace spd_kernels

#endif
