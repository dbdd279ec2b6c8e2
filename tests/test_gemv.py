"""The batch-1 GEMV kernels (kernels/layers/gemv.py) against the torch ops they replace
(RMSNorm.forward_with_residual, F.linear, silu_and_mul): on CPU in Triton's interpreter
with shapes that leave partial tiles in both dimensions, and in bf16 on a GPU with the
8B model's projection shapes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels.attention.rope_kv_write import triton_unavailable_reason
from kernels.layers import gemv
from kernels.layers.activation import silu_and_mul
from kernels.layers.norm import RMSNorm

needs_triton = pytest.mark.skipif(triton_unavailable_reason() is not None,
                                  reason="triton is not installed")
EPS = 1e-5
REPO = Path(__file__).resolve().parents[1]


def _inputs(k: int, n: int, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=g).to(device, dtype)
    res = torch.randn(1, k, generator=g).to(device, dtype)
    norm_w = (1 + 0.1 * torch.randn(k, generator=g)).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
    return x, res, norm_w, w


def _reference(x, res, norm_w, w, swiglu: bool):
    norm = RMSNorm(x.shape[1], EPS, x.dtype).to(x.device)
    norm.weight.data.copy_(norm_w)
    h, new_res = norm.forward_with_residual(x, res)
    y = F.linear(h, w)
    return (silu_and_mul(y) if swiglu else y), new_res


def _check(k, n, dtype, device, config, tol):
    x, res, norm_w, w = _inputs(k, n, dtype, device)
    # Plain product.
    plain = gemv.gemv(x, w, config=config)
    torch.testing.assert_close(plain, F.linear(x, w), **tol)
    # Float32 out (the LM head's logits): the same values, rounded to x's dtype first
    # (bit for bit under one tile config; the autotuner tunes each output dtype apart).
    wide = gemv.gemv(x, w, config=config, out_dtype=torch.float32)
    assert wide.dtype == torch.float32
    assert torch.equal(wide.to(x.dtype).float(), wide)
    if config is not None:
        assert torch.equal(wide, plain.float())
    for swiglu in (False, True):
        want, want_res = _reference(x, res, norm_w, w, swiglu)
        got, got_res = gemv.add_norm_gemv(x, res, norm_w, EPS, w, swiglu=swiglu,
                                          config=config)
        assert torch.equal(got_res, want_res)  # the residual add is exact in either path
        torch.testing.assert_close(got, want, **tol)
        # First layer: no residual yet, the input is the new residual.
        want0, _ = _reference(x, None, norm_w, w, swiglu)
        got0, res0 = gemv.add_norm_gemv(x, None, norm_w, EPS, w, swiglu=swiglu, config=config)
        assert res0 is x
        torch.testing.assert_close(got0, want0, **tol)


# On a GPU machine the compiled kernels are tested instead (and the GPU image's older
# Triton interpreter cannot take a runtime loop bound).
on_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="GPU tests cover it")


@needs_triton
@on_cpu_only
def test_matches_torch_in_triton_interpreter() -> None:
    # In a fresh process: Triton's own jit helpers (tl.sum) are built for the interpreter
    # only when TRITON_INTERPRET is set before triton is first imported. K = 200 and
    # N = 2 * 37 leave partial tiles in both dimensions.
    _run_in_interpreter("import torch; from tests.test_gemv import _check\n"
                        "for config in [(8, 64, 4), (4, 256, 4)]:\n"
                        "    _check(200, 74, torch.float32, 'cpu', config,"
                        " {'atol': 1e-5, 'rtol': 1e-5})")


def check_rope_fold(config, device="cpu", dtype=torch.float32, heads=(4, 2, 16),
                    k_dim=200) -> None:
    """The QKV product with the RoPE + KV write in its epilogue against the product then
    the fused RoPE + KV-write kernel: q, the whole cache (the written slot and every other
    byte), bit for bit under one tile config."""
    from kernels.attention.rope_kv_write import rope_and_write_kv_
    from kernels.layers.rotary import RotaryEmbedding

    (hq, hk, d), page = heads, 16
    x, res, norm_w, w = _inputs(k_dim, (hq + 2 * hk) * d, dtype, device)
    rot = RotaryEmbedding(d, 64, 10000.0, None).to(device)
    positions, slots = torch.tensor([37], device=device), torch.tensor([21], device=device)
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(4, 3, 2, page, hk, d, generator=g).to(device, dtype)
    want_cache, got_cache = cache.clone(), cache.clone()
    qkv, _ = gemv.add_norm_gemv(x, res, norm_w, EPS, w, config=config)
    q, k, v = qkv.view(hq + 2 * hk, d).split([hq, hk, hk])
    rope_and_write_kv_(q[None], k[None], v[None], positions, slots, rot.cos_sin_table(),
                       want_cache[:, 1])
    rope = gemv.RopeWrite(positions, slots, rot.cos_sin_table(), got_cache[:, 1], hq)
    got, _ = gemv.add_norm_gemv(x, res, norm_w, EPS, w, config=config, rope=rope)
    assert torch.equal(got[0, : hq * d], q.reshape(-1))
    assert torch.equal(got_cache, want_cache)


@needs_triton
@on_cpu_only
def test_rope_fold_matches_separate_kernels_in_triton_interpreter() -> None:
    _run_in_interpreter("from tests.test_gemv import check_rope_fold\n"
                        "for config in [(2, 64, 4), (4, 128, 4)]:\n"
                        "    check_rope_fold(config)")


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rope_fold_matches_separate_kernels_on_gpu() -> None:
    for config in [(2, 2048, 4), (4, 1024, 4)]:
        check_rope_fold(config, "cuda", torch.bfloat16, (32, 8, 128), 4096)


def _run_in_interpreter(code: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("k,n", [(4096, 6144), (4096, 28672), (14336, 4096)])
def test_matches_torch_in_bf16_on_gpu(k, n) -> None:
    gemv._kernels.cache_clear()
    # Float32 accumulation in another order than cuBLAS: within a bf16 rounding or two.
    _check(k, n, torch.bfloat16, "cuda", None, {"atol": 2e-2, "rtol": 2e-2})


def _engine_tokens(preset: str, device: str, dtype: str, on: bool) -> list[list[int]]:
    """Greedy tokens of prompts served one at a time (so every decode step has one row)
    with the one-row GEMV path switched on or off."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(preset, load_format="dummy", device=device, dtype=dtype, num_kv_blocks=256)
    assert gemv.set_decode_gemv(llm.engine.runner.model, on) == on
    if llm.engine.runner.graphs is not None:
        llm.engine.runner._capture_graphs()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[(5 * i + j) % 200 + 1 for j in range(n)] for i, n in enumerate([3, 37])]
    return [llm.generate([p], params)[0].token_ids for p in prompts]


@needs_triton
@on_cpu_only
def test_decoder_one_row_path_gives_the_same_tokens_in_triton_interpreter() -> None:
    # Untied head (the LM head goes through gemv too) and Qwen3's per-head q/k norms.
    _run_in_interpreter("from tests.test_gemv import _engine_tokens\n"
                        "for preset in ('tiny-llama-untied', 'tiny-qwen3'):\n"
                        "    on = _engine_tokens(preset, 'cpu', 'float32', True)\n"
                        "    off = _engine_tokens(preset, 'cpu', 'float32', False)\n"
                        "    assert on == off, (preset, on, off)")


def test_projection_bias_keeps_the_one_row_path_off() -> None:
    from engine.llm import LLM

    llm = LLM("tiny-qwen2", load_format="dummy", device="cpu", num_kv_blocks=64)
    assert not gemv.set_decode_gemv(llm.engine.runner.model, True)


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decoder_one_row_path_gives_the_same_tokens_on_gpu() -> None:
    """bf16, FlashInfer, decode graphs recaptured with the GEMV kernels inside."""
    assert _engine_tokens("mini-llama", "cuda", "bfloat16", True) == \
        _engine_tokens("mini-llama", "cuda", "bfloat16", False)
