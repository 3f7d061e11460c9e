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
// exp_avg_absmaxs/exp_avg_sq_absmaxs one fp32 absmax per block of 256 elements; qmaps [2, 256]
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
//                      p = q - s (q - a) (bf16/fp16: q rebuilt and rounded once)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <Python.h>

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
};

// The step's settings as the ops received them (``hyper``, lr already resolved from lr_tensor).
struct Hyper {
  double lr, beta1, beta2, eps, weight_decay, max_scale;
};

// Per-tensor scalars for step count ``count`` (already incremented); bias corrections in double.
Scalars make_scalars(double count, const Hyper& h, double inv_grad_scale) {
  const double bc1 = 1.0 - std::pow(h.beta1, count), bc2 = 1.0 - std::pow(h.beta2, count);
  return Scalars{static_cast<float>(1.0 - h.beta1), static_cast<float>(h.beta2), static_cast<float>(1.0 - h.beta2),
                 static_cast<float>(h.eps), static_cast<float>(h.lr / bc1), static_cast<float>(1.0 / std::sqrt(bc2)),
                 static_cast<float>(h.weight_decay), static_cast<float>(h.max_scale),
                 static_cast<float>(inv_grad_scale)};
}

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

struct Sums {
  double gd = 0.0, dd = 0.0, qq = 0.0;
  void add(const Sums& o) { gd += o.gd; dd += o.dd; qq += o.qq; }
};

// Adam on [begin, end): writes m, v (vmax) and, if STORE_Q, q into p; returns the
// chunk's three sums. One plain loop the compiler vectorizes (omp simd); its
// reduction order is fixed by the build, never by the thread count.
template <typename P, typename A, bool AMSGRAD, bool HAS_ANCHOR, bool STORE_Q, bool ROUND_Q = false>
__attribute__((always_inline)) inline Sums adam_chunk(P* __restrict p, const P* __restrict g, float* __restrict m, float* __restrict v,
                float* __restrict vmax, const A* __restrict a, int64_t begin, int64_t end, const Scalars& s) {
  double gd = 0.0, dd = 0.0, qq = 0.0;
  const float w1 = s.one_minus_beta1, b2 = s.beta2, w2 = s.one_minus_beta2;
  const float step_size = s.step_size, inv_sqrt_bc2 = s.inv_sqrt_bc2, eps = s.eps;
  const float inv_grad_scale = s.inv_grad_scale;  // AMP: 1/loss scale (1 without a GradScaler)
#pragma omp simd reduction(+ : gd, dd, qq)
  for (int64_t i = begin; i < end; ++i) {
    const float gi = to_float(g[i]) * inv_grad_scale;
    const float pi = to_float(p[i]);
    const float mi = m[i] + w1 * (gi - m[i]);  // torch's lerp for a weight < 0.5
    float vi = b2 * v[i] + w2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    if constexpr (AMSGRAD) {
      vi = std::max(vmax[i], vi);
      vmax[i] = vi;
    }
    float q = pi - step_size * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
    if constexpr (ROUND_Q) q = to_float(static_cast<P>(q));  // 8-bit moments: q lives in p's dtype
    float d = pi, e = q;
    if constexpr (HAS_ANCHOR) {
      const float ai = to_float(a[i]);
      d = pi - ai;
      e = q - ai;
    }
    gd += static_cast<double>(gi * d);
    dd += static_cast<double>(d * d);
    qq += static_cast<double>(e * e);
    if constexpr (STORE_Q) p[i] = static_cast<P>(q);
  }
  Sums out;
  out.gd = gd;
  out.dd = dd;
  out.qq = qq;
  return out;
}

// p = q - scale (q - a) on [begin, end); q is p itself, or (RECOMPUTE, bf16/fp16
// params) rebuilt from the old p and the new m, v so that it is rounded only once.
template <typename P, typename A, bool HAS_ANCHOR, bool RECOMPUTE>
__attribute__((always_inline)) inline void project_chunk(P* __restrict p, const float* __restrict m, const float* __restrict v, const A* __restrict a,
                   int64_t begin, int64_t end, const Scalars& s, float scale) {
  const float step_size = s.step_size, inv_sqrt_bc2 = s.inv_sqrt_bc2, eps = s.eps;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float q = to_float(p[i]);
    if constexpr (RECOMPUTE) q = q - step_size * m[i] / (std::sqrt(v[i]) * inv_sqrt_bc2 + eps);
    float target = 0.0f;
    if constexpr (HAS_ANCHOR) target = to_float(a[i]);
    p[i] = static_cast<P>(q - scale * (q - target));
  }
}

