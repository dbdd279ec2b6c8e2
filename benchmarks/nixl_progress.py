"""What NIXL's UCX progress thread costs on CPU: `baton serve` (1 prefill + 1 decode worker,
`--kv-transfer nixl`) with the thread polling without a timeout (NIXL's own default,
BATON_NIXL_PROGRESS_DELAY_US=0) and with Baton's 1 ms timeout, in one run: each worker's
CPU share while idle, then output tokens/s of concurrent streams.

    python -m benchmarks.nixl_progress --out benchmarks/results/nixl_progress_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import write_result
from cluster.local_server import baton_serve
from kernels.checkpoint_writer import write_checkpoint

CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def worker_pids(url: str) -> list[int]:
    return [w["pid"] for w in httpx.get(f"{url}/health").json()["workers"]]


async def streams(url: str, model: str, n: int, tokens: int) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> int:
            r = await client.post(f"{url}/v1/completions", json={
                "model": model, "prompt": [5, 6, 7, 10 + i % 50], "max_tokens": tokens,
                "ignore_eos": True, "temperature": 0})
            return r.json()["usage"]["completion_tokens"]

        await one(0)  # warm-up
        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(i) for i in range(n)))
        return sum(done) / (time.perf_counter() - t0)


def measure(args, model_dir: str, delay_us: int) -> dict:
    os.environ["BATON_NIXL_PROGRESS_DELAY_US"] = str(delay_us)  # the workers inherit it
    with baton_serve(model_dir, "--prefill", "1", "--decode", "1", "--kv-transfer",
                     "nixl") as url:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        pids = worker_pids(url)
        time.sleep(2)
        c0, t0 = [cpu_seconds(p) for p in pids], time.monotonic()
        time.sleep(args.idle_seconds)
        wall = time.monotonic() - t0
        idle = [(cpu_seconds(p) - c) / wall for p, c in zip(pids, c0)]
        tok_s = asyncio.run(streams(url, model, args.streams, args.tokens))
    result = {"progress_delay_us": delay_us, "idle_cpu_share_per_worker": idle,
              "output_tokens_per_s": tok_s}
    print(result, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-llama")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--idle-seconds", type=float, default=5.0)
    ap.add_argument("--out", default="benchmarks/results/nixl_progress_cpu.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(write_checkpoint(args.preset, Path(tmp) / args.preset, progress=False))
        # Alternated: a noisy machine drifts.
        runs = [measure(args, model_dir, d) for d in (0, 1000, 0, 1000)]
    by = {d: [r for r in runs if r["progress_delay_us"] == d] for d in (0, 1000)}
    write_result(args.out, {
        "benchmark": "nixl_progress", "preset": args.preset, "streams": args.streams,
        "tokens": args.tokens, "cpu_count": os.cpu_count(),
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
        "command": "python -m benchmarks.nixl_progress",
        "runs": runs,
        "tokens_per_s_1ms_over_spinning": sum(r["output_tokens_per_s"] for r in by[1000])
        / sum(r["output_tokens_per_s"] for r in by[0])})


if __name__ == "__main__":
    main()
