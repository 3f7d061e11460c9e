// What one 256-element block of the 8-bit CPU step costs, part by part (bench/cpu_block_costs.py).
// Compiled together with the kernel's own source, so every part is the code the step runs;
// one thread, data in L1/L2, so the figures are compute costs, not memory ones.
#include "adam_spd_cpu.cpp"

#include <chrono>

namespace spd_kernels {
namespace {

// quantize_block with its one table read replaced by a two-register shuffle: the codes are
// wrong; what is left is the cost of everything around the read (a lower bound for any
// quantizer that keeps these steps).
void quantize_without_table_read(const float* __restrict x, int64_t len, float inv, const QMaps& maps, int k,
                                 uint8_t* __restrict codes) {
#ifdef __AVX512F__
  const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), key_min = _mm512_set1_epi32(KEY_MIN),
                keys = _mm512_set1_epi32(NUM_KEYS), one = _mm512_set1_epi32(1), low16 = _mm512_set1_epi32(0xFFFF),
                field = _mm512_set1_epi32(FIELD), zero = _mm512_setzero_si512();
  const int32_t* table = &maps.entry[k][0][0];
  const __m512i t0 = _mm512_loadu_si512(table + NUM_KEYS - 32), t1 = _mm512_loadu_si512(table + NUM_KEYS - 16);
  for (int64_t j = 0; j + 16 <= len; j += 16) {
    const __m512 y = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(x + j), vinv), lo), hi);
    const __m512i bits = _mm512_castps_si512(y);
    const __mmask16 negative = _mm512_cmplt_epi32_mask(bits, zero);
    const __m512i offset = _mm512_sub_epi32(
        _mm512_max_epi32(_mm512_srli_epi32(_mm512_and_si512(bits, magnitude), 16), key_min), key_min);
    const __m512i entry = _mm512_permutex2var_epi32(t0, _mm512_mask_add_epi32(offset, negative, offset, keys), t1);
    const __m512i ylow = _mm512_mask_xor_epi32(_mm512_and_si512(bits, low16), negative,
                                               _mm512_and_si512(bits, low16), low16);
    const __mmask16 up = _mm512_cmplt_epi32_mask(_mm512_and_si512(entry, field), ylow);
    const __m512i below = _mm512_srli_epi32(entry, 24);
    __m512i code = _mm512_mask_add_epi32(below, up, below, one);
    if (k == 1) code = _mm512_mask_max_epi32(code, _mm512_cmpgt_epi32_mask(bits, zero), code, one);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + j), _mm512_cvtepi32_epi8(code));
  }
#else
  quantize_block(x, len, inv, maps, k, codes);
#endif
}

}  // namespace
}  // namespace spd_kernels

// ns per element of part `part` over the blocks of m (normalized first moments), v (second),
// repeated `reps` times. Parts: 0 dequantize m, 1 dequantize v, 2 quantize m, 3 quantize v,
// 4 and 5 the same without the table read, 6 the fp32 Adam update (bf16 anchors, q rounded to
// fp32 p, the three sums), 7 block absmax of m and v, 8 the whole 8-bit block (adam_chunk8).
double block_cost(const at::Tensor& qmaps, const at::Tensor& m, const at::Tensor& v, int64_t part, int64_t reps) {
  using namespace spd_kernels;
  constexpr int64_t B = QBLOCK;
  const QMaps& maps = make_qmaps(qmaps);
  const int64_t n = m.numel();
  const float *xm = m.data_ptr<float>(), *xv = v.data_ptr<float>();
  std::vector<uint8_t> cm(n), cv(n);
  std::vector<float> out(n), p(n, 0.01f), g(n), mw(xm, xm + n), vw(xv, xv + n), am(n / B, 1e-3f), av(n / B, 1e-6f);
  std::vector<c10::BFloat16> a(n, c10::BFloat16(0.011f));
  for (int64_t i = 0; i < n; ++i) g[i] = 1e-3f * xm[i];
  for (int64_t b = 0; b < n; b += B) {
    quantize_block(xm + b, B, 1.0f, maps, 0, cm.data() + b);
    quantize_block(xv + b, B, 1.0f, maps, 1, cv.data() + b);
  }
  const Moments8 mo{cm.data(), cv.data(), am.data(), av.data()};
  const Scalars s = make_scalars(10.0, Hyper{1e-3, 0.9, 0.999, 1e-8, 1.0, 1e9}, 1.0);
  double sink = 0.0;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < reps; ++r) {
    for (int64_t b = 0; b < n; b += B) {
      switch (part) {
        case 0: dequantize_block(cm.data() + b, B, maps, 0, 1.0f, out.data() + b); break;
        case 1: dequantize_block(cv.data() + b, B, maps, 1, 1.0f, out.data() + b); break;
        case 2: quantize_block(xm + b, B, 1.0f, maps, 0, cm.data() + b); break;
        case 3: quantize_block(xv + b, B, 1.0f, maps, 1, cv.data() + b); break;
        case 4: quantize_without_table_read(xm + b, B, 1.0f, maps, 0, cm.data() + b); break;
        case 5: quantize_without_table_read(xv + b, B, 1.0f, maps, 1, cv.data() + b); break;
        case 6:
          sink += adam_chunk<float, c10::BFloat16, false, true, true, true>(
                      p.data() + b, g.data() + b, mw.data() + b, vw.data() + b, nullptr, a.data() + b, 0, B, s).gd;
          break;
        case 7: sink += max_abs(xm + b, B) + max_abs(xv + b, B); break;
        default: sink += adam_chunk8<float, c10::BFloat16, true>(p.data() + b, g.data() + b, mo, a.data() + b, 0, B, s,
                                                                 maps).gd;
      }
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return seconds / static_cast<double>(reps * n) * 1e9 + (sink == 1234.5 ? 1e-30 : 0.0);
}
