#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (session 14): the penalized sampler and prompt scoring
# on CUDA (sampler unit test; the engine's greedy tokens with penalties and its prompt
# logprobs against transformers), then nccl pulls of 1k and 16k tokens with 64-token
# blocks, traced (where x2_nccl_staging.sh showed the GPU waiting on the host). Session 14
# ran this with the link thread under cProfile instead of traced: Python 3.12's profiler
# also recorded the main thread and told nothing, so that variant is gone.
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x2_nccl_profile.sh")
set -u
source scripts/gpu_calls/steps.sh
step penalties 240 python -m pytest -q tests/test_sampling.py tests/test_correctness.py \
  -k "penalt or prompt_logprobs"
STEP_TAIL=8 step traced 200 python -m benchmarks.gpu_transfer --phase-timeout 90 \
  --block-tokens 64 --tokens 1024,16384 --placements scattered \
  --backends torch_nccl,nccl,nccl_traced --out "$OUT/gpu_transfer_nccl_traced.json"
ls -la "$OUT"
