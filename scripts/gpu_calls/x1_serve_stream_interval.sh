#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 6): the GPU tests of the fast path (fused RoPE + KV
# write, staged decode steps against unstaged and torch), then router + one 8B worker,
# 1000/1000 at 256 streams, tokens handed to streams one at a time (default) against
# --stream-interval 4, same machine, back to back. (Measured through x1_gemv.sh's last
# steps instead: gpu_serve_h200_stream_interval_*.json, no gain on the H200.)
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_serve_stream_interval.sh", timeout_s=480)
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=12 step gpu_tests 180 python -m pytest -q -rs -x tests/test_rope_kv_write.py \
  tests/test_attention_backends.py
for n in 1 4; do
  STEP_TAIL=3 step "serve_interval_$n" 140 python -m benchmarks.gpu_serve --shapes 1000:1000 \
    --concurrency 256 --hf-concurrency "" \
    --serve-args "--max-num-batched-tokens 8192 --stream-interval $n" \
    --out "$OUT/gpu_serve_stream_interval_$n.json"
done
ls -la "$OUT"
