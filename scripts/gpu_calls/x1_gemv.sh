#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 6, batch-1 decode): the one-row GEMV kernels
# (kernels/layers/gemv.py) against cuBLAS and FlashInfer's small kernels: GPU tests, each
# projection of the 8B shape timed per tile config, then the 8B offline step at batch 1
# with the path on and off in one process (plus a kernel profile); last, the serving run
# of --stream-interval 1 vs 4 at 256 streams (x1_serve_stream_interval.sh's, shortened).
# Ran once with the first tile set (path 0.3 ms slower: *_first_configs.json); the path
# was then opt-in (--gemv), now default (--compare-gemv times it switched off).
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_gemv.sh", timeout_s=600)
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=10 step gpu_tests 150 python -m pytest -q -rs -x tests/test_gemv.py
STEP_TAIL=8 step gemv_kernels 150 python -m benchmarks.gpu_decode_kernels --parts gemv \
  --out "$OUT/gpu_gemv_kernels_h200.json"
STEP_TAIL=16 step offline_gemv 200 python -m benchmarks.offline --batches 1:1024 \
  --steps 16 --compare-gemv --profile 1:1024 --out "$OUT/offline_h200_gemv.json"
for n in 1 4; do
  STEP_TAIL=3 step "serve_interval_$n" 100 python -m benchmarks.gpu_serve --shapes 1000:1000 \
    --concurrency 256 --hf-concurrency "" \
    --serve-args "--max-num-batched-tokens 8192 --stream-interval $n" \
    --out "$OUT/gpu_serve_stream_interval_$n.json"
done
ls -la "$OUT"
