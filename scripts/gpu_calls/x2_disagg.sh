#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issue 7): the collectives of a TP step and the
# contiguous NCCL send/recv baseline, then 1P1D against two aggregated replicas
# (lone 4k-prompt TTFT, KV pull bandwidth 1k-64k tokens, mixed open-loop load).
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/flashinfer", ".whl/nixl", ".fi-aot"],
#       command="bash scripts/gpu_calls/x2_disagg.sh")
set -u
source scripts/gpu_env.sh || exit 1
export NCCL_DEBUG=WARN
step() {  # step NAME SECONDS CMD...
  local name=$1 lim=$2; shift 2
  echo "=== $name start $(date +%T)"
  timeout -k 10 "$lim" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name rc=$? end $(date +%T)"
  grep -v "NIXL INFO\|^\s*$\|random weights\|UserWarning\|return func" "$OUT/$name.log" \
    | tail -n 14 | cut -c1-900
}
step collectives 100 python -m benchmarks.gpu_collectives --out "$OUT/gpu_collectives.json"
step disagg 440 python -m benchmarks.gpu_disagg --kv-transfer nixl --rates 6,12 --duration 20 \
  --out "$OUT/gpu_disagg.json"
ls -la "$OUT"
