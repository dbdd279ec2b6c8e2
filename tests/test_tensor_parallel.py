"""Tensor parallelism across real processes (gloo on CPU): a TP=2 engine produces the
same greedy tokens and logprobs as TP=1 and as transformers, with its KV heads, MLP and
vocabulary split across two ranks, and its follower process leaves on close."""

from __future__ import annotations

import importlib.util

import httpx
import pytest
import torch

from engine.config import EngineConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.hf_oracle import hf_greedy, load_hf


def _prompts() -> list[list[int]]:
    # Mixed lengths incl. one over the chunk size and two sharing a prefix.
    base = [(13 * i) % 1000 + 3 for i in range(150)]
    return [[5, 6, 7], base, [*base[:100], 9, 9, 9], [(7 * i) % 997 + 2 for i in range(300)]]


# tiny-llama-untied: a tied tiny model puts nearly all probability on one token whatever
# the context, so it hides wrong KV; the untied head's logprobs show it.
@pytest.mark.parametrize("preset", ["tiny-llama-untied", "tiny-qwen3"])
def test_tp2_equals_tp1_and_transformers(checkpoint_dir, preset: str) -> None:
    model_dir = checkpoint_dir(preset)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    kw = {"num_kv_blocks": 128, "max_num_batched_tokens": 128}
    with LLM(str(model_dir), tp=2, **kw) as llm:
        followers = llm.engine.tp.followers
        assert llm.engine.runner.kv_spec.num_kv_heads * 2 == llm.engine.model_config.num_kv_heads
        tp2 = llm.generate(_prompts(), params)
    assert all(p.poll() is not None for p in followers), "follower outlived close()"
    with LLM(str(model_dir), **kw) as llm:
        tp1 = llm.generate(_prompts(), params)
    hf = load_hf(model_dir)
    for a, b, prompt in zip(tp2, tp1, _prompts()):
        ref_ids, ref_lps = hf_greedy(hf, prompt, 12)
        assert a.token_ids == b.token_ids == ref_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, ref_lps)) < 1e-4


def test_tp2_prompt_logprobs_equal_tp1(checkpoint_dir) -> None:
    """Prompt logprobs under TP: the followers compute the same extra logits rows (the
    vocabulary all-gather is collective), across prefill chunks."""
    model_dir = str(checkpoint_dir("tiny-llama-untied"))
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2)
    prompts = _prompts()[1:]
    kw = {"num_kv_blocks": 128, "max_num_batched_tokens": 128}
    with LLM(model_dir, tp=2, **kw) as llm:
        tp2 = llm.generate(prompts, params)
    with LLM(model_dir, **kw) as llm:
        tp1 = llm.generate(prompts, params)
    for a, b, p in zip(tp2, tp1, prompts):
        assert len(a.prompt_logprobs) == len(p) - 1
        assert max(abs(x - y) for x, y in zip(a.prompt_logprobs, b.prompt_logprobs)) < 1e-4
        assert a.token_ids == b.token_ids


def test_tp_that_does_not_divide_the_kv_heads_names_the_flag(checkpoint_dir) -> None:
    # tiny-mistral has one KV head: it cannot be split over two ranks.
    with pytest.raises(ValueError, match="num_key_value_heads=1 is not divisible by --tp 2"):
        LLM(str(checkpoint_dir("tiny-mistral")), tp=2, num_kv_blocks=64)


def test_tp_config_is_validated() -> None:
    with pytest.raises(ValueError, match="--tp"):
        EngineConfig(model="x", tp=0)


# Tier tests: three conversations, then six others that push them out of a 40-block
# device cache, then the three again (their prefixes come back from a lower tier).
TIER_PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)
CONVS = [[(31 * c + 7 * i) % 1000 + 3 for i in range(160)] for c in range(3)]
FILLER = [[(17 * c + 3 * i) % 1000 + 5 for i in range(160)] for c in range(3, 9)]


def _tier_reference(model_dir: str, **device):
    with LLM(model_dir, num_kv_blocks=40, **device) as llm:
        return llm.generate(CONVS, TIER_PARAMS)


