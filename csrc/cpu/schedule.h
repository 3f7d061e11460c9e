// How the CPU kernel's work is cut and handed to threads: batches of items by weight, and
// the flat chunk list of a bucket.
#pragma once

#include "common.h"

namespace spd_kernels {
namespace {

// Runs f(k) for every k in [0, n), where item k touches weight(k) elements. Consecutive
// items are grouped into one batch per thread, of equal weight as far as the items allow,
// and at most one batch per GRAIN elements, so work below 2 * GRAIN never leaves the calling
// thread. (Batches of GRAIN each, handed out in equal counts, left a thread 8 of a 9-chunk
// tensor's chunks and the other 1.) Which thread runs an item never changes what it
// computes: every item writes its own outputs.
template <typename Weight, typename F>
void parallel_items(int64_t n, Weight weight, F f) {
  std::vector<int64_t> weights(n);
  int64_t total = 0;
  for (int64_t k = 0; k < n; ++k) total += weights[k] = std::max<int64_t>(weight(k), 1);
  const int64_t wanted = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total / GRAIN));
  std::vector<int64_t> starts{0};
  int64_t filled = 0;
  for (int64_t k = 0; k + 1 < n; ++k) {
    filled += weights[k];
    // close batch b once the items so far reach (b + 1) / wanted of the total
    const int64_t b = static_cast<int64_t>(starts.size()) - 1;
    if (b + 1 < wanted && filled * wanted >= (b + 1) * total) starts.push_back(k + 1);
  }
  starts.push_back(n);
  const int64_t batches = static_cast<int64_t>(starts.size()) - 1;
  at::parallel_for(0, batches, 1, [&](int64_t lo, int64_t hi) {  // one batch: no threads woken
    for (int64_t b = lo; b < hi; ++b)
      for (int64_t k = starts[b]; k < starts[b + 1]; ++k) f(k);
  });
}

// The chunks of a bucket's tensors as one flat list, so one parallel_for covers them
// all: tensor t owns entries [first[t], first[t + 1]), each (tensor, begin, end).
struct ChunkList {
  std::vector<std::array<int64_t, 3>> chunks;
  std::vector<int64_t> first;
  // elements of chunk k, for parallel_items
  auto size_of() const {
    return [this](int64_t k) { return chunks[k][2] - chunks[k][1]; };
  }
};

template <typename Keep>
ChunkList chunk_list(at::TensorList params, Keep keep) {
  ChunkList out;
  const int64_t n = static_cast<int64_t>(params.size());
  out.first.reserve(n + 1);
  for (int64_t t = 0; t < n; ++t) {
    out.first.push_back(static_cast<int64_t>(out.chunks.size()));
    if (!keep(t)) continue;
    const int64_t numel = params[t].numel();
    for (int64_t b = 0; b < numel; b += CHUNK) out.chunks.push_back({t, b, std::min(b + CHUNK, numel)});
  }
  out.first.push_back(static_cast<int64_t>(out.chunks.size()));
  return out;
}

}  // namespace
}  // namespace spd_kernels
