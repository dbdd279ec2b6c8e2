#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issue 7): staged nccl transfers replayed as CUDA
# graphs (kvtransfer/transfer/nccl_graphs.py) beside chunks queued from Python, with
# 64-token (8 MiB) and 16-token (2 MiB) blocks, 30 laps a case; plus eight chunks, graphed.
# First the two-GPU nccl tests (the graphed transfer test among them). ~5 minutes warm.
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="bash scripts/gpu_calls/x2_nccl_graphs.sh")
set -u
source scripts/gpu_calls/steps.sh
python - <<'PY' > "$OUT/cupy_graph_api.txt" 2>&1
import cupy
from cupy.cuda import runtime
print("cupy", cupy.__version__, "nccl", cupy.cuda.nccl.get_version())
for name in ("streamBeginCapture", "streamEndCapture", "graphInstantiate", "graphLaunch",
             "graphDestroy", "graphExecDestroy", "streamWaitEvent", "streamCaptureModeThreadLocal"):
    print(name, getattr(runtime, name, "MISSING"), getattr(getattr(runtime, name, None), "__doc__", ""))
PY
cat "$OUT/cupy_graph_api.txt"
step nccl_tests 300 python -m pytest -q -x tests/test_nccl_gpu.py -k "not serving"
VARIANTS=torch_nccl,nccl,nccl_eager,nccl_eight_chunks,nccl_two_chunks
for bt in 64 16; do
  STEP_TAIL=24 step "graphs_block$bt" 240 python -m benchmarks.gpu_transfer --phase-timeout 80 \
    --block-tokens $bt --repeats 30 --placements contiguous,scattered --backends "$VARIANTS" \
    --out "$OUT/gpu_transfer_nccl_graphs_block$bt.json"
done
ls -la "$OUT"
