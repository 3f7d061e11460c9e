// What one 256-element block of the 8-bit CPU step costs, part by part (bench/cpu_block_costs.py).
// Built from the kernel's own headers (csrc/cpu/), so every part is the code the step runs;
// one thread, data in L1/L2, so the figures are compute costs, not memory ones.
#include "cpu/coded_step.h"

#include <chrono>

namespace spd_kernels {
namespace {

// quantize_block with its one table read replaced by a two-register shuffle: the codes are
// wrong; what is left is the cost of everything around the read (a lower bound for any
// quantizer that keeps these steps).
void quantize_without_table_read(const float* __restrict x, int64_t len, float inv, const QMaps& maps, int k,
                                 uint8_t* __restrict codes) {
#ifdef __AVX512F__
  const int32_t* table = &maps.entry[k][0][0];
  const __m512i t0 = _mm512_loadu_si512(table + NUM_KEYS - 32), t1 = _mm512_loadu_si512(table + NUM_KEYS - 16);
  quantize_block_by(x, len, inv, maps, k, codes, [&](__m512i index) { return _mm512_permutex2var_epi32(t0, index, t1); });
#else
  quantize_block(x, len, inv, maps, k, codes);
#endif
}

// The update's sqrt and divide alone, as avx512_steps.h's update32 issues them (one of each per
// 16 lanes): out = (step_size m) / fma(sqrt(v), 1 / sqrt(bc2), eps). They run on the divider,
// which no other instruction of the step uses: its time here is a floor under the whole step's.
void divider_alone(const float* __restrict m, const float* __restrict v, int64_t n, const Scalars& s,
                   float* __restrict out) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 step_size = _mm512_set1_ps(s.step_size), c = _mm512_set1_ps(s.inv_sqrt_bc2), eps = _mm512_set1_ps(s.eps);
  for (; i + 16 <= n; i += 16) {
    const __m512 denom = _mm512_fmadd_ps(_mm512_sqrt_ps(_mm512_loadu_ps(v + i)), c, eps);
    _mm512_storeu_ps(out + i, _mm512_div_ps(_mm512_mul_ps(step_size, _mm512_loadu_ps(m + i)), denom));
  }
#endif
  for (; i < n; ++i) out[i] = s.step_size * m[i] / (std::sqrt(v[i]) * s.inv_sqrt_bc2 + s.eps);
}

}  // namespace
}  // namespace spd_kernels

// ns per element of part `part` over the blocks of m (normalized first moments), v (second),
// repeated `reps` times. Parts: 0 dequantize m, 1 dequantize v, 2 quantize m, 3 quantize v,
// 4 and 5 the same without the table read, 6 the fp32 Adam update (bf16 anchors, q rounded to
// fp32 p, the three sums), 7 the whole 8-bit block (adam_chunk8: the update also reduces the
// blocks' absmax), 8 fp8 decode of m, 9 fp8 encode of m (absmax known), 10 the whole step with
// bf16 m and v, 11 with fp8 m and bf16 v (adam_chunk_coded), 12 the update's sqrt and divide alone.
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
  std::vector<uint8_t> m8(n);
  std::vector<uint16_t> mb(n), vb(n);
  std::vector<float> m8_scale(n / B);
  for (int64_t i = 0; i < n; ++i) {  // m and v as bf16 (v from the normalized v, scaled like a step's)
    mb[i] = static_cast<uint16_t>(float_bits(1e-3f * xm[i]) >> 16);
    vb[i] = static_cast<uint16_t>(float_bits(1e-6f * xv[i]) >> 16);
  }
  for (int64_t b = 0; b < n; b += B) {
    for (int64_t j = 0; j < B; ++j) out[b + j] = 1e-3f * xm[b + j];
    FP8Format::finish<0>(MomentView{m8.data(), m8_scale.data()}, b, B, out.data() + b, 1e-3f, nullptr);
  }
  const MomentView m8_view{m8.data(), m8_scale.data()}, mb_view{mb.data(), nullptr}, vb_view{vb.data(), nullptr};
  const Scalars s = make_scalars(10.0, Hyper{1e-3, 0.9, 0.999, 1e-8, 1.0, 1e9}, 1.0);
  double sink = 0.0;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < reps; ++r) {
    if (part == 12) {  // over the whole n at once, as the steps' loops run
      divider_alone(mw.data(), vw.data(), n, s, out.data());
      sink += out[r % n];
      continue;
    }
    if (part >= 10) {  // the whole steps as the kernel calls them: one call over a chunk of n elements
      if (part == 10)
        sink += adam_chunk_coded<float, c10::BFloat16, true, BF16Format, BF16Format>(p.data(), g.data(), mb_view, vb_view,
                                                                                    a.data(), 0, n, s, nullptr).gd;
      else
        sink += adam_chunk_coded<float, c10::BFloat16, true, FP8Format, BF16Format>(p.data(), g.data(), m8_view, vb_view,
                                                                                   a.data(), 0, n, s, nullptr).gd;
      continue;
    }
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
              p.data() + b, g.data() + b, F32Moment{mw.data() + b}, F32Moment{vw.data() + b}, nullptr, a.data() + b, 0,
              B, s).gd;
          break;
        case 7:
          sink += adam_chunk8<float, c10::BFloat16, true>(p.data() + b, g.data() + b, mo, a.data() + b, 0, B, s, maps).gd;
          break;
        case 8: FP8Format::moment<0>(m8_view, b, B, out.data() + b, 0, nullptr); break;
        default: FP8Format::finish<0>(m8_view, b, B, mw.data() + b, 1.0f, nullptr);  // part 9
      }
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return seconds / static_cast<double>(reps * n) * 1e9 + (sink == 1234.5 ? 1e-30 : 0.0);
}
