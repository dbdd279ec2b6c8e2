#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 6, batch-1 step vs its graph): GPU tests of the
# greedy sampler, PDL launches and decode steps launched ahead of the host (overlap);
# the 8B batch-1 step with overlap, PDL and the GEMV path flipped in the same process,
# each beside its graph's replay time; one served stream 1000/1000 through the router.
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_overlap.sh", timeout_s=560)
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=8 step gpu_tests 240 python -m pytest -q -rs tests/test_greedy.py \
  tests/test_gemv.py tests/test_attention_backends.py tests/test_rope_kv_write.py
STEP_TAIL=12 step offline 200 python -m benchmarks.offline --batches 1:1024,4:1024 \
  --steps 48 --compare overlap_decode --compare pdl --compare gemv_decode \
  --prefill-tokens 512 --out "$OUT/offline_h200_overlap.json"
STEP_TAIL=3 step serve_b1 120 python -m benchmarks.gpu_serve --shapes 1000:1000 \
  --concurrency 1 --hf-concurrency "" --serve-args "--max-num-batched-tokens 8192" \
  --out "$OUT/gpu_serve_h200_b1_overlap.json"
ls -la "$OUT"
