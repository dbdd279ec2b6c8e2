"""The one-row decode attention kernel (kernels/attention/one_row.py) against the torch
reference path over the same paged cache: on CPU in Triton's interpreter with small tiles
(so contexts cover one split, many splits, several tiles per split and the split cap),
and in bf16 on a GPU with the 8B shape, eagerly and replayed in a CUDA graph."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.attention.metadata import AttentionMetadata
from kernels.attention.one_row import OneRowAttention, OneRowConfig
from kernels.attention.rope_kv_write import triton_unavailable_reason
from kernels.attention.torch_paged import TorchPagedAttention

needs_triton = pytest.mark.skipif(triton_unavailable_reason() is not None,
                                  reason="triton is not installed")
REPO = Path(__file__).resolve().parents[1]


def check(heads: tuple[int, int, int], page: int, seq_lens: list[int], config: OneRowConfig,
          device: str, dtype: torch.dtype, tol: dict) -> None:
    """Each context length in turn through one scratch (as layers share it), against
    the reference; the tickets must be back to zero after every call."""
    hq, hkv, d = heads
    g = torch.Generator().manual_seed(0)
    blocks = -(-max(seq_lens) // page) + 3
    # Layer 1 of a 2-layer cache: the view is strided over blocks, as the engine's is.
    cache = torch.randn(blocks, 2, 2, page, hkv, d, generator=g).to(device, dtype)
    layer = cache[:, 1]
    attention = OneRowAttention(hq, hkv, d, torch.device(device), config)
    reference = TorchPagedAttention(hq, hkv, d)
    for seq_len in seq_lens:
        n_pages = -(-seq_len // page)
        table = torch.randperm(blocks, generator=g)[:n_pages]
        q = torch.randn(1, hq, d, generator=g).to(device, dtype)
        indptr = torch.tensor([0, n_pages], dtype=torch.int32, device=device)
        last = torch.tensor([seq_len - (n_pages - 1) * page], dtype=torch.int32, device=device)
        got = attention(q, layer, indptr, table.to(device, torch.int32), last)
        meta = AttentionMetadata(torch.zeros(1, dtype=torch.long, device=device),
                                 table[None].to(device),
                                 torch.tensor([seq_len], device=device), [1], [seq_len], page)
        want = reference._decode(q.float(), layer.float(), meta)
        torch.testing.assert_close(got.float(), want, **tol, msg=f"seq_len {seq_len}")
        assert not attention.tickets.any(), f"tickets left set after seq_len {seq_len}"


# Small tiles: 16-token tiles (the dot's least), at most 4 splits -> 1..4 splits and up to
# 4 tiles a split.
SMALL = dict(heads=(8, 2, 64), page=4, seq_lens=[1, 3, 16, 17, 60, 64, 65, 127, 200, 255],
             config=OneRowConfig(block_t=16, max_splits=4, num_warps=4))


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test covers it")
def test_matches_torch_in_triton_interpreter() -> None:
    # In a fresh process: Triton builds its jit helpers for the interpreter only when
    # TRITON_INTERPRET is set before it is first imported.
    code = ("import torch\nfrom tests.test_one_row_attention import check, SMALL\n"
            "for dtype in (torch.float32, torch.float16):\n"
            "    check(**SMALL, device='cpu', dtype=dtype, tol={'atol': 2e-3, 'rtol': 2e-3})\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_matches_torch_in_bf16_on_gpu() -> None:
    tol = {"atol": 2e-2, "rtol": 2e-2}
    lens = [1, 15, 16, 17, 64, 1000, 1024, 1025, 2049, 4096, 9000, 32768]
    check((32, 8, 128), 16, lens, OneRowConfig(), "cuda", torch.bfloat16, tol)
    check(**SMALL, device="cuda", dtype=torch.bfloat16, tol=tol)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replay_follows_the_page_lists() -> None:
    """Captured once, replayed with other page lists and lengths written into the same
    buffers (as the batch-1 decode graph is): each replay matches an eager call."""
    hq, hkv, d, page = 32, 8, 128, 16
    g = torch.Generator(device="cuda").manual_seed(1)
    cache = torch.randn(600, 2, page, hkv, d, generator=g, device="cuda", dtype=torch.bfloat16)
    attention = OneRowAttention(hq, hkv, d, torch.device("cuda"))
    q = torch.randn(1, hq, d, generator=g, device="cuda", dtype=torch.bfloat16)
    indptr = torch.zeros(2, dtype=torch.int32, device="cuda")
    indices = torch.zeros(600, dtype=torch.int32, device="cuda")
    last = torch.zeros(1, dtype=torch.int32, device="cuda")

    def fill(seq_len: int) -> None:
        n = -(-seq_len // page)
        indptr[1] = n
        indices[:n] = torch.randperm(600, generator=g, device="cuda")[:n].int()
        last[0] = seq_len - (n - 1) * page

    fill(100)
    attention(q, cache, indptr, indices, last)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention(q, cache, indptr, indices, last)
    for seq_len in (100, 1, 1024, 5000, 333):
        fill(seq_len)
        graph.replay()
        want = attention(q, cache, indptr, indices, last)
        torch.cuda.synchronize()
        assert torch.equal(out, want), seq_len


@pytest.mark.gpu
def test_batch1_decode_graph_runs_it_and_matches_the_torch_path() -> None:
    """One request at a time (the batch-1 decode graph): greedy tokens with the one-row
    kernel equal the torch reference path's and FlashInfer's, over contexts from one
    split to many, and across max_context, where batch 1 moves to FlashInfer's graph."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    prompts = [[(13 * i + j) % 4000 + 1 for j in range(n)]
               for i, n in enumerate([3, 70, 999, 2030])]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    outs = {}
    for mode in ("one-row", "flashinfer", "torch"):
        llm = LLM("mini-llama", load_format="dummy", device="cuda", dtype="bfloat16",
                  num_kv_blocks=512, attention_backend="torch" if mode == "torch" else
                  "flashinfer", one_row_attention=mode == "one-row")
        assert llm.engine.runner.one_row_attention == (mode == "one-row")
        outs[mode] = [llm.generate([p], params)[0].token_ids for p in prompts]
        graphs = llm.engine.runner.graphs
        if mode == "one-row":  # the last prompt ended past max_context
            assert graphs.one_row.config.max_context < 2030 + 40
            assert graphs.last_replayed is graphs.long_graph is not None
        del llm
    assert outs["one-row"] == outs["torch"] == outs["flashinfer"]


