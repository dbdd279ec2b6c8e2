#!/usr/bin/env bash
# One device call on nvidia-h200-x2: the penalized sampler on CUDA (sampler unit test, and
# the engine's greedy tokens with penalties against transformers), then the nccl link
# thread under cProfile for scattered 1k- and 16k-token pulls with 64-token blocks (where
# x2_nccl_staging.sh showed the GPU waiting 0.1-0.3 ms for the host before the first copy).
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x2_nccl_profile.sh")
set -u
source scripts/gpu_calls/steps.sh
step penalties 240 python -m pytest -q tests/test_sampling.py tests/test_correctness.py -k penalt
STEP_TAIL=8 step profile 200 python -m benchmarks.gpu_transfer --phase-timeout 90 \
  --block-tokens 64 --tokens 1024,16384 --placements scattered \
  --backends torch_nccl,nccl,nccl_profiled --out "$OUT/gpu_transfer_nccl_profile.json"
ls -la "$OUT"
