#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 5): KV-aware against round-robin routing on a chat
# workload with long reused context per turn (2k-token system prompts, 512-token user
# messages, 6 turns: up to ~5k tokens of history a turn), beside the short-turn workload
# of x1_prefix_routing.sh (1k system prompts, 128-token messages). Two aggregated workers
# of the 8B shape share the GPU; KV for half the working set.
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_prefix_routing_long.sh", timeout_s=560)
# Each level draws its sessions with seed + its index: LOADS=3,3,3 repeats load 3 on three
# traces; SEED shifts them all. TURNS / MSG_LEN / OUT_LEN change the chat's shape (the
# history a turn reuses against the new tokens it brings), FIRST_MSG_LEN makes each
# session open with a document that every later turn reuses (a chat about a paste: what
# round-robin must recompute wherever it lands); NAME suffixes the result file. On
# nvidia-h200-x2 the two workers take a GPU each. Next to run (session 12's proposal):
#   FIRST_MSG_LEN=6144 MSG_LEN=128 TURNS=6 OUT_LEN=64 LOADS=2,2,2 NAME=_x2_docs
#   (kind nvidia-h200-x2)
# SERVE_EXTRA adds `baton serve` flags, e.g. SERVE_EXTRA="--overlap-decode-max-rows 0" to
# see what launching decode steps ahead costs arriving requests (a step launched ahead
# that a new arrival turns into a miss runs anyway, before the arrival's prefill).
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=14 step prefix_routing_long "${STEP_S:-500}" python -m benchmarks.prefix_routing --device cuda \
  --preset llama-3.1-8b --systems 8 --system-len 2048 --sessions 96 --turns "${TURNS:-6}" \
  --msg-len "${MSG_LEN:-512}" --first-msg-len "${FIRST_MSG_LEN:-0}" \
  --out-len "${OUT_LEN:-64}" --loads "${LOADS:-2,3}" \
  --policies kv,round-robin --seed "${SEED:-0}" \
  --wait-idle 0 --serve-args "--gpu-memory-utilization 0.4 --max-num-batched-tokens 8192 ${SERVE_EXTRA:-}" \
  --out "$OUT/prefix_routing_h200_long${NAME:-}.json"
ls -la "$OUT"
