// The kernels for fp8 m (e4m3 blocks), 32-bit v (csrc/cpu/bucket_call.h says why a file a pair).
#include "../cpu/format_pair.h"

namespace spd_kernels {
[[maybe_unused]] const bool fp8_f32_registered =
    register_pair(MomentFormat::FP8, MomentFormat::F32, &run_format_pair<FP8Format, F32Format>);
}  // namespace spd_kernels
