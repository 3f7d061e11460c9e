import os

import torch

# Without a GPU the Triton kernels run under the interpreter on CPU tensors.
# Triton reads this when a kernel is defined, so it must be set before any
# test imports spd_kernels.ops.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=False)
settings.load_profile("ci")
