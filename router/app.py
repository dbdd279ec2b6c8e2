"""The router's FastAPI app: OpenAI endpoints, health, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer, TokenizerBundle
from router import dashboard
from router.errors import WorkerUnavailableError, install_error_handlers, model_not_found
from router.generation import RequestRunner
from router.kv_routing import KVRouter
from router.membership import Membership, admit, retire
from router.metrics import RouterMetrics
from router.policy import PolicyWeights
from router.protocol import ChatCompletionRequest, CompletionRequest
from router.responses import ChoiceState, Delta, Formatter
from router.tokenize import install_tokenize_routes
from router.tools import ToolPlan, format_for, plan_tools
from router.workers import WorkerPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterConfig:
    model: str  # checkpoint dir (tokenizer) or preset name (dummy weights)
    served_model_name: str
    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    routing: str = "kv"  # kv | round-robin | random | least-loaded
    local_prefill_threshold: int = 0  # uncached prompt tokens at or below: prefill on D
    # Prefill on D too while every prefill worker would keep the prompt waiting longer
    # than this (seconds at its measured speed); 0: never.
    prefill_overflow_wait_s: float = 0.0
    index: str = "memory"  # memory | redis://HOST:PORT
    route_weights: PolicyWeights = field(default_factory=PolicyWeights)
    ready_timeout_s: float = 120.0
    # redis://HOST:PORT: also serve the workers registered there (cluster/discovery.py),
    # added and dropped as their leases come and go.
    discover: str | None = None
    # The tool-call format replies are read in (router/tools.py); None: the template's.
    tool_call_parser: str | None = None


def load_tokenizer(model: str) -> TokenizerBundle:
    from pathlib import Path

    if Path(model).is_dir():
        return TokenizerBundle.from_dir(model)
    return TokenizerBundle.from_preset(model)


class Router:
    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.tok = load_tokenizer(cfg.model)
        self.tool_format = cfg.tool_call_parser or format_for(self.tok.chat_template)
        self.metrics = RouterMetrics()
        self.chart = dashboard.ChartHistory()  # the dashboard chart's last two minutes
        self.pool = WorkerPool(routing=cfg.routing)
        self.kv = (KVRouter(self.pool, cfg.index, cfg.route_weights)
                   if cfg.routing == "kv" else None)
        self.runner = RequestRunner(self.pool, self.metrics, self.kv,
                                    cfg.local_prefill_threshold, cfg.prefill_overflow_wait_s)
        self._refresher: asyncio.Task | None = None
        self.membership: Membership | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # once started

    def count_restart_threadsafe(self, address: str) -> None:
        """A supervisor thread's report that the worker at `address` is back: counted on
        the event loop that owns the pool (or here, before the router has started)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            self.pool.count_restart(address)
        else:
            loop.call_soon_threadsafe(self.pool.count_restart, address)

    async def replace_worker(self, old: str, role: str, new: str) -> None:
        """A restarted worker at a new address (the Ray job's supervisor): `role` is the
        pool, prefill or decode."""
        await retire(self.pool, self.kv, self.metrics, old)
        admit(self.pool, self.kv, [new] if role == "prefill" else [],
              [new] if role != "prefill" else [])

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        # grpc.aio channels bind to the running loop: open them here, not in __init__.
        self.pool.add_workers(self.cfg.prefill, self.cfg.decode)
        if self.pool.all:
            await self.pool.wait_ready(self.cfg.ready_timeout_s)
        self._refresher = asyncio.create_task(self._refresh_loop())
        if self.kv is not None:
            self.kv.start()
        if self.cfg.discover:
            # Workers come later, or are there already: /health says 503 until a decode
            # worker answers.
            self.membership = Membership(self.cfg.discover, self.pool, self.kv, self.metrics,
                                         fixed=set(self.cfg.prefill) | set(self.cfg.decode))
            await self.membership.start()

    async def stop(self) -> None:
        if self._refresher:
            self._refresher.cancel()
        if self.membership is not None:
            await self.membership.stop()
        if self.kv is not None:
            await self.kv.stop()
        await self.pool.close()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.chart.maybe_sample(self.metrics)
            await self.pool.refresh()
            await self.pool.close_idle_retired()
            if self.kv is not None:
                await self.kv.renew_leases()
            for w in self.pool.all:
                m, labels = self.metrics, (w.address, w.role)
                m.worker_in_flight.labels(*labels).set(w.in_flight)
                if w.status is not None:
                    m.worker_free_blocks.labels(*labels).set(w.status.free_blocks)
                    m.worker_running.labels(*labels).set(w.status.num_running)
                    m.worker_queued_prefill_tokens.labels(*labels).set(
                        w.status.queued_prefill_tokens)
                    if (backlog := w.prefill_backlog_s) is not None:
                        m.worker_prefill_backlog.labels(*labels).set(backlog)
                    else:  # no speed measured (a restarted worker): no stale value
                        with contextlib.suppress(KeyError):
                            m.worker_prefill_backlog.remove(*labels)

    # ---- request preparation -------------------------------------------------------
    @staticmethod
    def needs_tokenizer(req: CompletionRequest | ChatCompletionRequest) -> bool:
        if isinstance(req, ChatCompletionRequest):
            return True
        p = req.prompt
        return isinstance(p, str) or any(isinstance(x, str) for x in p or ())

    def prompts_of(self, req: CompletionRequest | ChatCompletionRequest,
                   tools: ToolPlan | None = None) -> list[list[int]]:
        if isinstance(req, ChatCompletionRequest):
            messages = [m.for_template() for m in req.messages]
            return [self.tok.chat_prompt_ids(messages, tools.tools if tools else None)]
        p = req.prompt
        if isinstance(p, str):
            prompts = [self.tok.encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [self.tok.encode(x) for x in p]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]
        else:
            raise InvalidRequestError("prompt must be a non-empty string, list of strings, "
                                      "token ids, or list of token id lists", param="prompt")
        vocab = self.tok.vocab_size
        for ids in prompts:
            if not ids:
                raise InvalidRequestError("prompt must not be empty", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"token ids must be in [0, {vocab})",
                                          param="prompt")
        return prompts

    def echo_texts(self, req, prompts: list[list[int]]
                   ) -> list[tuple[str, list[int] | None]] | None:
        """Completions with echo: each prompt's text as given (token ids: decoded), and for
        a text prompt where each of its tokens starts in it (the tokenizer's offsets: a
        special token the text does not contain, BOS, starts at 0 and takes no room)."""
        if not isinstance(req, CompletionRequest) or not req.echo:
            return None
        p = req.prompt
        texts = [p] if isinstance(p, str) else list(p) \
            if all(isinstance(x, str) for x in p) else None
        if texts is None:
            return [(self.tok.decode(ids, skip_special_tokens=False), None) for ids in prompts]
        out = []
        for text, ids in zip(texts, prompts):
            enc = self.tok.tokenizer.encode(text)
            out.append((text, [start for start, _ in enc.offsets] if enc.ids == ids else None))
        return out

    def params_of(self, req, prompt_len: int) -> SamplingParams:
        max_len = self.pool.max_model_len or 0
        if isinstance(req, ChatCompletionRequest):
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
                else req.max_tokens
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            max_tokens, logprobs = req.max_tokens, req.logprobs
            if req.echo and max_tokens == 0:
                max_tokens = 1  # scores the prompt; the token generated is dropped
        if max_tokens is None:
            max_tokens = max(max_len - prompt_len, 1)
        params = req.sampling_params(max_tokens, logprobs)
        if isinstance(req, CompletionRequest) and req.echo and logprobs is not None:
            params.prompt_logprobs = logprobs
        if max_len and prompt_len + params.max_tokens > max_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {prompt_len + params.max_tokens} tokens ({prompt_len} in the "
                f"prompt, {params.max_tokens} in the completion).", param="max_tokens")
        return params

    # ---- running ---------------------------------------------------------------------
    async def run_choice(self, state: ChoiceState, params: SamplingParams,
                         request_id: str, t_start: float) -> AsyncIterator[Delta]:
        m = self.metrics
        last = None
        status = "error"
        try:
            async for ev in self.runner.run(f"{request_id}-{state.index}",
                                            state.prompt_token_ids, params):
                now = time.perf_counter()
                if last is None:
                    m.ttft.observe(now - t_start)
                    state.timing["ttft_ms"] = (now - t_start) * 1e3
                elif ev.token_ids:
                    gap = (now - last) / len(ev.token_ids)
                    for _ in ev.token_ids:
                        m.itl.observe(gap)
                last = now
                t0 = time.perf_counter()
                if ev.cached_tokens is not None:
                    state.cached_tokens = ev.cached_tokens
                if ev.route:
                    state.route.update(ev.route)
                if ev.timing:
                    state.timing.update(ev.timing)
                if ev.prompt_logprobs is not None and state.prompt_logprobs is None:
                    state.prompt_logprobs = ev.prompt_logprobs
                    state.prompt_top_logprobs = ev.prompt_top_logprobs
                if state.score_only:  # the prompt's scores were all it asked for
                    if ev.finish_reason:
                        state.finish_reason = "length"
                        status = "ok"
                        yield Delta(state.index, "", [], [], [], "length")
                        return
                    continue
                # Token by token: a stop string ends the choice at the token completing
                # it, and the tokens after it in this chunk (the worker does not know the
                # stop strings) are neither returned nor counted.
                parts, kept = [], 0
                for t in ev.token_ids:
                    parts.append(state.detok.add_token(t))
                    kept += 1
                    if state.detok.stopped:
                        break
                text = "".join(parts)
                finish = ev.finish_reason
                if state.detok.stopped:
                    finish = "stop"
                elif finish:
                    text += state.detok.flush()
                ids, lps, tops = (list(ev.token_ids[:kept]), list(ev.logprobs[:kept]),
                                  list(ev.top_logprobs[:kept]))
                state.token_ids.extend(ids)
                state.logprobs.extend(lps)
                state.top_logprobs.extend(tops)
                state.text += text
                m.router_span.labels("detokenize").observe(time.perf_counter() - t0)
                yield Delta(state.index, text, ids, lps, tops, finish)
                if finish:
                    state.finish_reason = finish
                    status = "ok"
                    return
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            m.requests.labels(status).inc()
            m.e2e.observe(time.perf_counter() - t_start)
            if not state.shares_prompt:
                m.prompt_tokens.inc(len(state.prompt_token_ids))
                m.cached_tokens.inc(state.cached_tokens)
            m.generation_tokens.inc(len(state.token_ids))

    async def handle(self, req, kind: str, arrived: float | None = None,
                     disconnected: Callable[[], Awaitable[bool]] | None = None):
        """`arrived`: perf_counter() when the request's headers reached the app (before its
        body was read, parsed and validated), where TTFT counts from."""
        t_handler = time.perf_counter()
        t_start = arrived if arrived is not None else t_handler
        if req.model != self.cfg.served_model_name:  # as OpenAI: 404, model_not_found
            return model_not_found(req.model, self.cfg.served_model_name)
        req.check_supported()
        tools = plan_tools(req.tools, req.tool_choice, self.tool_format,
                           req.parallel_tool_calls is not False) \
            if isinstance(req, ChatCompletionRequest) else None
        if req.constrained():
            await asyncio.to_thread(req.constraint)  # compiled once, off the event loop
        # Tokenizing a long prompt takes milliseconds: keep it off the event loop, which is
        # streaming every other request's tokens meanwhile. Token ids need no tokenizer,
        # only a range check: inline, without the ~1 ms thread hop.
        if self.needs_tokenizer(req):
            prompts = await asyncio.to_thread(self.prompts_of, req, tools)
        else:
            prompts = self.prompts_of(req)
        # n choices per prompt, numbered prompt by prompt as OpenAI does; a seeded request's
        # choice j samples with seed + j (choice 0 is what n=1 gives).
        per_prompt = [self.params_of(req, len(p)) for p in prompts]
        constrained_by = req.constraint()[1]
        if tools is not None and tools.forced:
            if constrained_by:
                raise InvalidRequestError(f"{constrained_by} cannot be combined with a "
                                          "tool_choice that forces a call",
                                          param=constrained_by)
            # The grammar decides where the call ends: a stop string or token cutting it
            # would leave a reply that is neither a call nor text.
            per_prompt = [dataclasses.replace(sp, grammar=tools.grammar, stop=[],
                                              stop_token_ids=[]) for sp in per_prompt]
            self.metrics.constrained.labels("tool_choice").inc()
        elif constrained_by:
            self.metrics.constrained.labels(
                "response_format" if constrained_by == "response_format" else "vllm").inc()
        params = [dataclasses.replace(sp, seed=_wrap_int64(sp.seed + j))
                  if j and sp.seed is not None else sp for sp in per_prompt for j in range(req.n)]
        self.metrics.router_span.labels("tokenize").observe(time.perf_counter() - t_handler)
        request_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        echo = self.echo_texts(req, prompts)
        states = [ChoiceState(i, prompts[i // req.n], IncrementalDetokenizer(
            self.tok, sp.stop, sp.skip_special_tokens, sp.include_stop_str_in_output,
            sp.min_tokens), shares_prompt=i % req.n > 0,
            echo_text=echo[i // req.n][0] if echo else None,
            echo_offsets=echo[i // req.n][1] if echo else None,
            score_only=bool(echo) and req.max_tokens == 0)
            for i, sp in enumerate(params)]
        fmt = Formatter(kind, request_id, self.cfg.served_model_name, self.tok,
                        req.return_token_ids, params[0].logprobs, tools,
                        on_calls=self.metrics.tool_calls.inc)
        if not req.stream:
            async def drain(s: ChoiceState, sp: SamplingParams) -> None:
                async for _ in self.run_choice(s, sp, request_id, t_start):
                    pass

            try:
                await self._until_done_or_gone(
                    [asyncio.create_task(drain(s, sp)) for s, sp in zip(states, params)],
                    disconnected)
            except ClientGone:
                return Response(status_code=499)  # (nginx's "client closed request")
            return JSONResponse(fmt.full(states))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(self._sse(states, params, fmt, request_id, t_start,
                                           include_usage), media_type="text/event-stream")

    async def _until_done_or_gone(self, tasks: list[asyncio.Task],
                                  disconnected: Callable[[], Awaitable[bool]] | None) -> None:
        """Wait for a non-streaming request's choices; if the client goes away first (it
        timed out, say), cancel them, so the workers stop generating for nobody, as they
        do when a stream's client goes."""
        try:
            while True:
                done, pending = await asyncio.wait(tasks, timeout=DISCONNECT_POLL_S,
                                                   return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    if not t.cancelled() and t.exception() is not None:
                        raise t.exception()
                if not pending:
                    return
                if disconnected is not None and await disconnected():
                    raise ClientGone
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _sse(self, states, params, fmt: Formatter, request_id: str, t_start: float,
                   include_usage: bool) -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(s: ChoiceState, sp: SamplingParams) -> None:
            try:
                async for d in self.run_choice(s, sp, request_id, t_start):
                    await queue.put(d)
            except Exception as e:
                await queue.put(e)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(s, sp)) for s, sp in zip(states, params)]
        first = {s.index: True for s in states}
        remaining = len(tasks)
        try:
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, Exception):
                    status, msg = _status_of(item)
                    yield fmt.error_event(status, msg, getattr(item, "param", None))
                    break
                yield fmt.chunk(item, states[item.index], first[item.index])
                first[item.index] = False
            else:
                if include_usage:
                    yield fmt.usage_chunk(states)
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:  # the client went away, or an error: stop the workers too
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)


