"""Everything at once against one `baton serve` (1 prefill + 2 decode workers): streamed and
whole requests, clients hanging up mid-stream, bad requests, and a decode worker killed
(SIGKILL) in the middle of it all. Every request that runs to its end gets exactly the
tokens it gets alone, every bad one a 400, the killed worker comes back on its address,
and no worker is left holding blocks."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cluster.local_server import baton_serve, wait_pools_empty
from tests.test_discovery_e2e import wait_for

pytestmark = pytest.mark.slow
PRESET = "tiny-llama"
PROMPTS = [f"Request {i}: " + "tell me about the sea " * (1 + i % 9) for i in range(12)]


def body(prompt: str, **extra) -> dict:
    return {"model": PRESET, "prompt": prompt, "max_tokens": 40, "temperature": 0,
            "ignore_eos": True, **extra}


def whole(url: str, prompt: str) -> str:
    r = httpx.post(f"{url}/v1/completions", json=body(prompt), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def streamed(url: str, prompt: str, hang_up_after: int | None = None) -> str | None:
    text, chunks = "", 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body(prompt, stream=True),
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text += "".join(c["text"] for c in chunk["choices"])
            chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                return None  # the client goes away mid-stream
    return text


def bad(url: str, prompt: str) -> None:
    r = httpx.post(f"{url}/v1/completions", json=body(prompt, max_tokens=0), timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text


def test_mixed_traffic_with_a_worker_killed_midway(checkpoint_dir) -> None:
    with baton_serve(checkpoint_dir(PRESET), "--prefill", "1", "--decode", "2",
                     "--kv-blocks", "1024") as url:
        expected = {p: whole(url, p) for p in PROMPTS}  # alone, one at a time
        rng = random.Random(5)
        jobs = [(rng.choice(["whole", "stream", "hang_up", "bad"]), rng.choice(PROMPTS))
                for _ in range(96)]
        killed: list[dict] = []
        started = threading.Event()

        def run(kind: str, prompt: str) -> tuple[str, str, str | None]:
            started.set()
            if kind == "whole":
                return kind, prompt, whole(url, prompt)
            if kind == "stream":
                return kind, prompt, streamed(url, prompt)
            if kind == "hang_up":
                return kind, prompt, streamed(url, prompt, hang_up_after=rng.randint(1, 5))
            bad(url, prompt)
            return kind, prompt, None

        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(run, *job) for job in jobs]
            started.wait(30)

            def busy_decode_worker() -> bool:
                killed.extend(w for w in httpx.get(f"{url}/health").json()["workers"]
                              if w["role"] == "decode" and w["in_flight"])
                return bool(killed)

            wait_for("a decode worker with requests on it", busy_decode_worker, timeout=30)
            os.kill(killed[0]["pid"], signal.SIGKILL)
            results = [f.result(timeout=300) for f in futures]

        for kind, prompt, text in results:
            if kind in ("whole", "stream"):
                assert text == expected[prompt], (kind, prompt)
        assert {kind for kind, _, _ in results} == {"whole", "stream", "hang_up", "bad"}

        def back() -> bool:
            (w,) = [w for w in httpx.get(f"{url}/health").json()["workers"]
                    if w["address"] == killed[0]["address"]]
            return w["healthy"] and w["restarts"] == 1

        wait_for("the killed worker to be back", back, timeout=60)
        wait_pools_empty(url, timeout=30)
        metrics = httpx.get(f"{url}/metrics").text
        assert "baton_migrations_total 0.0" not in metrics  # streams moved off the dead one
        assert whole(url, PROMPTS[0]) == expected[PROMPTS[0]]  # and all serve again
