#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 5): prefix-aware routing with the 8B shape, two
# aggregated workers sharing the one GPU, together holding KV for half of the chat working
# set; kv, round-robin and random at each offered load of $LOADS, same run.
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_prefix_routing.sh", timeout_s=600)
# Runs so far (benchmarks/results/prefix_routing_h200*.json): 96 sessions at loads 2,5
# (_light: the H200 far from busy, every policy's TTFT mostly fixed cost); 192 sessions at
# 5,8,11 (round-robin starts to saturate at 11); GPU_TESTS=1 LOADS=14,18 NAME=_high (past
# round-robin's saturation), with the fast path's GPU tests first.
set -u
source scripts/gpu_calls/steps.sh
if [ "${GPU_TESTS:-0}" = 1 ]; then
  STEP_TAIL=12 step gpu_tests 150 python -m pytest -q -rs -x tests/test_rope_kv_write.py \
    tests/test_attention_backends.py
fi
STEP_TAIL=14 step prefix_routing 420 python -m benchmarks.prefix_routing --device cuda \
  --preset llama-3.1-8b --systems 8 --system-len 1024 --sessions 192 --turns 6 \
  --msg-len 128 --out-len 64 --loads "${LOADS:-5,8,11}" --wait-idle 0 \
  --serve-args "--gpu-memory-utilization 0.4 --max-num-batched-tokens 8192" \
  --out "$OUT/prefix_routing_h200${NAME:-}.json"
ls -la "$OUT"
