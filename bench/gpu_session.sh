#!/usr/bin/env bash
# The one command a session with a GPU machine runs (from the source tree, no install):
# the GPU tests, the verify table, and the benchmark report with the state-format
# (bf16 anchors, 8-bit moments), kernels-only, split-step and CUDA-graph lines, and the
# size and count sweeps.
#   OUT=results-folder bash bench/gpu_session.sh
set -u -o pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT/bench"
export PYTHONPATH=.
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/cuda_tests.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/cuda_tests.log"
rc=0
timeout 200 python3 -m pytest -m cuda -q -p no:cacheprovider 2>&1 | tee -a "$OUT/cuda_tests.log" | tail -25 || rc=1
timeout 60 python3 -m spd_kernels verify 2>&1 | tee "$OUT/verify.log" | tail -12 || rc=1
timeout 300 python3 -m spd_kernels bench --kernels-only --cuda-graph --state-formats --fresh-grads --out "$OUT/bench" 2>&1 | grep -v "it/s\]" | tee "$OUT/bench.log" | tail -40 || rc=1
# the scaling report's GPU sweeps (spd_kernels/sweep.py)
timeout 200 python3 -m spd_kernels bench --sweep size --out "$OUT/sweep" 2>&1 | grep -v "it/s\]" | tee "$OUT/sweep-size.log" | tail -12 || rc=1
timeout 200 python3 -m spd_kernels bench --sweep count --out "$OUT/sweep" 2>&1 | grep -v "it/s\]" | tee "$OUT/sweep-count.log" | tail -12 || rc=1
exit $rc
