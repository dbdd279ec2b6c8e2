#!/usr/bin/env bash
# One device call on nvidia-h200-x2: the router's --prefill-overflow-wait on GPUs (built in
# session 13 from the 70B run, where one prefill worker saturated while decode idled).
# llama-3.1-8b shape, input 3000 / output 150 at open-loop rates around one prefill
# worker's capacity: 1P1D, 1P1D with overflow at 0.5 s, and two aggregated replicas
# (chunked prefill at 2048), same run. About 6 minutes warm.
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/flashinfer", ".fi-aot", ".whl/nixl"],
#       command="bash scripts/gpu_calls/x2_overflow.sh")
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=40 step overflow 560 python -m benchmarks.gpu_disagg --preset llama-3.1-8b \
  --kv-transfer nixl --layouts "${LAYOUTS:-1P1D,1P1D/overflow=0.5,2xagg@2048}" \
  --lone-in 3000 --lone-repeats 2 --transfer-sizes "" --long-share 0 --chat-in 3000 \
  --chat-out 150 --rates "${RATES:-10,16}" --duration 20 --slo-ttft 2 --slo-itl 0.05 \
  --serve-args "--max-num-batched-tokens 8192" --out "$OUT/gpu_disagg_overflow_h200x2.json"
ls -la "$OUT"
