#!/usr/bin/env bash
# Prepare (here, where PyPI is reachable) what the GPU machines lack, in sets under .whl/:
#   base       serving stack: fastapi, starlette, uvicorn, uvloop, httptools, pydantic, redis,
#              protobuf (~9 MiB)
#   nixl       nixl-cu13 trimmed by scripts/trim_nixl.py (UCX/POSIX/GDS plugins, CUDA and
#              shared-memory transports) as one tar.xz, plus the nixl meta package (~8 MiB;
#              the wheel is 56 MiB)
#   flashinfer flashinfer-python 0.7.4 trimmed to the sources the H200 paths JIT-compile
#              (decode, prefill, page, norm, rope, activation, sampling), as one tar.xz,
#              plus apache-tvm-ffi and einops (~21 MiB; the whole wheel is 97 MiB)
# All three sets (~33 MiB) and .fi-aot (~13 MiB) fit the 64 MiB one device call carries.
# Usage: scripts/gpu_wheels.sh [base] [nixl] [flashinfer]     (default: all three)
# Then carry e.g. .whl/base and .whl/flashinfer, and begin the command with
# `source scripts/gpu_env.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-python3}
FLASHINFER_VERSION=0.7.4
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64
           --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64)
dl() {  # dl SET PACKAGE...
  local dest=".whl/$1"; shift
  mkdir -p "$dest"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$dest" "$@"
}

prepare_flashinfer() {
  dl flashinfer "apache-tvm-ffi>=0.1.11,<0.2" einops
  local tmp
  tmp=$(mktemp -d)
  dl_tmp() { "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$@"; }
  dl_tmp "flashinfer-python==$FLASHINFER_VERSION"
  (cd "$tmp" && "$PY" -m zipfile -e flashinfer_python-*.whl site >/dev/null)
  local fi="$tmp/site/flashinfer"
  # Kernel sources outside the top level of data/csrc are other models' kernels (MoE,
  # MLA, fp4, Blackwell); the JIT modules Baton builds need only the top-level files,
  # the headers in data/include, cutlass, cccl and spdlog.
  find "$fi/data/csrc" -mindepth 1 -type d -prune -exec rm -rf {} +
  # Outside data/, keep Python and the small templates/tables modules read at import.
  find "$fi" -path "$fi/data" -prune -o -type f ! -name '*.py' ! -name '*.json' \
       ! -name '*.jinja' ! -name 'py.typed' -print0 | xargs -0 rm -f
  find "$fi" -type d -empty -delete
  (cd "$tmp/site" && tar -cf - flashinfer flashinfer_python-*.dist-info | xz -T0 -6 \
     > "$OLDPWD/.whl/flashinfer/flashinfer-trimmed-$FLASHINFER_VERSION.tar.xz")
  rm -rf "$tmp"
}

prepare_nixl() {
  dl nixl nixl==1.5.1
  local tmp
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$tmp" nixl-cu13==1.5.1
  (cd "$tmp" && "$PY" -m zipfile -e nixl_cu13-*.whl site >/dev/null)
  "$PY" scripts/trim_nixl.py "$tmp/site"
  (cd "$tmp/site" && tar -cf - . | xz -T0 -6 > "$OLDPWD/.whl/nixl/nixl-cu13-trimmed-1.5.1.tar.xz")
  rm -rf "$tmp"
}

sets=("$@")
[ ${#sets[@]} -eq 0 ] && sets=(base nixl flashinfer)
for s in "${sets[@]}"; do
  case "$s" in
    base) dl base fastapi==0.115.12 starlette==0.46.2 uvicorn pydantic pydantic-core \
            annotated-types typing-inspection redis "protobuf>=7.35" uvloop httptools \
            "llguidance>=1.9" ;;
    nixl) prepare_nixl ;;
    flashinfer) prepare_flashinfer ;;
    *) echo "unknown set $s (base, nixl, flashinfer)" >&2; exit 2 ;;
  esac
  du -sh ".whl/$s"
done
