// The kernels for 32-bit m, bf16 v (csrc/cpu/bucket_call.h says why a file a pair).
#include "../cpu/format_pair.h"

void spd_kernels::run_f32_bf16(const BucketCall& call) { run_format_pair<F32Format, BF16Format>(call); }
