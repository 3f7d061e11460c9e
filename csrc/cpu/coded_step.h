// The chunk step over coded moments: the generic loop (math.h's adam_chunk with the formats'
// moment objects, block by block for the block formats), or, where the CPU has AVX-512 BF16,
// the steps written out for fp32 params with a bf16 second moment (avx512_steps.h).
//
// A chunk with a block format goes block by block: the block's moment decoded into an fp32
// buffer (L1), the fp32 step of math.h (q, kept in p's dtype, into p; the sums) on it, which
// also reduces the new values' absmax, then the block encoded from the buffer. fp32 and bf16
// moments need no buffer: they are one pass. (Decoding fp8 inside the step's loop measured
// slower: its 1-byte loads make the compiler unroll 64 wide and spill the sums; the AVX-512
// step decodes in registers.)
#pragma once

#include "avx512_steps.h"
#include "formats.h"

namespace spd_kernels {
namespace {

#ifdef SPD_KERNELS_AVX512_STEPS
// run(into, grads_scaled) with the AVX-512 steps' two runtime choices (the prefetch_level now, and
// whether grads are scaled) as compile-time constants
template <typename Run>
Sums dispatch_step(bool grads_scaled, Run run) {
  const bool into_l2 = prefetch_level.load(std::memory_order_relaxed) == static_cast<int>(PrefetchInto::L2);
  using L1 = std::integral_constant<PrefetchInto, PrefetchInto::L1>;
  using L2 = std::integral_constant<PrefetchInto, PrefetchInto::L2>;
  if (into_l2) return grads_scaled ? run(L2{}, std::true_type{}) : run(L2{}, std::false_type{});
  return grads_scaled ? run(L1{}, std::true_type{}) : run(L1{}, std::false_type{});
}
#endif

// Adam on [begin, end) (begin on a block bound) with moments in formats MF and VF: one pass over
// the chunk for fp32 and bf16 moments; block by block where a moment is BLOCKED (the step, q kept
// in the param's dtype into p, the sums, the block's absmax; then that block's encode, in L1).
// ``offset``: where this tensor starts in its whole tensor (a shard's start), for the rounding bits.
template <typename P, typename A, bool HAS_ANCHOR, typename MF, typename VF>
Sums adam_chunk_coded(P* __restrict p, const P* __restrict g, MomentView m, MomentView v, const A* __restrict a,
                      int64_t begin, int64_t end, const Scalars& s, const QMaps* maps, int64_t offset = 0) {
  const uint32_t m_key = rounding_key(s.step, 0), v_key = rounding_key(s.step, 1);
#ifdef SPD_KERNELS_AVX512_STEPS
  // fp32 params, bf16 v, bf16 or fp8 m: the steps written out in AVX-512 (avx512_steps.h)
  constexpr bool BY_HAND = std::is_same<P, float>::value && std::is_same<VF, BF16Format>::value &&
                           (!HAS_ANCHOR || std::is_same<A, float>::value || std::is_same<A, c10::BFloat16>::value);
  // without a grad scale the multiply by 1 / grad_scale is skipped (by 1: the same bits)
  if constexpr (BY_HAND && std::is_same<MF, BF16Format>::value) {
    uint16_t *mc = static_cast<uint16_t*>(m.codes), *vc = static_cast<uint16_t*>(v.codes);
    auto run = [&](auto into, auto grads_scaled) {
      return adam_chunk_bf16<decltype(into)::value, A, HAS_ANCHOR, decltype(grads_scaled)::value>(
          p, g, mc, vc, a, begin, end, s, v_key, offset);
    };
    return dispatch_step(s.inv_grad_scale != 1.0f, run);
  }
  if constexpr (BY_HAND && std::is_same<MF, FP8Format>::value) {
    uint16_t* vc = static_cast<uint16_t*>(v.codes);
    auto run = [&](auto into, auto grads_scaled) {
      return adam_chunk_fp8_bf16<decltype(into)::value, A, HAS_ANCHOR, decltype(grads_scaled)::value>(
          p, g, m, vc, a, begin, end, s, v_key, offset);
    };
    return dispatch_step(s.inv_grad_scale != 1.0f, run);
  }
#endif
  if constexpr (!MF::BLOCKED && !VF::BLOCKED) {
    return adam_chunk<P, A, false, HAS_ANCHOR, true, true>(p, g, MF::template moment<0>(m, 0, end, nullptr, m_key, maps),
                                                           VF::template moment<1>(v, 0, end, nullptr, v_key, maps), nullptr,
                                                           a, begin, end, s, offset);
  }
  Sums total;
  alignas(64) float mbuf[QBLOCK], vbuf[QBLOCK];
  auto block = [&](int64_t b0, auto len) __attribute__((always_inline)) {
    const Sums sums = adam_chunk<P, A, false, HAS_ANCHOR, true, true>(
        p + b0, g + b0, MF::template moment<0>(m, b0, len, mbuf, m_key, maps),
        VF::template moment<1>(v, b0, len, vbuf, v_key, maps), nullptr, HAS_ANCHOR ? a + b0 : nullptr, 0, len, s,
        offset + b0);
    total.add(sums);
    MF::template finish<0>(m, b0, len, mbuf, sums.m_absmax, maps);
    VF::template finish<1>(v, b0, len, vbuf, sums.v_absmax, maps);
  };
  for_each_block(begin, end, block);
  return total;
}

// The 8-bit step of one chunk (bench/cpu_block_costs.cpp times it).
template <typename P, typename A, bool HAS_ANCHOR>
Sums adam_chunk8(P* __restrict p, const P* __restrict g, const Moments8& mo, const A* __restrict a, int64_t begin,
                 int64_t end, const Scalars& s, const QMaps& maps) {
  return adam_chunk_coded<P, A, HAS_ANCHOR, Bnb8Format, Bnb8Format>(p, g, MomentView{mo.m, mo.m_absmax},
                                                                    MomentView{mo.v, mo.v_absmax}, a, begin, end, s,
                                                                    &maps);
}

}  // namespace
}  // namespace spd_kernels
