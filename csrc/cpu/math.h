// The fp32 math of one chunk: the Adam update with the three SPD sums, the projection, and
// the per-tensor finalize (docs/design.md, "The algorithm").
#pragma once

#include "common.h"

namespace spd_kernels {
namespace {

inline uint32_t hash32(uint32_t x) {  // lowbias32 (spd_kernels/formats/rounding.py)
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Element ``index``'s 16 random bits (rounding.py): one hash for two neighbours, the low half
// for the even one, the high half for the odd one.
inline uint32_t rounding_bits(uint32_t index, uint32_t key) {
  return (hash32((index >> 1) + key) >> (16 * (index & 1u))) & 0xFFFFu;
}

inline uint32_t float_bits(float y) {
  uint32_t bits;
  std::memcpy(&bits, &y, sizeof bits);
  return bits;
}

inline float bits_float(uint32_t bits) {
  float y;
  std::memcpy(&y, &bits, sizeof y);
  return y;
}

// How adam_chunk reads and writes a moment: a small object the loop inlines. load(i) is element
// i's stored value in fp32; store(i, x, index) keeps the new value x (``index``: the element's
// index in its whole tensor, for stochastic rounding). ABSMAX: the loop also reduces max |x| over
// what it stores (a block format's scale, formats.h). Written as plain arithmetic so the loop
// stays one vectorized pass.
struct F32Moment {  // fp32 in place
  static constexpr bool ABSMAX = false;
  float* x;
  float load(int64_t i) const { return x[i]; }
  void store(int64_t i, float y, uint32_t) const { x[i] = y; }
};

struct BF16NearestMoment {  // bf16, nearest even
  static constexpr bool ABSMAX = false;
  uint16_t* x;
  float load(int64_t i) const { return bits_float(static_cast<uint32_t>(x[i]) << 16); }
  void store(int64_t i, float y, uint32_t) const {
    const uint32_t b = float_bits(y);
    const uint16_t rounded = static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    x[i] = y != y ? static_cast<uint16_t>(0x7FC0) : rounded;  // NaN stays NaN, as c10's cast
  }
};

struct BF16StochasticMoment {  // bf16, stochastic from the element's random bits
  static constexpr bool ABSMAX = false;
  uint16_t* x;
  uint32_t key;  // the step's and moment's hash (formats.h's rounding_key)
  float load(int64_t i) const { return bits_float(static_cast<uint32_t>(x[i]) << 16); }
  void store(int64_t i, float y, uint32_t index) const {
    x[i] = static_cast<uint16_t>((float_bits(y) + rounding_bits(index, key)) >> 16);
  }
};

// The sums go in fp32, per vector lane, over runs of SUM_BLOCK elements (at most 64 terms a
// lane), and each run's total into the chunk's fp64 sums: fp64 in the loop cost 6 conversions
// and 6 fp64 adds per 16 elements, about a fifth of the bf16-moment loop's instructions. 64 fp32
// terms of one sign carry a relative error of at most ~4e-6, well inside the tie band the
// stats are tested with.
constexpr int64_t SUM_BLOCK = 1024;

struct Sums {
  double gd = 0.0, dd = 0.0, qq = 0.0;
  // max |new m|, |new v| of the elements, where the moment's ABSMAX asks (not added up by add)
  float m_absmax = 0.0f, v_absmax = 0.0f;
  void add(const Sums& o) { gd += o.gd; dd += o.dd; qq += o.qq; }
};

// Adam on [begin, end): writes m, v (vmax) and, if STORE_Q, q into p; returns the
// chunk's three sums (SUM_BLOCK runs in fp32, added in fp64). One plain loop the compiler
// vectorizes (omp simd); its reduction order is fixed by the build, never by the thread count.
// MM, VM: how m and v are read and written (the moment objects above; F32Moment: fp32 in place);
// ``index0 + i`` is element i's index in its whole tensor.
template <typename P, typename A, bool AMSGRAD, bool HAS_ANCHOR, bool STORE_Q, bool ROUND_Q = false,
          typename MM = F32Moment, typename VM = F32Moment>
__attribute__((always_inline)) inline Sums adam_chunk(P* __restrict p, const P* __restrict g, MM m, VM v,
                                                      float* __restrict vmax, const A* __restrict a, int64_t begin,
                                                      int64_t end, const Scalars& s, int64_t index0 = 0) {
  double gd = 0.0, dd = 0.0, qq = 0.0;
  const float w1 = s.one_minus_beta1, b2 = s.beta2, w2 = s.one_minus_beta2;
  const float step_size = s.step_size, inv_sqrt_bc2 = s.inv_sqrt_bc2, eps = s.eps;
  const float inv_grad_scale = s.inv_grad_scale;  // AMP: 1/loss scale (1 without a GradScaler)
  float m_absmax = 0.0f, v_absmax = 0.0f;
  for (int64_t b0 = begin; b0 < end; b0 += SUM_BLOCK) {
    // a 32-bit counter within the block, so the rounding index is not built from 64-bit lanes
    const int32_t len = static_cast<int32_t>(std::min(SUM_BLOCK, end - b0));
    const uint32_t index_b0 = static_cast<uint32_t>(index0 + b0);
    float bgd = 0.0f, bdd = 0.0f, bqq = 0.0f;
#pragma omp simd reduction(+ : bgd, bdd, bqq) reduction(max : m_absmax, v_absmax)
    for (int32_t j = 0; j < len; ++j) {
      const int64_t i = b0 + j;
      const uint32_t index = index_b0 + static_cast<uint32_t>(j);
      const float gi = to_float(g[i]) * inv_grad_scale;
      const float pi = to_float(p[i]);
      const float m0 = m.load(i);
      const float mi = m0 + w1 * (gi - m0);  // torch's lerp for a weight < 0.5
      float vi = b2 * v.load(i) + w2 * gi * gi;
      m.store(i, mi, index);
      v.store(i, vi, index);
      if constexpr (MM::ABSMAX) m_absmax = std::max(m_absmax, std::fabs(mi));
      if constexpr (VM::ABSMAX) v_absmax = std::max(v_absmax, std::fabs(vi));
      if constexpr (AMSGRAD) {
        vi = std::max(vmax[i], vi);
        vmax[i] = vi;
      }
      float q = pi - step_size * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
      if constexpr (ROUND_Q) q = to_float(static_cast<P>(q));  // 8-bit moments: q lives in p's dtype
      float d = pi, e = q;
      if constexpr (HAS_ANCHOR) {
        const float ai = to_float(a[i]);
        d = pi - ai;
        e = q - ai;
      }
      bgd += gi * d;
      bdd += d * d;
      bqq += e * e;
      if constexpr (STORE_Q) p[i] = static_cast<P>(q);
    }
    gd += bgd;
    dd += bdd;
    qq += bqq;
  }
  Sums out;
  out.gd = gd;
  out.dd = dd;
  out.qq = qq;
  out.m_absmax = m_absmax;
  out.v_absmax = v_absmax;
  return out;
}

// p = q - scale (q - a) on [begin, end); q is p itself, or (RECOMPUTE, bf16/fp16
// params) rebuilt from the old p and the new m, v so that it is rounded only once.
template <typename P, typename A, bool HAS_ANCHOR, bool RECOMPUTE>
__attribute__((always_inline)) inline void project_chunk(P* __restrict p, const float* __restrict m, const float* __restrict v, const A* __restrict a,
                   int64_t begin, int64_t end, const Scalars& s, float scale) {
  const float step_size = s.step_size, inv_sqrt_bc2 = s.inv_sqrt_bc2, eps = s.eps;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float q = to_float(p[i]);
    if constexpr (RECOMPUTE) q = q - step_size * m[i] / (std::sqrt(v[i]) * inv_sqrt_bc2 + eps);
    float target = 0.0f;
    if constexpr (HAS_ANCHOR) target = to_float(a[i]);
    p[i] = static_cast<P>(q - scale * (q - target));
  }
}

// c, |p-a|, |q-a|, r, s from a tensor's sums (the stats row layout of spd_kernels.stats).
void finalize(const Sums& sums, float weight_decay, float max_scale, float* row) {
  const double c = -sums.gd;
  const double npa = std::sqrt(sums.dd), nqa = std::sqrt(sums.qq);
  double r = 0.0, scale = 0.0;
  if (c < 0.0) {
    r = nqa > 0.0 ? std::min(std::max((nqa - npa) / nqa, 0.0), 1.0) : 0.0;
    scale = std::min(static_cast<double>(weight_decay) * r, static_cast<double>(max_scale));
  }
  row[STAT_C] = static_cast<float>(c);
  row[STAT_NORM_P_A] = static_cast<float>(npa);
  row[STAT_NORM_Q_A] = static_cast<float>(nqa);
  row[STAT_R] = static_cast<float>(r);
  row[STAT_SCALE] = static_cast<float>(scale);
}

}  // namespace
}  // namespace spd_kernels
