#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 6, batch-1 attention): the one-row attention
# kernel's GPU tests and the engine's GPU tests that now run it in the batch-1 graph
# (plus the one-rank CuPy communicator test, never run before); batch-1 attention kernels
# timed alone (FlashInfer's variants and the one-row kernel's configs); the 8B batch-1
# step with the one-row kernel on and off in the same process, at 1k and 4k context, for
# the default tiles and CONFIG2's.
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_one_row.sh", timeout_s=580)
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=10 step gpu_tests 200 python -m pytest -q -rs tests/test_one_row_attention.py \
  tests/test_attention_backends.py ${TESTS:-}
STEP_TAIL=40 step decode_kernels 100 python -m benchmarks.gpu_decode_kernels \
  --parts attention --shapes 1:1024,1:4096,1:16384 \
  --out "$OUT/gpu_decode_kernels_h200_one_row${NAME:-}.json"
STEP_TAIL=12 step offline 150 python -m benchmarks.offline --batches 1:1024,1:4096 \
  --steps 48 --compare one_row_attention --prefill-tokens 512 \
  --out "$OUT/offline_h200_one_row${NAME:-}.json"
[ -n "${CONFIG2:-}" ] && STEP_TAIL=12 step offline2 150 python -m benchmarks.offline \
  --batches 1:1024,1:4096 --steps 48 --compare one_row_attention --prefill-tokens 512 \
  --one-row-config "$CONFIG2" --out "$OUT/offline_h200_one_row${NAME:-}_b.json"
ls -la "$OUT"
