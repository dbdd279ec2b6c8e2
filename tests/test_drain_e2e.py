"""A worker told to stop (SIGTERM, as Kubernetes does in a rolling update) drains: the
stream it is serving runs to its last token on it (nothing migrates), requests arriving
meanwhile go to the other worker, and it exits by itself once it is idle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

import httpx
import pytest

from cluster.local_server import free_port, wait_healthy
from tests.test_discovery_e2e import wait_for
from tests.test_redis_routing_e2e import (
    PRESET,
    complete,
    drain,
    start,
    start_workers,
    stop_all,
)

pytestmark = pytest.mark.slow
TOKENS = 1500


def test_a_stopped_worker_finishes_its_stream_and_takes_nothing_new(checkpoint_dir) -> None:
    model = str(checkpoint_dir(PRESET))
    procs: list[subprocess.Popen] = []
    try:
        addresses = start_workers(model, 2, procs)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        procs.append(start("router", "--model", model, "--port", str(port),
                           "--decode-workers", ",".join(addresses)))
        drain(procs[-1])
        wait_healthy(url)

        streamed: list[int] = []
        finish: list[str] = []

        def stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
                    "model": PRESET, "prompt": [11, 12, 13], "max_tokens": TOKENS,
                    "temperature": 0, "ignore_eos": True, "stream": True,
                    "return_token_ids": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        for ch in json.loads(line[6:])["choices"]:
                            streamed.extend(ch.get("token_ids", []))
                            if ch.get("finish_reason"):
                                finish.append(ch["finish_reason"])

        t = threading.Thread(target=stream)
        t.start()
        busy: list[dict] = []
        wait_for("the stream to start", lambda: busy.extend(
            w for w in httpx.get(f"{url}/health").json()["workers"] if w["in_flight"]) or busy)
        target = busy[0]
        assert len(streamed) < TOKENS // 2, "the stream ended too soon to test a drain"
        os.kill(target["pid"], signal.SIGTERM)
        proc = next(p for p in procs if p.pid == target["pid"])
        # The router sees it draining (its status says so; /health and the dashboard show it).
        wait_for("the router to see the drain", lambda: any(
            w["address"] == target["address"] and w["draining"] and not w["healthy"]
            for w in httpx.get(f"{url}/health").json()["workers"]), timeout=10)

        others = [complete(url, [20 + i] * 5) for i in range(4)]
        assert {o["baton_route"][0]["decode"] for o in others} == \
            set(addresses) - {target["address"]}
        t.join(timeout=120)
        assert len(streamed) == TOKENS and finish == ["length"]
        assert proc.wait(timeout=60) == 0  # exits by itself once idle
        metrics = httpx.get(f"{url}/metrics").text
        assert "baton_migrations_total 0.0" in metrics
    finally:
        stop_all(procs)
