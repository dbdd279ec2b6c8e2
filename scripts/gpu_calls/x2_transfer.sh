#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issue 7): KV pull bandwidth GPU0 -> GPU1 for the nixl
# (one UCX worker, and NIXL's 4-thread engine) and nccl (staged, and each run as it is)
# backends beside one contiguous NCCL send/recv (1k-64k tokens, contiguous and scattered
# blocks), then the two-GPU nccl tests (staged and unstaged link data path and abort, 1P1D
# serving), then the bandwidths again with 64-token blocks. About 3 minutes warm.
# Next run (session 13's change, not yet on GPUs): a link polls its transfer's end for up to
# 2 ms before sleeping in a blocking sync (nccl_link.wait_for); compare nccl contiguous and
# staged at 1k tokens with gpu_transfer_h200x2.json (67% / 50%) and the 64-token run (79% /
# 27%, bimodal laps).
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/nixl"],
#       command="bash scripts/gpu_calls/x2_transfer.sh")
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=26 step transfer 330 python -m benchmarks.gpu_transfer --phase-timeout 60 \
  --out "$OUT/gpu_transfer.json"
step nccl_tests 200 python -m pytest -q -x tests/test_block_copy.py tests/test_nccl_gpu.py
# The same with 64-token blocks (--block-size 64: 8 MiB per block of the 8B shape), where
# a scattered block's fixed cost per NIXL descriptor is a quarter as large per byte.
STEP_TAIL=14 step transfer_block64 200 python -m benchmarks.gpu_transfer --phase-timeout 60 \
  --block-tokens 64 --backends torch_nccl,nccl,nixl --out "$OUT/gpu_transfer_block64.json"
ls -la "$OUT"
