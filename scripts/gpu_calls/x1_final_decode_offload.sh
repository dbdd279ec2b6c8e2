#!/usr/bin/env bash
# One device call on nvidia-h200: issue 6's offline decode/prefill numbers after the
# decode host work (staged steps, incremental page lists, scheduler fast paths; MBU from
# the weight bytes a decode step reads), with unstaged steps in the same process; then
# issue 8's offload benchmark, tiers off against the host tier, on the 8B shape.
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_final_decode_offload.sh", timeout_s=600)
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=12 step offline 200 python -m benchmarks.offline --steps 32 --profile \
  --compare-unstaged --out "$OUT/offline_h200_staged.json"
STEP_TAIL=6 step offload 330 python -m benchmarks.offload --device cuda \
  --preset llama-3.1-8b --kv-blocks 1024 --host-kv-gb 24 --systems 4 --system-len 2048 \
  --sessions 20 --turns 6 --msg-len 512 --out-len 64 --think 1.0 --rate 1.0 --repeats 2 \
  --modes off,host --no-warm-restart --out "$OUT/offload_h200_host.json"
ls -la "$OUT"
