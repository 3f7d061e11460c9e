// The kernels of one moment-format pair: a bucket's storage types and switches made compile-time
// values, then its step or one of the step's split halves (drivers.h). csrc/pairs/ has one file a
// pair that instantiates this (bucket_call.h says why).
#pragma once

#include "bucket_call.h"
#include "drivers.h"

namespace spd_kernels {
namespace {

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

// Calls f(Type<P>, Type<A>, AMSGRAD, HAS_ANCHOR) with the storage types and switches of the
// bucket as compile-time values: one instantiation per combination (amsgrad: 32-bit moments only).
template <typename MF, typename VF, typename F>
void dispatch(const BucketCall& call, F&& f) {
  const char* op = call.name;
  const bool amsgrad = !call.max_exp_avg_sqs.empty(), anchored = !call.anchors.empty();
  auto switches = [&](auto p_type, auto a_type) {
    if constexpr (!coded_v<MF, VF>) {
      if (amsgrad && anchored) return f(p_type, a_type, std::true_type{}, std::true_type{});
      if (amsgrad) return f(p_type, a_type, std::true_type{}, std::false_type{});
    }
    if (anchored) return f(p_type, a_type, std::false_type{}, std::true_type{});
    return f(p_type, a_type, std::false_type{}, std::false_type{});
  };
  // anchor-free buckets take the fp32 case: their anchor type is never used
  const auto a = call.anchors.empty() ? at::kFloat : call.anchors[0].scalar_type();
  with_storage_type(call.params[0].scalar_type(), op, "params", [&](auto p_type) {
    with_storage_type(a, op, "anchors", [&](auto a_type) { switches(p_type, a_type); });
  });
}

template <typename MF, typename VF>
void run_format_pair(const BucketCall& c) {
  using Op = BucketCall::Op;
  const CodedMoments coded{c.exp_avgs, c.exp_avg_sqs, c.exp_avg_scales, c.exp_avg_sq_scales, c.index_offsets};
  const QMaps* maps = std::is_same<MF, Bnb8Format>::value && c.op != Op::PROJECT ? &make_qmaps(*c.qmaps) : nullptr;
  dispatch<MF, VF>(c, [&](auto p_type, auto a_type, auto amsgrad, auto anchored) {
    using P = typename decltype(p_type)::type;
    using A = typename decltype(a_type)::type;
    constexpr bool AMS = decltype(amsgrad)::value, ANC = decltype(anchored)::value;
    switch (c.op) {
      case Op::STEP:
        return run_bucket<P, A, AMS, ANC, MF, VF>(c.params, c.grads, c.exp_avgs, c.exp_avg_sqs, c.max_exp_avg_sqs,
                                                  c.anchors, c.steps, c.hyper, c.inv_grad_scale, coded, maps, c.stats);
      case Op::PARTIALS:
        return partials_bucket<P, A, AMS, ANC, MF, VF>(c.params, c.grads, c.exp_avgs, c.exp_avg_sqs,
                                                       c.max_exp_avg_sqs, c.anchors, c.steps, c.hyper,
                                                       c.inv_grad_scale, coded, maps, c.sums);
      case Op::PROJECT:
        return project_bucket<P, A, AMS, ANC, MF, VF>(c.params, c.exp_avgs, c.exp_avg_sqs, c.max_exp_avg_sqs,
                                                      c.anchors, c.steps, c.sums, c.hyper, c.stats);
    }
  });
}

}  // namespace
}  // namespace spd_kernels
