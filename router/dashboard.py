"""The operator dashboard: one page (`/dashboard`) that polls one JSON document
(`/dashboard/state`) and draws the deployment from it.

The state is the router's view, read from the same objects `/health` and `/metrics`
read: every worker's health, load and KV occupancy, and the router's Prometheus
counters and histograms as cumulative values. The page keeps its last polls and shows
rates and latency percentiles over the last 10 s (from the difference of cumulative
counters and histogram buckets), so what it shows is now, not the average since start.
The one thing the router keeps for it is the recent past (`ChartHistory`: a sample a
second for two minutes), so a page opened now draws the last two minutes at once instead
of an empty chart, and its first rates cover the whole window.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections import deque
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


def metric_values(metrics: RouterMetrics, counter_attrs: tuple[str, ...] = COUNTERS,
                  histogram_attrs: tuple[str, ...] = HISTOGRAMS) -> tuple[dict, dict]:
    """(counters, histograms) of those RouterMetrics attributes, keyed by metric name:
    counters as {label text: value} ('' for no labels); histograms as {"le": [...],
    "cumulative": [...], "sum", "count"} with every label set but `le` summed."""
    counters: dict[str, dict[str, float]] = {}
    histograms: dict[str, dict] = {}
    for attr in counter_attrs:
        for family in getattr(metrics, attr).collect():
            series = counters.setdefault(family.name, {})
            for s in family.samples:
                if s.name.endswith("_total"):
                    key = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    series[key] = series.get(key, 0.0) + s.value
    for attr in histogram_attrs:
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


class ChartHistory:
    """The recent past the page would have polled had it been open: at most one sample a
    second, each shaped like a state's `counters` and `histograms` for what the rates,
    percentiles and chart read (requests, output tokens, TTFT, ITL), so the page treats
    them as its own earlier polls."""

    def __init__(self, seconds: int = 130) -> None:
        self.samples: deque[dict] = deque(maxlen=seconds)

    def maybe_sample(self, metrics: RouterMetrics, now: float | None = None) -> None:
        """Called every refresh (0.5 s); records a sample when a second has passed."""
        now = time.time() if now is None else now
        if self.samples and now - self.samples[-1]["time"] < 1.0:
            return
        counters, histograms = metric_values(metrics, ("requests", "generation_tokens"),
                                             HISTOGRAMS)
        self.samples.append({"instance": INSTANCE, "time": now, "counters": counters,
                             "histograms": histograms})


def state(router, history: bool = False) -> dict:
    """What `/dashboard/state` returns: the deployment as the router sees it now, and with
    `history` the chart's samples (the page asks once, when it opens)."""
    cfg, pool = router.cfg, router.pool
    counters, histograms = metric_values(router.metrics)
    extra = {"history": list(router.chart.samples)} if history else {}
    return {**extra,
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