// c, |p-a|, |q-a|, r, s from a tensor's sums (the stats row layout of spd_kernels.stats).
void finalize(const Sums& sums, float weight_decay, float max_scale, float* row) {
  const double c = -sums.gd;
  const double npa = std::sqrt(sums.dd), nqa = std::sqrt(sums.qq);
  double r = 0.0, scale = 0.0;
  if (c < 0.0) {
    r = nqa > 0.0 ? std::min(std::max((nqa - npa) / nqa, 0.0), 1.0) : 0.0;
    scale = std::min(static_cast<double>(weight_decay) * r, static_cast<double>(max_scale));
  }
  row[STAT_C] = static_cast<float>(c);
  row[STAT_NORM_P_A] = static_cast<float>(npa);
  row[STAT_NORM_Q_A] = static_cast<float>(nqa);
  row[STAT_R] = static_cast<float>(r);
  row[STAT_SCALE] = static_cast<float>(scale);
}

constexpr int64_t QBLOCK = 256;  // elements per absmax block (quantization.BLOCK_SIZE)
static_assert(CHUNK % QBLOCK == 0, "chunks must start on block bounds");

// Nearest code in O(1), one table read. A float's sign, exponent and top 7 mantissa bits (the
// upper 16 bits of its magnitude, its "key") pick a bucket of values narrower than the gap
// between two midpoints of either map, so at most one midpoint lies in a bucket (build_qmaps
// checks it). entry[map][sign][key] packs the number of midpoints below the bucket's
// smallest value (bits 24-31) and, in bits 0-16, where the bucket's midpoint is: it shares
// the bucket's upper 16 bits, so "midpoint < y" is a compare of the low 16 bits of the
// magnitudes, |mid| < |y| for y > 0 and |mid| > |y| for y < 0; both become
// field < ylow with field = the midpoint's low bits (y > 0) or 0xFFFF minus them (y < 0) and
// ylow = y's low bits, flipped the same way. A bucket without a midpoint stores 0x10000,
// which no ylow exceeds. The code of y is the count below, plus one if field < ylow.
// Magnitudes under 2^-24 share the lowest bucket, which reaches down to 0 and holds no
// midpoint (the maps' smallest nonzero values are above 1e-7; build_qmaps checks it).
constexpr uint32_t KEY_MIN = 103u << 7, KEY_MAX = 0x3F80;  // |y| in [2^-24, 1]: exponent, 7 mantissa bits
constexpr int NUM_KEYS = KEY_MAX - KEY_MIN + 1;

// The two maps (0: signed, for m; 1: unsigned, for v), their midpoints (mid[k][255] = +inf
// pads the search) and the bucket table.
struct QMaps {
  float value[2][256];
  float mid[2][256];
  int32_t entry[2][2][NUM_KEYS];  // [map][sign][key - KEY_MIN]; int32 so a vector gather reads it
  // byte b of value[k][c] at plane[k][b][c]: four 256-byte tables a byte shuffle reads (dequantize)
  alignas(64) uint8_t plane[2][4][256];
};

constexpr int32_t NO_MID = 0x10000, FIELD = 0x1FFFF;

inline uint32_t float_bits(float y) {
  uint32_t bits;
  std::memcpy(&bits, &y, sizeof bits);
  return bits;
}

inline float bits_float(uint32_t bits) {
  float y;
  std::memcpy(&y, &bits, sizeof y);
  return y;
}

// The number of midpoints below y, by binary search (to build and check the table).
int count_below(float y, const float* mid) {
  int code = 0;
  for (int step = 128; step >= 1; step >>= 1) code += (mid[code + step - 1] < y) ? step : 0;
  return code;
}

