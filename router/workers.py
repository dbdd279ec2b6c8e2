"""The router's view of its workers: gRPC stubs, health from periodic Status calls, and
its own count of requests in flight, which the selection policy reads."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from dataclasses import dataclass, field

import grpc

from engine.rpc import GRPC_OPTIONS
from engine.rpc import worker_pb2 as pb
from engine.rpc import worker_pb2_grpc as pb_grpc
from router.errors import WorkerUnavailableError

log = logging.getLogger(__name__)


@dataclass
class WorkerHandle:
    address: str
    role: str  # "prefill" or "decode"
    stub: pb_grpc.WorkerStub
    channel: grpc.aio.Channel
    healthy: bool = False
    in_flight: int = 0
    # Prompt tokens this router has sent here whose first token has not come back yet:
    # an exact, immediate view of the prefill queue (the polled status lags).
    pending_prefill_tokens: int = 0
    status: pb.WorkerStatus | None = None
    # KV blocks of this router's requests that finished here since `status` was polled
    # (at perf_counter() `status_at`), having started before: the status, up to 0.5 s
    # old, still counts them as in use, and that stale load would send the next request
    # away from the worker that holds its prefix.
    blocks_freed_since_status: int = 0
    status_at: float = 0.0
    polling: asyncio.Future | None = field(default=None, repr=False)  # refresh_soon's
    failures: int = 0
    retired: bool = False  # left the pool (discovery); its channel closes once idle
    # Times a supervisor started it again at this address (`baton serve`; None where no
    # supervisor of this process watches it: separate workers, Kubernetes pods).
    restarts: int | None = None

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """The speed it measured on its own prefill steps (None: none yet)."""
        rate = self.status.prefill_tokens_per_s if self.status else 0.0
        return rate or None

    @property
    def queued_prefill_tokens(self) -> int:
        """Prompt tokens ahead of a new one here: what this router has sent and not had
        back, or what the worker last reported waiting (other routers' requests too),
        whichever is more."""
        reported = self.status.queued_prefill_tokens if self.status else 0
        return max(self.pending_prefill_tokens, reported)

    def prefill_wait_s(self, rate: float | None = None) -> float | None:
        """Seconds a prompt sent now would wait behind the prefill queued here, at this
        worker's measured speed (or `rate`, a stand-in while it has measured none); 0
        when nothing is queued; None when there is a queue and no speed to time it."""
        queued = self.queued_prefill_tokens
        if queued == 0:
            return 0.0
        rate = self.prefill_tokens_per_s or rate
        return queued / rate if rate else None

    @property
    def prefill_backlog_s(self) -> float | None:
        """Seconds of prefill queued here at its own measured speed; None before it has
        measured one (no stand-in speed: this is what the worker itself reports)."""
        return self.prefill_wait_s() if self.prefill_tokens_per_s else None

    def to_json(self) -> dict:
        s = self.status
        return {"address": self.address, "role": self.role, "healthy": self.healthy,
                # Only while it answers: one that died draining is down.
                "draining": bool(s and s.draining) and self.failures == 0,
                "in_flight": self.in_flight,
                "running": s.num_running if s else None,
                "waiting": s.num_waiting if s else None,
                "held": s.num_held if s else None,
                "free_blocks": s.free_blocks if s else None,
                "total_blocks": s.total_blocks if s else None,
                "cached_blocks": s.cached_blocks if s else None,
                "kv_backend": s.kv_backend if s else None,
                "pid": s.pid if s else None,
                "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "prefill_backlog_s": self.prefill_backlog_s,
                "restarts": self.restarts}


@dataclass
class WorkerPool:
    prefill: list[WorkerHandle] = field(default_factory=list)
    decode: list[WorkerHandle] = field(default_factory=list)
    routing: str = "round-robin"
    _rr: dict[str, itertools.count] = field(default_factory=dict)
    # Removed (discovery: its lease ran out) but still serving requests that picked it:
    # its channel closes when the last of them ends.
    retired: list[WorkerHandle] = field(default_factory=list)
    # Addresses a supervisor in this process restarts (`baton serve`): their handles count
    # restarts (count_restart), the others report none.
    supervised: set[str] = field(default_factory=set)

    def add_workers(self, prefill: list[str], decode: list[str]) -> list[WorkerHandle]:
        """Open channels (call from the event loop that will use them); the new handles."""
        def handle(addr: str, role: str) -> WorkerHandle:
            ch = grpc.aio.insecure_channel(addr, options=GRPC_OPTIONS)
            return WorkerHandle(addr, role, pb_grpc.WorkerStub(ch), ch,
                                restarts=0 if addr in self.supervised else None)

        new = [handle(a, "prefill") for a in prefill] + [handle(a, "decode") for a in decode]
        self.prefill.extend(w for w in new if w.role == "prefill")
        self.decode.extend(w for w in new if w.role == "decode")
        return new

    def count_restart(self, address: str) -> None:
        """A supervisor in this process started the worker at `address` again."""
        for w in self.all:
            if w.address == address:
                w.restarts = (w.restarts or 0) + 1

    def remove(self, address: str) -> WorkerHandle | None:
        """Stop picking it; requests already on it go on (their channel stays open)."""
        for pool in (self.prefill, self.decode):
            for w in pool:
                if w.address == address:
                    pool.remove(w)
                    w.healthy, w.retired = False, True
                    self.retired.append(w)
                    return w
        return None

    async def close_idle_retired(self) -> None:
        for w in [w for w in self.retired if w.in_flight == 0]:
            self.retired.remove(w)
            await w.channel.close()

    @property
    def all(self) -> list[WorkerHandle]:
        return self.prefill + self.decode

    @property
    def disaggregated(self) -> bool:
        return any(w.healthy for w in self.prefill)

    @property
    def mode(self) -> str:
        """What /health and the dashboard report: disaggregated while a prefill worker is up."""
        return "disaggregated" if self.disaggregated else "aggregated"

    @property
    def max_model_len(self) -> int | None:
        lens = [w.status.max_model_len for w in self.all if w.status and w.healthy]
        return min(lens) if lens else None

    def shortest_prefill_wait(self) -> tuple[float | None, float | None]:
        """The least-backed-up live prefill worker's wait in seconds, and a prefill speed
        to time other queues with (the fastest measured). A worker that has measured no
        speed yet (just restarted, or only short prompts so far) is timed at that speed,
        and an idle one waits 0: either may be the shortest queue. Nones while nothing
        can be timed."""
        live = [w for w in self.prefill if w.healthy]
        rate = max((r for w in live if (r := w.prefill_tokens_per_s)), default=None)
        waits = [wait for w in live if (wait := w.prefill_wait_s(rate)) is not None]
        return (min(waits) if waits else None), rate

    def pick(self, role: str, exclude: set[str] | None = None) -> WorkerHandle:
        pool = self.prefill if role == "prefill" else self.decode
        live = [w for w in pool if w.healthy and w.address not in (exclude or set())]
        if not live:
            raise WorkerUnavailableError(f"no healthy {role} worker")
        if self.routing == "round-robin":
            counter = self._rr.setdefault(role, itertools.count())
            return live[next(counter) % len(live)]
        if self.routing == "random":
            return random.choice(live)
        # least-loaded by the router's own in-flight count; rotation breaks ties
        counter = self._rr.setdefault(role, itertools.count())
        start = next(counter) % len(live)
        rotated = live[start:] + live[:start]
        return min(rotated, key=lambda w: w.in_flight)

    async def refresh(self) -> None:
        await asyncio.gather(*(self._poll(w) for w in self.all))

    def refresh_soon(self, w: WorkerHandle) -> None:
        """Poll `w`'s status now, out of turn (one poll at a time per worker): a request
        just ended there, and until the next regular poll its blocks would still count as
        load (`blocks_freed_since_status` estimates them meanwhile)."""
        if w.polling is None or w.polling.done():
            w.polling = asyncio.ensure_future(self._poll(w))

    async def _poll(self, w: WorkerHandle) -> None:
        try:
            asked = time.perf_counter()
            status = await w.stub.Status(pb.StatusRequest(), timeout=2.0)
            if asked < w.status_at:
                return  # a poll asked later has answered already (refresh_soon's, say)
            w.status, w.status_at, w.blocks_freed_since_status = status, asked, 0
            if w.status.draining:  # shutting down: nothing new goes there
                if w.healthy:
                    log.info("%s worker %s is draining", w.role, w.address)
                w.healthy, w.failures = False, 0  # it answers: draining, not down
                return
            if not w.healthy:
                log.info("%s worker %s is up", w.role, w.address)
            w.healthy, w.failures = True, 0
        except grpc.aio.AioRpcError as e:
            w.failures += 1
            if w.healthy:
                log.warning("%s worker %s is down: %s", w.role, w.address, e.code())
            w.healthy = False

    def mark_failed(self, w: WorkerHandle) -> None:
        w.healthy = False
        w.failures += 1

    async def wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await self.refresh()
            if all(w.healthy for w in self.all):
                return
            if loop.time() > deadline:
                down = [w.address for w in self.all if not w.healthy]
                raise TimeoutError(f"workers not ready after {timeout}s: {', '.join(down)}")
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        for w in self.all + self.retired:
            await w.channel.close()
