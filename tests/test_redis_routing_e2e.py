"""Two router processes sharing one Redis (Valkey) index route a shared prefix to the same
worker; killing Redis mid-run loses no request (routing falls back to load only), and
when Redis returns empty the routers rebuild it from the workers and route by prefix
again."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from cluster.local_server import REPO, free_port, wait_healthy
from cluster.worker_main import READY_PREFIX
from kvtransfer.hashing import block_hashes
from router.prefix_index import Overlap
from router.redis_index import RedisPrefixIndex

pytestmark = pytest.mark.slow
PRESET = "tiny-llama"


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def drain(p: subprocess.Popen) -> None:
    """Keep reading a child's output so a full pipe never blocks its logging."""
    threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()


def start_worker(model: str, *args: str, role: str = "both") -> tuple[subprocess.Popen, str]:
    """A `baton worker` (aggregated unless `role` says otherwise) and the address it
    prints once it serves."""
    w = start("worker", "--role", role, "--model", model, "--kv-blocks", "256", *args)
    for line in w.stdout:
        if line.startswith(READY_PREFIX):
            drain(w)
            return w, line.split()[1]
    raise AssertionError(f"worker exited with {w.wait()}")


def start_workers(model: str, n: int, procs: list[subprocess.Popen]) -> list[str]:
    """n aggregated workers, each added to `procs` as it starts (so `stop_all` stops those
    started before one that fails); their addresses."""
    addresses = []
    for _ in range(n):
        w, address = start_worker(model)
        procs.append(w)
        addresses.append(address)
    return addresses


def stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGTERM whatever still runs, then wait (killing what outlives 30 s)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
        p.stdout.close()


async def index_overlap(url: str, prompt: list[int]) -> dict[str, Overlap]:
    idx = RedisPrefixIndex(url)
    try:
        return await idx.lookup(block_hashes(prompt, 16))
    finally:
        await idx.close()


def complete(url: str, prompt: list[int]) -> dict:
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": PRESET, "prompt": prompt, "max_tokens": 4, "temperature": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_routers_share_redis_and_survive_its_loss(checkpoint_dir, redis_url):
    url_redis, server = redis_url
    model = str(checkpoint_dir(PRESET))
    procs: list[subprocess.Popen] = []
    try:
        addrs = start_workers(model, 2, procs)
        routers = []
        for _ in range(2):
            port = free_port()
            procs.append(start("router", "--model", model, "--decode-workers", ",".join(addrs),
                               "--port", str(port), "--index", url_redis))
            drain(procs[-1])
            routers.append(f"http://127.0.0.1:{port}")
        for u in routers:
            wait_healthy(u)

        rng = random.Random(3)
        prefix = [rng.randrange(4, 1000) for _ in range(80)]

        def ask(u: str) -> str:
            body = complete(u, prefix + [rng.randrange(4, 1000) for _ in range(10)])
            return body["baton_route"][0]["decode"]

        home = ask(routers[0])
        time.sleep(1.0)  # KV events -> both routers -> Redis
        assert {ask(routers[1]), ask(routers[0]), ask(routers[1])} == {home}

        # Redis goes away in the middle of a burst: every request still completes.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(complete, routers[i % 2],
                                   [rng.randrange(4, 1000) for _ in range(40)])
                       for i in range(16)]
            time.sleep(0.05)
            server.stop()
            results = [f.result() for f in futures]
        assert all(r["usage"]["completion_tokens"] == 4 for r in results)
        # (Not the shared prefix: load-only routing could copy it to the other worker.)
        assert complete(routers[1], [5, 6, 7] * 20)["usage"]["completion_tokens"] == 4

        server.start()  # same port, empty store
        for u in routers:  # their next lookups succeed: each resyncs from the workers
            complete(u, [9, 8, 7] * 20)
        deadline = time.monotonic() + 20
        while asyncio.run(index_overlap(url_redis, prefix)).get(home, Overlap()).total < 5:
            assert time.monotonic() < deadline, "the index was not rebuilt"
            time.sleep(0.3)
        assert {ask(routers[0]), ask(routers[1]), ask(routers[0])} == {home}
    finally:
        stop_all(procs)
