#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 6, decode fast path): the fused RoPE + KV-write
# kernel's GPU tests, FlashInfer decode-attention variants and RoPE/KV-write per layer
# (graph-timed), then the 8B offline benchmark with the fused kernel (with kernel
# profiles at batch 1 and 64) and without it, and the FlashInfer path against the torch
# path. Packs newly JIT-compiled FlashInfer modules into $OUT/fi-aot.tar.
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_decode_kernels.sh", timeout_s=600)
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=8 step gpu_tests 150 python -m pytest -q -rs -x tests/test_rope_kv_write.py \
  tests/test_attention_backends.py
STEP_TAIL=30 step decode_kernels 200 python -m benchmarks.gpu_decode_kernels \
  --out "$OUT/gpu_decode_kernels_h200.json"
step offline_fused 150 python -m benchmarks.offline --steps 16 --profile \
  --out "$OUT/offline_h200_fused.json"
step offline_unfused 90 python -m benchmarks.offline --steps 16 --no-fused-rope-kv \
  --batches 1:1024,64:2048 --out "$OUT/offline_h200_unfused.json"
bash scripts/gpu_flashinfer_aot.sh > /dev/null 2>&1
ls -la "$OUT"