def test_host_tier_under_tp_brings_back_every_ranks_shard(checkpoint_dir) -> None:
    """Blocks evicted to host memory and loaded back under TP=2 give the logprobs of TP=1:
    the followers repeat the leader's host-tier copies on their shards. (Before they did,
    the untied model's logprobs changed after host hits; a tied tiny model hid it.)"""
    model_dir = str(checkpoint_dir("tiny-llama-untied"))
    params, convs, filler = TIER_PARAMS, CONVS, FILLER
    ref = _tier_reference(model_dir)
    with LLM(model_dir, tp=2, num_kv_blocks=40, host_kv_blocks=128) as llm:
        llm.generate(convs, params)
        llm.generate(filler, params)
        again = llm.generate(convs, params)
        assert llm.engine.tiers.stats.hits["host"] > 0
    for a, r in zip(again, ref):
        assert a.num_cached_tokens >= 144
        assert a.token_ids == r.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, r.logprobs)) < 1e-4


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason="needs 2 GPUs")])])
def test_disk_tier_under_tp_holds_whole_blocks_any_tp_size_reads(checkpoint_dir, tmp_path,
                                                                  device) -> None:
    """A disk tier under TP=2: blocks leave a small host tier for disk files holding every
    rank's heads (gathered from both ranks), and disk hits are scattered back to both: the
    logprobs equal TP=1's. The files are those of TP=1: a TP=1 engine started on them
    hits them with the same logprobs (and a TP=2 one restarted on them does too). On CUDA
    (float32) the references are CUDA's TP=1."""
    model_dir = str(checkpoint_dir("tiny-llama-untied"))
    params, convs, filler = TIER_PARAMS, CONVS, FILLER
    on = {"device": "cuda", "dtype": "float32"} if device == "cuda" else {}
    ref = _tier_reference(model_dir, **on)
    tiers = {"host_kv_blocks": 4, "disk_kv_blocks": 512, "disk_kv_dir": str(tmp_path), **on}

    def check(outs) -> None:
        for a, r in zip(outs, ref):
            assert a.num_cached_tokens >= 144
            assert a.token_ids == r.token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, r.logprobs)) < 1e-4

    with LLM(model_dir, tp=2, num_kv_blocks=40, **tiers) as llm:
        llm.generate(convs, params)
        llm.generate(filler, params)
        again = llm.generate(convs, params)
        stats = llm.engine.tiers.stats
        assert stats.offloaded_to_disk > 0 and stats.hits["disk"] > 0
        llm.engine.tiers.settle()
    check(again)
    for tp in (1, 2):  # files written under TP=2, read at TP=1 and at TP=2 after a restart
        with LLM(model_dir, tp=tp, num_kv_blocks=40, **tiers) as llm:
            outs = llm.generate(convs, params)
            assert llm.engine.tiers.stats.hits["disk"] > 0, f"tp={tp} missed the files"
        check(outs)


def test_baton_serve_with_a_tp2_worker(checkpoint_dir) -> None:
    """The whole stack: router + one aggregated worker whose model is split over two
    processes; completions over HTTP equal transformers' greedy tokens."""
    import httpx

    from cluster.local_server import baton_serve
    from engine.tokenizer import TokenizerBundle

    model_dir = checkpoint_dir("tiny-llama")
    tok = TokenizerBundle.from_dir(model_dir)
    hf = load_hf(model_dir)
    texts = ["Hello there, how are you?", "The quick brown fox " * 20]
    with baton_serve(model_dir, "--prefill", "0", "--decode", "1", "--tp", "2",
                     "--kv-blocks", "128") as url:
        for text in texts:
            r = httpx.post(f"{url}/v1/completions", timeout=60, json={
                "model": "tiny-llama", "prompt": text, "max_tokens": 10, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True})
            assert r.status_code == 200, r.text
            got = r.json()["choices"][0]["token_ids"]
            assert got == hf_greedy(hf, tok.encode(text), 10)[0]


