// Fused AdamSPD for a bucket of CPU tensors, registered as torch.ops.spd_kernels.adam_spd_step.
//
// Math (docs/design.md, "The algorithm"), per tensor p with grad g, moments m, v, anchor a
// (a = 0 when anchor-free), step t; fp32 math whatever the storage dtype:
//
//   t += 1; bc1 = 1 - b1^t; bc2 = 1 - b2^t                  (double, per tensor)
//   m = m + (1-b1)(g - m);  v = b2 v + (1-b2) g^2           (amsgrad: vmax = max(vmax, v))
//   q = p - (lr/bc1) m / (sqrt(v)/sqrt(bc2) + eps)
//   c = -sum g(p-a);  r = clamp((|q-a| - |p-a|)/|q-a|, 0, 1) (0 if |q-a| = 0)
//   s = min(lam r, max_scale) if c < 0 else 0;  p = q - s (q - a)
//
// Memory layout and schedule. Every tensor is contiguous. A tensor of up to
// TASK_MAX elements is done by one task in one visit: Adam chunk by chunk, its
// sums, the finalize and (only if s > 0) the projection, while its data is in
// L2/L3; one at::parallel_for runs all of them. Larger tensors go one at a time:
// phase 1 runs their chunks in parallel, writing m, v, q (fp32 p) and each
// chunk's three partial sums to its own slot; the finalize sums the slots in
// chunk order; phase 2 (only if s > 0; bf16/fp16 params always, since q is
// rebuilt from the old p and the new m, v and rounded once) revisits the
// chunks while the tensor is still in the last-level cache, where it fits.
// Each chunk's sums have a fixed order (fp64 accumulators), so results are
// bitwise the same for any thread count.
//
// 8-bit moments (spd_kernels/quantization.py): exp_avgs/exp_avg_sqs hold uint8 codes and
// exp_avg_scales/exp_avg_sq_scales one fp32 absmax per block of 256 elements; qmaps [2, 256]
// the values codes stand for (signed for m, unsigned for v). Chunks start on block bounds, so a
// block is one stretch of one chunk: dequantize, update in fp32, q from the fp32 moments (kept
// in the param's dtype, stored into p), the block's new absmax, then the nearest code for each
// value: the number of midpoints below it (a midpoint itself takes the lower code); a positive
// second moment takes at least code 1 (spd_kernels/quantization.py says why).
//
// Settings. The ops take the step's float settings as one list ``hyper`` in the
// order of spd_kernels.hyperparameters.PACKED; the HP_* slots below name it, and
// ``hyperparameter_names`` lets the Python side check the two agree at load time.
//
// Sharded parameters (FSDP2: each rank holds a slice of every tensor) need the
// sums over the whole logical tensor, so the step is also offered in two ops
// with a seam for the caller's all-reduce between them:
//   adam_spd_partials: Adam on every chunk of every local shard; each tensor's
//                      three sums (fp64) into sums [n, 3]; steps += 1
//   adam_spd_project:  from the all-reduced sums, the stats rows and
//
// The parts: cpu/common.h (layout, sizes, scalars), cpu/schedule.h (batches, chunk lists),
// cpu/math.h (the fp32 chunk step), cpu/quantizer.h (the 8-bit maps), cpu/formats.h (the moment formats), cpu/drivers.h (a bucket's
// step and split halves); this file checks the inputs, dispatches dtypes and registers the ops.

#include "cpu/drivers.h"

#include <Python.h>
#include <torch/library.h>

