#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 6, correctness after the fused RoPE + KV write and
# staged decode steps): FlashInfer path, torch path and transformers bf16/fp32 on the same
# weights, mini-llama (50 prompts x 64 tokens) and the 8B shape (16 x 32).
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_correctness.sh", timeout_s=330)
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=6 step correctness 270 python -m benchmarks.gpu_correctness --presets mini-llama \
  --out "$OUT/gpu_correctness_h200_fused_staged.json"
ls -la "$OUT"
