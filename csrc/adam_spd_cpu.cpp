// Fused AdamSPD for a bucket of CPU tensors, registered as torch.ops.spd_kernels.adam_spd_step.
//
// Math (DESIGN.md section 1), per tensor p with grad g, moments m, v, anchor a
// (a = 0 when anchor-free), step t; fp32 math whatever the storage dtype:
//
//   t += 1; bc1 = 1 - b1^t; bc2 = 1 - b2^t                  (double, per tensor)
//   m = m + (1-b1)(g - m);  v = b2 v + (1-b2) g^2           (amsgrad: vmax = max(vmax, v))
//   q = p - (lr/bc1) m / (sqrt(v)/sqrt(bc2) + eps)
//   c = -sum g(p-a);  r = clamp((|q-a| - |p-a|)/|q-a|, 0, 1) (0 if |q-a| = 0)
//   s = lam r if c < 0 else 0;  p = q - s (q - a)
//
// Memory layout and schedule. Every tensor is contiguous. Work is cut into
// chunks of CHUNK elements over all tensors of the bucket; at::parallel_for
// runs the chunks. A tensor that fits one chunk is done by one task in one
// visit: Adam, its sums, the finalize and (only if s > 0) the projection, all
// while its data is in L1/L2. Larger tensors: phase 1 writes m, v, q (fp32 p)
// and each chunk's three partial sums to its own slot; the finalize sums a
// tensor's slots in chunk order; phase 2 revisits only the chunks of tensors
// with s > 0 (bf16/fp16 params: every chunk, since q is rebuilt from the old p
// and the new m, v and rounded once). Each chunk's sums run in 8 fixed lanes,
// so results are bitwise the same for any thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <Python.h>

#include <cmath>
#include <vector>

