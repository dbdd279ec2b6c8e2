#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issue 7, fourth pass): where TP=2's batch-1 decode step
# goes (rank 0's profile of CUDA-graph steps at TP 1 and 2, Chrome traces), then the per-rank
# NIXL path under TP on GPUs: a TP=2 prefill worker on GPUs 0,1 and a TP=2 decode worker on
# GPUs 1,0 (each rank pair crosses NVLink; two workers share each GPU, so --kv-blocks sizes
# each cache), then TP=1 1P1D for the greedy tokens the TP=2 run must match.
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/flashinfer", ".fi-aot", ".whl/nixl"],
#       command="bash scripts/gpu_calls/x2_tp_profile_nixl.sh")
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=40 step tp_profile 160 python -m benchmarks.gpu_tp --tp 1,2 --profile-only \
  --profile-graphs --trace-dir "$OUT" --out "$OUT/gpu_tp_profile_graphs.json"
STEP_TAIL=12 step tp2_nixl 260 python -m benchmarks.gpu_disagg --tp 2 --kv-transfer nixl \
  --layouts 1P1D --decode-gpus 1,0 --lone-in 4000 --lone-repeats 4 \
  --transfer-sizes 1024,4096,16384 --rates 2 --duration 10 \
  --serve-args "--max-num-batched-tokens 8192 --kv-blocks 8192" \
  --out "$OUT/gpu_tp2_disagg_nixl_shared_h200x2.json"
STEP_TAIL=8 step tp1_nixl 150 python -m benchmarks.gpu_disagg --tp 1 --kv-transfer nixl \
  --layouts 1P1D --lone-in 4000 --lone-repeats 2 --transfer-sizes 1024,4096,16384 --rates "" \
  --serve-args "--max-num-batched-tokens 8192 --kv-blocks 8192" \
  --out "$OUT/gpu_tp1_disagg_nixl_h200x2.json"
python - "$OUT" <<'PY'
import json, sys
a = json.load(open(f"{sys.argv[1]}/gpu_tp2_disagg_nixl_shared_h200x2.json"))["layouts"]["1P1D"]
b = json.load(open(f"{sys.argv[1]}/gpu_tp1_disagg_nixl_h200x2.json"))["layouts"]["1P1D"]
same = sum(x == y for p, q in zip(a["greedy"], b["greedy"]) for x, y in zip(p, q))
print("greedy TP=2 1P1D vs TP=1 1P1D:", same, "of", sum(len(q) for q in b["greedy"]))
PY
ls -la "$OUT"
