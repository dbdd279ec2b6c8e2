#!/usr/bin/env bash
# One device call on nvidia-h200 (issue 5): x1_prefix_routing_long.sh with the two workers'
# CUDA contexts under NVIDIA MPS instead of time-sliced. Without MPS the GPU switches
# between the two processes' contexts and each worker's first-token compute is inflated;
# that is a test-bench artefact (one GPU for two workers), not what a worker per GPU sees.
# The daemon is a user process with its pipes under /tmp; it is quit at the end (the GPU's
# compute mode is left as it is). LOADS / SEED / TURNS / MSG_LEN / OUT_LEN / NAME as in
# x1_prefix_routing_long.sh.
#   run(kind="nvidia-h200", carry=[".whl/base", ".whl/flashinfer", ".fi-aot"],
#       command="LOADS=3,3 SEED=51 bash scripts/gpu_calls/x1_prefix_routing_mps.sh",
#       timeout_s=330)
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d && echo "MPS daemon started"
bash scripts/gpu_calls/x1_prefix_routing_long.sh
echo quit | nvidia-cuda-mps-control
sleep 2
tail -3 "$CUDA_MPS_LOG_DIRECTORY/control.log"
mv "$OUT/prefix_routing_h200_long${NAME:-}.json" "$OUT/prefix_routing_h200_long_mps${NAME:-}.json"
