#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issue 7): the collectives of a TP step and the
# contiguous NCCL send/recv baseline, then 1P1D against two aggregated replicas
# (lone 4k-prompt TTFT, KV pull bandwidth 1k-64k tokens, mixed open-loop load).
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/flashinfer", ".whl/nixl", ".fi-aot"],
#       command="bash scripts/gpu_calls/x2_disagg.sh")
set -u
source scripts/gpu_calls/steps.sh
step collectives 100 python -m benchmarks.gpu_collectives --out "$OUT/gpu_collectives.json"
step disagg 440 python -m benchmarks.gpu_disagg --kv-transfer nixl --rates 6,12 --duration 20 \
  --out "$OUT/gpu_disagg.json"
ls -la "$OUT"
