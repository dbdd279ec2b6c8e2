"""A worker told to stop (SIGTERM, as Kubernetes does in a rolling update) drains: the
stream it is serving runs to its last token on it (nothing migrates), requests arriving
meanwhile go to the other worker, and it exits by itself once it is idle."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading

import grpc
import httpx
import pytest

from cluster.local_server import free_port, wait_healthy
from engine.rpc import GRPC_OPTIONS
from engine.rpc import worker_pb2 as pb
from engine.rpc import worker_pb2_grpc as pb_grpc
from engine.rpc.convert import refused_before_start
from engine.sampling_params import SamplingParams
from router.generation import RequestRunner
from router.metrics import RouterMetrics
from router.workers import WorkerPool
from tests.test_discovery_e2e import wait_for
from tests.test_redis_routing_e2e import (
    PRESET,
    complete,
    drain,
    start,
    start_worker,
    start_workers,
    stop_all,
)

pytestmark = pytest.mark.slow
# Long enough that the drain outlasts a few of the router's status polls (0.5 s apart) on
# a loaded 2-core machine: at 1500 tokens the stream once ended before the router looked.
TOKENS = 3500


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
        # Tokens first: a worker counted busy may not have the call yet, and one stopped
        # then refuses it (the router sends it elsewhere; nothing to drain).
        wait_for("the stream's first tokens", lambda: streamed)
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


def test_a_refused_decode_call_leaves_the_prefilled_kv_for_its_retry(checkpoint_dir) -> None:
    """A draining decode worker refuses a disaggregated Generate before touching its KV
    handle, and says so (trailing metadata): a retry on another decode worker (what the
    router does then) pulls the same prefilled blocks instead of prefilling again, and
    gets the tokens an aggregated run gives."""
    model = str(checkpoint_dir(PRESET))
    procs: list[subprocess.Popen] = []
    channels: list[grpc.Channel] = []

    def stub(address: str) -> pb_grpc.WorkerStub:
        channels.append(grpc.insecure_channel(address, options=GRPC_OPTIONS))
        return pb_grpc.WorkerStub(channels[-1])

    params = pb.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompt = list(range(30, 70))
    try:
        addresses = {}
        for name, role in (("p", "prefill"), ("d1", "decode"), ("d2", "decode"), ("agg", "both")):
            proc, addresses[name] = start_worker(model, role=role)
            procs.append(proc)
        expected = [t for ch in stub(addresses["agg"]).Generate(pb.GenerateRequest(
            request_id="agg", prompt_token_ids=prompt, params=params)) for t in ch.token_ids]

        # d1 serves a long stream, so told to stop it drains (refusing new calls) for a while.
        long = stub(addresses["d1"]).Generate(pb.GenerateRequest(
            request_id="long", prompt_token_ids=[5, 6, 7], params=pb.SamplingParams(
                max_tokens=TOKENS, temperature=0.0, ignore_eos=True)))
        next(long)
        procs[1].send_signal(signal.SIGTERM)
        wait_for("d1 to drain", lambda: stub(addresses["d1"]).Status(
            pb.StatusRequest()).draining, timeout=10)

        first = stub(addresses["p"]).Prefill(pb.PrefillRequest(
            request_id="r", prompt_token_ids=prompt, params=params))
        request = pb.GenerateRequest(request_id="r-0", prompt_token_ids=prompt, params=params,
                                     first_token_id=first.first_token_id, handle=first.handle)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub(addresses["d1"]).Generate(request))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused_before_start(refused.value)

        request.request_id = "r-1"
        chunks = list(stub(addresses["d2"]).Generate(request))
        assert chunks[0].kv_transfer_bytes > 0  # pulled, not prefilled again
        assert [first.first_token_id] + [t for ch in chunks for t in ch.token_ids] == expected

        # The router's side: it has not yet seen d1's drain (its next status poll would),
        # picks d1 first, is refused, and retries on d2 with the same KV.
        metrics = RouterMetrics()

        async def through_router() -> list:
            pool = WorkerPool(routing="round-robin")
            for w in pool.add_workers([addresses["p"]], [addresses["d1"], addresses["d2"]]):
                w.healthy = True
            try:
                return [e async for e in RequestRunner(pool, metrics).run(
                    "routed", prompt, SamplingParams(max_tokens=12, temperature=0.0,
                                                     ignore_eos=True))]
            finally:
                await pool.close()

        events = asyncio.run(through_router())
        assert [t for e in events for t in e.token_ids] == expected
        timing = {k: v for e in events if e.timing for k, v in e.timing.items()}
        assert "kv_transfer_ms" in timing, timing  # the retry pulled P's blocks
        assert [e.route for e in events if e.route] == [{"prefill": addresses["p"]},
                                                        {"decode": addresses["d2"]}]
        # A refusal is no failure: nothing migrated (operators read migrations as failures)
        assert metrics.registry.get_sample_value("baton_migrations_total") == 0
        long.cancel()
    finally:
        for c in channels:
            c.close()
        stop_all(procs)
