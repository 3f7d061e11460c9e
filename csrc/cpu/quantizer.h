// 8-bit moments: the maps' bucket table, blockwise dequantize and quantize, and the 8-bit
// chunk step (spd_kernels/quantization.py is the reference rule).
#pragma once

#include "math.h"

namespace spd_kernels {
namespace {


// A whole block's length as a type: the loops of a block called with it have a constant length
// (no remainder; plain loads, where a masked load from memory is slow).
using WholeBlock = std::integral_constant<int64_t, QBLOCK>;

// f(b0, len) for the blocks of [begin, end) (begin on a block bound): len is WholeBlock for the
// whole ones, the int64_t count for a last partial one.
template <typename F>
__attribute__((always_inline)) inline void for_each_block(int64_t begin, int64_t end, F f) {
  int64_t b0 = begin;
  for (; b0 + QBLOCK <= end; b0 += QBLOCK) f(b0, WholeBlock{});
  if (b0 < end) f(b0, end - b0);
}

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

}  // namespace
}  // namespace spd_kernels
