// The kernels for bf16 m and v (csrc/cpu/bucket_call.h says why a file a pair).
#include "../cpu/format_pair.h"

namespace spd_kernels {
[[maybe_unused]] const bool bf16_bf16_registered =
    register_pair(MomentFormat::BF16, MomentFormat::BF16, &run_format_pair<BF16Format, BF16Format>);
}  // namespace spd_kernels
