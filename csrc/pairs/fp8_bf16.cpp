// The kernels for fp8 m (e4m3 blocks), bf16 v (csrc/cpu/bucket_call.h says why a file a pair).
#include "../cpu/format_pair.h"

void spd_kernels::run_fp8_bf16(const BucketCall& call) { run_format_pair<FP8Format, BF16Format>(call); }
