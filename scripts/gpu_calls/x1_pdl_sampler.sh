#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 6, batch-1 MBU): GPU tests of PDL launches, the
# greedy sampler and the GEMV kernel (float32 LM-head output); the sampler and the
# projections with PDL on and off; the 8B batch-1 step with PDL and the GEMV path
# flipped in the same process, each beside its graph's replay time.
# (The first version of this call also timed a one-kernel batch-1 attention, since
# removed: gpu_decode_kernels_h200_one_row.json, offline_h200_one_row_attention.json.)
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_pdl_sampler.sh", timeout_s=560)
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=8 step gpu_tests 200 python -m pytest -q -rs tests/test_gemv.py \
  tests/test_rope_kv_write.py tests/test_greedy.py
STEP_TAIL=12 step kernels 200 python -m benchmarks.gpu_decode_kernels \
  --parts sampler,gemv --out "$OUT/gpu_decode_kernels_h200_pdl.json"
STEP_TAIL=12 step offline 200 python -m benchmarks.offline --batches 1:1024 --steps 32 \
  --compare pdl --compare gemv_decode \
  --prefill-tokens 512 --out "$OUT/offline_h200_pdl_sampler.json"
ls -la "$OUT"