def test_a_dead_rank_takes_its_worker_down_and_requests_go_elsewhere(checkpoint_dir) -> None:
    """SIGKILL one follower rank: its worker exits at once (instead of hanging in a
    collective) and the router keeps answering from the other worker."""
    import os
    import signal
    import time

    import httpx

    from cluster.local_server import _alive, _children, baton_serve

    model_dir = checkpoint_dir("tiny-llama")
    body = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    with baton_serve(model_dir, "--prefill", "0", "--decode", "2", "--tp", "2",
                     "--kv-blocks", "64") as url:
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        serve_pid = next(p for p in _children(os.getpid())
                         if _children(p))
        workers = _children(serve_pid)
        victim_worker = workers[0]
        follower = _children(victim_worker)[0]
        os.kill(follower, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while _alive(victim_worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(victim_worker), "worker kept running without its rank"
        for _ in range(4):
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text


def _prompts_for_hf(n: int = 3) -> list[list[int]]:
    return [[(13 * i + c) % 1000 + 3 for i in range(40 + 37 * c)] for c in range(n)]


def _complete(url: str, model: str, prompt: list[int]) -> dict:
    import httpx

    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_disaggregated_tp2_prefill_and_decode(checkpoint_dir) -> None:
    """1P1D with both workers at TP=2: the prefill leader gathers its ranks' KV shards,
    the decode leader scatters them to its ranks; tokens equal transformers' (untied
    model: wrong KV in any rank's heads shows)."""
    from cluster.local_server import baton_serve

    model_dir = checkpoint_dir("tiny-llama-untied")
    hf = load_hf(model_dir)
    with baton_serve(model_dir, "--prefill", "1", "--decode", "1", "--tp", "2",
                     "--kv-transfer", "tcp", "--kv-blocks", "128") as url:
        for prompt in _prompts_for_hf():
            body = _complete(url, "tiny-llama-untied", prompt)
            assert "prefill" in body["baton_route"][0]
            assert body["choices"][0]["token_ids"] == hf_greedy(hf, prompt, 10)[0]


@pytest.mark.skipif(importlib.util.find_spec("nixl") is None, reason="NIXL is not installed")
def test_disaggregated_tp2_over_per_rank_nixl(checkpoint_dir) -> None:
    """1P1D at TP=2 with --kv-transfer nixl: each decode rank reads its shard from the
    same prefill rank's agent; tokens equal transformers' and the KV bytes are reported."""
    from cluster.local_server import baton_serve

    model_dir = checkpoint_dir("tiny-llama-untied")
    hf = load_hf(model_dir)
    with baton_serve(model_dir, "--prefill", "1", "--decode", "1", "--tp", "2",
                     "--kv-transfer", "nixl", "--kv-blocks", "128") as url:
        assert {w["kv_backend"] for w in httpx.get(f"{url}/health").json()["workers"]} == \
            {"nixl"}
        for prompt in _prompts_for_hf():
            body = _complete(url, "tiny-llama-untied", prompt)
            assert "prefill" in body["baton_route"][0]
            assert body["choices"][0]["token_ids"] == hf_greedy(hf, prompt, 10)[0]


def test_prefill_tp2_hands_kv_to_a_tp1_decode_worker(checkpoint_dir) -> None:
    """Full-head blocks on the wire: a TP=2 prefill worker and a TP=1 decode worker
    exchange KV (re-sharded on the way), and tokens still equal transformers'."""
    import subprocess
    import sys
    import threading

    from cluster.local_server import REPO, free_port, wait_healthy
    from cluster.worker_main import READY_PREFIX

    model_dir = str(checkpoint_dir("tiny-llama-untied"))
    hf = load_hf(model_dir)
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        return p

    def address_of(p: subprocess.Popen) -> str:
        for line in p.stdout:
            if line.startswith(READY_PREFIX):
                threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
                return line.split()[1]
        raise AssertionError("worker exited before it was ready")

    try:
        prefill = address_of(start("worker", "--role", "prefill", "--model", model_dir,
                                   "--tp", "2", "--kv-blocks", "128", "--kv-transfer", "tcp"))
        decode = address_of(start("worker", "--role", "decode", "--model", model_dir,
                                  "--kv-blocks", "128", "--kv-transfer", "tcp"))
        port = free_port()
        router = start("router", "--model", model_dir, "--prefill-workers", prefill,
                       "--decode-workers", decode, "--port", str(port))
        threading.Thread(target=lambda: [None for _ in router.stdout], daemon=True).start()
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        for prompt in _prompts_for_hf():
            body = _complete(url, "tiny-llama-untied", prompt)
            assert body["baton_route"][0]["prefill"] == prefill
            assert body["choices"][0]["token_ids"] == hf_greedy(hf, prompt, 10)[0]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_tp_worker_refuses_other_kv_transports(checkpoint_dir) -> None:
    import subprocess
    import sys

    from cluster.local_server import REPO

    p = subprocess.run([sys.executable, "-m", "cluster.cli", "worker", "--role", "prefill",
                        "--model", str(checkpoint_dir("tiny-llama")), "--tp", "2",
                        "--kv-transfer", "nccl"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0
    assert "--kv-transfer nccl with --tp 2" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.skipif(importlib.util.find_spec("nixl") is None, reason="NIXL is not installed")
def test_nixl_pairs_only_workers_of_the_same_tp() -> None:
    """A TP=1 worker pulling from a TP=2 prefill worker over nixl (and the reverse) is
    refused with the flags to change, before any read is posted."""
    import asyncio

    import torch

    from kvtransfer.transfer.base import PeerInfo
    from kvtransfer.transfer.nixl import (
        NixlBackend,
        RankAgent,
        ShardedNixlBackend,
        pack_rank_agents,
    )

    kv = torch.zeros(4, 2, 2, 4, 2, 8)
    single = NixlBackend(kv, "tp-width-test", None)
    two_ranks = pack_rank_agents([RankAgent(f"p-r{r}", b"meta", 4096, single.block_bytes, r)
                                  for r in range(2)])

    async def fetch_tp(address: str) -> bytes:
        return two_ranks

    async def fetch_plain(address: str) -> bytes:
        return single.metadata()

    async def never(*args) -> int:
        raise AssertionError("no read may start")

    peer = PeerInfo("127.0.0.1:1", "p-r0", 4096, single.block_bytes)
    single._fetch_metadata = fetch_tp
    with pytest.raises(ValueError, match=r"split over 2 tensor-parallel ranks and this worker "
                                         r"has 1.*same --tp.*--kv-transfer tcp"):
        asyncio.run(single.pull(peer, "r1", [0], [1]))
    sharded = ShardedNixlBackend(single, [RankAgent("d-r0", b"", 0, single.block_bytes, 0)] * 2,
                                 fetch_plain, never)
    with pytest.raises(ValueError, match="split over 1 tensor-parallel ranks and this worker "
                                         "has 2"):
        asyncio.run(sharded.pull(peer, "r1", [0], [1]))
    single.close()
