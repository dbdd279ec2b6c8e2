"""The operator dashboard against a live `baton serve` (1 prefill + 1 decode worker): the
state document counts exactly the traffic sent, and the page, loaded in real headless
Chromium (skipped where it is not installed), draws that state: model, mode, both
workers, request totals and latency percentiles."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from html.parser import HTMLParser

import httpx
import pytest

from cluster.local_server import baton_serve, wait_pools_empty

pytestmark = pytest.mark.slow
PRESET = "tiny-llama-untied"
REQUESTS, MAX_TOKENS = 5, 7
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(checkpoint_dir):
    with baton_serve(checkpoint_dir(PRESET), "--prefill", "1", "--decode", "1",
                     "--kv-blocks", "256") as url:
        for i in range(REQUESTS):
            r = httpx.post(f"{url}/v1/completions", timeout=60, json={
                "model": PRESET, "prompt": f"request {i}: " + "tell me a story " * 3,
                "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
        wait_pools_empty(url)
        yield url


def test_state_counts_the_traffic_and_names_every_worker(server):
    state = httpx.get(f"{server}/dashboard/state").json()
    health = httpx.get(f"{server}/health").json()
    assert (state["model"], state["mode"], state["routing"], state["index"]) == \
        (PRESET, "disaggregated", "kv", "memory")
    assert [w["address"] for w in state["workers"]] == [w["address"] for w in health["workers"]]
    assert sorted(w["role"] for w in state["workers"]) == ["decode", "prefill"]
    assert all(w["healthy"] and w["total_blocks"] == 256 for w in state["workers"])
    counters, hists = state["counters"], state["histograms"]
    assert counters["baton_requests"] == {"status=ok": REQUESTS}
    assert counters["baton_generation_tokens"] == {"": REQUESTS * MAX_TOKENS}
    assert counters["baton_routing_decisions"] == {"kind=disaggregated": REQUESTS}
    ttft = hists["baton_time_to_first_token_seconds"]
    assert ttft["count"] == REQUESTS and ttft["cumulative"][-1] == REQUESTS
    assert ttft["le"][-1] is None and ttft["le"][:-1] == sorted(ttft["le"][:-1])
    assert hists["baton_inter_token_latency_seconds"]["count"] == REQUESTS * (MAX_TOKENS - 1)


def test_the_router_keeps_the_charts_last_minutes(server):
    """A sample a second of what the page's rates and percentiles read, shaped like a
    state's counters and histograms, sent only when asked (the page asks when it opens)."""
    assert "history" not in httpx.get(f"{server}/dashboard/state").json()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # three samples, the last after all the traffic
        history = httpx.get(f"{server}/dashboard/state?history=1").json()["history"]
        last = history[-1]["histograms"] if history else None
        if len(history) >= 3 and last["baton_time_to_first_token_seconds"]["count"] == REQUESTS:
            break
        time.sleep(0.5)
    times = [h["time"] for h in history]
    assert len(times) >= 3 and all(b - a >= 1.0 for a, b in itertools.pairwise(times))
    newest = history[-1]
    assert newest["instance"] == httpx.get(f"{server}/dashboard/state").json()["instance"]
    assert newest["counters"]["baton_generation_tokens"] == {"": REQUESTS * MAX_TOKENS}
    assert newest["counters"]["baton_requests"] == {"status=ok": REQUESTS}
    assert newest["histograms"]["baton_inter_token_latency_seconds"]["count"] == \
        REQUESTS * (MAX_TOKENS - 1)


def test_page_is_served_as_html(server):
    r = httpx.get(f"{server}/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="workers"' in r.text and "dashboard/state" in r.text


class _Texts(HTMLParser):
    """Text of every element with an id, and the data-address of every worker row."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.attrs: dict[str, dict] = {}
        self.rows: list[str] = []
        self._open: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-address" in a:
            self.rows.append(a["data-address"])
        if tag not in ("br", "img", "meta", "input"):
            self._open.append(a.get("id"))
            if a.get("id"):
                self.by_id[a["id"]] = ""
                self.attrs[a["id"]] = a

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for i in self._open:
            if i:
                self.by_id[i] += data


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make test installs "
                    "Debian's chromium where apt can)")
def test_page_in_headless_chromium_draws_the_state(server, tmp_path):
    # The router's chart samples by now: the page starts its chart from them, so it draws
    # more points than its own few polls.
    deadline = time.monotonic() + 15
    while len(httpx.get(f"{server}/dashboard/state?history=1").json()["history"]) < 10 \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    samples = len(httpx.get(f"{server}/dashboard/state?history=1").json()["history"])
    # window=0: percentiles since the router started (the traffic above), not the last 10 s.
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
         "--virtual-time-budget=4000", "--dump-dom", f"{server}/dashboard?window=0"],
        capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    page = _Texts()
    page.feed(done.stdout)
    texts = {k: v.strip() for k, v in page.by_id.items()}
    assert texts["status"] == "live", texts.get("status")
    assert (texts["model"], texts["mode"], texts["routing"]) == (PRESET, "disaggregated", "kv")
    health = httpx.get(f"{server}/health").json()
    assert sorted(page.rows) == sorted(w["address"] for w in health["workers"])
    assert texts["req-total"] == str(REQUESTS) and texts["req-errors"] == "0"
    hists = httpx.get(f"{server}/dashboard/state").json()["histograms"]
    ttft, itl = (hists[f"baton_{n}_seconds"] for n in ("time_to_first_token",
                                                       "inter_token_latency"))
    for shown, hist, q in [("ttft-p50", ttft, 0.5), ("ttft-p99", ttft, 0.99),
                           ("itl-p50", itl, 0.5)]:
        assert _shown_ms(texts[shown]) == pytest.approx(_quantile(hist, q) * 1000, abs=0.51)
    assert "prefill placed: disaggregated" in texts["routing-table"]
    assert int(page.attrs["chart"]["data-points"]) >= samples >= 10


def _quantile(hist: dict, q: float) -> float:
    """The page's estimate: linear inside the bucket holding the q-th observation."""
    cum, edges = hist["cumulative"], hist["le"]
    rank = q * cum[-1]
    i = next(i for i, c in enumerate(cum) if c >= rank)
    lo, below = (edges[i - 1], cum[i - 1]) if i else (0.0, 0.0)
    if edges[i] is None:
        return lo
    return lo + (edges[i] - lo) * (rank - below) / (cum[i] - below)


def _shown_ms(text: str) -> float:
    """The page prints '7.3 ms' below 10 ms, else whole milliseconds."""
    assert text.endswith(" ms"), text
    return float(text.removesuffix(" ms"))
