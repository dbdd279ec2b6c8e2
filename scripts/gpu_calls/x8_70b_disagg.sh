#!/usr/bin/env bash
# The issue-9 run, for nvidia-h200-x8 (not lent so far; never run): llama-3.1-70b shape,
# bf16, random weights built on the GPUs; one prefill worker at TP=4 (GPUs 0-3) and one
# decode worker at TP=4 (GPUs 4-7), KV pulled rank to rank over NIXL (GPU0->GPU4, ...),
# against two aggregated TP=4 replicas (GPUs 0-3, 4-7), same run. Per layout: lone
# 3000-token TTFT, KV pull bandwidth (in all and per rank pair), a closed-loop
# concurrency sweep of input 3000 / output 150 (Dynamo's published shape), and multi-turn
# chat sessions; goodput under TTFT <= 2 s and ITL <= 50 ms; output tok/s per GPU.
# On x4 (TP=2, session 13) a layout took ~40 s to start and ~25 s a level, so both fit one
# call; the aggregated replicas chunk prefill at 2048 tokens (what an aggregated
# deployment tunes to keep decode moving; at 8192 their ITL p99 was 390 ms on x4).
#   run(kind="nvidia-h200-x8", carry=[".whl/base", ".whl/flashinfer", ".fi-aot", ".whl/nixl"],
#       command="bash scripts/gpu_calls/x8_70b_disagg.sh", timeout_s=600)
# Second call: LAYOUTS=1P1D/overflow=0.5/mix=512/sat=3000,1P1D/local=512 NAME=_knobs (the
# decode worker prefills while the prefill worker is backed up more than 0.5 s, 512 prompt
# tokens a step beside its streams: on 8B x2 this took 1P1D from -19% to -2.7% tok/s per
# GPU against replicas with ITL p99 42 ms, gpu_disagg_overflow_mix_h200x2.json; turns with
# 512 or fewer uncached tokens stay on the decode worker), then LAYOUTS=2xagg NAME=_agg8192.
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=24 step tp4_disagg 570 python -m benchmarks.gpu_disagg --preset llama-3.1-70b \
  --tp 4 --kv-transfer nixl --layouts "${LAYOUTS:-1P1D,2xagg@2048}" --lone-in 3000 \
  --lone-repeats 4 --transfer-sizes 3000,16384 --rates "" --chat-in 3000 --chat-out 150 \
  --concurrency 8,32,64 --sessions-concurrency 32 --session-systems 8 \
  --session-system-len 2048 --session-msg-len 256 --session-turns 4 --duration 25 \
  --slo-ttft 2 --slo-itl 0.05 --serve-args "--max-num-batched-tokens 8192" \
  --out "$OUT/gpu_disagg_70b_tp4_h200x8${NAME:-}.json"
ls -la "$OUT"