void build_qmaps(const float* values, QMaps& out) {
  for (int k = 0; k < 2; ++k) {
    for (int c = 0; c < 256; ++c) out.value[k][c] = values[256 * k + c];
    for (int c = 0; c < 256; ++c)
      for (int b = 0; b < 4; ++b) out.plane[k][b][c] = static_cast<uint8_t>(float_bits(out.value[k][c]) >> (8 * b));
    for (int c = 0; c < 255; ++c) out.mid[k][c] = (out.value[k][c] + out.value[k][c + 1]) / 2.0f;
    out.mid[k][255] = std::numeric_limits<float>::infinity();
    for (int sign = 0; sign < 2; ++sign) {
      for (int key = 0; key < NUM_KEYS; ++key) {
        // the bucket's magnitudes [lo, hi]; the lowest bucket reaches down to 0, the top one is {1}
        const uint32_t bucket = KEY_MIN + static_cast<uint32_t>(key);
        const float lo = key == 0 ? 0.0f : bits_float(bucket << 16);
        const float hi = bucket == KEY_MAX ? 1.0f : bits_float((bucket << 16) | 0xFFFFu);
        const float smallest = sign ? -hi : lo, largest = sign ? -lo : hi;
        const int below = count_below(smallest, out.mid[k]);
        const int inside = count_below(largest, out.mid[k]) - below;
        TORCH_CHECK(inside <= 1, "qmaps: two midpoints of a map fall in one bucket of the quantizer");
        int32_t field = NO_MID;
        if (inside == 1) {
          const uint32_t mid_bits = float_bits(out.mid[k][below]) & 0x7FFFFFFFu;
          TORCH_CHECK((mid_bits >> 16) == bucket && key != 0, "qmaps: a midpoint below 2^-24 (or above 1)");
          field = static_cast<int32_t>(sign ? 0xFFFFu - (mid_bits & 0xFFFFu) : mid_bits & 0xFFFFu);
        }
        const int32_t entry = static_cast<int32_t>((static_cast<uint32_t>(below) << 24) | static_cast<uint32_t>(field));
        out.entry[k][sign][key] = entry;
      }
    }
  }
}

// The table for these maps: built once (the maps are constants), rebuilt if they change.
const QMaps& make_qmaps(const at::Tensor& qmaps) {
  static QMaps cached;
  static float cached_values[512];
  static bool built = false;
  static std::mutex lock;
  const float* values = qmaps.data_ptr<float>();
  std::lock_guard<std::mutex> guard(lock);
  if (!built || std::memcmp(values, cached_values, sizeof cached_values) != 0) {
    build_qmaps(values, cached);
    std::memcpy(cached_values, values, sizeof cached_values);
    built = true;
  }
  return cached;
}

// The code of y (in [-1, 1]) in map k: the number of its midpoints below y.
inline uint8_t nearest_code(float y, const QMaps& maps, int k) {
  const uint32_t bits = float_bits(y), raw_key = (bits & 0x7FFFFFFFu) >> 16, negative = bits >> 31;
  const uint32_t key = std::min(std::max(raw_key, KEY_MIN), KEY_MAX) - KEY_MIN;
  const int32_t entry = maps.entry[k][negative][key];
  const int32_t ylow = static_cast<int32_t>((bits & 0xFFFFu) ^ (negative ? 0xFFFFu : 0u));
  const int32_t code = static_cast<int32_t>(static_cast<uint32_t>(entry) >> 24) + ((entry & FIELD) < ylow ? 1 : 0);
  // the second moment (map 1): a positive value never takes the zero code
  return static_cast<uint8_t>(k == 1 && code == 0 && y > 0.0f ? 1 : code);
}

// One tensor's 8-bit moments: codes and per-block absmax.
struct Moments8 {
  uint8_t* m;
  uint8_t* v;
  float* m_absmax;
  float* v_absmax;
};

