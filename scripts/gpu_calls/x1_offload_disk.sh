#!/usr/bin/env bash
# Short device call (issue 8): tiers off against host(2 GB)+disk on the 8B workload, with
# bounded write-behind (the engine never waits for the disk).
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/flashinfer", ".whl/nixl", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_offload_disk.sh")
set -u
source scripts/gpu_env.sh || exit 1
timeout -k 5 150 python -m benchmarks.offload --device cuda --preset llama-3.1-8b \
  --kv-blocks 1024 --disk-kv-gb 24 --disk-mode-host-gb 2 --systems 4 --system-len 2048 \
  --sessions 20 --turns 6 --msg-len 512 --out-len 64 --think 1.0 --rate 1.0 --repeats 1 \
  --modes off,host+disk --no-warm-restart --out "$OUT/offload_h200_bounded_disk.json" 2>&1 \
  | grep -v "^\s*$\|random weights" | tail -4 | cut -c1-1200