namespace spd_kernels {
namespace {

// A moment format, from its codes' dtype (spd_kernels/formats/: the dtypes name the formats).
enum class Format { F32, BF16, FP8, BNB8 };

Format format_of(const char* op, const char* what, at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return Format::F32;
    case at::kBFloat16: return Format::BF16;
    case at::kFloat8_e4m3fn: return Format::FP8;
    case at::kByte: return Format::BNB8;
    default:
      TORCH_CHECK(false, op, ": ", what, " must be fp32, bf16, float8_e4m3fn (block-scaled) or uint8 "
                  "(bitsandbytes' 8-bit) codes, got ", dtype);
  }
}

bool blocked(Format f) { return f == Format::FP8 || f == Format::BNB8; }

struct Formats {
  Format m = Format::F32, v = Format::F32;
};

Formats check_inputs(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList anchors,
                     at::TensorList steps, const CodedMoments& coded, const std::optional<at::Tensor>& qmaps,
                     bool with_grads) {
  const size_t n = params.size();
  TORCH_CHECK((!with_grads || grads.size() == n) && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  steps.size() == n,
              op, ": params, grads, exp_avgs, exp_avg_sqs and steps must have the same length");
  Formats f;
  if (n == 0) return f;
  f.m = format_of(op, "exp_avgs", exp_avgs[0].scalar_type());
  f.v = format_of(op, "exp_avg_sqs", exp_avg_sqs[0].scalar_type());
  TORCH_CHECK((f.m == Format::BNB8) == (f.v == Format::BNB8), op,
              ": bitsandbytes' 8-bit format (uint8 codes) is for both moments or neither");
  TORCH_CHECK(f.v != Format::FP8, op, ": fp8 second moments are not supported (spd_kernels/formats/fp8.py says why)");
  const bool compressed = f.m != Format::F32 || f.v != Format::F32;
  TORCH_CHECK(!compressed || max_exp_avg_sqs.empty(), op, ": amsgrad with compressed moments is not supported");
  TORCH_CHECK(coded.m_scales.size() == (blocked(f.m) ? n : 0) && coded.v_scales.size() == (blocked(f.v) ? n : 0),
              op, ": exp_avg_scales / exp_avg_sq_scales: one per tensor for a block-scaled moment (fp8, 8-bit), "
              "else empty");
  if (f.m == Format::BNB8)
    TORCH_CHECK(qmaps.has_value() && qmaps->device().is_cpu() && qmaps->scalar_type() == at::kFloat &&
                    qmaps->is_contiguous() && qmaps->numel() == 512,
                op, ": 8-bit moments need qmaps, a contiguous fp32 CPU tensor of shape [2, 256]");
  TORCH_CHECK(coded.offsets.empty() || coded.offsets.size() == n, op,
              ": index_offsets: one per tensor (where its shard starts in the whole tensor), or empty");
  TORCH_CHECK(max_exp_avg_sqs.empty() || max_exp_avg_sqs.size() == n, op, ": max_exp_avg_sqs length");
  TORCH_CHECK(anchors.empty() || anchors.size() == n, op, ": anchors length");
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), op, ": param ", i, " must be a contiguous CPU tensor");
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), op, ": param ", i, " dtype differs in the bucket");
    if (with_grads)
      TORCH_CHECK(grads[i].sizes() == p.sizes() && grads[i].scalar_type() == p.scalar_type() &&
                      grads[i].is_contiguous(),
                  op, ": grad ", i, " must be contiguous, with its param's shape and dtype");
    for (const auto* t : {&exp_avgs[i], &exp_avg_sqs[i]})
      TORCH_CHECK(t->scalar_type() == (t == &exp_avgs[i] ? exp_avgs[0] : exp_avg_sqs[0]).scalar_type() &&
                      t->is_contiguous() && t->numel() == p.numel(),
                  op, ": moments of tensor ", i, " must be contiguous, of its param's size, one format per bucket");
    for (const auto* scales : {&coded.m_scales, &coded.v_scales})
      if (!scales->empty()) {
        const auto& t = (*scales)[i];
        TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == (p.numel() + QBLOCK - 1) / QBLOCK,
                    op, ": scales of tensor ", i, " must be contiguous fp32, one per 256 elements");
      }
    if (!max_exp_avg_sqs.empty())
      TORCH_CHECK(max_exp_avg_sqs[i].scalar_type() == at::kFloat && max_exp_avg_sqs[i].is_contiguous() &&
                      max_exp_avg_sqs[i].numel() == p.numel(),
                  op, ": max_exp_avg_sq ", i, " must be contiguous fp32 of its param's size");
    if (!anchors.empty())
      TORCH_CHECK(anchors[i].is_contiguous() && anchors[i].numel() == p.numel() &&
                      anchors[i].scalar_type() == anchors[0].scalar_type(),
                  op, ": anchor ", i, " must be contiguous, of its param's size, one dtype per bucket");
    TORCH_CHECK(steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1 && steps[i].device().is_cpu(), op,
                ": step ", i, " must be a one-element fp32 CPU tensor");
  }
  return f;
}

// The ``hyper`` list as named settings. A tensor lr (a 0-d CPU tensor: torch.compile
// passes it to the op unchanged, so changing it recompiles nothing) overrides slot HP_LR.
Hyper read_hyper(const char* op, at::ArrayRef<double> hyper, const std::optional<at::Tensor>& lr_tensor) {
  TORCH_CHECK(static_cast<int64_t>(hyper.size()) == NUM_HP, op, ": hyper must hold ", NUM_HP,
              " values (lr, beta1, beta2, eps, weight_decay, max_scale), got ", hyper.size());
  Hyper h{hyper[HP_LR], hyper[HP_BETA1], hyper[HP_BETA2], hyper[HP_EPS], hyper[HP_WEIGHT_DECAY], hyper[HP_MAX_SCALE]};
  if (lr_tensor.has_value()) {
    TORCH_CHECK(lr_tensor->device().is_cpu() && lr_tensor->numel() == 1, op,
                ": lr_tensor must be a one-element CPU tensor");
    h.lr = lr_tensor->item<double>();
  }
  return h;
}

