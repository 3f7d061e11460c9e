#!/usr/bin/env bash
# The one command a session with a GPU machine runs (from the source tree, no install):
# the GPU tests, the verify table, the GPU timings and the benchmark report.
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
timeout 120 python3 bench/gpu_check.py --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log" | tail -40 || rc=1
timeout 170 python3 -m spd_kernels bench --out "$OUT/bench" 2>&1 | grep -v "it/s\]" | tee "$OUT/bench.log" | tail -30 || rc=1
exit $rc
