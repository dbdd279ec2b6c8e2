"""The Prefill RPC: prefill the (uncached part of the) prompt, sample the first token with
the request's own settings, keep the blocks pinned and hand back a KV handle. The blocks
are freed when the decode worker calls Release, or when the lease runs out."""

from __future__ import annotations

import dataclasses
import time

import grpc

from engine.errors import InvalidRequestError
from engine.rpc import worker_pb2 as pb
from engine.rpc.convert import params_from_proto, top_to_proto
from engine.rpc_server import (
    WorkerService,
    abort_invalid,
    prepare_grammar,
    request_call,
)
from engine.structured import GRAMMAR_ERROR, grammar_failed


class PrefillService(WorkerService):
    async def Prefill(self, request, context):
        async with request_call(self.ctx, context):
            return await self._prefill_call(request, context)

    async def _prefill_call(self, request, context):
        ctx = self.ctx
        rid = request.request_id
        prompt = list(request.prompt_token_ids)
        last = None
        try:
            params = params_from_proto(request.params)  # validates: a 400, not UNKNOWN
            # One token here; the rest on the decode side. EOS/stop tokens still end it.
            first_only = dataclasses.replace(params, max_tokens=1,
                                             min_tokens=min(params.min_tokens, 1))
            await prepare_grammar(ctx, params)
            async for out in ctx.worker.generate(rid, prompt, first_only, hold_kv=True):
                last = out  # the one output of its one token
        except InvalidRequestError as e:
            await abort_invalid(context, e)
            return pb.PrefillResponse()
        assert last is not None and last.finished
        if last.finish_reason == GRAMMAR_ERROR:
            await ctx.worker.call(lambda e: e.release(rid))
            await abort_invalid(context, grammar_failed())
            return pb.PrefillResponse()
        ended = last.finish_reason == "stop" or params.max_tokens == 1
        reason = (last.finish_reason if last.finish_reason == "stop" else "length") \
            if ended else ""

        def take_handle(e):
            held = e.held.get(rid)
            if held is None:
                return None
            if ended:  # nothing to hand over
                e.release(rid)
                return None
            return ctx.handle_for(rid, list(held[0].block_table), len(prompt))

        handle = await ctx.worker.call(take_handle)
        if handle is None and not ended:
            await context.abort(grpc.StatusCode.INTERNAL, "prefill lost its blocks")
        resp = pb.PrefillResponse(first_token_id=last.token_ids[0],
                                  first_logprob=last.logprobs[0], finish_reason=reason,
                                  num_cached_tokens=last.num_cached_tokens)
        if last.queue_seconds is not None:
            resp.queue_seconds = last.queue_seconds
            resp.first_token_seconds = last.first_token_seconds
            resp.emit_seconds = time.monotonic() - last.first_token_at
        if last.top_logprobs:
            resp.first_top_logprobs.extend(top_to_proto(last.top_logprobs[0]).items)
        if handle is not None:
            resp.handle.CopyFrom(handle)
        return resp
