"""Prefix-aware routing benchmark: a multi-turn chat workload (S system prompts x U users
x T turns, each turn extending its conversation, jittered arrivals) against 2 workers
whose KV capacity holds about half of the working set; `kv`, `round-robin` and `random`
routing measured in the same run, plus the hit ratio of an oracle: one shared LRU cache
of the same total size replaying the same requests.

    python -m benchmarks.prefix_routing --out benchmarks/results/prefix_routing_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import httpx

from benchmarks.common import write_result
from cluster.local_server import baton_serve
from kernels.checkpoint_writer import write_checkpoint
from kvtransfer.hashing import block_hashes


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def user_session(client: httpx.AsyncClient, url: str, model: str, system: list[int],
                       turns: int, msg_len: int, out_len: int, rng: random.Random,
                       log: list[dict], jitter: float) -> None:
    history = list(system)
    await asyncio.sleep(rng.uniform(0, jitter))
    for _ in range(turns):
        prompt = history + [rng.randrange(4, 1000) for _ in range(msg_len)]
        t0 = time.perf_counter()
        ttft, tokens, cached = None, [], 0
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
                for ch in chunk["choices"]:
                    if ttft is None and ch.get("token_ids"):
                        ttft = time.perf_counter() - t0
                    tokens += ch.get("token_ids", [])
        log.append({"prompt": prompt, "output": tokens, "ttft": ttft, "cached": cached,
                    "t": t0})
        history = prompt + tokens
        await asyncio.sleep(rng.uniform(0.5 * jitter, 1.5 * jitter))


async def workload(url: str, model: str, args, seed: int) -> tuple[list[dict], float]:
    rng = random.Random(seed)
    systems = [[rng.randrange(4, 1000) for _ in range(args.system_len)]
               for _ in range(args.systems)]
    log: list[dict] = []
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(user_session(
            client, url, model, systems[u % args.systems], args.turns, args.msg_len,
            args.out_len, random.Random(seed * 1000 + u), log, args.jitter)
            for u in range(args.users)))
    return log, time.perf_counter() - t0


def oracle_hit_ratio(log: list[dict], capacity_blocks: int, block_size: int) -> float:
    """One LRU cache of every worker's blocks together, fed in the order requests ran."""
    lru: OrderedDict[int, None] = OrderedDict()
    hit = total = 0
    for rec in sorted(log, key=lambda r: r["t"]):
        prompt = rec["prompt"]
        hashes = block_hashes(prompt[: len(prompt) - 1], block_size)
        n = 0
        for h in hashes:
            if h not in lru:
                break
            n += 1
            lru.move_to_end(h)
        hit += n * block_size
        total += len(prompt)
        for h in block_hashes(prompt + rec["output"], block_size):
            lru[h] = None
            lru.move_to_end(h)
            while len(lru) > capacity_blocks:
                lru.popitem(last=False)
    return hit / total


def summarize(log: list[dict], wall: float) -> dict:
    ttfts = [r["ttft"] for r in log if r["ttft"] is not None]
    prompt = sum(len(r["prompt"]) for r in log)
    return {"requests": len(log), "ttft_p50_ms": 1e3 * pct(ttfts, 0.5),
            "ttft_p99_ms": 1e3 * pct(ttfts, 0.99),
            "ttft_mean_ms": 1e3 * statistics.mean(ttfts),
            "hit_ratio": sum(r["cached"] for r in log) / prompt,
            "output_tokens_per_s": sum(len(r["output"]) for r in log) / wall,
            "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small-llama")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kv-blocks", type=int, default=192, help="per worker")
    ap.add_argument("--systems", type=int, default=4)
    ap.add_argument("--system-len", type=int, default=256)
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--msg-len", type=int, default=64)
    ap.add_argument("--out-len", type=int, default=16)
    ap.add_argument("--jitter", type=float, default=1.0, help="seconds between turns (mean)")
    ap.add_argument("--policies", default="kv,round-robin,random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/prefix_routing_cpu.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="baton-prefix-"))
    model_dir = write_checkpoint(args.preset, work / args.preset, progress=False)
    working_set = args.systems * args.system_len + args.users * args.turns * (
        args.msg_len + args.out_len)
    capacity = args.workers * args.kv_blocks * 16
    print(f"working set ~{working_set} tokens, KV capacity {capacity} tokens "
          f"({capacity / working_set:.0%})", flush=True)
    results, oracle = {}, None
    for policy in args.policies.split(","):
        with baton_serve(model_dir, "--prefill", "0", "--decode", str(args.workers),
                         "--kv-blocks", str(args.kv_blocks), "--routing", policy) as url:
            log, wall = asyncio.run(workload(url, args.preset, args, args.seed))
        results[policy] = summarize(log, wall)
        if oracle is None:
            oracle = oracle_hit_ratio(log, args.workers * args.kv_blocks, 16)
        print(policy, json.dumps(results[policy]), flush=True)
    base = results.get("round-robin")
    kv = results.get("kv")
    ratios = {}
    if base and kv:
        ratios = {"ttft_p50_round_robin_over_kv": base["ttft_p50_ms"] / kv["ttft_p50_ms"],
                  "kv_hit_ratio_over_oracle": kv["hit_ratio"] / oracle}
    print("oracle hit ratio", oracle, ratios, flush=True)
    write_result(args.out, {
        "benchmark": "prefix_routing", "preset": args.preset, "workers": args.workers,
        "kv_blocks_per_worker": args.kv_blocks, "working_set_tokens": working_set,
        "capacity_tokens": capacity, "workload": {k: getattr(args, k) for k in (
            "systems", "system_len", "users", "turns", "msg_len", "out_len", "jitter",
            "seed")},
        "policies": results, "oracle_hit_ratio": oracle, "ratios": ratios})


if __name__ == "__main__":
    main()
