# Source at the start of a device command. Installs whatever wheel sets were carried
# (.whl/base, .whl/nixl, .whl/flashinfer: see scripts/gpu_wheels.sh) into /tmp/site, unpacks
# the trimmed FlashInfer, points FlashInfer's JIT cache at .fi-cache (carry it back in to
# skip compiling), and keeps NVLink multicast off in every process started from here.
mkdir -p /tmp/site
whls=$(ls .whl/*/*.whl 2>/dev/null)
if [ -n "$whls" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $whls || return 1
fi
for t in .whl/flashinfer/*.tar.xz; do
  [ -e "$t" ] && { [ -d /tmp/site/flashinfer ] || tar -xJf "$t" -C /tmp/site || return 1; }
done
for t in .whl/nixl/*.tar.xz; do
  [ -e "$t" ] && { [ -d /tmp/site/nixl_cu13 ] || tar -xJf "$t" -C /tmp/site || return 1; }
done
# Kernels compiled on an earlier machine (scripts/gpu_flashinfer_aot.sh) load as AOT
# modules: no nvcc, no ninja, no minutes of JIT.
for so in .fi-aot/*.so; do
  [ -e "$so" ] || continue
  name=$(basename "$so" .so)
  mkdir -p "/tmp/site/flashinfer/data/aot/$name" && cp "$so" "/tmp/site/flashinfer/data/aot/$name/"
done
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=$PWD/.fi-cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
