// The floor under a step's first pass on the CPU (bench/cpu_pass_costs.py): a pass that reads
// every array the step reads and writes every one it writes, in the step's layout and over the
// kernel's own thread split (csrc/cpu/schedule.h: CHUNK-element chunks, consecutive ones batched
// per thread), with one multiply-add or so per value, so that each store waits on its loads and
// nothing else. Out of cache it shows what memory gives that layout once the step's compute is
// taken away; the kernel's time over it is what its instructions add.
//
// Layout per element: p, g fp32; m fp32, bf16 bit patterns (int16) or one-byte codes (uint8, as
// fp8 m's; its per-block scales, 4 B a 256-block, left out as the bench's byte counts leave them);
// v fp32 or bf16 patterns; the anchor fp32, bf16 patterns or none. p, m and v are written.
// The values mean nothing: a bf16 is truncated, a code converted as an integer.
//
// projection_pass is the same floor under the projection pass that follows a first pass when SPD
// projects: p read and written, the anchor read (p = 0.999 p + 0.001 a), over the same split. Run
// right after stream_pass on the same arrays, it reads them wherever the first pass left them (the
// last-level cache when they fit), as the kernel's projection does.
#include "cpu/schedule.h"

#include <optional>

namespace {

inline float load(const float* x, int64_t i) { return x[i]; }
inline float load(const int16_t* x, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(static_cast<uint16_t>(x[i])) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}
inline float load(const uint8_t* x, int64_t i) { return static_cast<float>(x[i]); }

inline void store(float* x, int64_t i, float y) { x[i] = y; }
inline void store(int16_t* x, int64_t i, float y) {
  uint32_t bits;
  std::memcpy(&bits, &y, 4);
  x[i] = static_cast<int16_t>(bits >> 16);
}
inline void store(uint8_t* x, int64_t i, float y) { x[i] = static_cast<uint8_t>(static_cast<int32_t>(y)); }

// [begin, end) of the arrays. Out of line, its pointers its own arguments: inlined into the
// chunk lambda, the byte variant (uint8 m) ran 6x slower in L2 than the others, scalar-bound.
template <typename M, typename V, typename A>
__attribute__((noinline)) void pass_range(float* __restrict p, const float* __restrict g, M* __restrict m,
                                          V* __restrict v, const A* __restrict a, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float gi = g[i], mi = load(m, i) + gi, vi = load(v, i) + gi * gi;
    const float ai = a ? load(a, i) : 0.0f;
    p[i] -= 1e-6f * mi * (vi + ai);
    store(m, i, mi);
    store(v, i, vi);
  }
}

// The projection's [begin, end): out of line for the same reason.
template <typename A>
__attribute__((noinline)) void projection_range(float* __restrict p, const A* __restrict a, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) p[i] = 0.999f * p[i] + (a ? 0.001f * load(a, i) : 0.0f);
}

// range(begin, end) over [0, n) in the kernel's split: CHUNK-element chunks, batched per thread.
template <typename Range>
void over_chunks(int64_t n, Range range) {
  using namespace spd_kernels;
  const int64_t n_chunks = (n + CHUNK - 1) / CHUNK;
  parallel_items(n_chunks, [](int64_t) { return CHUNK; }, [&](int64_t c) {
    range(c * CHUNK, std::min((c + 1) * CHUNK, n));
  });
}

// f(anchor pointer): a null float pointer for none, else the anchor's fp32 or bf16-pattern data.
template <typename F>
void with_anchor_pointer(const std::optional<at::Tensor>& a, F f) {
  if (!a) return f(static_cast<const float*>(nullptr));
  if (a->scalar_type() == at::kFloat) return f(a->data_ptr<float>());
  TORCH_CHECK(a->scalar_type() == at::kShort, "anchor: float32 or bf16 patterns as int16, got ", a->scalar_type());
  f(static_cast<const int16_t*>(a->data_ptr<int16_t>()));
}

template <typename M, typename V>
void with_anchor(at::Tensor& p, const at::Tensor& g, at::Tensor& m, at::Tensor& v, const std::optional<at::Tensor>& a) {
  float* pp = p.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  M* mp = static_cast<M*>(m.data_ptr());
  V* vp = static_cast<V*>(v.data_ptr());
  with_anchor_pointer(a, [&](auto ap) {
    over_chunks(p.numel(), [&](int64_t begin, int64_t end) { pass_range(pp, gp, mp, vp, ap, begin, end); });
  });
}

template <typename M>
void with_v(at::Tensor& p, const at::Tensor& g, at::Tensor& m, at::Tensor& v, const std::optional<at::Tensor>& a) {
  if (v.scalar_type() == at::kFloat) return with_anchor<M, float>(p, g, m, v, a);
  TORCH_CHECK(v.scalar_type() == at::kShort, "v: float32 or bf16 patterns as int16, got ", v.scalar_type());
  with_anchor<M, int16_t>(p, g, m, v, a);
}

}  // namespace

// One pass over [p, g, m, v, a] (contiguous, equal numel; p and g fp32).
void stream_pass(at::Tensor p, const at::Tensor& g, at::Tensor m, at::Tensor v, const std::optional<at::Tensor>& a) {
  TORCH_CHECK(p.scalar_type() == at::kFloat && g.scalar_type() == at::kFloat, "p and g: float32");
  for (const at::Tensor& t : {p, g, m, v})
    TORCH_CHECK(t.is_contiguous() && t.numel() == p.numel(), "every array contiguous, with p's numel");
  TORCH_CHECK(!a || (a->is_contiguous() && a->numel() == p.numel()), "anchor: contiguous, with p's numel");
  switch (m.scalar_type()) {
    case at::kFloat: return with_v<float>(p, g, m, v, a);
    case at::kShort: return with_v<int16_t>(p, g, m, v, a);
    case at::kByte: return with_v<uint8_t>(p, g, m, v, a);
    default: TORCH_CHECK(false, "m: float32, bf16 patterns as int16 or uint8 codes, got ", m.scalar_type());
  }
}

// The projection pass's floor over [p, a] (contiguous, equal numel; p fp32, a fp32, bf16 patterns
// as int16, or none).
void projection_pass(at::Tensor p, const std::optional<at::Tensor>& a) {
  TORCH_CHECK(p.scalar_type() == at::kFloat && p.is_contiguous(), "p: contiguous float32");
  TORCH_CHECK(!a || (a->is_contiguous() && a->numel() == p.numel()), "anchor: contiguous, with p's numel");
  float* pp = p.data_ptr<float>();
  with_anchor_pointer(a, [&](auto ap) {
    over_chunks(p.numel(), [&](int64_t begin, int64_t end) { projection_range(pp, ap, begin, end); });
  });
}
