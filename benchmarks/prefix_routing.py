"""Prefix-aware routing under an offered-load sweep: multi-turn chat sessions (each on
one of S system prompts, T turns, every turn re-sending the conversation so far plus a
new message) arrive as a Poisson process at each rate of `--loads` against 2 aggregated
workers whose KV capacity holds about half of the working set. At every rate `kv`,
`round-robin` and `random` routing serve the same sessions (same arrivals, same tokens;
one server per policy, fresh sessions and system prompts per rate), and an oracle (one
shared LRU cache of the same total size replaying the same requests) gives the best hit
ratio any routing could reach.

Sessions arrive open-loop, so a policy that recomputes more prefill saturates at a lower
rate, and past saturation its queue (and TTFT) grows for as long as arrivals continue.
Each level draws its own trace (seed + its index), and round-robin's TTFT swings with
the trace: give a load more than once (`--loads 3,3,3`) and the JSON's
`ttft_p50_round_robin_over_kv_by_load` has the median over its traces. Every level also
reports `ttft_parts_ms`: where TTFT went (the first-token worker's queue and compute,
and the rest: router, gRPC, hand-offs), from the router's `baton_timing`.

    python -m benchmarks.prefix_routing --out benchmarks/results/prefix_routing_cpu.json

On one GPU (both workers share it; random weights in the real shape):

    python -m benchmarks.prefix_routing --device cuda --preset llama-3.1-8b --wait-idle 0 \
        --serve-args "--gpu-memory-utilization 0.4" ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import statistics
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.common import counter_by_label, pct, write_result
from cluster.local_server import baton_serve
from kernels.checkpoint_writer import write_checkpoint
from kvtransfer.hashing import block_hashes

BLOCK = 16


@dataclass(frozen=True)
class Session:
    sid: int
    start: float  # arrival offset (s) at load 1
    system: list[int]
    messages: list[list[int]]  # one per turn
    thinks: list[float]  # seconds between a turn's last token and the next turn, at load 1


def first_msg_len(args) -> int:
    """A session's first message: --first-msg-len (a document pasted at the start of a
    chat), else as long as the others."""
    return args.first_msg_len or args.msg_len


def make_sessions(args, seed: int) -> list[Session]:
    rng = random.Random(seed)
    systems = [[rng.randrange(4, 1000) for _ in range(args.system_len)]
               for _ in range(args.systems)]
    out, t = [], 0.0
    for s in range(args.sessions):
        msgs = [[rng.randrange(4, 1000) for _ in range(first_msg_len(args) if turn == 0
                                                        else args.msg_len)]
                for turn in range(args.turns)]
        thinks = [rng.uniform(0.5, 1.5) * args.think for _ in range(args.turns)]
        out.append(Session(s, t, systems[s % args.systems], msgs, thinks))
        t += rng.expovariate(args.rate)
    return out


async def run_session(client: httpx.AsyncClient, url: str, model: str, s: Session,
                      load: float, out_len: int, t_start: float, log: list[dict]) -> None:
    await asyncio.sleep(max(0.0, t_start + s.start / load - time.perf_counter()))
    history = list(s.system)
    for turn, msg in enumerate(s.messages):
        prompt = history + msg
        t0 = time.perf_counter()
        ttft, tokens, cached, timing = None, [], 0, {}
        async with client.stream("POST", f"{url}/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0,
                "ignore_eos": True, "stream": True, "return_token_ids": True,
                "stream_options": {"include_usage": True}}) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
                    timing = (chunk.get("baton_timing") or [{}])[0]
                if "choices" not in chunk:
                    raise RuntimeError(f"stream chunk without choices: {chunk}")
                for ch in chunk["choices"]:
                    if ttft is None and ch.get("token_ids"):
                        ttft = time.perf_counter() - t0
                    tokens += ch.get("token_ids", [])
        log.append({"session": s.sid, "turn": turn, "prompt": prompt, "output": tokens,
                    "ttft": ttft, "cached": cached, "t": t0, "end": time.perf_counter(),
                    "timing": timing})
        history = prompt + tokens
        await asyncio.sleep(s.thinks[turn] / load)


async def watch_workers(client: httpx.AsyncClient, url: str, samples: list[dict],
                        stop: asyncio.Event) -> None:
    """Sample every worker's in-flight count (the router's own) every 0.25 s."""
    while not stop.is_set():
        try:
            body = (await client.get(f"{url}/health", timeout=2)).json()
            samples.append({w["address"]: w["in_flight"] for w in body["workers"]})
        except (httpx.HTTPError, ValueError):
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def workload(url: str, model: str, sessions: list[Session], load: float,
                   out_len: int) -> tuple[list[dict], list[dict], float, dict[str, float]]:
    log: list[dict] = []
    samples: list[dict] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        before = kv_picks((await client.get(f"{url}/metrics")).text)
        watcher = asyncio.create_task(watch_workers(client, url, samples, stop))
        t0 = time.perf_counter()
        await asyncio.gather(*(run_session(client, url, model, s, load, out_len, t0, log)
                               for s in sessions))
        wall = time.perf_counter() - t0
        stop.set()
        await watcher
        after = kv_picks((await client.get(f"{url}/metrics")).text)
    # The server runs every load of a policy: this level's picks are the increase.
    picks = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return log, samples, wall, picks


def kv_picks(metrics_text: str) -> dict[str, float]:
    """The router's `baton_kv_route_picks` counters by outcome (decode role: the
    aggregated workers), empty under other policies."""
    return counter_by_label(metrics_text, "baton_kv_route_picks", "outcome", role="decode")


def oracle_hit_ratio(log: list[dict], capacity_blocks: int) -> float:
    """One LRU cache of every worker's blocks together, fed in the order requests ran."""
    lru: OrderedDict[int, None] = OrderedDict()
    hit = total = 0
    for rec in sorted(log, key=lambda r: r["t"]):
        prompt = rec["prompt"]
        n = 0
        for h in block_hashes(prompt[: len(prompt) - 1], BLOCK):
            if h not in lru:
                break
            n += 1
            lru.move_to_end(h)
        hit += n * BLOCK
        total += len(prompt)
        for h in block_hashes(prompt + rec["output"], BLOCK):
            lru[h] = None
            lru.move_to_end(h)
            while len(lru) > capacity_blocks:
                lru.popitem(last=False)
    return hit / total


