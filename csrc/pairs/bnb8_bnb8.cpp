// The kernels for bitsandbytes' blockwise 8-bit m and v (csrc/cpu/bucket_call.h says why a file a pair).
#include "../cpu/format_pair.h"

void spd_kernels::run_bnb8_bnb8(const BucketCall& call) { run_format_pair<Bnb8Format, Bnb8Format>(call); }
