#!/usr/bin/env bash
# On the GPU machine, after a run that JIT-compiled FlashInfer's kernels: pack the
# compiled modules (one .so each) into $OUT/fi-aot.tar. Back here, unpack it into .fi-aot/
# (ignored by git) and carry .fi-aot: scripts/gpu_env.sh installs them as FlashInfer AOT
# modules, so later runs skip the JIT (about 2 minutes of nvcc for Baton's kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=$(mktemp -d)/.fi-aot
mkdir -p "$dest"
find .fi-cache /tmp/site/flashinfer/data/aot -name '*.so' -path '*cached_ops*' \
  -exec cp {} "$dest/" \; 2>/dev/null || true
find /tmp/site/flashinfer/data/aot -name '*.so' -exec cp -n {} "$dest/" \; 2>/dev/null || true
tar -C "$(dirname "$dest")" -cf "${OUT:-.}/fi-aot.tar" .fi-aot
ls -la "$dest"
