// What every part of the CPU kernel shares: the stats and settings layout, the chunk and task
// sizes, storage conversions and the per-tensor scalars (csrc/adam_spd_cpu.cpp says how they fit).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>


#include <array>
#include <cstring>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <cmath>
#include <type_traits>
#include <vector>

namespace spd_kernels {

// The step's settings as the ops received them (``hyper``, lr already resolved from lr_tensor).
// Outside the unnamed namespace: the ops' entry hands it to every format pair's file (bucket_call.h).
struct Hyper {
  double lr, beta1, beta2, eps, weight_decay, max_scale;
};

namespace {

// The stats row layout of spd_kernels/stats.py: one fp32 row per tensor.
constexpr int64_t NUM_STATS = 5;
constexpr int64_t STAT_C = 0, STAT_NORM_P_A = 1, STAT_NORM_Q_A = 2, STAT_R = 3, STAT_SCALE = 4;

// Slots of the ``hyper`` list (spd_kernels.hyperparameters.PACKED).
constexpr int64_t HP_LR = 0, HP_BETA1 = 1, HP_BETA2 = 2, HP_EPS = 3, HP_WEIGHT_DECAY = 4, HP_MAX_SCALE = 5;
constexpr int64_t NUM_HP = 6;
const char* const HP_NAMES[NUM_HP] = {"lr", "beta1", "beta2", "eps", "weight_decay", "max_scale"};

constexpr int64_t CHUNK = 16384;  // 64 KB of fp32 per array: five arrays stay in a 1 MB L2
// Tensors up to this size are one task each. Run chunk-parallel, one tensor at a time, a
// tensor of a few chunks is one batch of parallel_items (under 2 * GRAIN elements), so a
// bucket of many such tensors ran on one thread (8-bit moments, compute-bound: 2x slower
// at 1,000 tensors of 64K). As one task each they spread over the threads, and a task's
// ~2.6 MB (five arrays) stays in the last-level cache between Adam and the projection.
constexpr int64_t TASK_MAX = 8 * CHUNK;
// Elements per scale of a block-scaled moment (fp8, 8-bit; quantization.BLOCK_SIZE, the formats' ``block``).
constexpr int64_t QBLOCK = 256;
static_assert(CHUNK % QBLOCK == 0, "chunks must start on block bounds");
// Elements a thread must have before a second one is woken. Waking the OpenMP team costs
// microseconds on a quiet machine but a scheduler slice (milliseconds) when other processes
// load the cores, so a small bucket (an MLP, biases, LoRA factors) runs on the calling thread.
constexpr int64_t GRAIN = 1 << 16;

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

struct Scalars {
  float one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_sqrt_bc2;
  float weight_decay, max_scale, inv_grad_scale;
  uint32_t step;  // the step count after this step's increment (stochastic rounding's key)
};

// Per-tensor scalars for step count ``count`` (already incremented); bias corrections in double.
inline Scalars make_scalars(double count, const Hyper& h, double inv_grad_scale) {
  const double bc1 = 1.0 - std::pow(h.beta1, count), bc2 = 1.0 - std::pow(h.beta2, count);
  return Scalars{static_cast<float>(1.0 - h.beta1), static_cast<float>(h.beta2), static_cast<float>(1.0 - h.beta2),
                 static_cast<float>(h.eps), static_cast<float>(h.lr / bc1), static_cast<float>(1.0 / std::sqrt(bc2)),
                 static_cast<float>(h.weight_decay), static_cast<float>(h.max_scale),
                 static_cast<float>(inv_grad_scale), static_cast<uint32_t>(count)};
}

}  // namespace
}  // namespace spd_kernels