// One block's codes to fp32: out[j] = table[codes[j]] * scale (table = maps.value[k]).
inline void dequantize_block(const uint8_t* __restrict codes, int64_t len, const QMaps& maps, int k, float scale,
                             float* __restrict out) {
  const float* __restrict table = maps.value[k];
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512 vscale = _mm512_set1_ps(scale);
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
  // 64 codes at a time without a gather: each byte of the values is a 256-entry byte table,
  // read with two 128-entry byte shuffles (vpermt2b) picked by the code's top bit; the four
  // byte planes are then interleaved into 64 floats (unpacks work within 128-bit lanes,
  // so lane l of A, B, C, D holds elements 16l + 0-3, 4-7, 8-11, 12-15; shuffles gather them)
  if (len >= 64) {
    __m512i quarter[4][4];
    for (int b = 0; b < 4; ++b)
      for (int q = 0; q < 4; ++q) quarter[b][q] = _mm512_load_si512(maps.plane[k][b] + 64 * q);
    for (; j + 64 <= len; j += 64) {
      const __m512i c = _mm512_loadu_si512(codes + j);
      const __mmask64 top = _mm512_movepi8_mask(c);
      __m512i byte[4];
      for (int b = 0; b < 4; ++b)
        byte[b] = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(quarter[b][0], c, quarter[b][1]),
                                         _mm512_permutex2var_epi8(quarter[b][2], c, quarter[b][3]));
      const __m512i lo01 = _mm512_unpacklo_epi8(byte[0], byte[1]), hi01 = _mm512_unpackhi_epi8(byte[0], byte[1]);
      const __m512i lo23 = _mm512_unpacklo_epi8(byte[2], byte[3]), hi23 = _mm512_unpackhi_epi8(byte[2], byte[3]);
      const __m512i a = _mm512_unpacklo_epi16(lo01, lo23), bq = _mm512_unpackhi_epi16(lo01, lo23);
      const __m512i cq = _mm512_unpacklo_epi16(hi01, hi23), d = _mm512_unpackhi_epi16(hi01, hi23);
      const __m512i t1 = _mm512_shuffle_i32x4(a, bq, _MM_SHUFFLE(1, 0, 1, 0));
      const __m512i t2 = _mm512_shuffle_i32x4(cq, d, _MM_SHUFFLE(1, 0, 1, 0));
      const __m512i t3 = _mm512_shuffle_i32x4(a, bq, _MM_SHUFFLE(3, 2, 3, 2));
      const __m512i t4 = _mm512_shuffle_i32x4(cq, d, _MM_SHUFFLE(3, 2, 3, 2));
      const __m512i x[4] = {_mm512_shuffle_i32x4(t1, t2, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(t1, t2, _MM_SHUFFLE(3, 1, 3, 1)),
                            _mm512_shuffle_i32x4(t3, t4, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(t3, t4, _MM_SHUFFLE(3, 1, 3, 1))};
      for (int q = 0; q < 4; ++q) _mm512_storeu_ps(out + j + 16 * q, _mm512_mul_ps(_mm512_castsi512_ps(x[q]), vscale));
    }
  }
#endif
  for (; j + 16 <= len; j += 16) {
    const __m512i index = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + j)));
    _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_i32gather_ps(index, table, 4), vscale));
  }
#endif
  for (; j < len; ++j) out[j] = table[codes[j]] * scale;
}

#ifdef __AVX512F__
// The table read of the vector quantizer: 16 entries of map k's table at once.
struct GatherEntries {
  const int32_t* table;
  __m512i operator()(__m512i index) const { return _mm512_i32gather_epi32(index, table, 4); }
};
#endif

// One block's fp32 values to codes of map k: y = clamp(x * inv, -1, 1); code = midpoints below y.
// ``read`` fetches the table entries (bench/cpu_block_costs.cpp swaps it to time the rest).
template <typename Read>
inline void quantize_block_by(const float* __restrict x, int64_t len, float inv, const QMaps& maps, int k,
                              uint8_t* __restrict codes, [[maybe_unused]] Read read) {
  int64_t j = 0;
#ifdef __AVX512F__
  // the same steps as nearest_code, 16 lanes at a time (one gather: the table); |y| <= 1, so
  // the key needs no upper clamp
  const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), key_min = _mm512_set1_epi32(KEY_MIN),
                keys = _mm512_set1_epi32(NUM_KEYS), one = _mm512_set1_epi32(1), low16 = _mm512_set1_epi32(0xFFFF),
                field = _mm512_set1_epi32(FIELD), zero = _mm512_setzero_si512();
  for (; j + 16 <= len; j += 16) {
    const __m512 y = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(x + j), vinv), lo), hi);
    const __m512i bits = _mm512_castps_si512(y);
    const __mmask16 negative = _mm512_cmplt_epi32_mask(bits, zero);
    const __m512i offset = _mm512_sub_epi32(
        _mm512_max_epi32(_mm512_srli_epi32(_mm512_and_si512(bits, magnitude), 16), key_min), key_min);
    const __m512i entry = read(_mm512_mask_add_epi32(offset, negative, offset, keys));
    const __m512i ylow = _mm512_mask_xor_epi32(_mm512_and_si512(bits, low16), negative,
                                               _mm512_and_si512(bits, low16), low16);
    const __mmask16 up = _mm512_cmplt_epi32_mask(_mm512_and_si512(entry, field), ylow);
    const __m512i below = _mm512_srli_epi32(entry, 24);
    __m512i code = _mm512_mask_add_epi32(below, up, below, one);
    if (k == 1)  // the second moment: a positive value never takes the zero code
      code = _mm512_mask_max_epi32(code, _mm512_cmpgt_epi32_mask(bits, zero), code, one);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + j), _mm512_cvtepi32_epi8(code));
  }
