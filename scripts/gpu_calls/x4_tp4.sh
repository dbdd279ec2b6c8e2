#!/usr/bin/env bash
# One device call on nvidia-h200-x4 (issue 7): TP=4 greedy agreement with TP=1 (mini-llama,
# decode graphs), the 8B decode step at TP 4/2/1 and the 70B shape at TP=4, one run. The
# step times were first measured in session 12's last device minutes
# (gpu_tp124_8b_h200x4.json, gpu_tp4_70b_h200x4.json); this adds the agreement. ~4 min.
#   run(kind="nvidia-h200-x4", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x4_tp4.sh")
set -u
source scripts/gpu_calls/steps.sh
step tp4_agreement 200 python -m benchmarks.gpu_tp --tp 1,4 --tp-graphs 1 --prompts 20 \
  --batches 1:1024,64:2048 --out "$OUT/gpu_tp4_agreement_h200x4.json"
step tp4_70b 150 python -m benchmarks.gpu_tp --preset llama-3.1-70b --tp 4 --tp-graphs 1 \
  --skip-agreement --out "$OUT/gpu_tp4_70b_h200x4.json"
ls -la "$OUT"
