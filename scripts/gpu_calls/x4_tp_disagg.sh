#!/usr/bin/env bash
# One device call on nvidia-h200-x4 (issue 9 scaled down; not yet run: x4 was first lent
# when session 12 had two device minutes left, spent on x4_tp4.sh's step times): llama-3.1-70b shape, random
# bf16 weights built on the GPUs, one prefill worker at TP=2 (GPUs 0-1) + one decode worker
# at TP=2 (GPUs 2-3) against two aggregated TP=2 replicas, same run: lone 3000-token TTFT,
# KV pull per request, then input 3000 / output 150 requests at rising open-loop rates.
# KV moves rank to rank over NIXL (GPU0->GPU2, GPU1->GPU3), one agent per TP rank; a
# 1P1D layout pulling over tcp through the TP leaders compares.
#   run(kind="nvidia-h200-x4", carry=[".whl/base", ".whl/flashinfer", ".fi-aot", ".whl/nixl"],
#       command="bash scripts/gpu_calls/x4_tp_disagg.sh", timeout_s=600)
# Two 70B TP=2 layouts do not fit one call's 600 s: one per call. Second call:
# LAYOUTS=2xagg NAME=_agg; third (tcp through the TP leaders, 1P1D): TCP=1.
set -u
source scripts/gpu_calls/steps.sh
if [ "${TCP:-0}" = 1 ]; then
  STEP_TAIL=8 step tp_disagg_tcp 480 python -m benchmarks.gpu_disagg --preset llama-3.1-70b \
    --tp 2 --kv-transfer tcp --layouts 1P1D --lone-in 3000 --lone-repeats 4 \
    --transfer-sizes 1024,4096 --long-share 0 --chat-in 3000 --chat-out 150 --rates 1 \
    --duration 10 --serve-args "--max-num-batched-tokens 8192" \
    --out "$OUT/gpu_tp_disagg_70b_tcp_h200x4.json"
else
  STEP_TAIL=20 step tp_disagg 480 python -m benchmarks.gpu_disagg --preset llama-3.1-70b \
    --tp 2 --kv-transfer nixl --layouts "${LAYOUTS:-1P1D}" --lone-in 3000 --lone-repeats 4 \
    --transfer-sizes 1024,4096 --long-share 0 --chat-in 3000 --chat-out 150 \
    --rates "${RATES:-1,2}" --duration 20 --slo-ttft 2 --slo-itl 0.05 \
    --serve-args "--max-num-batched-tokens 8192" \
    --out "$OUT/gpu_tp_disagg_70b_h200x4${NAME:-}.json"
fi
ls -la "$OUT"
