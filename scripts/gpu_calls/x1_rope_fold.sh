#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 6, batch-1 step): GPU tests of the QKV GEMV with
# the RoPE + KV write in its epilogue (bit-equal to the two kernels; engine tokens equal),
# the overlap and staging engine test; the 8B batch-1 step with the fold, the GEMV path,
# PDL and overlap flipped in the same process.
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_rope_fold.sh", timeout_s=560)
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=8 step gpu_tests 240 python -m pytest -q -rs tests/test_gemv.py \
  tests/test_attention_backends.py tests/test_greedy.py
STEP_TAIL=20 step offline 240 python -m benchmarks.offline --batches 1:1024 \
  --steps 64 --compare rope_fold --compare gemv_decode --compare pdl --compare overlap_decode \
  --prefill-tokens 512 --out "$OUT/offline_h200_rope_fold.json"
ls -la "$OUT"