std::vector<std::string> hyperparameter_names() { return std::vector<std::string>(HP_NAMES, HP_NAMES + NUM_HP); }

void check_sums(const char* op, const at::Tensor& sums, int64_t n) {
  TORCH_CHECK(sums.device().is_cpu() && sums.scalar_type() == at::kDouble && sums.is_contiguous() &&
                  sums.dim() == 2 && sums.size(0) == n && sums.size(1) == 3,
              op, ": sums must be a contiguous fp64 CPU tensor of shape [", n, ", 3]");
}

template <typename T>
struct Type {
  using type = T;
};

// The storage types the kernel is instantiated for, one row each: f(Type<T>) for ``dtype``.
template <typename F>
void with_storage_type(at::ScalarType dtype, const char* op, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(Type<float>{});
    case at::kBFloat16: return f(Type<c10::BFloat16>{});
    case at::kHalf: return f(Type<c10::Half>{});
    default: TORCH_CHECK(false, op, ": ", what, " must be fp32, bf16 or fp16, got ", dtype);
  }
}

// The moment-format pairs the kernel is instantiated for, one row each: f(MF{}, VF{}).
template <typename F>
void with_formats(const char* op, Formats formats, F&& f) {
  using M = Format;
  const auto is = [&](M m, M v) { return formats.m == m && formats.v == v; };
  if (is(M::F32, M::F32)) return f(F32Format{}, F32Format{});
  if (is(M::BNB8, M::BNB8)) return f(Bnb8Format{}, Bnb8Format{});
  if (is(M::BF16, M::BF16)) return f(BF16Format{}, BF16Format{});
  if (is(M::FP8, M::BF16)) return f(FP8Format{}, BF16Format{});
  if (is(M::F32, M::BF16)) return f(F32Format{}, BF16Format{});
  if (is(M::BF16, M::F32)) return f(BF16Format{}, F32Format{});
  if (is(M::FP8, M::F32)) return f(FP8Format{}, F32Format{});
  TORCH_CHECK(false, op, ": this pair of moment formats is not instantiated");
}

// Calls f(Type<P>, Type<A>, AMSGRAD, HAS_ANCHOR, MF, VF) with the storage types, switches and moment
// formats of a bucket as compile-time values: one instantiation per combination (amsgrad: fp32 only).
template <typename F>
void dispatch(const char* op, at::TensorList params, at::TensorList max_exp_avg_sqs, at::TensorList anchors,
              Formats formats, F&& f) {
  const bool amsgrad = !max_exp_avg_sqs.empty(), anchored = !anchors.empty();
  auto switches = [&](auto p_type, auto a_type) {
    with_formats(op, formats, [&](auto mf, auto vf) {
      constexpr bool fp32 = !coded_v<decltype(mf), decltype(vf)>;
      if constexpr (fp32) {
        if (amsgrad && anchored) return f(p_type, a_type, std::true_type{}, std::true_type{}, mf, vf);
        if (amsgrad) return f(p_type, a_type, std::true_type{}, std::false_type{}, mf, vf);
      }
      if (anchored) return f(p_type, a_type, std::false_type{}, std::true_type{}, mf, vf);
      return f(p_type, a_type, std::false_type{}, std::false_type{}, mf, vf);
    });
  };
  // anchor-free buckets take the fp32 case: their anchor type is never used
  const auto a = anchors.empty() ? at::kFloat : anchors[0].scalar_type();
  with_storage_type(params[0].scalar_type(), op, "params", [&](auto p_type) {
    with_storage_type(a, op, "anchors", [&](auto a_type) { switches(p_type, a_type); });
  });
}

#define SPD_TYPES(p_type, a_type, ams, anc, mf, vf) \
  using P = typename decltype(p_type)::type;         \
  using A = typename decltype(a_type)::type;         \
  constexpr bool AMS = decltype(ams)::value;         \
  constexpr bool ANC = decltype(anc)::value;         \
  using MF = decltype(mf);                           \
  using VF = decltype(vf)

