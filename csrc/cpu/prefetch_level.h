// Which cache the AVX-512 steps' software prefetches fill (avx512_steps.h's prefetch_ahead):
// prefetcht0 into L1, or prefetcht1 into L2. The step's results do not depend on it, only its
// speed, and which is faster depends on the core: on a Zen 4, into L2 was 5-6% faster on vit_b
// than into L1 in the same build; the Zen 5 and the Intel Xeon were measured into L1
// (docs/results/cpu.md).
//
// Set from Python (spd_kernels/_cpu.py: the CPU's default, or SPD_KERNELS_CPU_PREFETCH) through
// the set_prefetch_level op; the steps read it once per chunk. Inline, outside the files'
// anonymous namespaces: one variable for every file of the build.
#pragma once

#include <atomic>

namespace spd_kernels {

enum class PrefetchInto : int { L1 = 1, L2 = 2 };

inline std::atomic<int> prefetch_level{static_cast<int>(PrefetchInto::L1)};

}  // namespace spd_kernels
