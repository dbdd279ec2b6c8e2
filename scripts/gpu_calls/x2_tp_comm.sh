#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issue 7, third pass): TP all-reduces through Baton's own
# CuPy NCCL communicator (kernels/tp_comm.py). Which CuPy/NCCL the image has, the two-GPU
# communicator tests (equal to torch.distributed, captured in a CUDA graph, TP=2 engine with
# decode graphs = TP=1), then TP decode with graphs and eager, both over the communicator.
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x2_tp_comm.sh", timeout_s=600)
set -u
source scripts/gpu_calls/steps.sh
cupy_probe
# NCCL_DEBUG=INFO here: if capture hangs again, its log shows where (next try after that:
# NCCL_GRAPH_REGISTER=0).
NCCL_DEBUG=INFO STEP_TAIL=24 step tp_comm_test 180 python -m pytest -q -s -rs -x \
  tests/test_tp_comm_gpu.py
step gpu_tp_graphs 220 python -m benchmarks.gpu_tp --tp-graphs 1 --prompts 20 \
  --out "$OUT/gpu_tp_comm_graphs.json"
step gpu_tp_eager 110 python -m benchmarks.gpu_tp --tp 2 --tp-graphs 0 --skip-agreement \
  --out "$OUT/gpu_tp_comm_eager.json"
ls -la "$OUT"
