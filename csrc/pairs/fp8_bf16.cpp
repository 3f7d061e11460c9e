// The kernels for fp8 m (e4m3 blocks), bf16 v (csrc/cpu/bucket_call.h says why a file a pair).
#include "../cpu/format_pair.h"

namespace spd_kernels {
[[maybe_unused]] const bool fp8_bf16_registered =
    register_pair(MomentFormat::FP8, MomentFormat::BF16, &run_format_pair<FP8Format, BF16Format>);
}  // namespace spd_kernels
