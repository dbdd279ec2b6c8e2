#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 6, the whole "show" list again with everything on
# by default: PDL, RoPE folded into the batch-1 QKV GEMV, the one-kernel greedy sampler,
# decode steps launched ahead of the host, since session 9 the one-row attention): the offline
# decode/prefill cases against their rooflines, then serving through the router at
# 1/16/64/256 streams for 1000/1000 and 4000/200 (transformers' baseline is in
# gpu_serve_h200.json, measured before; not rerun, it takes most of a call).
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="NAME=session9 bash scripts/gpu_calls/x1_refresh.sh", timeout_s=590)
# NAME names the result files (offline_h200_$NAME.json, gpu_serve_h200_$NAME.json).
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=8 step offline 200 python -m benchmarks.offline \
  --batches 1:1024,16:2048,64:2048,256:2048 --steps 32 --prefill-tokens 4096 \
  --out "$OUT/offline_h200_${NAME:-session7}.json"
STEP_TAIL=10 step serve 330 python -m benchmarks.gpu_serve --shapes 1000:1000,4000:200 \
  --concurrency 1,16,64,256 --hf-concurrency "" --out "$OUT/gpu_serve_h200_${NAME:-session7}.json"
ls -la "$OUT"