#endif
  for (; j < len; ++j) codes[j] = nearest_code(std::min(std::max(x[j] * inv, -1.0f), 1.0f), maps, k);
}

inline void quantize_block(const float* __restrict x, int64_t len, float inv, const QMaps& maps, int k,
                           uint8_t* __restrict codes) {
#ifdef __AVX512F__
  quantize_block_by(x, len, inv, maps, k, codes, GatherEntries{&maps.entry[k][0][0]});
#else
  quantize_block_by(x, len, inv, maps, k, codes, 0);
#endif
}

inline float max_abs(const float* __restrict x, int64_t len) {
  float out = 0.0f;
#pragma omp simd reduction(max : out)
  for (int64_t j = 0; j < len; ++j) out = std::max(out, std::fabs(x[j]));
  return out;
}

// Adam on [begin, end) (begin on a block bound) with 8-bit moments, block by block:
// dequantize m and v, the fp32 step (q, kept in the param's dtype, into p; the sums), the
// blocks' new absmax, quantize. Returns the three sums.
template <typename P, typename A, bool HAS_ANCHOR>
Sums adam_chunk8(P* __restrict p, const P* __restrict g, const Moments8& mo, const A* __restrict a, int64_t begin,
                 int64_t end, const Scalars& s, const QMaps& maps) {
  Sums total;
  float m[QBLOCK], v[QBLOCK];
  for (int64_t b0 = begin; b0 < end; b0 += QBLOCK) {
    const int64_t len = std::min(QBLOCK, end - b0), blk = b0 / QBLOCK;
    dequantize_block(mo.m + b0, len, maps, 0, mo.m_absmax[blk], m);
    dequantize_block(mo.v + b0, len, maps, 1, mo.v_absmax[blk], v);
    total.add(adam_chunk<P, A, false, HAS_ANCHOR, true, true>(p + b0, g + b0, m, v, nullptr,
                                                               HAS_ANCHOR ? a + b0 : nullptr, 0, len, s));
    const float m_max = max_abs(m, len), v_max = max_abs(v, len);
    quantize_block(m, len, m_max > 0.0f ? 1.0f / m_max : 0.0f, maps, 0, mo.m + b0);
    quantize_block(v, len, v_max > 0.0f ? 1.0f / v_max : 0.0f, maps, 1, mo.v + b0);
    mo.m_absmax[blk] = m_max;
    mo.v_absmax[blk] = v_max;
  }
  return total;
}

// The 8-bit moments of a bucket's tensors (empty lists: fp32 moments).
struct Bucket8 {
  at::TensorList exp_avgs, exp_avg_sqs, m_absmaxs, v_absmaxs;
  Moments8 at(int64_t t) const {
    return Moments8{exp_avgs[t].data_ptr<uint8_t>(), exp_avg_sqs[t].data_ptr<uint8_t>(),
                    m_absmaxs[t].data_ptr<float>(), v_absmaxs[t].data_ptr<float>()};
  }
};

