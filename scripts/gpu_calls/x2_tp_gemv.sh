#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issue 7, sixth pass): the one-row GEMV decode path
# under TP (each rank its shard, all-reduce after o and down, LM head shards gathered).
# The GEMV and two-GPU TP tests, then greedy agreement and the 8B decode step at TP 1 and 2.
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x2_tp_gemv.sh")
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=12 step tp_tests 260 python -m pytest -q -s -rs -x tests/test_tp_comm_gpu.py \
  tests/test_gemv.py
step gpu_tp_graphs 220 python -m benchmarks.gpu_tp --tp-graphs 1 --prompts 20 \
  --out "$OUT/gpu_tp_gemv.json"
ls -la "$OUT"
