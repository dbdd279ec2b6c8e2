#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issue 7, seventh pass): the one-row attention kernel
# under TP (this rank's heads) in the two-GPU TP tests and the 8B decode step at TP 1 and 2;
# then serving: TP=2 1P1D over per-rank NIXL with decode graphs (now the default) on two
# shared GPUs (prefill 0,1; decode 1,0), and TP=1 1P1D with 64-token blocks (8 MiB each,
# transfers and greedy tokens to compare with gpu_tp1_disagg_nixl_h200x2.json).
#   run(kind="nvidia-h200-x2", carry=[".whl/base", ".whl/flashinfer", ".fi-aot", ".whl/nixl"],
#       command="bash scripts/gpu_calls/x2_tp_serve.sh")
set -u
source scripts/gpu_calls/steps.sh
STEP_TAIL=6 step tp_tests 200 python -m pytest -q -rs -x tests/test_tp_comm_gpu.py \
  tests/test_one_row_attention.py
step gpu_tp 120 python -m benchmarks.gpu_tp --tp-graphs 1 --skip-agreement \
  --out "$OUT/gpu_tp_one_row.json"
STEP_TAIL=12 step tp2_nixl 200 python -m benchmarks.gpu_disagg --tp 2 --kv-transfer nixl \
  --layouts 1P1D --decode-gpus 1,0 --lone-in 4000 --lone-repeats 4 \
  --transfer-sizes 1024,4096,16384 --rates 2,4 --duration 10 \
  --serve-args "--max-num-batched-tokens 8192 --kv-blocks 8192" \
  --out "$OUT/gpu_tp2_disagg_nixl_shared_graphs_h200x2.json"
STEP_TAIL=8 step block64 150 python -m benchmarks.gpu_disagg --tp 1 --kv-transfer nixl \
  --layouts 1P1D --lone-in 4000 --lone-repeats 2 --transfer-sizes 1024,4096,16384 --rates "" \
  --serve-args "--max-num-batched-tokens 8192 --kv-blocks 2048 --block-size 64" \
  --out "$OUT/gpu_disagg_block64_h200x2.json"
ls -la "$OUT"
