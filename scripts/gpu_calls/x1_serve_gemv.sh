#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 6, batch-1 decode): router + one 8B worker, one
# stream of 1000/1000 (every decode step one row), with the GEMV path (default) and with
# --no-gemv-decode, back to back; start-up time includes the GEMV autotuning.
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_serve_gemv.sh", timeout_s=300)
set -u
source scripts/gpu_calls/steps.sh
for mode in gemv no_gemv; do
  extra=""; [ "$mode" = no_gemv ] && extra="--no-gemv-decode"
  STEP_TAIL=3 step "serve_$mode" 120 python -m benchmarks.gpu_serve --shapes 1000:1000 \
    --concurrency 1 --hf-concurrency "" \
    --serve-args "--max-num-batched-tokens 8192 $extra" --out "$OUT/gpu_serve_b1_$mode.json"
done
ls -la "$OUT"
