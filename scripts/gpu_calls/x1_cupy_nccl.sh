#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 7 pieces that one GPU can check, issue 6 profile):
# the CuPy NCCL communicator with a group of one rank (CuPy 14's bytes unique id, a CUDA
# graph of all-reduces and an all-gather, equality with torch.distributed), and a kernel
# profile of batch-1 decode steps (what runs between two graphs).
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_cupy_nccl.sh", timeout_s=400)
set -u
source scripts/gpu_calls/steps.sh
cupy_probe
NCCL_DEBUG=INFO STEP_TAIL=16 step tp_comm_test 180 python -m pytest -q -s -rs -x \
  tests/test_tp_comm_gpu.py
STEP_TAIL=6 step profile 150 python -m benchmarks.offline --batches 1:1024 --steps 16 \
  --profile 1:1024 --prefill-tokens 512 --out "$OUT/offline_h200_b1_profile.json"
ls -la "$OUT"