def peak_active_tokens(log: list[dict], system_len: int, systems: int) -> int:
    """Most tokens of live conversations (first request sent .. last token back) at once,
    plus every system prompt once: what a perfect cache would hold at the busiest time."""
    spans: dict[int, list[float]] = {}
    size: dict[int, int] = {}
    for r in log:
        sp = spans.setdefault(r["session"], [r["t"], r["end"]])
        sp[0], sp[1] = min(sp[0], r["t"]), max(sp[1], r["end"])
        own = len(r["prompt"]) + len(r["output"]) - system_len
        size[r["session"]] = max(size.get(r["session"], 0), own)
    events = sorted([(a, size[s]) for s, (a, _) in spans.items()]
                    + [(b, -size[s]) for s, (_, b) in spans.items()])
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak + systems * system_len


def summarize(log: list[dict], samples: list[dict], wall: float, loadavg: tuple) -> dict:
    ttfts = [r["ttft"] for r in log if r["ttft"] is not None]
    prompt = sum(len(r["prompt"]) for r in log)
    cached = sum(r["cached"] for r in log)
    workers = sorted({a for s in samples for a in s})
    in_flight = [statistics.mean(s.get(a, 0) for s in samples) for a in workers] \
        if samples else []
    return {"requests": len(log), "ttft_p50_ms": 1e3 * pct(ttfts, 0.5),
            "ttft_p90_ms": 1e3 * pct(ttfts, 0.9), "ttft_p99_ms": 1e3 * pct(ttfts, 0.99),
            "ttft_mean_ms": 1e3 * statistics.mean(ttfts),
            "hit_ratio": cached / prompt,
            "prefill_tokens_computed": prompt - cached,
            "output_tokens_per_s": sum(len(r["output"]) for r in log) / wall,
            "wall_s": wall,
            "mean_in_flight_per_worker": in_flight,
            "busier_worker_share": max(in_flight) / sum(in_flight)
            if in_flight and sum(in_flight) else None,
            "loadavg_1m_start_end": [loadavg[0], os.getloadavg()[0]],
            "ttft_parts_ms": ttft_parts(log)}


TTFT_PARTS = {  # part: its key in the router's baton_timing (ms)
    "router_routing": "router_ms", "network": "prefill_network_ms",
    "worker_queue": "prefill_queue_ms", "worker_first_token": "prefill_first_token_ms",
    "worker_emit": "prefill_emit_ms"}


