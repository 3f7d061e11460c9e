// The kernels for bf16 m, 32-bit v (csrc/cpu/bucket_call.h says why a file a pair).
#include "../cpu/format_pair.h"

void spd_kernels::run_bf16_f32(const BucketCall& call) { run_format_pair<BF16Format, F32Format>(call); }
