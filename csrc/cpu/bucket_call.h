// One op's call on one bucket, as the ops' entry (csrc/adam_spd_cpu.cpp) hands it to the kernels
// of the bucket's moment-format pair (csrc/pairs/, one file a pair).
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
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps;
  at::TensorList exp_avg_scales, exp_avg_sq_scales;  // one per tensor for a block-scaled moment, else empty
  const at::Tensor* qmaps;       // bitsandbytes' 8-bit maps, [2, 256] fp32; else null
  at::IntArrayRef index_offsets;  // where each tensor's shard starts in its whole tensor; empty: 0
  Hyper hyper;
  double inv_grad_scale;
  float* stats;   // out (STEP, PROJECT): [n, NUM_STATS]
  double* sums;   // out (PARTIALS) or in (PROJECT): [n, 3]
};

// The pairs the kernel is built for, moments (m, v): fp32 (32-bit), bf16, fp8 (e4m3 blocks),
// bnb8 (bitsandbytes' blockwise 8-bit, both moments). The inputs are checked by the caller.
void run_f32_f32(const BucketCall& call);
void run_bnb8_bnb8(const BucketCall& call);
void run_bf16_bf16(const BucketCall& call);
void run_fp8_bf16(const BucketCall& call);
void run_f32_bf16(const BucketCall& call);
void run_bf16_f32(const BucketCall& call);
void run_fp8_f32(const BucketCall& call);

}  // namespace spd_kernels
