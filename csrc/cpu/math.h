// The fp32 math of one chunk: the Adam update with the three SPD sums, the projection, and
// the per-tensor finalize (docs/design.md, "The algorithm").
#pragma once

#include "common.h"

namespace spd_kernels {
namespace {

struct Sums {
  double gd = 0.0, dd = 0.0, qq = 0.0;
  void add(const Sums& o) { gd += o.gd; dd += o.dd; qq += o.qq; }
};

// Adam on [begin, end): writes m, v (vmax) and, if STORE_Q, q into p; returns the
// chunk's three sums. One plain loop the compiler vectorizes (omp simd); its
// reduction order is fixed by the build, never by the thread count.
template <typename P, typename A, bool AMSGRAD, bool HAS_ANCHOR, bool STORE_Q, bool ROUND_Q = false>
__attribute__((always_inline)) inline Sums adam_chunk(P* __restrict p, const P* __restrict g, float* __restrict m, float* __restrict v,
                float* __restrict vmax, const A* __restrict a, int64_t begin, int64_t end, const Scalars& s) {
  double gd = 0.0, dd = 0.0, qq = 0.0;
  const float w1 = s.one_minus_beta1, b2 = s.beta2, w2 = s.one_minus_beta2;
  const float step_size = s.step_size, inv_sqrt_bc2 = s.inv_sqrt_bc2, eps = s.eps;
  const float inv_grad_scale = s.inv_grad_scale;  // AMP: 1/loss scale (1 without a GradScaler)
#pragma omp simd reduction(+ : gd, dd, qq)
  for (int64_t i = begin; i < end; ++i) {
    const float gi = to_float(g[i]) * inv_grad_scale;
    const float pi = to_float(p[i]);
    const float mi = m[i] + w1 * (gi - m[i]);  // torch's lerp for a weight < 0.5
    float vi = b2 * v[i] + w2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
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
    gd += static_cast<double>(gi * d);
    dd += static_cast<double>(d * d);
    qq += static_cast<double>(e * e);
    if constexpr (STORE_Q) p[i] = static_cast<P>(q);
  }
  Sums out;
  out.gd = gd;
  out.dd = dd;
  out.qq = qq;
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
