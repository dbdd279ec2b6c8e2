"""The fused RoPE + paged KV-write kernel against the torch path it replaces (rotary
`_rotate` + `write_kv`): on CPU through Triton's interpreter (the test extras install
Triton; skipped where it is missing), and in bf16 on a GPU."""

from __future__ import annotations

import pytest
import torch

from kernels.attention import rope_kv_write
from kernels.attention.metadata import AttentionMetadata
from kernels.attention.torch_paged import write_kv
from kernels.layers.rotary import RotaryEmbedding, _rotate

needs_triton = pytest.mark.skipif(rope_kv_write.triton_unavailable_reason() is not None,
                                  reason="triton is not installed")


def _case(dtype: torch.dtype, device: str, packed: bool):
    """Five tokens at scattered positions into scattered slots of layer 1 of a 3-layer
    cache (so the layer view is strided over blocks, as the engine's is)."""
    g = torch.Generator().manual_seed(0)
    t, hq, hk, d, bs = 5, 4, 2, 64, 16
    rot = RotaryEmbedding(d, 512, 10000.0, None).to(device)
    if packed:  # views of one QKV projection output, as the decoder passes them
        qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(device, dtype)
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        q, k, v = q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)
    else:
        q, k, v = (torch.randn(t, h, d, generator=g).to(device, dtype) for h in (hq, hk, hk))
    positions = torch.tensor([3, 100, 7, 511, 0], device=device)
    slots = torch.tensor([5, 17, 40, 33, 2], device=device)
    cache = torch.randn(4, 3, 2, bs, hk, d, generator=g).to(device, dtype)
    return rot, q, k, v, positions, slots, cache


def _check(dtype: torch.dtype, device: str, packed: bool) -> None:
    rot, q, k, v, positions, slots, cache = _case(dtype, device, packed)
    want_cache = cache.clone()
    cos, sin = rot.cos[positions].unsqueeze(1), rot.sin[positions].unsqueeze(1)
    want_q = _rotate(q, cos, sin)
    meta = AttentionMetadata(slots, None, None, [1] * 5, [1] * 5, 16)
    write_kv(want_cache[:, 1], _rotate(k, cos, sin), v, meta)

    rope_kv_write.rope_and_write_kv_(q, k, v, positions, slots, rot.cos_sin_table(),
                                     cache[:, 1])
    assert torch.equal(q, want_q)
    assert torch.equal(cache, want_cache)  # written slots right, every other byte untouched


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("packed", [True, False])
def test_matches_torch_path_in_triton_interpreter(monkeypatch, dtype, packed) -> None:
    # bf16 is left to the GPU test: the interpreter emulates bf16 rounding by truncation.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rope_kv_write._kernel.cache_clear()  # triton.jit reads TRITON_INTERPRET when it wraps
    try:
        _check(dtype, "cpu", packed)
    finally:
        rope_kv_write._kernel.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("packed", [True, False])
def test_matches_torch_path_in_bf16_on_gpu(packed) -> None:
    _check(torch.bfloat16, "cuda", packed)
