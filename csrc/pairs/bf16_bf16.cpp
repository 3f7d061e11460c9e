// The kernels for bf16 m and v (csrc/cpu/bucket_call.h says why a file a pair).
#include "../cpu/format_pair.h"

void spd_kernels::run_bf16_bf16(const BucketCall& call) { run_format_pair<BF16Format, BF16Format>(call); }
