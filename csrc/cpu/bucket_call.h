// One op's call on one bucket, as the ops' entry (csrc/adam_spd_cpu.cpp) hands it to the kernels
// of the bucket's moment-format pair (csrc/pairs/, one file a pair, each registering its kernels
// here as the library loads: a new pair is one new file).
//
// Why a file a pair: the kernel is instantiated for every storage type, anchor type, switch and
// pair (several hundred functions), and in one file the build took over five minutes on one
// core. Apart, the pairs compile in parallel. What crosses between the files is declared here,
// outside the unnamed namespace the kernel's parts live in (each file has its own copy of those),
// so it holds only types with external linkage.
#pragma once

#include "common.h"

namespace spd_kernels {

struct BucketCall {
  enum class Op { STEP, PARTIALS, PROJECT };
  Op op;
  const char* name;  // the op's name, for its errors
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps;
  at::TensorList exp_avg_scales, exp_avg_sq_scales;  // one per tensor for a block-scaled moment, else empty
  const at::Tensor* qmaps;       // bitsandbytes' 8-bit maps, [2, 256] fp32; else null
  at::IntArrayRef index_offsets;  // where each tensor's shard starts in its whole tensor; empty: 0
  Hyper hyper;
  double inv_grad_scale;
  float* stats;   // out (STEP, PROJECT): [n, NUM_STATS]
  double* sums;   // out (PARTIALS) or in (PROJECT): [n, 3]
};

// A moment's format, named by its codes' dtype (spd_kernels/formats/): fp32 (32-bit), bf16, fp8
// (e4m3 in 256-element blocks), bnb8 (bitsandbytes' blockwise 8-bit, both moments or neither).
enum class MomentFormat { F32, BF16, FP8, BNB8, COUNT };

// A pair's kernels, for inputs the caller has checked.
using PairKernels = void (*)(const BucketCall&);

// The kernels registered for moments (m, v); null where no file of pairs/ builds that pair.
// Inline: one table in the library, whatever file registers or reads it, filled before any op runs.
inline PairKernels& pair_kernels(MomentFormat m, MomentFormat v) {
  static PairKernels table[static_cast<int>(MomentFormat::COUNT)][static_cast<int>(MomentFormat::COUNT)] = {};
  return table[static_cast<int>(m)][static_cast<int>(v)];
}

inline bool register_pair(MomentFormat m, MomentFormat v, PairKernels kernels) {
  pair_kernels(m, v) = kernels;
  return true;
}

}  // namespace spd_kernels
