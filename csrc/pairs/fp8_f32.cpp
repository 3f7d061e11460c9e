// The kernels for fp8 m (e4m3 blocks), 32-bit v (csrc/cpu/bucket_call.h says why a file a pair).
#include "../cpu/format_pair.h"

void spd_kernels::run_fp8_f32(const BucketCall& call) { run_format_pair<FP8Format, F32Format>(call); }
