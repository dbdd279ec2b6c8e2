#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 6, batch-1 decode), after x1_gemv.sh found the
# GEMV path 0.3 ms slower per step than cuBLAS: GPU tests of the path, the projections
# again with larger K tiles (where down_proj and gate_up had lost), and the offline
# batch-1 step with the path on and off in one process.
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_gemv_configs.sh", timeout_s=400)
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=10 step gpu_tests 120 python -m pytest -q -rs tests/test_gemv.py
STEP_TAIL=8 step gemv_kernels 120 python -m benchmarks.gpu_decode_kernels --parts gemv \
  --out "$OUT/gpu_gemv_kernels_h200_configs.json"
STEP_TAIL=8 step offline_gemv 150 python -m benchmarks.offline --batches 1:1024 \
  --steps 16 --compare-gemv --prefill-tokens 512 \
  --out "$OUT/offline_h200_gemv_configs.json"
ls -la "$OUT"
