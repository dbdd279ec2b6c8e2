#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels the GPU machines lack, into .whl/.
# The device machines have Python 3.12, torch, grpcio, tokenizers, transformers, xxhash,
# msgpack, prometheus-client, httpx; they lack the serving stack and NIXL.
# Usage: scripts/gpu_wheels.sh   (then carry .whl, and start the device command with
#        `source scripts/gpu_env.sh`)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PY=${PYTHON:-python3}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64)
dl() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$@"
}
dl nixl-cu13==1.5.1 nixl==1.5.1
dl fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection \
   redis "protobuf>=7.35"
ls -la .whl | awk '{s+=$5} END {printf "%.1f MiB of wheels in .whl\n", s/1048576}'
