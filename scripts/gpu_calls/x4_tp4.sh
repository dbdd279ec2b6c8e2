#!/usr/bin/env bash
# One device call on nvidia-h200-x4 (issue 7): TP=2 and TP=4 greedy agreement with TP=1
# (mini-llama-wide: mini-llama's 4 layers with the 8 kv heads TP=4 needs; decode graphs),
# then the 70B shape's decode step at TP=4. Session 13 ran the agreement
# (gpu_tp4_agreement_h200x4.json: 20/20 prompts x 64 tokens equal); the step times are
# session 12's (gpu_tp124_8b_h200x4.json, gpu_tp4_70b_h200x4.json). ~3 min.
#   run(kind="nvidia-h200-x4", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x4_tp4.sh")
set -u
source scripts/gpu_calls/steps.sh
step tp4_agreement 150 python -m benchmarks.gpu_tp --tp 1,2,4 --tp-graphs 1 --prompts 20 \
  --agreement-model mini-llama-wide --batches '' --out "$OUT/gpu_tp4_agreement_h200x4.json"
step tp4_70b 150 python -m benchmarks.gpu_tp --preset llama-3.1-70b --tp 4 --tp-graphs 1 \
  --skip-agreement --out "$OUT/gpu_tp4_70b_h200x4.json"
ls -la "$OUT"
