#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issue 7): the nccl link's staging plans side by side
# (benchmarks/nccl_variants.py), 30 laps a case (laps of small transfers vary by 2x), with
# 64-token (8 MiB) and 16-token (2 MiB) blocks: serving's plan (wide first gather and last
# scatter) untraced and traced, every copy narrow (the plan before), two chunks, one chunk.
# Traced cases' median marks go to nccl_traces_median_ms. First the two-GPU nccl tests.
# About 4 minutes warm.
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x2_nccl_staging.sh")
set -u
source scripts/gpu_calls/steps.sh
step nccl_tests 240 python -m pytest -q -x tests/test_block_copy.py tests/test_nccl_gpu.py -k "not serving"
VARIANTS=torch_nccl,nccl,nccl_narrow_edges,nccl_traced,nccl_two_chunks,nccl_one_chunk
for bt in 64 16; do
  STEP_TAIL=22 step "staging_block$bt" 240 python -m benchmarks.gpu_transfer --phase-timeout 80 \
    --block-tokens $bt --repeats 30 --placements contiguous,scattered --backends "$VARIANTS" \
    --out "$OUT/gpu_transfer_nccl_plans_block$bt.json"
done
ls -la "$OUT"
