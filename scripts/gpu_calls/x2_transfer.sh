#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issue 7): KV pull bandwidth GPU0 -> GPU1 for the nixl
# and nccl backends beside one contiguous NCCL send/recv (1k-64k tokens, contiguous and
# scattered blocks), then the two-GPU nccl tests (link data path and abort, 1P1D serving).
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/nixl"],
#       command="bash scripts/gpu_calls/x2_transfer.sh")
set -u
source scripts/gpu_calls/steps.sh
step transfer 420 python -m benchmarks.gpu_transfer --phase-timeout 130 \
  --out "$OUT/gpu_transfer.json"
step nccl_tests 150 python -m pytest -q -x tests/test_nccl_gpu.py
ls -la "$OUT"
