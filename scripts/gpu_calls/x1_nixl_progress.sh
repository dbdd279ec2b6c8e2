#!/usr/bin/env bash
# One device call on nvidia-h200: 1P1D on one GPU over NIXL (cuda_ipc between the two
# worker processes), 4k-token prompts one at a time, with the UCX progress thread polling
# with no timeout (NIXL's default, BATON_NIXL_PROGRESS_DELAY_US=0: a core per agent) and
# with Baton's 1 ms poll timeout: TTFT (prefill + KV pull + first decode step) for each,
# and the workers' CPU use while idle.
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".whl/nixl", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_nixl_progress.sh", timeout_s=300)
set -u
source scripts/gpu_calls/steps.sh
for d in 0 1000; do
  export BATON_NIXL_PROGRESS_DELAY_US=$d
  STEP_TAIL=5 step "nixl_delay_$d" 120 python -m benchmarks.gpu_serve --shapes 4000:8 \
    --concurrency 1,1,1,1 --hf-concurrency "" --serve-args "--prefill 1 --decode 1 \
    --prefill-gpus 0 --decode-gpus 0 --gpu-memory-utilization 0.4 --kv-transfer nixl \
    --max-num-batched-tokens 8192" --out "$OUT/gpu_serve_h200_1p1d_nixl_delay_$d.json"
done
ls -la "$OUT"
