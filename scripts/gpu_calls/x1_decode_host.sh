#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 6, decode host time): GPU tests of the fast path
# (fused RoPE + KV write, staged decode steps against unstaged and torch), then the 8B
# offline benchmark: host time per phase of the graph runner, staged against unstaged
# decode steps and the fused RoPE + KV write against the unfused path, each in the same
# process, and kernel profiles at batch 1 and 64.
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_decode_host.sh", timeout_s=600)
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=12 step gpu_tests 180 python -m pytest -q -rs -x tests/test_rope_kv_write.py \
  tests/test_attention_backends.py
STEP_TAIL=24 step offline 300 python -m benchmarks.offline --steps 16 --profile \
  --compare-unstaged --compare-unfused-rope-kv --out "$OUT/offline_h200_staged.json"
ls -la "$OUT"
