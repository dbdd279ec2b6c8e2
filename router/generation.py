"""One request's trip through the workers (DESIGN.md, "A request, step by step"):
prefill on P, first token out at once, then decode on D with P's KV handle; or decode
only (aggregated). If a decode worker dies mid-stream the request moves to another one
with the tokens generated so far (migration), so the client sees one unbroken stream."""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import xxhash

from engine.errors import InvalidRequestError
from engine.rpc import worker_pb2 as pb
from engine.rpc.convert import params_to_proto, refused_before_start, top_from_proto
from engine.sampling_params import SamplingParams
from router.errors import WorkerUnavailableError
from router.kv_routing import KVRouter
from router.metrics import RouterMetrics
from router.policy import prefill_placement
from router.prefix_index import Overlap
from router.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN}
MAX_ATTEMPTS = 3


@dataclass
class TokenEvent:
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int | None = None  # on the first event
    route: dict[str, str] | None = None  # which workers serve it (first event of a stage)
    # Milliseconds a worker spent on it before its first token there (first event of a
    # stage): "<phase>_queue_ms" waiting, "<phase>_first_token_ms" computing, phase
    # "prefill" (whoever made the first token), "decode" (the decode worker of a
    # disaggregated request) or "migrated" (a worker taking over after one failed: it
    # prefills prompt and tokens so far); "kv_transfer_ms" for the decode worker's pull.
    # Also "<phase>_emit_ms" (token sampled -> handed to gRPC there: the engine thread to
    # event loop hop), "<phase>_network_ms" (the call's round trip less the worker's own
    # parts: both gRPC hops and the handler's start) and, on the first stage, "router_ms"
    # (routing and building the call, from the request reaching the runner).
    timing: dict[str, float] | None = None
    # params.prompt_logprobs: once, on the first event that has them (entry i for prompt
    # token i + 1), with their top alternatives
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None


def _invalid(e: grpc.aio.AioRpcError) -> InvalidRequestError:
    param, _, msg = (e.details() or "").partition("|")
    return InvalidRequestError(msg or param, param=param or None)


