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
// cpu/math.h (the fp32 chunk step), cpu/quantizer.h (the 8-bit maps), cpu/formats.h (the moment
// formats), cpu/coded_step.h and cpu/avx512_steps.h (the chunk step over coded moments),
// cpu/drivers.h (a bucket's step and split halves), cpu/format_pair.h (one pair's kernels, the
// storage types dispatched), instantiated one file a pair in pairs/ (cpu/bucket_call.h, what the
// files share, says why); this file checks the inputs, finds the pair's kernels and registers the ops.

#include "cpu/bucket_call.h"
#include "cpu/prefetch_level.h"

#include <Python.h>
#include <torch/library.h>

namespace spd_kernels {
namespace {

// A moment's format, from its codes' dtype.
MomentFormat format_of(const char* op, const char* what, at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return MomentFormat::F32;
    case at::kBFloat16: return MomentFormat::BF16;
    case at::kFloat8_e4m3fn: return MomentFormat::FP8;
    case at::kByte: return MomentFormat::BNB8;
    default:
      TORCH_CHECK(false, op, ": ", what, " must be fp32, bf16, float8_e4m3fn (block-scaled) or uint8 "
                  "(bitsandbytes' 8-bit) codes, got ", dtype);
  }
}

bool blocked(MomentFormat f) { return f == MomentFormat::FP8 || f == MomentFormat::BNB8; }

struct Formats {
  MomentFormat m = MomentFormat::F32, v = MomentFormat::F32;
};

Formats check_inputs(const char* op, const BucketCall& c, bool with_grads) {
  const size_t n = c.params.size();
  TORCH_CHECK((!with_grads || c.grads.size() == n) && c.exp_avgs.size() == n && c.exp_avg_sqs.size() == n &&
                  c.steps.size() == n,
              op, ": params, grads, exp_avgs, exp_avg_sqs and steps must have the same length");
  Formats f;
  if (n == 0) return f;
  f.m = format_of(op, "exp_avgs", c.exp_avgs[0].scalar_type());
  f.v = format_of(op, "exp_avg_sqs", c.exp_avg_sqs[0].scalar_type());
  TORCH_CHECK((f.m == MomentFormat::BNB8) == (f.v == MomentFormat::BNB8), op,
              ": bitsandbytes' 8-bit format (uint8 codes) is for both moments or neither");
  TORCH_CHECK(f.v != MomentFormat::FP8, op, ": fp8 second moments are not supported (spd_kernels/formats/fp8.py says why)");
  const bool compressed = f.m != MomentFormat::F32 || f.v != MomentFormat::F32;
  TORCH_CHECK(!compressed || c.max_exp_avg_sqs.empty(), op, ": amsgrad with compressed moments is not supported");
  TORCH_CHECK(c.exp_avg_scales.size() == (blocked(f.m) ? n : 0) && c.exp_avg_sq_scales.size() == (blocked(f.v) ? n : 0),
              op, ": exp_avg_scales / exp_avg_sq_scales: one per tensor for a block-scaled moment (fp8, 8-bit), "
              "else empty");
  if (f.m == MomentFormat::BNB8)
    TORCH_CHECK(c.qmaps != nullptr && c.qmaps->device().is_cpu() && c.qmaps->scalar_type() == at::kFloat &&
                    c.qmaps->is_contiguous() && c.qmaps->numel() == 512,
                op, ": 8-bit moments need qmaps, a contiguous fp32 CPU tensor of shape [2, 256]");
  TORCH_CHECK(c.index_offsets.empty() || c.index_offsets.size() == n, op,
              ": index_offsets: one per tensor (where its shard starts in the whole tensor), or empty");
  TORCH_CHECK(c.max_exp_avg_sqs.empty() || c.max_exp_avg_sqs.size() == n, op, ": max_exp_avg_sqs length");
  TORCH_CHECK(c.anchors.empty() || c.anchors.size() == n, op, ": anchors length");
  for (size_t i = 0; i < n; ++i) {
    const auto& p = c.params[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), op, ": param ", i, " must be a contiguous CPU tensor");
    TORCH_CHECK(p.scalar_type() == c.params[0].scalar_type(), op, ": param ", i, " dtype differs in the bucket");
    if (with_grads)
      TORCH_CHECK(c.grads[i].sizes() == p.sizes() && c.grads[i].scalar_type() == p.scalar_type() &&
                      c.grads[i].is_contiguous(),
                  op, ": grad ", i, " must be contiguous, with its param's shape and dtype");
    for (const auto* t : {&c.exp_avgs[i], &c.exp_avg_sqs[i]})
      TORCH_CHECK(t->scalar_type() == (t == &c.exp_avgs[i] ? c.exp_avgs[0] : c.exp_avg_sqs[0]).scalar_type() &&
                      t->is_contiguous() && t->numel() == p.numel(),
                  op, ": moments of tensor ", i, " must be contiguous, of its param's size, one format per bucket");
    for (const auto* scales : {&c.exp_avg_scales, &c.exp_avg_sq_scales})
      if (!scales->empty()) {
        const auto& t = (*scales)[i];
        TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() &&
                        t.numel() == (p.numel() + QBLOCK - 1) / QBLOCK,
                    op, ": scales of tensor ", i, " must be contiguous fp32, one per 256 elements");
      }
    if (!c.max_exp_avg_sqs.empty())
      TORCH_CHECK(c.max_exp_avg_sqs[i].scalar_type() == at::kFloat && c.max_exp_avg_sqs[i].is_contiguous() &&
                      c.max_exp_avg_sqs[i].numel() == p.numel(),
                  op, ": max_exp_avg_sq ", i, " must be contiguous fp32 of its param's size");
    if (!c.anchors.empty())
      TORCH_CHECK(c.anchors[i].is_contiguous() && c.anchors[i].numel() == p.numel() &&
                      c.anchors[i].scalar_type() == c.anchors[0].scalar_type(),
                  op, ": anchor ", i, " must be contiguous, of its param's size, one dtype per bucket");
    TORCH_CHECK(c.steps[i].scalar_type() == at::kFloat && c.steps[i].numel() == 1 && c.steps[i].device().is_cpu(), op,
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

// prefetch_level.h's getter and setter (spd_kernels/_cpu.py): 1 into L1, 2 into L2
int64_t get_prefetch_level() { return prefetch_level.load(); }
int64_t set_prefetch_level(int64_t level) {  // returns the level it replaced
  TORCH_CHECK(level == static_cast<int>(PrefetchInto::L1) || level == static_cast<int>(PrefetchInto::L2),
              "set_prefetch_level: level must be 1 (into L1) or 2 (into L2), got ", level);
  return prefetch_level.exchange(static_cast<int>(level));
}

void check_sums(const char* op, const at::Tensor& sums, int64_t n) {
  TORCH_CHECK(sums.device().is_cpu() && sums.scalar_type() == at::kDouble && sums.is_contiguous() &&
                  sums.dim() == 2 && sums.size(0) == n && sums.size(1) == 3,
              op, ": sums must be a contiguous fp64 CPU tensor of shape [", n, ", 3]");
}

// The kernels of the bucket's moment-format pair (registered by the files of pairs/).
void run_pair(const char* op, Formats formats, const BucketCall& call) {
  const PairKernels kernels = pair_kernels(formats.m, formats.v);
  TORCH_CHECK(kernels != nullptr, op, ": this pair of moment formats is not built (csrc/pairs/)");
  kernels(call);
}

at::Tensor adam_spd_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList anchors,
                         at::TensorList steps, at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                         const std::optional<at::Tensor>& qmaps, at::IntArrayRef index_offsets,
                         at::ArrayRef<double> hyper, double inv_grad_scale, const std::optional<at::Tensor>& lr_tensor) {
  const char* op = "adam_spd_step";
  BucketCall call{BucketCall::Op::STEP, op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps,
                  exp_avg_scales, exp_avg_sq_scales, qmaps ? &*qmaps : nullptr, index_offsets, {}, inv_grad_scale,
                  nullptr, nullptr};
  const Formats formats = check_inputs(op, call, true);
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor stats = at::empty({n, NUM_STATS}, at::TensorOptions().dtype(at::kFloat));
  if (n == 0) return stats;
  call.hyper = read_hyper(op, hyper, lr_tensor);
  call.stats = stats.data_ptr<float>();
  run_pair(op, formats, call);
  return stats;
}

void adam_spd_partials(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList anchors,
                       at::TensorList steps, at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                       const std::optional<at::Tensor>& qmaps, at::IntArrayRef index_offsets,
                       at::ArrayRef<double> hyper, double inv_grad_scale, const at::Tensor& sums,
                       const std::optional<at::Tensor>& lr_tensor) {
  const char* op = "adam_spd_partials";
  BucketCall call{BucketCall::Op::PARTIALS, op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps,
                  exp_avg_scales, exp_avg_sq_scales, qmaps ? &*qmaps : nullptr, index_offsets, {}, inv_grad_scale,
                  nullptr, nullptr};
  const Formats formats = check_inputs(op, call, true);
  const int64_t n = static_cast<int64_t>(params.size());
  check_sums(op, sums, n);
  if (n == 0) return;
  call.hyper = read_hyper(op, hyper, lr_tensor);
  call.sums = sums.data_ptr<double>();
  run_pair(op, formats, call);
}

at::Tensor adam_spd_project(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList max_exp_avg_sqs, at::TensorList anchors, at::TensorList steps,
                            at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                            const std::optional<at::Tensor>& qmaps, const at::Tensor& sums,
                            at::ArrayRef<double> hyper, const std::optional<at::Tensor>& lr_tensor) {
  const char* op = "adam_spd_project";
  BucketCall call{BucketCall::Op::PROJECT, op, params, {}, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps,
                  exp_avg_scales, exp_avg_sq_scales, qmaps ? &*qmaps : nullptr, {}, {}, 1.0, nullptr, nullptr};
  const Formats formats = check_inputs(op, call, false);
  const int64_t n = static_cast<int64_t>(params.size());
  check_sums(op, sums, n);
  at::Tensor stats = at::empty({n, NUM_STATS}, at::TensorOptions().dtype(at::kFloat));
  if (n == 0) return stats;
  call.hyper = read_hyper(op, hyper, lr_tensor);
  call.sums = sums.data_ptr<double>();
  call.stats = stats.data_ptr<float>();
  run_pair(op, formats, call);
  return stats;
}

}  // namespace

// The ops' schemas and fake impls are defined once, in spd_kernels/ops/contract.py; this build
// registers their CPU kernels, describes itself (the order it reads ``hyper`` in) and takes the
// cache its AVX-512 steps prefetch into.
TORCH_LIBRARY_FRAGMENT(spd_kernels, m) {
  m.def("hyperparameter_names() -> str[]", &hyperparameter_names);
  m.def("prefetch_level() -> int", &get_prefetch_level);
  m.def("set_prefetch_level(int level) -> int", &set_prefetch_level);
}

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