def ttft_parts(log: list[dict]) -> dict[str, dict[str, float]]:
    """Where time to first token went, p50 and mean, from the router's baton_timing: its
    routing, the gRPC round trip less the worker's parts, the first-token worker's queue
    wait, compute and hand-off to gRPC; "router_other" is the rest of the router's TTFT,
    which starts when the request's headers arrive (reading, parsing and validating the
    body, stream set-up, its event loop's backlog), and "client" what the client saw beyond
    that (sending the body, the first chunk's trip back, the client's own loop)."""
    rows = [r for r in log if r["ttft"] is not None and
            {"ttft_ms", *TTFT_PARTS.values()} <= set(r.get("timing", {}))]
    if not rows:
        return {}
    parts = {name: [r["timing"][key] for r in rows] for name, key in TTFT_PARTS.items()}
    parts["router_other"] = [r["timing"]["ttft_ms"] - sum(r["timing"][k]
                                                           for k in TTFT_PARTS.values())
                             for r in rows]
    parts["client"] = [r["ttft"] * 1e3 - r["timing"]["ttft_ms"] for r in rows]
    return {k: {"p50": pct(v, 0.5), "mean": statistics.mean(v)} for k, v in parts.items()}


def wait_for_idle(limit_s: float) -> list[float]:
    """Sleep until the 1-minute load average is below 1.0 (shared machine), up to limit_s."""
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] >= 1.0 and time.monotonic() < deadline:
        print(f"load average {os.getloadavg()[0]:.2f}: waiting", flush=True)
        time.sleep(30)
    return list(os.getloadavg())