namespace spd_kernels {
namespace {

constexpr int64_t CHUNK = 16384;  // 64 KB of fp32 per array: five arrays stay in a 1 MB L2
constexpr int LANES = 8;  // fixed accumulation lanes (fp64): the sum order never depends on threads

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

struct Scalars {
  float one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_sqrt_bc2, weight_decay;
};

struct Sums {
  double gd = 0.0, dd = 0.0, qq = 0.0;
  void add(const Sums& o) { gd += o.gd; dd += o.dd; qq += o.qq; }
};

// Adam on element i: writes m, v (vmax) and, if store_q, q into p; adds the three
// terms to lane l of the accumulators.
template <typename P, typename A>
inline void adam_element(P* __restrict p, const P* __restrict g, float* __restrict m, float* __restrict v,
                         float* __restrict vmax, const A* __restrict a, int64_t i, int l, const Scalars& s,
                         bool store_q, double* gd, double* dd, double* qq) {
  const float gi = to_float(g[i]);
  const float pi = to_float(p[i]);
  const float mi = m[i] + s.one_minus_beta1 * (gi - m[i]);  // torch's lerp for a weight < 0.5
  float vi = s.beta2 * v[i] + s.one_minus_beta2 * gi * gi;
  m[i] = mi;
  v[i] = vi;
  if (vmax != nullptr) {
    vi = std::max(vmax[i], vi);
    vmax[i] = vi;
  }
  const float q = pi - s.step_size * mi / (std::sqrt(vi) * s.inv_sqrt_bc2 + s.eps);
  const float ai = a != nullptr ? to_float(a[i]) : 0.0f;
  const float d = pi - ai, e = q - ai;
  gd[l] += static_cast<double>(gi * d);
  dd[l] += static_cast<double>(d * d);
  qq[l] += static_cast<double>(e * e);
  if (store_q) p[i] = static_cast<P>(q);
}

// Adam on [begin, end) (begin a multiple of LANES); returns the chunk's sums.
// Full groups of LANES elements form a loop the compiler turns into SIMD code.
template <typename P, typename A>
Sums adam_chunk(P* __restrict p, const P* __restrict g, float* __restrict m, float* __restrict v,
                float* __restrict vmax, const A* __restrict a, int64_t begin, int64_t end, const Scalars& s,
                bool store_q) {
  double gd[LANES] = {0}, dd[LANES] = {0}, qq[LANES] = {0};
  int64_t base = begin;
  for (; base + LANES <= end; base += LANES) {
#pragma GCC unroll 8
    for (int l = 0; l < LANES; ++l) adam_element<P, A>(p, g, m, v, vmax, a, base + l, l, s, store_q, gd, dd, qq);
  }
  for (int l = 0; base + l < end; ++l) adam_element<P, A>(p, g, m, v, vmax, a, base + l, l, s, store_q, gd, dd, qq);
  Sums out;
  for (int l = 0; l < LANES; ++l) {
    out.gd += gd[l];
    out.dd += dd[l];
    out.qq += qq[l];
  }
  return out;
}

// p = q - scale (q - a) on [begin, end); q is p itself, or rebuilt from the old p and
// the new m, v when recompute (bf16/fp16 params, so q is rounded only once).
template <typename P, typename A>
void project_chunk(P* __restrict p, const float* __restrict m, const float* __restrict v, const A* __restrict a,
                   int64_t begin, int64_t end, const Scalars& s, float scale, bool recompute) {
  for (int64_t i = begin; i < end; ++i) {
    float q = to_float(p[i]);
    if (recompute) q = q - s.step_size * m[i] / (std::sqrt(v[i]) * s.inv_sqrt_bc2 + s.eps);
    const float ai = a != nullptr ? to_float(a[i]) : 0.0f;
    p[i] = static_cast<P>(q - scale * (q - ai));
  }
}

// c, |p-a|, |q-a|, r, s from a tensor's sums (the stats row layout of spd_kernels.stats).
void finalize(const Sums& sums, float weight_decay, float* row) {
  const double c = -sums.gd;
  const double npa = std::sqrt(sums.dd), nqa = std::sqrt(sums.qq);
  double r = 0.0, scale = 0.0;
  if (c < 0.0) {
    r = nqa > 0.0 ? std::min(std::max((nqa - npa) / nqa, 0.0), 1.0) : 0.0;
    scale = weight_decay * r;
  }
  row[0] = static_cast<float>(c);
  row[1] = static_cast<float>(npa);
  row[2] = static_cast<float>(nqa);
  row[3] = static_cast<float>(r);
  row[4] = static_cast<float>(scale);
}

template <typename P, typename A>
void run_bucket(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList anchors, at::TensorList steps, double lr, double beta1,
                double beta2, double eps, double weight_decay, float* stats) {
  const int64_t n = static_cast<int64_t>(params.size());
  const bool amsgrad = !max_exp_avg_sqs.empty();
  const bool anchored = !anchors.empty();
  const bool store_q = std::is_same<P, float>::value;

  std::vector<Scalars> scalars(n);
  for (int64_t t = 0; t < n; ++t) {
    float* step = steps[t].data_ptr<float>();
    const double count = static_cast<double>(*step) + 1.0;
    *step = static_cast<float>(count);
    const double bc1 = 1.0 - std::pow(beta1, count), bc2 = 1.0 - std::pow(beta2, count);
    scalars[t] = Scalars{static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                         static_cast<float>(1.0 - beta2), static_cast<float>(eps),
                         static_cast<float>(lr / bc1), static_cast<float>(1.0 / std::sqrt(bc2)),
                         static_cast<float>(weight_decay)};
  }
  // chunk table: (tensor, first element); first_chunk[t] indexes a multi-chunk tensor's slots
  std::vector<std::pair<int64_t, int64_t>> chunks;
  std::vector<int64_t> first_chunk(n + 1, 0);
  for (int64_t t = 0; t < n; ++t) {
    first_chunk[t] = static_cast<int64_t>(chunks.size());
    const int64_t numel = params[t].numel();
    if (numel <= CHUNK) {
      chunks.emplace_back(t, 0);
    } else {
      for (int64_t s = 0; s < numel; s += CHUNK) chunks.emplace_back(t, s);
    }
  }
  first_chunk[n] = static_cast<int64_t>(chunks.size());
  std::vector<Sums> partials(chunks.size());

  auto ptrs = [&](int64_t t) {
    return std::make_tuple(params[t].data_ptr<P>(), grads[t].data_ptr<P>(), exp_avgs[t].data_ptr<float>(),
                           exp_avg_sqs[t].data_ptr<float>(),
                           amsgrad ? max_exp_avg_sqs[t].data_ptr<float>() : nullptr,
                           anchored ? anchors[t].data_ptr<A>() : nullptr);
  };

  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t t = chunks[c].first, start = chunks[c].second;
      const int64_t numel = params[t].numel();
      auto [p, g, m, v, vmax, a] = ptrs(t);
      const Scalars& s = scalars[t];
      if (numel <= CHUNK) {  // the whole tensor, in one visit
        const Sums sums = adam_chunk<P, A>(p, g, m, v, vmax, a, 0, numel, s, store_q);
        float* row = stats + 5 * t;
        finalize(sums, s.weight_decay, row);
        if (!store_q || row[4] != 0.0f)
          project_chunk<P, A>(p, m, amsgrad ? vmax : v, a, 0, numel, s, row[4], !store_q);
      } else {
        partials[c] = adam_chunk<P, A>(p, g, m, v, vmax, a, start, std::min(start + CHUNK, numel), s, store_q);
      }
    }
  });

  std::vector<int64_t> phase2;
  for (int64_t t = 0; t < n; ++t) {
    if (params[t].numel() <= CHUNK) continue;
    Sums sums;
    for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) sums.add(partials[c]);
    finalize(sums, scalars[t].weight_decay, stats + 5 * t);
    if (!store_q || stats[5 * t + 4] != 0.0f)
      for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) phase2.push_back(c);
  }
  at::parallel_for(0, static_cast<int64_t>(phase2.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t c = phase2[k], t = chunks[c].first, start = chunks[c].second;
      auto [p, g, m, v, vmax, a] = ptrs(t);
      (void)g;
      project_chunk<P, A>(p, m, amsgrad ? vmax : v, a, start, std::min(start + CHUNK, params[t].numel()),
                          scalars[t], stats[5 * t + 4], !store_q);
    }
  });
}

