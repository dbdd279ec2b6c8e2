"""The Generate RPC: with a KV handle, pull the prompt blocks this worker lacks from the
prefill worker, release them there, and decode; without one (aggregated serving, or a
short prompt kept local), prefill here first. Tokens stream back as they are sampled."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from engine.errors import InvalidRequestError
from engine.llm_engine import RemoteAdmission, RequestOutput
from engine.rpc import worker_pb2 as pb
from engine.rpc.convert import params_from_proto, top_to_proto
from engine.rpc_server import (
    WorkerService,
    abort_invalid,
    prepare_grammar,
    request_call,
)
from engine.structured import GRAMMAR_ERROR, grammar_failed

log = logging.getLogger(__name__)
ADMIT_TIMEOUT_S = 60.0


def _chunk(out: RequestOutput, sent: int) -> pb.TokenChunk:
    """Tokens of `out` from index `sent` on (a step may finish a request mid-stream)."""
    chunk = pb.TokenChunk(token_ids=out.token_ids[sent:], logprobs=out.logprobs[sent:],
                          finish_reason=out.finish_reason or "")
    if out.top_logprobs:
        chunk.top_logprobs.extend(top_to_proto(t) for t in out.top_logprobs[sent:])
    return chunk


_RELEASES: set[asyncio.Task] = set()  # Release calls in flight to prefill workers


class DecodeService(WorkerService):
    async def Generate(self, request, context):
        async with request_call(self.ctx, context):
            async for chunk in self._generate_stream(request, context):
                yield chunk

    async def _generate_stream(self, request, context):
        ctx = self.ctx
        rid = request.request_id
        prompt = list(request.prompt_token_ids)
        first = pb.TokenChunk()
        arrival = time.monotonic()
        try:
            params = params_from_proto(request.params)  # validates: a 400, not UNKNOWN
            await prepare_grammar(ctx, params)
            if request.HasField("first_token_id"):
                q, first, already = await self._admit_remote(request, params, prompt, context,
                                                             arrival)
            else:
                already = list(request.resume_token_ids)
                q = await ctx.worker.admit(
                    rid, lambda e: e.add_request(rid, prompt, params, resume=already,
                                                 arrival_time=arrival))
        except InvalidRequestError as e:
            await abort_invalid(context, e)
            return
        sent = len(already)
        first_sent = scored = False
        async for out in ctx.worker.stream(rid, q):
            if out.finish_reason == GRAMMAR_ERROR:
                await abort_invalid(context, grammar_failed())
                return
            chunk = _chunk(out, sent)
            sent = len(out.token_ids)
            if out.prompt_logprobs is not None and not scored:
                chunk.prompt_logprobs.extend(out.prompt_logprobs)
                chunk.prompt_top_logprobs.extend(top_to_proto(t)
                                                 for t in out.prompt_top_logprobs or [])
                scored = True
            if not first_sent:
                chunk.num_cached_tokens = out.num_cached_tokens
                chunk.kv_transfer_bytes = first.kv_transfer_bytes
                chunk.kv_transfer_seconds = first.kv_transfer_seconds
                chunk.kv_transfer_backend = first.kv_transfer_backend
                if out.queue_seconds is not None:
                    chunk.queue_seconds = out.queue_seconds
                    chunk.first_token_seconds = out.first_token_seconds
                    chunk.emit_seconds = time.monotonic() - out.first_token_at
                first_sent = True
            yield chunk

    async def _admit_remote(self, request, params, prompt, context, arrival: float):
        ctx = self.ctx
        rid = request.request_id
        handle = request.handle
        generated = [request.first_token_id, *request.resume_token_ids]
        logprobs = [request.first_logprob] + [0.0] * len(request.resume_token_ids)
        deadline = arrival + ADMIT_TIMEOUT_S
        adm: RemoteAdmission | None = None
        prepared: list[RemoteAdmission] = []  # on the engine thread, even if we are gone

        def prepare(e) -> RemoteAdmission | None:
            got = e.prepare_remote(rid, prompt, generated, logprobs, params)
            if got is not None:
                prepared.append(got)
            return got

        try:
            while adm is None:
                adm = await ctx.worker.call(prepare)
                if adm is None:
                    if time.monotonic() > deadline:
                        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                            "no KV blocks free on the decode worker")
                    await asyncio.sleep(0.01)
            own = ctx.transfer.name
            if own != "tcp" and handle.backend and handle.backend != own:  # tcp reads any
                raise RuntimeError(f"the prefill worker offers its KV over {handle.backend}, "
                                   f"this decode worker pulls with {own}: start both with "
                                   "the same --kv-transfer")
            first = pb.TokenChunk(kv_transfer_backend=own)
            src = list(handle.block_ids[adm.num_local_hit_blocks : len(adm.fill_block_ids)
                                        + adm.num_local_hit_blocks])
            t0 = time.perf_counter()
            first.kv_transfer_bytes = await ctx.transfer.pull(
                ctx.peer_of(handle), handle.request_id, src, adm.fill_block_ids)
            first.kv_transfer_seconds = time.perf_counter() - t0
        except BaseException:
            # Runs after any prepare still queued (a cancelled caller's included).
            ctx.worker.post(lambda e: [e.cancel_remote(a) for a in prepared])
            raise
        finally:
            # Not awaited: the prefill worker's round trip would delay this request's
            # admission (~0.7 ms on CPU), and nothing here depends on it.
            task = asyncio.create_task(
                self._release_remote(handle.worker_address, handle.request_id))
            _RELEASES.add(task)  # the loop holds tasks weakly
            task.add_done_callback(_RELEASES.discard)
        # Its queue here counts from the call, less the pull (reported apart): waiting
        # for free blocks is queueing too.
        queued_from = arrival + first.kv_transfer_seconds
        q = await ctx.worker.admit(rid, lambda e: e.commit_remote(adm, queued_from))
        return q, first, generated

    async def _release_remote(self, address: str, rid: str) -> None:
        try:
            await self.ctx.peers.stub(address).Release(pb.ReleaseRequest(request_id=rid))
        except grpc.aio.AioRpcError as e:  # its lease will free the blocks anyway
            log.warning("release of %s on %s failed: %s", rid, address, e.details())
        except Exception as e:  # e.g. the channel closed at shutdown: same fallback
            log.warning("release of %s on %s failed: %r", rid, address, e)
