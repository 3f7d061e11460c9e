// A bucket's whole step and its split halves over the chunk and task schedule.
#pragma once

#include "coded_step.h"
#include "schedule.h"

namespace spd_kernels {
namespace {

// The coded moments of a bucket's tensors: codes, and per-block scales where the format has them.
// ``offsets``: where each tensor's shard starts in its whole tensor (empty: 0), stochastic rounding's index.
struct CodedMoments {
  at::TensorList exp_avgs, exp_avg_sqs, m_scales, v_scales;
  at::IntArrayRef offsets = {};
  MomentView m(int64_t t) const { return view(exp_avgs[t], m_scales, t); }
  MomentView v(int64_t t) const { return view(exp_avg_sqs[t], v_scales, t); }
  int64_t offset(int64_t t) const { return offsets.empty() ? 0 : offsets[t]; }
  static MomentView view(const at::Tensor& codes, at::TensorList scales, int64_t t) {
    return MomentView{codes.data_ptr(), scales.empty() ? nullptr : scales[t].data_ptr<float>()};
  }
};

// Whether moments in MF, VF are stored other than as fp32 values (then q is stored in p in
// phase 1, since the fp32 moments are gone after it, and q is defined in the param's dtype).
template <typename MF, typename VF>
constexpr bool coded_v = !(std::is_same<MF, F32Format>::value && std::is_same<VF, F32Format>::value);

// steps += 1 for every tensor; the per-tensor scalars of the new counts.
std::vector<Scalars> advance_steps(at::TensorList steps, const Hyper& hyper, double inv_grad_scale) {
  std::vector<Scalars> scalars(steps.size());
  for (size_t t = 0; t < steps.size(); ++t) {
    float* step = steps[t].data_ptr<float>();
    const double count = static_cast<double>(*step) + 1.0;
    *step = static_cast<float>(count);
    scalars[t] = make_scalars(count, hyper, inv_grad_scale);
  }
  return scalars;
}

template <typename P, typename A, bool AMSGRAD, bool HAS_ANCHOR, typename MF, typename VF>
void run_bucket(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList anchors, at::TensorList steps, const Hyper& hyper,
                double inv_grad_scale, const CodedMoments& coded, const QMaps* maps, float* stats) {
  const int64_t n = static_cast<int64_t>(params.size());
  // fp32 params hold q after phase 1; so do coded moments; else q is rebuilt and rounded once
  constexpr bool CODED = coded_v<MF, VF>;
  constexpr bool STORE_Q = CODED || std::is_same<P, float>::value;

  const std::vector<Scalars> scalars = advance_steps(steps, hyper, inv_grad_scale);
  auto ptrs = [&](int64_t t) {
    return std::make_tuple(params[t].data_ptr<P>(), grads[t].data_ptr<P>(),
                           CODED ? nullptr : exp_avgs[t].data_ptr<float>(),
                           CODED ? nullptr : exp_avg_sqs[t].data_ptr<float>(),
                           AMSGRAD ? max_exp_avg_sqs[t].data_ptr<float>() : nullptr,
                           HAS_ANCHOR ? anchors[t].data_ptr<A>() : nullptr);
  };
  auto adam = [&](int64_t t, int64_t begin, int64_t end) {
    auto [p, g, m, v, vmax, a] = ptrs(t);
    if constexpr (CODED)
      return adam_chunk_coded<P, A, HAS_ANCHOR, MF, VF>(p, g, coded.m(t), coded.v(t), a, begin, end, scalars[t], maps,
                                                        coded.offset(t));
    else return adam_chunk<P, A, AMSGRAD, HAS_ANCHOR, STORE_Q>(p, g, F32Moment{m}, F32Moment{v}, vmax, a, begin, end,
                                                               scalars[t]);
  };

  // Tensors up to TASK_MAX: one task each does Adam, the sums, the finalize and
  // (only if s > 0, or to round a bf16/fp16 q once) the projection, all in cache. Adam
  // goes chunk by chunk and adds the chunks' sums in order, as the paths below do, so
  // every path (and the split ops) gives a tensor the same bits.
  std::vector<int64_t> small, large;
  for (int64_t t = 0; t < n; ++t) (params[t].numel() <= TASK_MAX ? small : large).push_back(t);
  parallel_items(
      static_cast<int64_t>(small.size()), [&](int64_t k) { return params[small[k]].numel(); },
      [&](int64_t k) {
        const int64_t t = small[k], numel = params[t].numel();
        auto [p, g, m, v, vmax, a] = ptrs(t);
        const Scalars& s = scalars[t];
        Sums sums;
        for (int64_t b = 0; b < numel; b += CHUNK) sums.add(adam(t, b, std::min(b + CHUNK, numel)));
        float* row = stats + NUM_STATS * t;
        finalize(sums, s.weight_decay, s.max_scale, row);
        if (!STORE_Q || row[STAT_SCALE] != 0.0f)
          project_chunk<P, A, HAS_ANCHOR, !STORE_Q>(p, m, AMSGRAD ? vmax : v, a, 0, numel, s, row[STAT_SCALE]);
      });

  // Larger tensors one at a time, so the projection re-reads q and a from the
  // last-level cache where the tensor fits there: chunks in parallel, each with
  // its own partial-sum slot; the slots are summed in chunk order.
  std::vector<Sums> partials;
  for (const int64_t t : large) {
    const int64_t numel = params[t].numel(), n_chunks = (numel + CHUNK - 1) / CHUNK;
    auto [p, g, m, v, vmax, a] = ptrs(t);
    const Scalars& s = scalars[t];
    partials.assign(n_chunks, Sums{});
    parallel_items(n_chunks, [](int64_t) { return CHUNK; }, [&](int64_t c) {
      partials[c] = adam(t, c * CHUNK, std::min((c + 1) * CHUNK, numel));
    });
    Sums sums;
    for (const Sums& part : partials) sums.add(part);
    float* row = stats + NUM_STATS * t;
    finalize(sums, s.weight_decay, s.max_scale, row);
    if (STORE_Q && row[STAT_SCALE] == 0.0f) continue;
    parallel_items(n_chunks, [](int64_t) { return CHUNK; }, [&](int64_t c) {
      project_chunk<P, A, HAS_ANCHOR, !STORE_Q>(p, m, AMSGRAD ? vmax : v, a, c * CHUNK,
                                                std::min((c + 1) * CHUNK, numel), s, row[STAT_SCALE]);
    });
  }
}

// Split step, first half: Adam on every chunk of every tensor (steps += 1) and
// each tensor's three sums, summed over its chunks in order, into sums [n, 3].
template <typename P, typename A, bool AMSGRAD, bool HAS_ANCHOR, typename MF, typename VF>
void partials_bucket(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList anchors,
                     at::TensorList steps, const Hyper& hyper, double inv_grad_scale, const CodedMoments& coded,
                     const QMaps* maps, double* sums) {
  const int64_t n = static_cast<int64_t>(params.size());
  constexpr bool CODED = coded_v<MF, VF>;
  const std::vector<Scalars> scalars = advance_steps(steps, hyper, inv_grad_scale);
  const ChunkList work = chunk_list(params, [](int64_t) { return true; });
  std::vector<Sums> partials(work.chunks.size());
  parallel_items(static_cast<int64_t>(work.chunks.size()), work.size_of(), [&](int64_t k) {
    const auto [t, begin, end] = work.chunks[k];
    const A* a = HAS_ANCHOR ? anchors[t].data_ptr<A>() : nullptr;
    if constexpr (CODED) {
      partials[k] = adam_chunk_coded<P, A, HAS_ANCHOR, MF, VF>(params[t].data_ptr<P>(), grads[t].data_ptr<P>(),
                                                               coded.m(t), coded.v(t), a, begin, end, scalars[t], maps,
                                                               coded.offset(t));
    } else {  // a coded step always stores q; else a low-precision q is rebuilt and rounded once in the project op
      constexpr bool STORE_Q = std::is_same<P, float>::value;
      partials[k] = adam_chunk<P, A, AMSGRAD, HAS_ANCHOR, STORE_Q>(
          params[t].data_ptr<P>(), grads[t].data_ptr<P>(), F32Moment{exp_avgs[t].data_ptr<float>()},
          F32Moment{exp_avg_sqs[t].data_ptr<float>()}, AMSGRAD ? max_exp_avg_sqs[t].data_ptr<float>() : nullptr, a, begin, end,
          scalars[t]);
    }
  });
  for (int64_t t = 0; t < n; ++t) {
    Sums total;  // an empty shard contributes zeros
    for (int64_t k = work.first[t]; k < work.first[t + 1]; ++k) total.add(partials[k]);
    sums[3 * t + 0] = total.gd;
    sums[3 * t + 1] = total.dd;
    sums[3 * t + 2] = total.qq;
  }
}

// Split step, second half: stats from the (all-reduced) sums, then the projection
// of the tensors with s > 0 (every tensor for bf16/fp16, whose q was not stored).
template <typename P, typename A, bool AMSGRAD, bool HAS_ANCHOR, typename MF, typename VF>
void project_bucket(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList anchors, at::TensorList steps,
                    const double* sums, const Hyper& hyper, float* stats) {
  const int64_t n = static_cast<int64_t>(params.size());
  constexpr bool STORE_Q = coded_v<MF, VF> || std::is_same<P, float>::value;
  std::vector<Scalars> scalars(n);
  for (int64_t t = 0; t < n; ++t) {
    const double count = static_cast<double>(*steps[t].data_ptr<float>());  // incremented by the partials op
    scalars[t] = make_scalars(count, hyper, 1.0);
    Sums total;
    total.gd = sums[3 * t + 0];
    total.dd = sums[3 * t + 1];
    total.qq = sums[3 * t + 2];
    finalize(total, scalars[t].weight_decay, scalars[t].max_scale, stats + NUM_STATS * t);
  }
  const ChunkList work = chunk_list(params, [&](int64_t t) { return !STORE_Q || stats[NUM_STATS * t + STAT_SCALE] != 0.0f; });
  parallel_items(static_cast<int64_t>(work.chunks.size()), work.size_of(), [&](int64_t k) {
    const auto [t, begin, end] = work.chunks[k];
    // q is rebuilt (bf16/fp16, 32-bit moments) from m and v, or vmax under amsgrad
    const float* m = STORE_Q ? nullptr : exp_avgs[t].data_ptr<float>();
    const float* v = STORE_Q ? nullptr : (AMSGRAD ? max_exp_avg_sqs[t] : exp_avg_sqs[t]).data_ptr<float>();
    project_chunk<P, A, HAS_ANCHOR, !STORE_Q>(params[t].data_ptr<P>(), m, v,
                                              HAS_ANCHOR ? anchors[t].data_ptr<A>() : nullptr, begin, end,
                                              scalars[t], stats[NUM_STATS * t + STAT_SCALE]);
  });
}

}  // namespace
}  // namespace spd_kernels