void check_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList max_exp_avg_sqs, at::TensorList anchors, at::TensorList steps) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "adam_spd_step: params, grads, exp_avgs, exp_avg_sqs and steps must have the same length");
  TORCH_CHECK(max_exp_avg_sqs.empty() || max_exp_avg_sqs.size() == n, "adam_spd_step: max_exp_avg_sqs length");
  TORCH_CHECK(anchors.empty() || anchors.size() == n, "adam_spd_step: anchors length");
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), "adam_spd_step: param ", i, " must be a contiguous CPU tensor");
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), "adam_spd_step: param ", i, " dtype differs in the bucket");
    TORCH_CHECK(grads[i].sizes() == p.sizes() && grads[i].scalar_type() == p.scalar_type() && grads[i].is_contiguous(),
                "adam_spd_step: grad ", i, " must be contiguous, with its param's shape and dtype");
    for (const auto* t : {&exp_avgs[i], &exp_avg_sqs[i]})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == p.numel(),
                  "adam_spd_step: moments of tensor ", i, " must be contiguous fp32 of its param's size");
    if (!max_exp_avg_sqs.empty())
      TORCH_CHECK(max_exp_avg_sqs[i].scalar_type() == at::kFloat && max_exp_avg_sqs[i].is_contiguous() &&
                      max_exp_avg_sqs[i].numel() == p.numel(),
                  "adam_spd_step: max_exp_avg_sq ", i, " must be contiguous fp32 of its param's size");
    if (!anchors.empty())
      TORCH_CHECK(anchors[i].is_contiguous() && anchors[i].numel() == p.numel() &&
                      anchors[i].scalar_type() == anchors[0].scalar_type(),
                  "adam_spd_step: anchor ", i, " must be contiguous, of its param's size, one dtype per bucket");
    TORCH_CHECK(steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1 && steps[i].device().is_cpu(),
                "adam_spd_step: step ", i, " must be a one-element fp32 CPU tensor");
  }
}

template <typename P>
void dispatch_anchor(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList anchors,
                     at::TensorList steps, double lr, double beta1, double beta2, double eps, double weight_decay,
                     float* stats) {
  const auto a_type = anchors.empty() ? params[0].scalar_type() : anchors[0].scalar_type();
  switch (a_type) {
    case at::kFloat:
      return run_bucket<P, float>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, lr, beta1,
                                  beta2, eps, weight_decay, stats);
    case at::kBFloat16:
      return run_bucket<P, c10::BFloat16>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, lr,
                                          beta1, beta2, eps, weight_decay, stats);
    case at::kHalf:
      return run_bucket<P, c10::Half>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, lr,
                                      beta1, beta2, eps, weight_decay, stats);
    default:
      TORCH_CHECK(false, "adam_spd_step: anchors must be fp32, bf16 or fp16, got ", a_type);
  }
}

at::Tensor adam_spd_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList anchors,
                         at::TensorList steps, double lr, double beta1, double beta2, double eps,
                         double weight_decay) {
  check_inputs(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps);
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor stats = at::empty({n, 5}, at::TensorOptions().dtype(at::kFloat));
  if (n == 0) return stats;
  float* out = stats.data_ptr<float>();
  switch (params[0].scalar_type()) {
    case at::kFloat:
      dispatch_anchor<float>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, lr, beta1, beta2,
                             eps, weight_decay, out);
      break;
    case at::kBFloat16:
      dispatch_anchor<c10::BFloat16>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, lr, beta1,
                                     beta2, eps, weight_decay, out);
      break;
    case at::kHalf:
      dispatch_anchor<c10::Half>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, lr, beta1,
                                 beta2, eps, weight_decay, out);
      break;
    default:
      TORCH_CHECK(false, "adam_spd_step: params must be fp32, bf16 or fp16, got ", params[0].scalar_type());
  }
  return stats;
}

}  // namespace

TORCH_LIBRARY(spd_kernels, m) {
  m.def(
      "adam_spd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor[] anchors, Tensor(e!)[] steps, float lr, float beta1, float beta2, "
      "float eps, float weight_decay) -> Tensor");
}

TORCH_LIBRARY_IMPL(spd_kernels, CPU, m) { m.impl("adam_spd_step", &adam_spd_step); }

}  // namespace spd_kernels

// Importing spd_kernels._C loads this library, which registers the op above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "AdamSPD CPU kernel (torch.ops.spd_kernels)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
