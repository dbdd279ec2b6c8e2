"""Runs an `LLMEngine` on its own thread and lets asyncio code (the gRPC service) submit
requests and await their outputs. gRPC handlers admit, abort and release through `call`,
which hands the work to the engine thread: before each step it runs, in order, what had
been handed to it when the step before ended (later arrivals wait one step, so callers
polling through `call` cannot starve the steps). Work once handed over always runs; an
admission whose caller is cancelled is aborted right behind it. (Handlers used to take
the engine's lock themselves, from an executor thread; the engine thread, releasing it
after a step and taking it again at once, often won it back: a call waited 1.4 steps on
average, up to 2, in tests/test_worker_stream.py, none of it in the request's queue
time. `lock` still guards the engine; before `start`, `call` runs work under it.)"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from engine.llm_engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output standing for two consecutive ones of a request: the later one's state
    (cumulative tokens, text, finish) with both deltas."""
    first = earlier if earlier.queue_seconds is not None else later
    return dataclasses.replace(later, new_token_ids=earlier.new_token_ids + later.new_token_ids,
                               new_text=earlier.new_text + later.new_text,
                               queue_seconds=first.queue_seconds,
                               first_token_seconds=first.first_token_seconds,
                               first_token_at=first.first_token_at)


def _deliver(pairs: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in pairs:
        q.put_nowait(out)


def _settle(fut: asyncio.Future | None, result: object, error: BaseException | None) -> None:
    if fut is None or fut.done():  # posted without a caller, or the caller was cancelled
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class EngineWorker:
    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop,
                 stream_interval: int = 1) -> None:
        self.engine = engine
        self.loop = loop
        # Tokens per hand-off to a request's stream after its first (--stream-interval):
        # each hand-off becomes one gRPC message and one HTTP chunk, and at hundreds of
        # streams their per-message cost, paid under the GIL the engine thread needs too,
        # slows every step. Outputs held back are merged into the next one handed off.
        self.stream_interval = max(1, stream_interval)
        self._held: dict[str, RequestOutput | None] = {}  # engine thread only
        self.lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        # Work handed to the engine thread: (fn, the caller's future or None).
        self._inbox: deque[tuple[Callable[[LLMEngine], object], asyncio.Future | None]] = \
            deque()
        self._started = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._event_subscribers: list[asyncio.Queue[bytes]] = []
        self.num_steps = 0

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self._fail_inbox(RuntimeError("the engine worker stopped"))

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread before its next step (at once when it is
        idle), after whatever was handed to it earlier. Once handed over, `fn` runs even
        if the caller is cancelled meanwhile."""
        if not self._started:  # no engine thread (tests): nothing steps concurrently
            def locked() -> T:
                with self.lock:
                    return fn(self.engine)
            return await self.loop.run_in_executor(None, locked)
        fut = self.loop.create_future()
        self._hand_over(fn, fut)
        return await fut

    def post(self, fn: Callable[[LLMEngine], object]) -> None:
        """`call` without waiting for it (an abort for a caller that went away)."""
        if self._started:
            self._hand_over(fn, None)
        else:
            with self.lock:
                fn(self.engine)

    def _hand_over(self, fn: Callable[[LLMEngine], object], fut: asyncio.Future | None) -> None:
        self._inbox.append((fn, fut))
        self._wake.set()
        if self._stop.is_set() or not self._thread.is_alive():  # nobody will drain it
            self._fail_inbox(RuntimeError("the engine worker stopped"))

    def _drain_inbox(self) -> None:
        # Only what is here now: calls arriving meanwhile (a transfer polling through
        # `call` every half millisecond) wait for the next step instead of starving it.
        for _ in range(len(self._inbox)):
            fn, fut = self._inbox.popleft()
            try:
                with self.lock:
                    result, error = fn(self.engine), None
            except BaseException as e:  # the engine thread must outlive any call
                result, error = None, e if isinstance(e, Exception) else \
                    RuntimeError(f"engine call raised {e!r}")
            self._to_loop(_settle, fut, result, error)

    def _fail_inbox(self, error: BaseException) -> None:
        while self._inbox:
            _, fut = self._inbox.popleft()
            self._to_loop(_settle, fut, None, error)

    def _to_loop(self, fn: Callable, *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed (shutdown)
            self.loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        try:
            self._loop_steps()
        except BaseException as e:  # died: no stream may wait for it forever
            log.exception("engine thread died")
            self._fail_all(e)
        finally:  # stopped, or died: nothing handed over may wait forever either
            self._stop.set()
            self._fail_inbox(RuntimeError("the engine worker stopped"))

    def _loop_steps(self) -> None:
        next_expiry = 0.0
        while not self._stop.is_set():
            outs: list[RequestOutput] | None = None
            batch = None
            self._drain_inbox()
            try:
                with self.lock:
                    if self.engine.has_unfinished():
                        outs = self.engine.step()
                        self.num_steps += 1
                    batch = self.engine.events.flush()
                    now = time.monotonic()
                    if now >= next_expiry:
                        for rid in self.engine.expire_held(now):
                            log.warning("KV lease of %s expired: blocks freed", rid)
                        next_expiry = now + 1.0
            except Exception as e:  # a bug must not hang every waiting client
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            if batch is not None:
                self._publish(batch.encode())
            if outs is None:
                if not self._inbox:
                    self._wake.wait(0.05)
                self._wake.clear()
                continue
            # One hand-off per step, not per request: each call_soon_threadsafe wakes the
            # event loop and takes the GIL from this thread (256 of them per step at batch
            # 256 slowed steps down in serving).
            pairs = [(q, out) for out in self._to_hand_off(outs)
                     if (q := self._streams.get(out.request_id)) is not None]
            if pairs:
                self._to_loop(_deliver, pairs)

    def _to_hand_off(self, outs: list[RequestOutput]) -> list[RequestOutput]:
        """This step's outputs to hand to their streams: all of them at interval 1; else a
        request's first and last, and otherwise every `stream_interval` tokens."""
        if self.stream_interval == 1:
            return outs
        held, ready = self._held, []
        for out in outs:
            rid = out.request_id
            if rid not in held:  # the first output goes out at once (TTFT)
                held[rid] = None
                ready.append(out)
            else:
                prev = held[rid]
                if prev is not None:
                    out = merge_outputs(prev, out)
                if out.finished or len(out.new_token_ids) >= self.stream_interval:
                    held[rid] = None
                    ready.append(out)
                else:
                    held[rid] = out
            if out.finished:
                held.pop(rid, None)
        if len(held) > 2 * len(self._streams) + 64:  # aborted requests never finish here
            for rid in [r for r in held if r not in self._streams]:
                held.pop(rid, None)
        return ready

    def _publish(self, data: bytes) -> None:
        for q in list(self._event_subscribers):
            self._to_loop(q.put_nowait, data)

    async def subscribe_events(self):
        """(snapshot blocks, last event id, instance id, queue of later encoded batches)."""
        q: asyncio.Queue[bytes] = asyncio.Queue()

        def snap(e: LLMEngine):
            pending, blocks, last = e.kv_snapshot()
            if pending is not None:  # others must not miss what the snapshot absorbs
                self._publish(pending.encode())
            self._event_subscribers.append(q)
            return blocks, last, e.events.instance_id

        blocks, last, instance = await self.call(snap)
        return blocks, last, instance, q

    def unsubscribe_events(self, q: asyncio.Queue) -> None:
        if q in self._event_subscribers:
            self._event_subscribers.remove(q)

    def _fail_all(self, err: BaseException) -> None:
        try:
            with self.lock:
                for rid in list(self._streams):
                    self.engine.abort_request(rid)
        finally:  # the streams hear of it even if an abort fails too
            for q in list(self._streams.values()):
                self._to_loop(q.put_nowait, err)

    async def admit(self, request_id: str, fn: Callable[[LLMEngine], object]) -> asyncio.Queue:
        """Open the request's output queue, then run `fn` (which puts it in the batch)
        under the lock; the queue exists before the first step can produce output, and is
        dropped again if `fn` fails."""
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        admitted = False

        def run(e: LLMEngine) -> object:
            nonlocal admitted
            result = fn(e)
            admitted = True
            return result

        try:
            await self.call(run)
        except asyncio.CancelledError:
            # `fn` runs anyway (it was handed over): an abort right behind it frees what
            # it admitted, so nothing decodes, or holds blocks, for a caller gone (and
            # nothing else is aborted when `fn` refused it, e.g. as a duplicate id).
            self._streams.pop(request_id, None)
            self.post(lambda e: e.abort_request(request_id) if admitted else None)
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return q

    async def stream(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        """Outputs of a request already admitted; aborts it if the consumer goes away.
        Outputs that queued up while the consumer was busy come out as one (their token
        and text deltas joined), so a lagging event loop sends fewer, larger messages
        instead of falling further behind."""
        finished = False
        try:
            while True:
                item = await q.get()
                while isinstance(item, RequestOutput) and not item.finished and not q.empty():
                    nxt = q.get_nowait()
                    item = nxt if isinstance(nxt, BaseException) else merge_outputs(item, nxt)
                if isinstance(item, BaseException):
                    raise RuntimeError(f"engine failed: {item}") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                await self.call(lambda e: e.abort_request(request_id))

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       hold_kv: bool = False) -> AsyncIterator[RequestOutput]:
        arrival = time.monotonic()
        q = await self.admit(request_id, lambda e: e.add_request(
            request_id, prompt, params, hold_kv, arrival_time=arrival))
        async for out in self.stream(request_id, q):
            yield out
