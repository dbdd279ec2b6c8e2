#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 6, batch-1 attention, the show run): GPU tests of
# the one-row kernel and the batch-1 path; the 8B batch-1 step with the one-row kernel on
# and off in the same process at 1k, 2k and 4k context (past max_context both run
# FlashInfer's graph); greedy agreement with transformers with the prompts also run one at
# a time (batch-1 kernels); one served stream 1000/1000 through the router.
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_one_row_show.sh", timeout_s=590)
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=8 step gpu_tests 150 python -m pytest -q -rs tests/test_one_row_attention.py \
  tests/test_attention_backends.py tests/test_greedy.py tests/test_gemv.py
STEP_TAIL=12 step offline 120 python -m benchmarks.offline --batches 1:1024,1:2048,1:4096 \
  --steps 48 --compare one_row_attention --prefill-tokens 512 \
  --out "$OUT/offline_h200_one_row.json"
STEP_TAIL=6 step correctness 190 python -m benchmarks.gpu_correctness --presets mini-llama \
  --batch-1 --out "$OUT/gpu_correctness_h200_one_row.json"
STEP_TAIL=3 step serve_b1 110 python -m benchmarks.gpu_serve --shapes 1000:1000 \
  --concurrency 1 --hf-concurrency "" --serve-args "--max-num-batched-tokens 8192" \
  --out "$OUT/gpu_serve_h200_b1_one_row.json"
ls -la "$OUT"