def run_level(args, url: str, policy: str, level: dict, sessions: list[Session],
              capacity: int) -> None:
    loadavg = os.getloadavg()
    log, samples, wall, picks = asyncio.run(
        workload(url, args.preset, sessions, level["load"], args.out_len))
    level["policies"][policy] = summary = summarize(log, samples, wall, loadavg)
    if picks:
        summary["kv_route_picks"] = picks
    if "oracle_hit_ratio" not in level:  # same sessions for every policy: computed once
        level["oracle_hit_ratio"] = oracle_hit_ratio(log, capacity // BLOCK)
        level["peak_active_tokens"] = peak_active_tokens(log, args.system_len, args.systems)
    print(f"load {level['load']} {policy}", json.dumps(summary), flush=True)


def write_levels(args, levels: list[dict], kv_blocks: int, working_set: int, capacity: int,
                 loadavg_start: list[float]) -> None:
    """Written after every policy, so a run cut short keeps what it measured."""
    for level in levels:
        p = level["policies"]
        if "kv" in p and "round-robin" in p:
            level["ratios"] = {
                "ttft_p50_round_robin_over_kv": p["round-robin"]["ttft_p50_ms"]
                / p["kv"]["ttft_p50_ms"],
                "ttft_p99_round_robin_over_kv": p["round-robin"]["ttft_p99_ms"]
                / p["kv"]["ttft_p99_ms"],
                "kv_hit_ratio_over_oracle": p["kv"]["hit_ratio"] / level["oracle_hit_ratio"]}
            if "random" in p:
                level["ratios"]["ttft_p50_random_over_kv"] = \
                    p["random"]["ttft_p50_ms"] / p["kv"]["ttft_p50_ms"]
        print(f"load {level['load']} oracle {level['oracle_hit_ratio']:.3f}",
              json.dumps(level.get("ratios", {})), flush=True)
    # A load given more than once (--loads 3,3,3: each level its own trace) is judged by
    # the median over its traces: one trace can swing the ratio by 2x.
    by_load: dict[str, list[float]] = {}
    for lv in levels:
        if (r := lv.get("ratios", {}).get("ttft_p50_round_robin_over_kv")) is not None:
            by_load.setdefault(str(lv["load"]), []).append(r)
    ratio_by_load = {load: {"traces": len(rs), "median": statistics.median(rs),
                            "min": min(rs), "max": max(rs)} for load, rs in by_load.items()}
    three_x = [float(load) for load, r in ratio_by_load.items() if r["median"] >= 3]
    write_result(args.out, {
        "benchmark": "prefix_routing", "preset": args.preset, "device": args.device,
        "serve_args": args.serve_args, "workers": args.workers,
        "kv_blocks_per_worker": kv_blocks, "working_set_tokens": working_set,
        "capacity_tokens": capacity, "workload": {k: getattr(args, k) for k in (
            "systems", "system_len", "sessions", "turns", "msg_len", "first_msg_len",
            "out_len", "rate",
            "think", "seed")},
        "loadavg_start": loadavg_start, "loadavg_end": list(os.getloadavg()),
        "levels": levels, "loads_with_3x_lower_ttft_p50": three_x,
        "ttft_p50_round_robin_over_kv_by_load": ratio_by_load})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small-llama")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kv-blocks", type=int, default=0,
                    help="per worker; 0: half the working set over all workers")
    ap.add_argument("--systems", type=int, default=4)
    ap.add_argument("--system-len", type=int, default=256)
    ap.add_argument("--sessions", type=int, default=48)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--msg-len", type=int, default=96)
    ap.add_argument("--first-msg-len", type=int, default=0,
                    help="tokens of each session's first message (a document the chat is "
                         "about, reused by every later turn); 0: --msg-len")
    ap.add_argument("--out-len", type=int, default=16)
    ap.add_argument("--rate", type=float, default=1.2, help="session arrivals/s at load 1")
    ap.add_argument("--think", type=float, default=2.5,
                    help="mean seconds between turns at load 1")
    ap.add_argument("--loads", default="1,2,3,4",
                    help="time compression factors: load x replays the trace x times faster")
    ap.add_argument("--policies", default="kv,round-robin,random",
                    help="routing policies; kv@NAME=X+NAME=Y adds kv with those --route-weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-idle", type=float, default=600,
                    help="seconds to wait for a 1-minute load average below 1.0")
    ap.add_argument("--device", default="cpu",
                    help="cuda: workers on the GPU(s) with random weights of --preset")
    ap.add_argument("--serve-args", default="",
                    help="more `baton serve` flags, e.g. '--gpu-memory-utilization 0.4'")
    ap.add_argument("--out", default="benchmarks/results/prefix_routing_cpu.json")
    args = ap.parse_args()

    working_set = args.systems * args.system_len + args.sessions * (
        first_msg_len(args) + (args.turns - 1) * args.msg_len + args.turns * args.out_len)
    kv_blocks = args.kv_blocks or math.ceil(working_set / 2 / BLOCK / args.workers)
    capacity = args.workers * kv_blocks * BLOCK
    print(f"working set {working_set} tokens, KV capacity {capacity} tokens "
          f"({capacity / working_set:.0%})", flush=True)
    if args.device == "cpu":
        work = Path(tempfile.mkdtemp(prefix="baton-prefix-"))
        model = [str(write_checkpoint(args.preset, work / args.preset, progress=False))]
    else:  # an 8B-or-larger checkpoint on disk would take minutes to write and read
        model = [args.preset, "--load-format", "dummy", "--device", args.device]
    loadavg_start = wait_for_idle(args.wait_idle)
    loads = [float(x) for x in args.loads.split(",")]
    levels = [{"load": load, "session_rate_per_s": args.rate * load,
               "request_rate_per_s": args.rate * load * args.turns,
               "think_s": args.think / load, "policies": {}} for load in loads]
    for policy in args.policies.split(","):
        # One server per policy for all loads; each load sends fresh sessions and system
        # prompts (its own seed), so nothing a level sends was cached by an earlier one
        # and the earlier level's blocks are merely the first to be evicted.
        # Aggregated workers move no KV: TCP transfer, because the default NIXL agent's
        # UCX progress thread busy-polls a whole core per worker on this 2-core machine.
        # "kv@active_decode=0.02+host=0.5": kv routing with those --route-weights.
        routing, _, weights = policy.partition("@")
        extra = ["--route-weights", weights.replace("+", ",")] if weights else []
        with baton_serve(*model, "--prefill", "0", "--decode", str(args.workers),
                         "--kv-blocks", str(kv_blocks), "--kv-transfer", "tcp",
                         "--routing", routing, *extra, *args.serve_args.split(),
                         timeout=600) as url:
            for i, level in enumerate(levels):
                run_level(args, url, policy, level, make_sessions(args, args.seed + i),
                          capacity)
        write_levels(args, levels, kv_blocks, working_set, capacity, loadavg_start)


if __name__ == "__main__":
    main()
