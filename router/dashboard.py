"""The operator dashboard: one page (`/dashboard`) that polls one JSON document
(`/dashboard/state`) and draws the deployment from it.

The state is the router's view, read from the same objects `/health` and `/metrics`
read: every worker's health, load and KV occupancy, and the router's Prometheus
counters and histograms as cumulative values. The page keeps its last polls and shows
rates and latency percentiles over the last 10 s (from the difference of cumulative
counters and histogram buckets), so what it shows is now, not the average since start,
and the router keeps no state for it.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from importlib.resources import files

from router.metrics import RouterMetrics

# What the page shows, by RouterMetrics attribute; labelled series are summed (histograms)
# or kept apart by label (counters). Only these are read: the per-worker histograms of the
# registry would make every poll cost more as workers are added.
HISTOGRAMS = ("ttft", "itl")
COUNTERS = ("requests", "prompt_tokens", "cached_tokens", "generation_tokens", "kv_bytes",
            "migrations", "routing", "kv_picks")
# Tells one router process from another: behind a Service the page may reach several, and
# its window differences must not mix their counters.
INSTANCE = f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}"


@functools.cache
def page() -> str:
    """The page, read once (it is the same for every request)."""
    return files("router").joinpath("static/dashboard.html").read_text(encoding="utf-8")


def metric_values(metrics: RouterMetrics) -> tuple[dict, dict]:
    """(counters, histograms), keyed by metric name: counters as {label text: value}
    ('' for no labels); histograms as {"le": [...], "cumulative": [...], "sum", "count"}
    with every label set but `le` summed."""
    counters: dict[str, dict[str, float]] = {}
    histograms: dict[str, dict] = {}
    for attr in COUNTERS:
        for family in getattr(metrics, attr).collect():
            series = counters.setdefault(family.name, {})
            for s in family.samples:
                if s.name.endswith("_total"):
                    key = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    series[key] = series.get(key, 0.0) + s.value
    for attr in HISTOGRAMS:
        for family in getattr(metrics, attr).collect():
            buckets: dict[float, float] = {}
            total = count = 0.0
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + s.value
                elif s.name.endswith("_sum"):
                    total += s.value
                elif s.name.endswith("_count"):
                    count += s.value
            edges = sorted(buckets)
            histograms[family.name] = {
                "le": [e if e != float("inf") else None for e in edges],
                "cumulative": [buckets[e] for e in edges], "sum": total, "count": count}
    return counters, histograms


def state(router) -> dict:
    """What `/dashboard/state` returns: the deployment as the router sees it now."""
    cfg, pool = router.cfg, router.pool
    counters, histograms = metric_values(router.metrics)
    return {
        "instance": INSTANCE,
        "time": time.time(),
        "model": cfg.served_model_name,
        "mode": pool.mode,
        "routing": cfg.routing,
        "index": "redis" if cfg.index.startswith("redis") else cfg.index,
        "local_prefill_threshold": cfg.local_prefill_threshold,
        "prefill_overflow_wait_s": cfg.prefill_overflow_wait_s,
        "max_model_len": pool.max_model_len,
        "workers": [w.to_json() for w in pool.all],
        "counters": counters,
        "histograms": histograms,
    }
