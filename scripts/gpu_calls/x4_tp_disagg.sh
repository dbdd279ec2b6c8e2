#!/usr/bin/env bash
# One device call on nvidia-h200-x4 (issue 9 scaled down): llama-3.1-70b shape, random
# bf16 weights built on the GPUs, one prefill worker at TP=2 (GPUs 0-1) + one decode worker
# at TP=2 (GPUs 2-3) against two aggregated TP=2 replicas, same run: lone 3000-token TTFT,
# KV pull per request, then input 3000 / output 150 requests at rising open-loop rates.
# KV moves over tcp through each TP leader (per-rank NIXL is not written yet): expect the
# transfer, not the GPUs, to bound 1P1D here; the JSON says by how much.
#   run(kind="nvidia-h200-x4", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x4_tp_disagg.sh", timeout_s=600)
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=20 step tp_disagg 560 python -m benchmarks.gpu_disagg --preset llama-3.1-70b --tp 2 \
  --kv-transfer tcp --layouts 1P1D,2xagg --lone-in 3000 --lone-repeats 4 \
  --transfer-sizes 1024,4096 --long-share 0 --chat-in 3000 --chat-out 150 --rates 1,2,4 \
  --duration 20 --slo-ttft 2 --slo-itl 0.05 --serve-args "--max-num-batched-tokens 8192" \
  --out "$OUT/gpu_tp_disagg_70b_h200x4.json"
ls -la "$OUT"
