"""KV-aware routing end to end: with 1 prefill and 2 decode workers, requests that share a
prefix land on the decode worker that holds it (its KV events told the router), while a
new prefix goes to the other, emptier worker; conditional disaggregation prefills a
mostly cached prompt on the decode worker itself."""

from __future__ import annotations

import json
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cluster.local_server import baton_serve

pytestmark = pytest.mark.slow
PRESET = "tiny-llama"


def complete(url: str, prompt: list[int]) -> dict:
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": PRESET, "prompt": prompt, "max_tokens": 3, "temperature": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_shared_prefixes_stick_to_their_worker(checkpoint_dir):
    rng = random.Random(0)
    prefix_a = [rng.randrange(4, 1000) for _ in range(96)]
    prefix_b = [rng.randrange(4, 1000) for _ in range(96)]
    with baton_serve(checkpoint_dir(PRESET), "--prefill", "1", "--decode", "2",
                     "--kv-blocks", "512", "--routing", "kv") as url:
        homes: dict[str, set[str]] = {"a": set(), "b": set()}
        for i in range(8):
            name, prefix = ("a", prefix_a) if i % 2 == 0 else ("b", prefix_b)
            body = complete(url, prefix + [rng.randrange(4, 1000) for _ in range(20)])
            homes[name].add(body["baton_route"][0]["decode"])
            time.sleep(0.3)  # let the KV events of this request reach the router
        assert len(homes["a"]) == 1 and len(homes["b"]) == 1, homes
        assert homes["a"] != homes["b"], "the second prefix should go to the emptier worker"
        # Two new prefixes, then six picks of the worker holding them; none diverted.
        metrics = httpx.get(f"{url}/metrics").text
        assert 'baton_kv_route_picks_total{outcome="new_prefix",role="decode"} 2.0' in metrics
        assert 'baton_kv_route_picks_total{outcome="best_prefix",role="decode"} 6.0' in metrics
        assert 'outcome="diverted",role="decode"' not in metrics


def test_mostly_cached_prompt_is_prefilled_locally(checkpoint_dir):
    rng = random.Random(1)
    prefix = [rng.randrange(4, 1000) for _ in range(160)]
    with baton_serve(checkpoint_dir(PRESET), "--prefill", "1", "--decode", "1",
                     "--kv-blocks", "512", "--local-prefill-threshold", "32") as url:
        first = complete(url, [*prefix, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20])
        assert "prefill" in first["baton_route"][0]  # 174 uncached tokens: disaggregated
        time.sleep(0.5)
        second = complete(url, [*prefix, 21, 22, 23])
        route = second["baton_route"][0]
        assert "prefill" not in route, "163 tokens, 160 cached on D: should stay local"
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 160
        metrics = httpx.get(f"{url}/metrics").text
        assert 'baton_routing_decisions_total{kind="local"} 1.0' in metrics
        assert 'baton_routing_decisions_total{kind="disaggregated"} 1.0' in metrics
        # Where each request's time to first token went: the router's routing, then P's
        # queue, compute, hand-off to gRPC and the calls' network time; then D's (and its
        # KV pull) when disaggregated; only the local prefill otherwise.
        t1, t2 = first["baton_timing"][0], second["baton_timing"][0]
        stage = {"queue_ms", "first_token_ms", "emit_ms", "network_ms"}
        assert set(t1) == {"ttft_ms", "router_ms", "kv_transfer_ms",
                           *(f"prefill_{k}" for k in stage),
                           *(f"decode_{k}" for k in stage)}, t1
        assert set(t2) == {"ttft_ms", "router_ms", *(f"prefill_{k}" for k in stage)}, t2
        for t in (t1, t2):
            assert all(v >= 0 for v in t.values()), t
            assert t["prefill_first_token_ms"] > 0
            # The parts of the first token's trip happen one after another within TTFT.
            parts = ["router_ms", *(f"prefill_{k}" for k in stage)]
            assert t["ttft_ms"] >= sum(t[k] for k in parts), t
        prefill_w, decode_w = first["baton_route"][0]["prefill"], route["decode"]
        assert (f'baton_worker_queue_seconds_count{{phase="prefill",worker="{prefill_w}"}} 1.0'
                in metrics)
        assert (f'baton_worker_queue_seconds_count{{phase="prefill",worker="{decode_w}"}} 1.0'
                in metrics)  # the local prefill
        assert (f'baton_worker_first_token_seconds_count{{phase="decode",worker="{decode_w}"}}'
                ' 1.0' in metrics)
        # Streamed: the usage chunk carries it.
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
                "model": PRESET, "prompt": [*prefix, 30, 31], "max_tokens": 3,
                "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: {")]
        assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 160
        assert chunks[-1]["baton_timing"][0]["prefill_first_token_ms"] > 0


def test_backed_up_prefill_pool_overflows_to_the_decode_worker(checkpoint_dir):
    """--prefill-overflow-wait: while the prefill worker has a prompt queued (it would keep
    the next one waiting longer than the limit, at the speed it measured), a burst's
    other prompts are prefilled on the decode worker (in 256-token chunks while it
    decodes); every one still gets the tokens the engine alone gives it."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    rng = random.Random(2)
    prompts = [[rng.randrange(4, 1000) for _ in range(480)] for _ in range(9)]
    with LLM(checkpoint_dir(PRESET)) as llm:
        expected = [o.text for o in llm.generate(
            prompts, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))]
    with baton_serve(checkpoint_dir(PRESET), "--prefill", "1", "--decode", "1",
                     "--kv-blocks", "1024", "--prefill-overflow-wait", "0.000001",
                     # overflowed prompts beside decoding streams go 256 tokens a step
                     "--prefill-tokens-while-decoding", "256") as url:
        first = complete(url, prompts[0])  # nothing queued, and no speed known yet
        assert "prefill" in first["baton_route"][0]
        deadline = time.monotonic() + 10
        while True:  # P measured its speed on that 480-token step; the router polls it
            workers = httpx.get(f"{url}/dashboard/state").json()["workers"]
            speed = next(w for w in workers if w["role"] == "prefill")["prefill_tokens_per_s"]
            if speed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert speed and speed > 0, workers
        prefill = next(w for w in workers if w["role"] == "prefill")
        assert prefill["prefill_backlog_s"] == 0.0  # idle: nothing queued
        with ThreadPoolExecutor(8) as pool:
            bodies = list(pool.map(lambda p: complete(url, p), prompts[1:]))
        assert [b["choices"][0]["text"] for b in [first, *bodies]] == expected
        metrics = httpx.get(f"{url}/metrics").text
        assert "baton_worker_prefill_backlog_seconds{" in metrics
        kinds = {k: float(v) for k, v in re.findall(
            r'baton_routing_decisions_total\{kind="(\w+)"\} ([\d.]+)', metrics)}
        local = [b for b in bodies if "prefill" not in b["baton_route"][0]]
        assert kinds.get("overflow", 0) == len(local) >= 1, kinds
        assert kinds["disaggregated"] == 9 - len(local) >= 2, kinds
