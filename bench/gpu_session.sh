#!/usr/bin/env bash
# The one command a session with a GPU machine runs (from the source tree, no install):
# the GPU tests, the verify table (every moment format), the benchmark report with the
# state-format lines (bf16 anchors, bf16 moments, fp8 + bf16 moments, 8-bit), kernels-only, split-step and CUDA-graph lines, and the size and
# count sweeps. Parts run in that order (what matters most first), each under its own
# time limit; the limits add up to 510 s, so the whole fits one 600 s device call. The
# sweeps start no new point once their budget is spent and rewrite their files after
# every point, so a cut-short sweep still brings back what it measured.
#   OUT=results-folder bash bench/gpu_session.sh
set -u -o pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT/bench" "$OUT/sweep"
export PYTHONPATH=.
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/cuda_tests.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/cuda_tests.log"
rc=0
part() {  # part SECONDS LOG command...: run under a time limit, keep the whole log, show its tail
  local limit=$1 log=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep --line-buffered -v "it/s\]" >> "$log"
  local status=${PIPESTATUS[0]}
  echo "[$* : exit $status after $((SECONDS - start)) s of $limit]" >> "$log"
  tail -25 "$log"
  [ "$status" -eq 0 ] || rc=1
}
part 150 "$OUT/cuda_tests.log" python3 -m pytest -m cuda -q -p no:cacheprovider
part 60 "$OUT/verify.log" python3 -m spd_kernels verify
part 170 "$OUT/bench.log" python3 -m spd_kernels bench --kernels-only --cuda-graph --state-formats --fresh-grads \
  --out "$OUT/bench"
# the scaling report's GPU sweeps (spd_kernels/bench/sweep.py)
part 75 "$OUT/sweep-size.log" python3 -m spd_kernels bench --sweep size --budget-s 40 --out "$OUT/sweep"
part 55 "$OUT/sweep-count.log" python3 -m spd_kernels bench --sweep count --budget-s 25 --out "$OUT/sweep"
exit $rc
