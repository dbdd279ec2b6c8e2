# Sourced by the device-call scripts here: installs the carried wheels (scripts/gpu_env.sh)
# and defines `step NAME SECONDS CMD...`, which runs one benchmark under its own time limit
# with its log under $OUT, so one hang costs one step, and prints the log's tail.
source scripts/gpu_env.sh || exit 1
export NCCL_DEBUG=WARN
step() {
  local name=$1 lim=$2; shift 2
  echo "=== $name start $(date +%T)"
  timeout -k 10 "$lim" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name rc=$? end $(date +%T)"
  grep -v "NIXL INFO\|^\s*$\|random weights\|UserWarning\|return func" "$OUT/$name.log" \
    | tail -n "${STEP_TAIL:-14}" | cut -c1-900
}
# What CuPy and NCCL the machine has (the KV links and the TP communicator use both).
cupy_probe() {
  step cupy_probe 60 python -c "import cupy, torch; from cupy.cuda import nccl; \
print('cupy', cupy.__version__, 'nccl available', nccl.available, 'version', nccl.get_version(), \
'bf16 constant', hasattr(nccl, 'NCCL_BFLOAT16'), 'torch nccl', torch.cuda.nccl.version())"
}
