#!/usr/bin/env bash
# One device call on nvidia-h200: structured outputs on CUDA (greedy under a JSON schema
# equals transformers under the same grammar, decode CUDA graphs on), and the CUDA
# variants of prompt scoring and penalties (session 14's, first run on a GPU here).
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/h200_structured.sh")
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=30 step structured 300 python -m pytest -q -rs tests/test_structured_outputs.py
STEP_TAIL=30 step correctness 400 python -m pytest -q -rs tests/test_correctness.py \
  -k "prompt_logprobs or penalties or logit_bias"
