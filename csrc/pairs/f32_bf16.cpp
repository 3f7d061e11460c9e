// The kernels for 32-bit m, bf16 v (csrc/cpu/bucket_call.h says why a file a pair).
#include "../cpu/format_pair.h"

namespace spd_kernels {
[[maybe_unused]] const bool f32_bf16_registered =
    register_pair(MomentFormat::F32, MomentFormat::BF16, &run_format_pair<F32Format, BF16Format>);
}  // namespace spd_kernels