class RequestRunner:
    def __init__(self, pool: WorkerPool, metrics: RouterMetrics, kv: KVRouter | None = None,
                 local_prefill_threshold: int = 0, prefill_overflow_wait_s: float = 0.0
                 ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.kv = kv  # None: round-robin / random / least-loaded picks
        self.local_prefill_threshold = local_prefill_threshold
        self.prefill_overflow_wait_s = prefill_overflow_wait_s  # 0: never overflow
        self._background: set[asyncio.Future] = set()

    async def run(self, request_id: str, prompt: list[int], params: SamplingParams
                  ) -> AsyncIterator[TokenEvent]:
        generated: list[int] = []
        handle: pb.KVHandle | None = None
        prefill_w: WorkerHandle | None = None
        t0 = time.perf_counter()
        overlaps, bs = await self.kv.overlaps(prompt) if self.kv else ({}, 16)
        tie_key = xxhash.xxh3_64_intdigest(struct.pack(f"<{len(prompt)}I", *prompt))
        decode_w = self._pick("decode", set(), overlaps, bs, tie_key)
        # Conditional disaggregation: when what decode_w lacks of the prompt is short,
        # prefilling it right there beats shipping KV from a prefill worker; so does a
        # prefill pool backed up past --prefill-overflow-wait (router/policy.py).
        held = overlaps[decode_w.address].total * bs if decode_w.address in overlaps else 0
        placement = "local"
        # A prompt to score (echo with logprobs) is computed where it is decoded: the
        # decode worker returns its logprobs with the first tokens.
        if self.pool.disaggregated and params.prompt_logprobs is None:
            prefill_wait, rate = self.pool.shortest_prefill_wait()
            placement = prefill_placement(len(prompt) - held, self.local_prefill_threshold,
                                          self.prefill_overflow_wait_s, prefill_wait,
                                          decode_w.prefill_wait_s(rate))
        disaggregate = placement == "disaggregated"
        self.metrics.routing.labels(placement).inc()
        self.metrics.router_span.labels("route").observe(time.perf_counter() - t0)
        local_prefill = 0
        scored = params.prompt_logprobs is None  # nothing to wait for
        failed: set[str] = set()
        routed: WorkerHandle | None = None
        try:
            if disaggregate:
                first, prefill_w, rtt, router_s = await self._prefill(
                    request_id, prompt, params, overlaps, bs, tie_key, t0)
                generated.append(first.first_token_id)
                top = [top_from_proto(pb.TopLogprobList(items=first.first_top_logprobs))] \
                    if first.first_top_logprobs else []
                yield TokenEvent([first.first_token_id], [first.first_logprob], top,
                                 first.finish_reason or None, first.num_cached_tokens,
                                 route={"prefill": prefill_w.address},
                                 timing=self._timing("prefill", prefill_w, first, rtt,
                                                     router_s))
                if first.finish_reason:
                    return
                handle = first.handle if first.HasField("handle") else None
            else:  # decode_w prefills what it lacks; count it until its first token is back
                local_prefill = len(prompt) - held
                decode_w.pending_prefill_tokens += local_prefill
            first_event = not generated
            for attempt in range(MAX_ATTEMPTS):
                w = decode_w if attempt == 0 else self._pick("decode", failed, overlaps, bs,
                                                             tie_key)
                if w.retired:  # it left the pool (discovery) while P prefilled: its channel
                    failed.add(w.address)  # closes once idle, so do not start on it
                    w = self._pick("decode", failed, overlaps, bs, tie_key)
                req = pb.GenerateRequest(request_id=f"{request_id}-{attempt}",
                                         prompt_token_ids=prompt,
                                         params=params_to_proto(params))
                if handle is not None:
                    req.first_token_id = generated[0]
                    req.first_logprob = 0.0
                    req.handle.CopyFrom(handle)
                    req.resume_token_ids.extend(generated[1:])
                else:
                    req.resume_token_ids.extend(generated)
                # Whatever happens to an attempt that began, the decode side releases P's
                # blocks, so a retry must not read them again: it re-prefills locally
                # instead. A call refused before it began (a draining worker) touched
                # nothing: its retry pulls the same blocks.
                offered, handle = handle, None
                w.in_flight += 1
                sent_at = time.perf_counter()
                router_s = sent_at - t0 if first_event and attempt == 0 else None
                call = w.stub.Generate(req)
                phase = "prefill" if not generated else "decode" if attempt == 0 \
                    else "migrated"
                timing: dict[str, float] | None = None
                try:
                    async for chunk in call:
                        if timing is None:  # this worker's first chunk
                            timing = self._timing(phase, w, chunk,
                                                  time.perf_counter() - sent_at, router_s)
                            if chunk.kv_transfer_backend:
                                timing["kv_transfer_ms"] = chunk.kv_transfer_seconds * 1e3
                        if local_prefill:
                            decode_w.pending_prefill_tokens -= local_prefill
                            local_prefill = 0
                        if chunk.kv_transfer_backend:
                            self.metrics.kv_transfer(chunk.kv_transfer_backend,
                                                     chunk.kv_transfer_bytes,
                                                     chunk.kv_transfer_seconds)
                        generated.extend(chunk.token_ids)
                        prompt_lps = prompt_tops = None
                        if not scored and (chunk.prompt_logprobs or len(prompt) < 2):
                            # (a migrated request is scored again: the first set counts)
                            scored = True
                            prompt_lps = list(chunk.prompt_logprobs)
                            prompt_tops = [top_from_proto(t)
                                           for t in chunk.prompt_top_logprobs]
                        yield TokenEvent(
                            list(chunk.token_ids), list(chunk.logprobs),
                            [top_from_proto(t) for t in chunk.top_logprobs],
                            chunk.finish_reason or None,
                            chunk.num_cached_tokens if first_event else None,
                            route={"decode": w.address} if routed is not w else None,
                            timing=timing if routed is not w else None,
                            prompt_logprobs=prompt_lps, prompt_top_logprobs=prompt_tops)
                        first_event = False
                        routed = w
                        if chunk.finish_reason:
                            return
                    return
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        raise _invalid(e) from None
                    if e.code() not in RETRYABLE:
                        raise
                    if refused_before_start(e):  # a draining worker: nothing failed
                        handle = offered
                        log.info("decode worker %s is draining: %s goes elsewhere",
                                 w.address, request_id)
                    else:
                        log.warning("decode worker %s failed on %s (%s): migrating with %d "
                                    "tokens%s", w.address, request_id, e.code(),
                                    len(generated),
                                    " and the prefilled KV" if handle is not None else "")
                        self.metrics.migrations.inc()
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        self.pool.mark_failed(w)
                    failed.add(w.address)
                finally:
                    w.in_flight -= 1
                    if sent_at < w.status_at:  # free (or cached) there now, whatever the
                        # status says, until the poll asked for here answers (an estimate:
                        # a prefix shared with requests still running stays in use)
                        w.blocks_freed_since_status += -(-(len(prompt) + len(generated)) // bs)
                        self.pool.refresh_soon(w)
                    call.cancel()  # no-op when done; frees the worker's blocks otherwise
            raise WorkerUnavailableError("decode failed on every worker tried")
        finally:
            if local_prefill:
                decode_w.pending_prefill_tokens -= local_prefill
            if prefill_w is not None:
                # Normally the decode worker has released P's blocks already (then this
                # is a no-op); if the request ended before that, P frees them now.
                task = asyncio.ensure_future(self._release(prefill_w, request_id))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    def _timing(self, phase: str, w: WorkerHandle, msg: pb.PrefillResponse | pb.TokenChunk,
                rtt: float, router_s: float | None = None) -> dict[str, float]:
        """The first message of a call: where its round trip `rtt` (seconds) went."""
        timing = {} if router_s is None else {"router_ms": router_s * 1e3}
        if not msg.HasField("queue_seconds"):  # a worker that does not report it
            return timing
        self.metrics.worker_queue.labels(phase, w.address).observe(msg.queue_seconds)
        self.metrics.worker_first_token.labels(phase, w.address).observe(
            msg.first_token_seconds)
        worker_s = msg.queue_seconds + msg.first_token_seconds + msg.emit_seconds
        timing.update({f"{phase}_queue_ms": msg.queue_seconds * 1e3,
                       f"{phase}_first_token_ms": msg.first_token_seconds * 1e3,
                       f"{phase}_emit_ms": msg.emit_seconds * 1e3,
                       f"{phase}_network_ms": max(rtt - worker_s, 0.0) * 1e3})
        return timing

    def _pick(self, role: str, failed: set[str], overlaps: dict[str, Overlap],
              block_size: int, tie_key: int) -> WorkerHandle:
        if self.kv is not None:
            w, outcome = self.kv.pick(role, overlaps, block_size, failed, tie_key)
            self.metrics.kv_picks.labels(role, outcome).inc()
            return w
        return self.pool.pick(role, exclude=failed)

    async def _prefill(self, request_id: str, prompt: list[int], params: SamplingParams,
                       overlaps: dict[str, Overlap], block_size: int, tie_key: int,
                       t0: float) -> tuple[pb.PrefillResponse, WorkerHandle, float, float]:
        """The first token from a prefill worker, which one, the call's round trip, and
        the seconds from `t0` to the first call sent (routing)."""
        failed: set[str] = set()
        router_s: float | None = None
        for _ in range(MAX_ATTEMPTS):
            w = self._pick("prefill", failed, overlaps, block_size, tie_key)
            held = overlaps[w.address].total * block_size if w.address in overlaps else 0
            w.in_flight += 1
            w.pending_prefill_tokens += len(prompt) - held
            try:
                call = pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt,
                                         params=params_to_proto(params))
                sent_at = time.perf_counter()
                if router_s is None:
                    router_s = sent_at - t0
                resp = await w.stub.Prefill(call)
                return resp, w, time.perf_counter() - sent_at, router_s
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise _invalid(e) from None
                if e.code() not in RETRYABLE:
                    raise
                log.warning("prefill worker %s failed on %s (%s): retrying elsewhere",
                            w.address, request_id, e.code())
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    self.pool.mark_failed(w)
                failed.add(w.address)
            finally:
                w.in_flight -= 1
                w.pending_prefill_tokens -= len(prompt) - held
        raise WorkerUnavailableError("prefill failed on every worker tried")

    async def _release(self, w: WorkerHandle, request_id: str) -> None:
        try:
            await w.stub.Release(pb.ReleaseRequest(request_id=request_id), timeout=5)
        except grpc.aio.AioRpcError as e:
            log.info("release of %s on %s failed (%s); its lease frees it", request_id,
                     w.address, e.code())
        except grpc.aio.UsageError:  # it left the pool and its channel is closed
            log.info("release of %s on %s skipped (the worker left); its lease frees it",
                     request_id, w.address)
