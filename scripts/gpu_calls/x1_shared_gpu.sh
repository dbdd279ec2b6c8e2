#!/usr/bin/env bash
# One device call on nvidia-h200: two aggregated 8B workers share one GPU, each with
# --gpu-memory-utilization 0.45 of the card (a per-worker share since session 12): both
# must start and size their KV caches alike, whichever sized first; then one request each.
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x1_shared_gpu.sh", timeout_s=400)
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=12 step shared_gpu 300 python - "$OUT" <<'PY'
import json, sys, httpx
from benchmarks.common import write_result
from cluster.local_server import baton_serve
with baton_serve("llama-3.1-8b", "--load-format", "dummy", "--device", "cuda", "--prefill", "0",
                 "--decode", "2", "--gpu-memory-utilization", "0.45", timeout=280) as url:
    workers = httpx.get(f"{url}/health").json()["workers"]
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    outs = [httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": model, "prompt": [1, 2, 3, i], "max_tokens": 8}).status_code for i in range(4)]
    res = {"benchmark": "shared_gpu", "script": "scripts/gpu_calls/x1_shared_gpu.sh",
           "serve_flags": "llama-3.1-8b --load-format dummy --device cuda --prefill 0 "
                          "--decode 2 --gpu-memory-utilization 0.45",
           "workers": [{k: w[k] for k in ("address", "total_blocks", "healthy")}
                       for w in workers], "request_status": outs}
    print(json.dumps(res))
    write_result(f"{sys.argv[1]}/shared_gpu_h200.json", res)
PY
