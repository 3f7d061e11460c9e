// The kernels for bitsandbytes' blockwise 8-bit m and v (csrc/cpu/bucket_call.h says why a file a pair).
#include "../cpu/format_pair.h"

namespace spd_kernels {
[[maybe_unused]] const bool bnb8_bnb8_registered =
    register_pair(MomentFormat::BNB8, MomentFormat::BNB8, &run_format_pair<Bnb8Format, Bnb8Format>);
}  // namespace spd_kernels
