"""Prometheus metrics of one router (its own registry, so several routers can live in one
test process)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                    30, 60)
_SPAN_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                 0.1)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("baton_time_to_first_token_seconds", "TTFT", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("baton_inter_token_latency_seconds", "gap between tokens",
                             registry=r, buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("baton_e2e_request_latency_seconds", "request latency",
                             registry=r, buckets=_LATENCY_BUCKETS)
        self.requests = Counter("baton_requests", "requests by final status", ["status"],
                                registry=r)
        self.prompt_tokens = Counter("baton_prompt_tokens", "prompt tokens in", registry=r)
        self.cached_tokens = Counter("baton_cached_prompt_tokens",
                                     "prompt tokens served from a cache", registry=r)
        self.generation_tokens = Counter("baton_generation_tokens", "tokens out", registry=r)
        self.kv_bytes = Counter("baton_kv_transfer_bytes", "KV bytes moved P->D", ["backend"],
                                registry=r)
        self.kv_seconds = Histogram("baton_kv_transfer_seconds", "KV pull time per request",
                                    ["backend"], registry=r, buckets=_LATENCY_BUCKETS)
        self.migrations = Counter("baton_migrations", "requests moved after a worker failed",
                                  registry=r)
        self.constrained = Counter(
            "baton_constrained_requests", "requests decoded under a grammar, by what asked "
            "for it: response_format, vllm (guided_* / structured_outputs), tool_choice "
            "(a forced call)", ["kind"], registry=r)
        self.tool_calls = Counter("baton_tool_calls", "tool calls returned to clients",
                                  registry=r)
        self.routing = Counter("baton_routing_decisions",
                               "prefill placement: on a prefill worker (disaggregated), on the "
                               "decode worker (local: little uncached; overflow: the "
                               "prefill pool backed up)",
                               ["kind"], registry=r)
        self.kv_picks = Counter("baton_kv_route_picks",
                                "KV-aware picks: to the best prefix holder, diverted from it "
                                "by load, or a prefix no worker holds", ["role", "outcome"],
                                registry=r)
        # By worker too: the one whose queue grows is the one to look at.
        self.worker_queue = Histogram(
            "baton_worker_queue_seconds", "a request's wait in a worker's queue before the "
            "first step computing it, by phase (prefill: the worker making the first token)",
            ["phase", "worker"], registry=r, buckets=_LATENCY_BUCKETS)
        self.worker_first_token = Histogram(
            "baton_worker_first_token_seconds", "from a worker's first step on a request to "
            "its first token there, by phase", ["phase", "worker"], registry=r,
            buckets=_LATENCY_BUCKETS)
        self.router_span = Histogram("baton_router_span_seconds",
                                     "router's own time per request, by stage", ["stage"],
                                     registry=r, buckets=_SPAN_BUCKETS)
        self.worker_in_flight = Gauge("baton_worker_in_flight", "requests in flight",
                                      ["worker", "role"], registry=r)
        self.worker_free_blocks = Gauge("baton_worker_free_blocks", "free KV blocks",
                                        ["worker", "role"], registry=r)
        self.worker_running = Gauge("baton_worker_running", "running sequences",
                                    ["worker", "role"], registry=r)
        self.worker_queued_prefill_tokens = Gauge(
            "baton_worker_queued_prefill_tokens", "prompt tokens waiting", ["worker", "role"],
            registry=r)
        # Its queued prompt tokens over the speed it measured: seconds of prefill backlog.
        # A prefill pool whose workers sit high here is too small for the traffic.
        self.worker_prefill_backlog = Gauge(
            "baton_worker_prefill_backlog_seconds",
            "queued prompt tokens over the worker's measured prefill speed",
            ["worker", "role"], registry=r)

    def forget_worker(self, address: str, role: str) -> None:
        """A worker that left: its series stop being exported (pods come and go with new
        addresses; a series per address ever seen would grow without bound)."""
        for g in (self.worker_in_flight, self.worker_free_blocks, self.worker_running,
                  self.worker_queued_prefill_tokens, self.worker_prefill_backlog):
            with contextlib.suppress(KeyError):
                g.remove(address, role)
        for h in (self.worker_queue, self.worker_first_token):
            for phase in ("prefill", "decode", "migrated"):
                with contextlib.suppress(KeyError):
                    h.remove(phase, address)

    def kv_transfer(self, backend: str, nbytes: int, seconds: float) -> None:
        self.kv_bytes.labels(backend).inc(nbytes)
        self.kv_seconds.labels(backend).observe(seconds)