template <typename P, typename A, bool AMSGRAD, bool HAS_ANCHOR, bool EIGHT>
void run_bucket(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList anchors, at::TensorList steps, const Hyper& hyper,
                double inv_grad_scale, const Bucket8& eight, const QMaps* maps, float* stats) {
  const int64_t n = static_cast<int64_t>(params.size());
  // fp32 params hold q after phase 1; so do 8-bit buckets (their fp32 moments are gone after it,
  // and q is defined in the param's dtype); else q is rebuilt and rounded once
  constexpr bool STORE_Q = EIGHT || std::is_same<P, float>::value;

  std::vector<Scalars> scalars(n);
  for (int64_t t = 0; t < n; ++t) {
    float* step = steps[t].data_ptr<float>();
    const double count = static_cast<double>(*step) + 1.0;
    *step = static_cast<float>(count);
    scalars[t] = make_scalars(count, hyper, inv_grad_scale);
  }
  auto ptrs = [&](int64_t t) {
    return std::make_tuple(params[t].data_ptr<P>(), grads[t].data_ptr<P>(),
                           EIGHT ? nullptr : exp_avgs[t].data_ptr<float>(),
                           EIGHT ? nullptr : exp_avg_sqs[t].data_ptr<float>(),
                           AMSGRAD ? max_exp_avg_sqs[t].data_ptr<float>() : nullptr,
                           HAS_ANCHOR ? anchors[t].data_ptr<A>() : nullptr);
  };
  auto adam = [&](int64_t t, int64_t begin, int64_t end) {
    auto [p, g, m, v, vmax, a] = ptrs(t);
    if constexpr (EIGHT) return adam_chunk8<P, A, HAS_ANCHOR>(p, g, eight.at(t), a, begin, end, scalars[t], *maps);
    else return adam_chunk<P, A, AMSGRAD, HAS_ANCHOR, STORE_Q>(p, g, m, v, vmax, a, begin, end, scalars[t]);
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

// Split step, first half: Adam on every chunk of every tensor (steps += 1) and
// each tensor's three sums, summed over its chunks in order, into sums [n, 3].
template <typename P, typename A, bool AMSGRAD, bool HAS_ANCHOR, bool EIGHT>
void partials_bucket(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList anchors,
                     at::TensorList steps, const Hyper& hyper, double inv_grad_scale, const Bucket8& eight,
                     const QMaps* maps, double* sums) {
  const int64_t n = static_cast<int64_t>(params.size());
  // else q is rebuilt and rounded once in the project op
  constexpr bool STORE_Q = EIGHT || std::is_same<P, float>::value;
  std::vector<Scalars> scalars(n);
  for (int64_t t = 0; t < n; ++t) {
    float* step = steps[t].data_ptr<float>();
    const double count = static_cast<double>(*step) + 1.0;
    *step = static_cast<float>(count);
    scalars[t] = make_scalars(count, hyper, inv_grad_scale);
  }
  const ChunkList work = chunk_list(params, [](int64_t) { return true; });
  std::vector<Sums> partials(work.chunks.size());
  parallel_items(static_cast<int64_t>(work.chunks.size()), work.size_of(), [&](int64_t k) {
    const auto [t, begin, end] = work.chunks[k];
    const A* a = HAS_ANCHOR ? anchors[t].data_ptr<A>() : nullptr;
    if constexpr (EIGHT) {
      partials[k] = adam_chunk8<P, A, HAS_ANCHOR>(params[t].data_ptr<P>(), grads[t].data_ptr<P>(), eight.at(t), a,
                                                  begin, end, scalars[t], *maps);
    } else {
      partials[k] = adam_chunk<P, A, AMSGRAD, HAS_ANCHOR, STORE_Q>(
          params[t].data_ptr<P>(), grads[t].data_ptr<P>(), exp_avgs[t].data_ptr<float>(),
          exp_avg_sqs[t].data_ptr<float>(), AMSGRAD ? max_exp_avg_sqs[t].data_ptr<float>() : nullptr, a, begin, end,
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
template <typename P, typename A, bool AMSGRAD, bool HAS_ANCHOR, bool EIGHT>
void project_bucket(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList anchors, at::TensorList steps,
                    const double* sums, const Hyper& hyper, float* stats) {
  const int64_t n = static_cast<int64_t>(params.size());
  constexpr bool STORE_Q = EIGHT || std::is_same<P, float>::value;
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

void check_inputs(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList anchors,
                  at::TensorList steps, const Bucket8& eight, const std::optional<at::Tensor>& qmaps,
                  bool with_grads) {
  const size_t n = params.size();
  const bool eight_bit = !eight.m_absmaxs.empty();
  TORCH_CHECK(eight.m_absmaxs.size() == eight.v_absmaxs.size() && (!eight_bit || eight.m_absmaxs.size() == n), op,
              ": exp_avg_absmaxs and exp_avg_sq_absmaxs: one per tensor, or both empty (fp32 moments)");
  if (eight_bit) {
    TORCH_CHECK(max_exp_avg_sqs.empty(), op, ": amsgrad with 8-bit moments is not supported");
    TORCH_CHECK(qmaps.has_value() && qmaps->device().is_cpu() && qmaps->scalar_type() == at::kFloat &&
                    qmaps->is_contiguous() && qmaps->numel() == 512,
                op, ": 8-bit moments need qmaps, a contiguous fp32 CPU tensor of shape [2, 256]");
  }
  TORCH_CHECK((!with_grads || grads.size() == n) && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  steps.size() == n,
              op, ": params, grads, exp_avgs, exp_avg_sqs and steps must have the same length");
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
      TORCH_CHECK(t->scalar_type() == (eight_bit ? at::kByte : at::kFloat) && t->is_contiguous() &&
                      t->numel() == p.numel(),
                  op, ": moments of tensor ", i, " must be contiguous ", eight_bit ? "uint8 codes" : "fp32",
                  " of its param's size");
    if (eight_bit)
      for (const auto* t : {&eight.m_absmaxs[i], &eight.v_absmaxs[i]})
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() &&
                        t->numel() == (p.numel() + QBLOCK - 1) / QBLOCK,
                    op, ": absmax of tensor ", i, " must be contiguous fp32, one per 256 elements");
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

// Calls f(Type<P>, Type<A>, AMSGRAD, HAS_ANCHOR, EIGHT) with the storage types and switches
// of a bucket as compile-time values: one instantiation per combination (8-bit: no amsgrad).
template <typename F>
void dispatch(const char* op, at::TensorList params, at::TensorList max_exp_avg_sqs, at::TensorList anchors,
              bool eight_bit, F&& f) {
  const bool amsgrad = !max_exp_avg_sqs.empty(), anchored = !anchors.empty();
  auto switches = [&](auto p_type, auto a_type) {
    if (eight_bit && anchored) return f(p_type, a_type, std::false_type{}, std::true_type{}, std::true_type{});
    if (eight_bit) return f(p_type, a_type, std::false_type{}, std::false_type{}, std::true_type{});
    if (amsgrad && anchored) return f(p_type, a_type, std::true_type{}, std::true_type{}, std::false_type{});
    if (amsgrad) return f(p_type, a_type, std::true_type{}, std::false_type{}, std::false_type{});
    if (anchored) return f(p_type, a_type, std::false_type{}, std::true_type{}, std::false_type{});
    return f(p_type, a_type, std::false_type{}, std::false_type{}, std::false_type{});
  };
  auto anchor_type = [&](auto p_type) {
    // anchor-free buckets take the first case: their anchor type is never used
    const auto a = anchors.empty() ? at::kFloat : anchors[0].scalar_type();
    switch (a) {
      case at::kFloat: return switches(p_type, Type<float>{});
      case at::kBFloat16: return switches(p_type, Type<c10::BFloat16>{});
      case at::kHalf: return switches(p_type, Type<c10::Half>{});
      default: TORCH_CHECK(false, op, ": anchors must be fp32, bf16 or fp16, got ", a);
    }
  };
  switch (params[0].scalar_type()) {
    case at::kFloat: return anchor_type(Type<float>{});
    case at::kBFloat16: return anchor_type(Type<c10::BFloat16>{});
    case at::kHalf: return anchor_type(Type<c10::Half>{});
    default: TORCH_CHECK(false, op, ": params must be fp32, bf16 or fp16, got ", params[0].scalar_type());
  }
}

#define SPD_TYPES(p_type, a_type, ams, anc, eig) \
  using P = typename decltype(p_type)::type;      \
  using A = typename decltype(a_type)::type;      \
  constexpr bool AMS = decltype(ams)::value;      \
  constexpr bool ANC = decltype(anc)::value;      \
  constexpr bool EIG = decltype(eig)::value

at::Tensor adam_spd_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList anchors,
                         at::TensorList steps, at::TensorList exp_avg_absmaxs, at::TensorList exp_avg_sq_absmaxs,
                         const std::optional<at::Tensor>& qmaps, at::ArrayRef<double> hyper, double inv_grad_scale,
                         const std::optional<at::Tensor>& lr_tensor) {
  const Bucket8 eight{exp_avgs, exp_avg_sqs, exp_avg_absmaxs, exp_avg_sq_absmaxs};
  check_inputs("adam_spd_step", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, eight, qmaps,
               true);
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor stats = at::empty({n, NUM_STATS}, at::TensorOptions().dtype(at::kFloat));
  if (n == 0) return stats;
  float* out = stats.data_ptr<float>();
  const Hyper h = read_hyper("adam_spd_step", hyper, lr_tensor);
  const bool eight_bit = !exp_avg_absmaxs.empty();
  const QMaps* maps = eight_bit ? &make_qmaps(*qmaps) : nullptr;
  dispatch("adam_spd_step", params, max_exp_avg_sqs, anchors, eight_bit,
           [&](auto p_type, auto a_type, auto ams, auto anc, auto eig) {
    SPD_TYPES(p_type, a_type, ams, anc, eig);
    run_bucket<P, A, AMS, ANC, EIG>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, h,
                                    inv_grad_scale, eight, maps, out);
  });
  return stats;
}

void adam_spd_partials(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList anchors,
                       at::TensorList steps, at::TensorList exp_avg_absmaxs, at::TensorList exp_avg_sq_absmaxs,
                       const std::optional<at::Tensor>& qmaps, at::ArrayRef<double> hyper, double inv_grad_scale,
                       const at::Tensor& sums, const std::optional<at::Tensor>& lr_tensor) {
  const Bucket8 eight{exp_avgs, exp_avg_sqs, exp_avg_absmaxs, exp_avg_sq_absmaxs};
  check_inputs("adam_spd_partials", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, eight,
               qmaps, true);
  const int64_t n = static_cast<int64_t>(params.size());
  check_sums("adam_spd_partials", sums, n);
  if (n == 0) return;
  double* out = sums.data_ptr<double>();
  const Hyper h = read_hyper("adam_spd_partials", hyper, lr_tensor);
  const bool eight_bit = !exp_avg_absmaxs.empty();
  const QMaps* maps = eight_bit ? &make_qmaps(*qmaps) : nullptr;
  dispatch("adam_spd_partials", params, max_exp_avg_sqs, anchors, eight_bit,
           [&](auto p_type, auto a_type, auto ams, auto anc, auto eig) {
    SPD_TYPES(p_type, a_type, ams, anc, eig);
    partials_bucket<P, A, AMS, ANC, EIG>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, h,
                                         inv_grad_scale, eight, maps, out);
  });
}

at::Tensor adam_spd_project(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList max_exp_avg_sqs, at::TensorList anchors, at::TensorList steps,
                            at::TensorList exp_avg_absmaxs, at::TensorList exp_avg_sq_absmaxs,
                            const std::optional<at::Tensor>& qmaps, const at::Tensor& sums,
                            at::ArrayRef<double> hyper, const std::optional<at::Tensor>& lr_tensor) {
  const Bucket8 eight{exp_avgs, exp_avg_sqs, exp_avg_absmaxs, exp_avg_sq_absmaxs};
  check_inputs("adam_spd_project", params, {}, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, eight, qmaps,
               false);
  const int64_t n = static_cast<int64_t>(params.size());
  check_sums("adam_spd_project", sums, n);
  at::Tensor stats = at::empty({n, NUM_STATS}, at::TensorOptions().dtype(at::kFloat));
  if (n == 0) return stats;
  const double* in = sums.data_ptr<double>();
  float* out = stats.data_ptr<float>();
  const Hyper h = read_hyper("adam_spd_project", hyper, lr_tensor);
  dispatch("adam_spd_project", params, max_exp_avg_sqs, anchors, !exp_avg_absmaxs.empty(),
           [&](auto p_type, auto a_type, auto ams, auto anc, auto eig) {
    SPD_TYPES(p_type, a_type, ams, anc, eig);
    project_bucket<P, A, AMS, ANC, EIG>(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, steps, in, h, out);
  });
  return stats;
}

#undef SPD_TYPES

}  // namespace

TORCH_LIBRARY(spd_kernels, m) {
  m.def(
      "adam_spd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor[] anchors, Tensor(e!)[] steps, Tensor(f!)[] exp_avg_absmaxs, "
      "Tensor(g!)[] exp_avg_sq_absmaxs, Tensor? qmaps, float[] hyper, float inv_grad_scale, "
      "Tensor? lr_tensor=None) -> Tensor");
  m.def(
      "adam_spd_partials(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor[] anchors, Tensor(e!)[] steps, Tensor(f!)[] exp_avg_absmaxs, "
      "Tensor(g!)[] exp_avg_sq_absmaxs, Tensor? qmaps, float[] hyper, float inv_grad_scale, "
      "Tensor(h!) sums, Tensor? lr_tensor=None) -> ()");
  m.def(
      "adam_spd_project(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor[] max_exp_avg_sqs, "
      "Tensor[] anchors, Tensor[] steps, Tensor[] exp_avg_absmaxs, Tensor[] exp_avg_sq_absmaxs, Tensor? qmaps, "
      "Tensor sums, float[] hyper, Tensor? lr_tensor=None) -> Tensor");
  m.def("hyperparameter_names() -> str[]", &hyperparameter_names);
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
