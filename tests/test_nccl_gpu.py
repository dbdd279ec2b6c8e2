"""The nccl transfer backend on two GPUs (skipped without them, or without CuPy): an
NcclLink pair moves scattered block runs to the right places, staged (gathered into
chunks, four of them here, so both buffers are reused) and unstaged (more than one NCCL
group of runs), abort() ends a receive whose sender never sends, and `baton serve` 1P1D with
`--kv-transfer nccl` gives transformers' greedy tokens."""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import random
import time

import httpx
import pytest
import torch

from kvtransfer.transfer import coalesce

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
    pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="needs CuPy"),
]
BLOCKS, WIDTH = 16384, 2048  # 8 KiB blocks of float32
N = 7000  # scattered: about one run per block; staged, 4 chunks of <= 16 MiB


def _ids(seed: int) -> list[int]:
    ids = list(range(BLOCKS))
    random.Random(seed).shuffle(ids)
    return ids[:N]


def _side(rank: int, conn, staged: bool) -> None:
    """Rank 0 (GPU 0) sends, rank 1 (GPU 1) receives; the pipe carries the unique id."""
    from kvtransfer.transfer.nccl_link import NcclLink, new_unique_id

    torch.cuda.set_device(rank)
    dev = f"cuda:{rank}"
    kv = torch.zeros(BLOCKS, WIDTH, device=dev)
    if rank == 0:
        kv += torch.arange(BLOCKS, device=dev, dtype=torch.float32)[:, None] * 1000
        kv += torch.arange(WIDTH, device=dev, dtype=torch.float32)[None, :]
        (uid,) = conn.recv()
    else:
        uid = new_unique_id()
        conn.send((uid,))
    link = NcclLink(rank, uid, rank, kv.data_ptr(), WIDTH * 4, f"test{rank}",
                    compute_stream=torch.cuda.default_stream(rank).cuda_stream,
                    kv_cache=kv if staged else None, trace=True)
    link.ready.result(timeout=120)
    src, dst = _ids(1), _ids(2)
    runs = coalesce(src, dst)
    mine = [(r.src_start if rank == 0 else r.dst_start, r.count) for r in runs]
    moved = link.submit(mine).result(timeout=120)
    if rank == 0:
        conn.recv()  # the receiver has checked and tried the abort
        link.abort()
        return
    torch.cuda.synchronize()
    s = torch.tensor(src, device=dev, dtype=torch.float32)
    expected = s[:, None] * 1000 + torch.arange(WIDTH, device=dev, dtype=torch.float32)
    ok = torch.equal(kv[torch.tensor(dst, device=dev)], expected)
    # A receive with no matching send hangs until abort() ends it.
    hung = link.submit(mine)
    time.sleep(1.0)
    waiting = not hung.done()
    t0 = time.monotonic()
    link.abort()
    try:
        hung.result(timeout=30)
        error = None
    except Exception as e:
        error = type(e).__name__
    closed = link.wait_closed(30)  # its GPU work has run out: the blocks are free to reuse
    conn.send((moved, len(runs), ok, waiting, error, time.monotonic() - t0, closed,
               link.traces[0]))


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "unstaged"])
def test_link_moves_scattered_runs_and_abort_ends_a_hung_receive(staged):
    from kvtransfer.transfer.staging import DEFAULT_PLAN

    assert len(DEFAULT_PLAN.chunks([1] * N, WIDTH * 4) or []) == 4
    ctx = mp.get_context("spawn")
    a0, b0 = ctx.Pipe()
    a1, b1 = ctx.Pipe()
    procs = [ctx.Process(target=_side, args=(0, b0, staged)),
             ctx.Process(target=_side, args=(1, b1, staged))]
    for p in procs:
        p.start()
    try:
        assert a1.poll(120), "rank 1 made no unique id"
        a0.send(a1.recv())
        assert a1.poll(240), "the transfer did not finish"
        moved, runs, ok, waiting, error, abort_s, closed, trace = a1.recv()
        a0.send(("done",))
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert runs > 1024 and moved == N * WIDTH * 4
    assert ok, "blocks landed in the wrong places"
    assert waiting and error is not None and abort_s < 30 and closed
    # The receiver's trace: host marks in order, GPU marks from real timing events (each
    # chunk's receive, then its scatter, when staged)
    assert trace["bytes"] == moved and trace["runs"] == runs
    assert 0 <= trace["host_taken_ms"] <= trace["host_queued_ms"] <= trace["host_seen_done_ms"]
    gpu = trace["gpu"]
    assert gpu["start"] == 0 and gpu["end"] > 0
    if staged:
        for c in range(4):
            assert gpu[f"op{c}"] <= gpu[f"opped{c}"] <= gpu[f"copy{c}"] <= gpu[f"copied{c}"]
        assert gpu["copied3"] <= gpu["end"]


@pytest.mark.slow
def test_serving_1p1d_over_nccl_equals_transformers(checkpoint_dir):
    from cluster.local_server import baton_serve
    from engine.tokenizer import TokenizerBundle
    from tests.hf_oracle import hf_greedy, load_hf

    model = checkpoint_dir("tiny-llama")
    tok = TokenizerBundle.from_dir(model)
    texts = ["Hello there, how are you?", "The quick brown fox " * 30, "1, 2, 3,"]
    hf = load_hf(model)
    expected = [hf_greedy(hf, tok.encode(t), 12)[0] for t in texts]
    with baton_serve(model, "--prefill", "1", "--decode", "1", "--prefill-gpus", "0",
                     "--decode-gpus", "1", "--device", "cuda", "--dtype", "float32",
                     "--kv-transfer", "nccl", "--kv-blocks", "256", timeout=300) as url:
        health = httpx.get(f"{url}/health").json()
        assert {w["kv_backend"] for w in health["workers"]} == {"nccl"}
        for text, ref in zip(texts, expected):
            r = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "model": model.name, "prompt": text, "max_tokens": 12, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}).json()
            assert r["choices"][0]["token_ids"] == ref
        metrics = httpx.get(f"{url}/metrics").text
        assert 'baton_kv_transfer_bytes_total{backend="nccl"}' in metrics