def test_tiles_must_be_powers_of_two() -> None:
    for bad in (OneRowConfig(48, 4), OneRowConfig(16, 3), OneRowConfig(8, 4)):
        with pytest.raises(AssertionError, match="powers of two"):
            OneRowAttention(8, 2, 64, torch.device("cpu"), bad)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_after_a_kv_writing_gemv_in_a_graph_of_layers() -> None:
    """As in a batch-1 step: per layer, the QKV GEMV writes this step's K/V in its epilogue,
    the kernel (launched under PDL, KV loads before its wait) attends, the o GEMV feeds the
    next layer; one graph replayed over many lengths. Each KV head's k is 3x its first query
    head, so the new token dominates that head's softmax: a stale read of its slot shows.
    Tickets are shared by all layers and must end at zero."""
    from kernels.layers import gemv

    torch.manual_seed(0)
    layers, hq, hkv, d, page, hidden, blocks = 8, 32, 8, 128, 16, 4096, 800
    dev, bf = "cuda", torch.bfloat16
    cache = torch.randn(blocks, layers, 2, page, hkv, d, device=dev, dtype=bf)
    w_qkv = torch.randn((hq + 2 * hkv) * d, hidden, device=dev, dtype=bf) * 0.02
    for h in range(hkv):
        w_qkv[(hq + h) * d:(hq + h + 1) * d] = 3 * w_qkv[4 * h * d:(4 * h + 1) * d]
    w_o = torch.randn(hidden, hq * d, device=dev, dtype=bf) * 0.02
    norm_w = torch.ones(hidden, device=dev, dtype=bf)
    x = torch.randn(1, hidden, device=dev, dtype=bf)
    pos = torch.zeros(1, dtype=torch.long, device=dev)
    slot = pos.clone()
    cos_sin = torch.randn(10000, d, device=dev)
    indptr = torch.zeros(2, dtype=torch.int32, device=dev)
    indices = torch.zeros(blocks, dtype=torch.int32, device=dev)
    last = torch.ones(1, dtype=torch.int32, device=dev)
    attention = OneRowAttention(hq, hkv, d, torch.device(dev))
    reference = TorchPagedAttention(hq, hkv, d)

    def forward():
        outs, h = [], x
        for i in range(layers):
            rope = gemv.RopeWrite(pos, slot, cos_sin, cache[:, i], hq)
            q, _ = gemv.add_norm_gemv(h, None, norm_w, 1e-5, w_qkv, rope=rope)
            q = q[:, :hq * d].view(1, hq, d)
            o = attention(q, cache[:, i], indptr, indices, last)
            outs.append((q, o))
            h = gemv.gemv(o.reshape(1, -1), w_o)
        return outs

    def fill(seq_len: int) -> torch.Tensor:
        n = -(-seq_len // page)
        table = torch.randperm(blocks, device=dev)[:n].int()
        indptr[1], indices[:n], last[0] = n, table, seq_len - (n - 1) * page
        pos[0], slot[0] = seq_len - 1, table[-1].long() * page + (seq_len - 1) % page
        return table

    fill(100)
    forward()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = forward()
    rng = torch.Generator().manual_seed(1)
    lens = [1, 2, 15, 16, 17, 63, 64, 65, 1000, 2047, 2048, 2049, 4096, 9000]
    lens += torch.randint(1, 2100, (40,), generator=rng).tolist()
    for seq_len in lens:
        table = fill(seq_len)
        graph.replay()
        torch.cuda.synchronize()
        meta = AttentionMetadata(pos, torch.arange(len(table), device=dev)[None],
                                 torch.tensor([seq_len], device=dev), [1], [seq_len], page)
        for i, (q, o) in enumerate(outs):
            want = reference._decode(q.float(), cache[table.long(), i].float(), meta)
            torch.testing.assert_close(o.float(), want, atol=5e-2, rtol=5e-2,
                                       msg=f"seq_len {seq_len} layer {i}")
        assert not attention.tickets.any(), seq_len
