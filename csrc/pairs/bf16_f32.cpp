// The kernels for bf16 m, 32-bit v (csrc/cpu/bucket_call.h says why a file a pair).
#include "../cpu/format_pair.h"

namespace spd_kernels {
[[maybe_unused]] const bool bf16_f32_registered =
    register_pair(MomentFormat::BF16, MomentFormat::F32, &run_format_pair<BF16Format, F32Format>);
}  // namespace spd_kernels
