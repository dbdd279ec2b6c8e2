#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issues 7 and 8, second pass): the tiered-KV workload
# on GPU1 (disk tier with the measured-cost guard), then on both GPUs the collectives a TP
# step makes, the NIXL backend probe, and TP decode eager vs CUDA graphs.
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/flashinfer", ".whl/nixl", ".fi-aot"],
#       command="bash scripts/gpu_calls/x2_tp_graphs_offload.sh")
set -u
source scripts/gpu_calls/steps.sh
( CUDA_VISIBLE_DEVICES=1 step offload 300 python -m benchmarks.offload --device cuda \
    --preset llama-3.1-8b --kv-blocks 1024 --host-kv-gb 24 --disk-kv-gb 24 --systems 4 \
    --system-len 2048 --sessions 20 --turns 6 --msg-len 512 --out-len 64 --think 1.0 \
    --rate 1.0 --repeats 1 --out "$OUT/offload_h200.json" ) &
wait
step collectives 90 python -m benchmarks.gpu_collectives --out "$OUT/gpu_collectives.json"
step nixl_backends 60 python -m benchmarks.nixl_backends --dir /tmp --out "$OUT/nixl_backends.json"
step gpu_tp 200 python -m benchmarks.gpu_tp --tp-graphs 1 --out "$OUT/gpu_tp_graphs.json"
ls -la "$OUT"
