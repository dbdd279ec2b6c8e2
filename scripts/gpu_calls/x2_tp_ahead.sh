#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issue 7, fifth pass): TP ranks launch the next decode
# graph ahead (the leader's token ids broadcast over the TP communicator), as one process
# does. The two-GPU TP tests (TP=2 with graphs, launches used and wasted, = TP=1), greedy
# agreement and the 8B decode step at TP 1 and 2 with graphs, then rank 0's profile of
# TP=2 graph steps (is the GPU still idle between them?).
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x2_tp_ahead.sh")
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=12 step tp_comm_test 200 python -m pytest -q -s -rs -x tests/test_tp_comm_gpu.py
step gpu_tp_graphs 220 python -m benchmarks.gpu_tp --tp-graphs 1 --prompts 20 \
  --out "$OUT/gpu_tp_ahead.json"
STEP_TAIL=24 step tp_profile 120 python -m benchmarks.gpu_tp --tp 2 --profile-only \
  --profile-graphs --out "$OUT/gpu_tp_ahead_profile.json"
ls -la "$OUT"
