// The kernels for 32-bit m and v (amsgrad too) (csrc/cpu/bucket_call.h says why a file a pair).
#include "../cpu/format_pair.h"

void spd_kernels::run_f32_f32(const BucketCall& call) { run_format_pair<F32Format, F32Format>(call); }
