#!/usr/bin/env bash
# One device call on nvidia-h200-x4 (issue 9 scaled down): llama-3.1-70b shape, random bf16
# weights built on the GPUs, one prefill worker at TP=2 (GPUs 0-1) + one decode worker at
# TP=2 (GPUs 2-3) against two aggregated TP=2 replicas, same run: lone 3000-token TTFT, KV
# pull per request, then input 3000 / output 150 requests at rising open-loop rates.
# KV moves rank to rank over NIXL (GPU0->GPU2, GPU1->GPU3), one agent per TP rank.
# Session 13 ran it (both layouts fit one call: ~4 min): gpu_tp_disagg_70b_both_h200x4.json,
# and with closed-loop and multi-turn levels, gpu_tp_disagg_70b_sweep_h200x4.json: the one
# prefill worker saturates near 2.7 requests/s (3000 tokens in ~370 ms) while decode idles.
# Next: the default layouts add 1P1D/overflow=0.5/mix=256: the decode worker prefills
# while the prefill worker is backed up more than 0.5 s, 256 prompt tokens a step beside
# its streams (a 70B TP=2 step of 512 prompt tokens is ~60 ms, past the 50 ms ITL bound;
# on 8B x2 the pair took 1P1D from -19% to -2.7% tok/s per GPU against replicas,
# gpu_disagg_overflow_mix_h200x2.json). ~9.5 min.
#   run(kind="nvidia-h200-x4", carry=[".whl/base", ".whl/flashinfer", ".fi-aot", ".whl/nixl"],
#       command="bash scripts/gpu_calls/x4_tp_disagg.sh", timeout_s=600)
# LAYOUTS (default 1P1D,1P1D/overflow=0.5/mix=256,2xagg@2048), RATES, CONC (closed-loop
# users), SESSIONS (multi-turn users), SIZES (timed KV pulls, e.g. 1024,4096) and NAME change the
# run; TCP=1 pulls over tcp through the TP leaders instead (1P1D only). Second call:
# LAYOUTS=1P1D,1P1D/sat=3000,1P1D/local=512 NAME=_knobs (--prefill-saturation-tokens 3000:
# the prefill worker stops packing two 3000-token prompts into one ~750 ms step;
# --local-prefill-threshold 512: chat turns the decode worker mostly holds stay there).
set -u
source scripts/gpu_calls/steps.sh
if [ "${TCP:-0}" = 1 ]; then
  STEP_TAIL=8 step tp_disagg_tcp 480 python -m benchmarks.gpu_disagg --preset llama-3.1-70b \
    --tp 2 --kv-transfer tcp --layouts 1P1D --lone-in 3000 --lone-repeats 4 \
    --transfer-sizes 1024,4096 --long-share 0 --chat-in 3000 --chat-out 150 --rates 1 \
    --duration 10 --serve-args "--max-num-batched-tokens 8192" \
    --out "$OUT/gpu_tp_disagg_70b_tcp_h200x4.json"
else
  STEP_TAIL=40 step tp_disagg 580 python -m benchmarks.gpu_disagg --preset llama-3.1-70b \
    --tp 2 --kv-transfer nixl --layouts "${LAYOUTS:-1P1D,1P1D/overflow=0.5/mix=256,2xagg@2048}" \
    --lone-in 3000 --lone-repeats 2 --transfer-sizes "${SIZES:-}" --long-share 0 --chat-in 3000 \
    --chat-out 150 --rates "${RATES:-2,3}" --concurrency "${CONC:-8,24}" \
    --sessions-concurrency "${SESSIONS:-16}" --duration 20 --slo-ttft 2 --slo-itl 0.05 \
    --serve-args "--max-num-batched-tokens 8192" \
    --out "$OUT/gpu_tp_disagg_70b_h200x4${NAME:-}.json"
fi
ls -la "$OUT"