at::Tensor adam_spd_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList anchors,
                         at::TensorList steps, at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                         const std::optional<at::Tensor>& qmaps, at::IntArrayRef index_offsets,
                         at::ArrayRef<double> hyper, double inv_grad_scale, const std::optional<at::Tensor>& lr_tensor) {
  const CodedMoments coded{exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, index_offsets};
  const Formats formats = check_inputs("adam_spd_step", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, coded, qmaps,
               true);
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor stats = at::empty({n, NUM_STATS}, at::TensorOptions().dtype(at::kFloat));
  if (n == 0) return stats;
  float* out = stats.data_ptr<float>();
  const Hyper h = read_hyper("adam_spd_step", hyper, lr_tensor);
  const QMaps* maps = formats.m == Format::BNB8 ? &make_qmaps(*qmaps) : nullptr;
  dispatch("adam_spd_step", params, max_exp_avg_sqs, anchors, formats,
           [&](auto p_type, auto a_type, auto ams, auto anc, auto mf, auto vf) {
    SPD_TYPES(p_type, a_type, ams, anc, mf, vf);
    run_bucket<P, A, AMS, ANC, MF, VF>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, h,
                                    inv_grad_scale, coded, maps, out);
  });
  return stats;
}

void adam_spd_partials(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList anchors,
                       at::TensorList steps, at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                       const std::optional<at::Tensor>& qmaps, at::IntArrayRef index_offsets,
                       at::ArrayRef<double> hyper, double inv_grad_scale, const at::Tensor& sums,
                       const std::optional<at::Tensor>& lr_tensor) {
  const CodedMoments coded{exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, index_offsets};
  const Formats formats = check_inputs("adam_spd_partials", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, coded,
               qmaps, true);
  const int64_t n = static_cast<int64_t>(params.size());
  check_sums("adam_spd_partials", sums, n);
  if (n == 0) return;
  double* out = sums.data_ptr<double>();
  const Hyper h = read_hyper("adam_spd_partials", hyper, lr_tensor);
  const QMaps* maps = formats.m == Format::BNB8 ? &make_qmaps(*qmaps) : nullptr;
  dispatch("adam_spd_partials", params, max_exp_avg_sqs, anchors, formats,
           [&](auto p_type, auto a_type, auto ams, auto anc, auto mf, auto vf) {
    SPD_TYPES(p_type, a_type, ams, anc, mf, vf);
    partials_bucket<P, A, AMS, ANC, MF, VF>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, h,
                                         inv_grad_scale, coded, maps, out);
  });
}

at::Tensor adam_spd_project(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList max_exp_avg_sqs, at::TensorList anchors, at::TensorList steps,
                            at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                            const std::optional<at::Tensor>& qmaps, const at::Tensor& sums,
                            at::ArrayRef<double> hyper, const std::optional<at::Tensor>& lr_tensor) {
  const CodedMoments coded{exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales};
  const Formats formats = check_inputs("adam_spd_project", params, {}, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, coded, qmaps,
               false);
  const int64_t n = static_cast<int64_t>(params.size());
  check_sums("adam_spd_project", sums, n);
  at::Tensor stats = at::empty({n, NUM_STATS}, at::TensorOptions().dtype(at::kFloat));
  if (n == 0) return stats;
  const double* in = sums.data_ptr<double>();
  float* out = stats.data_ptr<float>();
  const Hyper h = read_hyper("adam_spd_project", hyper, lr_tensor);
  dispatch("adam_spd_project", params, max_exp_avg_sqs, anchors, formats,
           [&](auto p_type, auto a_type, auto ams, auto anc, auto mf, auto vf) {
    SPD_TYPES(p_type, a_type, ams, anc, mf, vf);
    project_bucket<P, A, AMS, ANC, MF, VF>(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, in, h, out);
  });
  return stats;
}

#undef SPD_TYPES

}  // namespace

// The ops' schemas and fake impls are defined once, in spd_kernels/ops/contract.py; this build
// registers their CPU kernels, and describes itself (the order it reads ``hyper`` in).
TORCH_LIBRARY_FRAGMENT(spd_kernels, m) { m.def("hyperparameter_names() -> str[]", &hyperparameter_names); }

TORCH_LIBRARY_IMPL(spd_kernels, CPU, m) {
  m.impl("adam_spd_step", &adam_spd_step);
  m.impl("adam_spd_partials", &adam_spd_partials);
  m.impl("adam_spd_project", &adam_spd_project);
}

}  // namespace spd_kernels

// Importing spd_kernels._C loads this library, which registers the ops above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "AdamSPD CPU kernel (torch.ops.spd_kernels)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