def _status_of(e: Exception) -> tuple[int, str]:
    if isinstance(e, InvalidRequestError):
        return 400, str(e)
    if isinstance(e, WorkerUnavailableError):
        return 503, str(e)
    return 500, f"internal error: {e}"


ARRIVED = "baton.arrived"
# How often a non-streaming request checks that its client is still there.
DISCONNECT_POLL_S = 0.5
INT64 = 2**64


class ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer."""


def _wrap_int64(seed: int) -> int:
    """A choice's seed (seed + j) kept a signed 64-bit integer, as the wire carries."""
    return (seed + INT64 // 2) % INT64 - INT64 // 2


class StampArrival:
    """ASGI middleware: stamps when a request's headers arrive, so the router's TTFT also
    counts reading, parsing and validating its body (a 4k-token prompt's JSON takes about
    a millisecond; FastAPI does it before the endpoint runs)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            scope[ARRIVED] = time.perf_counter()
        await self.app(scope, receive, send)


def create_app(cfg: RouterConfig) -> FastAPI:
    router = Router(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.start()
        # Imports and startup state live for the whole process: freeze them, so a full
        # collection (otherwise ~60 ms on a small CPU, in the middle of some request's
        # routing) only walks what requests allocate.
        gc.collect()
        gc.freeze()
        yield
        await router.stop()

    app = FastAPI(title="Baton router", lifespan=lifespan)
    app.add_middleware(StampArrival)
    app.state.router = router

    install_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await router.handle(req, "completion", request.scope.get(ARRIVED),
                                   request.is_disconnected)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        return await router.handle(req, "chat", request.scope.get(ARRIVED),
                                   request.is_disconnected)

    def model_card() -> dict:
        return {"id": cfg.served_model_name, "object": "model", "created": 0,
                "owned_by": "baton", "max_model_len": router.pool.max_model_len}

    install_tokenize_routes(app, router)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != cfg.served_model_name:
            return model_not_found(model_id, cfg.served_model_name)
        return model_card()

    @app.get("/health")
    async def health():
        ok = any(w.healthy for w in router.pool.decode)
        body = {"status": "ok" if ok else "unavailable",
                "mode": router.pool.mode,
                "workers": [w.to_json() for w in router.pool.all]}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard_page():
        return HTMLResponse(dashboard.page())

    @app.get("/dashboard/state")
    async def dashboard_state(history: bool = False):
        return dashboard.state(router, history)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(router.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    return app
