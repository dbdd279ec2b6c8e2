#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issues 7 and 8, third pass): the tiered-KV workload on
# GPU1 with a small host tier over disk (async demotion), beside nothing on GPU0; then a
# rank-0 profile of eager batch-1 decode at TP 1 and 2 (why TP=2 is slower).
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/flashinfer", ".whl/nixl", ".fi-aot"],
#       command="bash scripts/gpu_calls/x2_tp_profile_offload.sh")
set -u
source scripts/gpu_calls/steps.sh
( CUDA_VISIBLE_DEVICES=1 step offload 260 python -m benchmarks.offload --device cuda \
    --preset llama-3.1-8b --kv-blocks 1024 --host-kv-gb 24 --disk-kv-gb 24 \
    --disk-mode-host-gb 2 --systems 4 --system-len 2048 --sessions 20 --turns 6 \
    --msg-len 512 --out-len 64 --think 1.0 --rate 1.0 --repeats 1 \
    --out "$OUT/offload_h200_async_disk.json" ) &
wait
step tp_profile 150 python -m benchmarks.gpu_tp --profile-only --out "$OUT/gpu_tp_profile.json"
ls -la "$OUT"
