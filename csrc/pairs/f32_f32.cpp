// The kernels for 32-bit m and v (amsgrad too) (csrc/cpu/bucket_call.h says why a file a pair).
#include "../cpu/format_pair.h"

namespace spd_kernels {
[[maybe_unused]] const bool f32_f32_registered =
    register_pair(MomentFormat::F32, MomentFormat::F32, &run_format_pair<F32Format, F32Format>);
}  // namespace spd_kernels
