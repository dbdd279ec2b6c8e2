"""A router started with --discover and no worker list serves whatever workers register in
Redis (a real Valkey): a worker that joins gets requests; one killed outright is dropped
when its lease lapses; a replacement takes over with the same greedy tokens; a worker
stopped cleanly leaves at once, long before its lease would run out."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from cluster.local_server import free_port
from tests.test_redis_routing_e2e import PRESET, complete, drain, start, start_worker, stop_all

pytestmark = pytest.mark.slow


def health(url: str) -> tuple[int, dict]:
    r = httpx.get(f"{url}/health", timeout=2)
    return r.status_code, r.json()


def wait_for(what: str, cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_router_serves_the_workers_that_register(checkpoint_dir, redis_url) -> None:
    redis, _ = redis_url
    model = str(checkpoint_dir(PRESET))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = [start("router", "--model", model, "--discover", redis, "--port", str(port))]
    drain(procs[0])
    try:
        # Up with no worker at all: not ready, and says so.
        wait_for("the router", lambda: health(url)[0] == 503)
        assert health(url)[1]["workers"] == []

        w1, a1 = start_worker(model, "--register", redis, "--lease-seconds", "1")
        procs.append(w1)
        wait_for("the first worker", lambda: health(url)[0] == 200)
        prompt = list(range(40, 90))
        first = complete(url, prompt)
        assert first["baton_route"][0]["decode"] == a1

        w1.kill()  # no clean stop: its lease lapses (1 s), then the router drops it
        t0 = time.monotonic()
        wait_for("the dead worker to be dropped", lambda: health(url)[1]["workers"] == [])
        assert time.monotonic() - t0 < 10
        assert health(url)[0] == 503

        w2, a2 = start_worker(model, "--register", redis, "--lease-seconds", "30")
        procs.append(w2)
        wait_for("the second worker", lambda: health(url)[0] == 200)
        second = complete(url, prompt)
        assert second["baton_route"][0]["decode"] == a2
        assert second["choices"][0]["text"] == first["choices"][0]["text"]

        w2.send_signal(signal.SIGTERM)  # a clean stop deregisters: gone well within 30 s
        t0 = time.monotonic()
        wait_for("the stopped worker to leave", lambda: health(url)[1]["workers"] == [],
                 timeout=10)
        assert time.monotonic() - t0 < 10
    finally:
        stop_all(procs)
