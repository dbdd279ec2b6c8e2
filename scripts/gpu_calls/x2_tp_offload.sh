#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issues 7 and 8): NIXL backend probe, tier copy
# bandwidth, the tiered-KV workload on GPU1 while GPU0 runs the single-GPU checks, then
# tensor parallelism (mini-llama TP=2 vs TP=1 agreement, 8B decode step at TP 1 and 2).
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/flashinfer", ".whl/nixl", ".fi-aot"],
#       command="bash scripts/gpu_calls/x2_tp_offload.sh")
# Every step has its own time limit and log under $OUT, so one hang costs one step.
set -u
source scripts/gpu_calls/steps.sh
nvidia-smi --query-gpu=index,name,memory.used --format=csv > "$OUT/gpus.txt"
python -c "import nixl, flashinfer; print('nixl', nixl.__file__, 'flashinfer', flashinfer.__version__)"
( CUDA_VISIBLE_DEVICES=1 step offload 330 python -m benchmarks.offload --device cuda \
    --preset llama-3.1-8b --kv-blocks 1024 --host-kv-gb 24 --disk-kv-gb 24 --systems 4 \
    --system-len 2048 --sessions 20 --turns 6 --msg-len 512 --out-len 64 --think 1.0 \
    --rate 1.0 --repeats 1 --out "$OUT/offload_h200.json" ) &
CUDA_VISIBLE_DEVICES=0 step kv_copy 90 python -m benchmarks.kv_copy --device cuda \
  --out "$OUT/kv_copy_h200.json"
wait
step nixl_backends 90 python -m benchmarks.nixl_backends --dir /tmp --out "$OUT/nixl_backends.json"
step gpu_tp 200 python -m benchmarks.gpu_tp --out "$OUT/gpu_tp_h200x2.json"
ls -la "$OUT"
