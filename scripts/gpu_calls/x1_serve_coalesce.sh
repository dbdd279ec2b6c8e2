#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 6, serving): router + one 8B worker at 64 and 256
# streams, 1000/1000, with per-request outputs that queued up while the worker's event
# loop was busy merged into one stream message (engine/worker.py), against the numbers in
# gpu_serve_h200_staged.json (same shapes, one message per token).
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_serve_coalesce.sh", timeout_s=400)
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=4 step serve_coalesce 300 python -m benchmarks.gpu_serve --shapes 1000:1000 \
  --concurrency 64,256 --hf-concurrency "" --out "$OUT/gpu_serve_coalesce.json"
ls -la "$OUT"
