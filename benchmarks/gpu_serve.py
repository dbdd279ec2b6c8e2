"""Serving benchmark through the router on one GPU, beside transformers in the same run.

    source scripts/gpu_env.sh && python -m benchmarks.gpu_serve --out $OUT/gpu_serve.json

`baton serve --device cuda` (aggregated: router + one worker) with the llama-3.1-8b
shape and random bf16 weights; a closed-loop load generator keeps `c` streaming
requests in flight (prompt given as token ids, ignore_eos, fixed output length) and
records per-request TTFT and inter-token gaps from the SSE stream. Then the server is
stopped and transformers `generate` runs the same shapes as the naive baseline (one
batch of c prompts; only the smaller concurrencies, which already take it minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time

import httpx
import torch

from benchmarks.common import pct, write_result
from cluster.local_server import baton_serve

MODEL_NAME = ["?"]  # what the server calls its model (from /v1/models)


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int],
                      out_len: int, tokens: list[int] | None = None) -> dict:
    """One streamed request; `tokens`, when given, receives the generated token ids (a
    multi-turn client sends them back as the next turn's history)."""
    body = {"model": MODEL_NAME[0], "prompt": prompt, "max_tokens": out_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    counts: list[int] = []  # tokens per chunk: a lagging stream merges several into one
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                ids = [t for ch in chunk["choices"] for t in ch.get("token_ids", [])]
                stamps.append(time.perf_counter())
                counts.append(len(ids))
                if tokens is not None:
                    tokens.extend(ids)
    # One gap per token after the first chunk's: a chunk of n tokens spreads its wait
    # over them (as the router's ITL histogram does).
    gaps = [(b - a) / n for (a, b), n in zip(itertools.pairwise(stamps), counts[1:])
            for _ in range(n)]
    return {"ttft": stamps[0] - t0, "gaps": gaps, "chunks": len(stamps),
            "tokens": sum(counts), "latency": stamps[-1] - t0}


async def load(url: str, in_len: int, out_len: int, concurrency: int, requests: int,
               vocab: int) -> dict:
    rng = random.Random(in_len * 31 + concurrency)
    prompts = [[rng.randrange(vocab) for _ in range(in_len)] for _ in range(requests)]
    queue = list(range(requests))
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        async def user() -> None:
            while queue:
                i = queue.pop()
                results.append(await one_request(client, url, prompts[i], out_len))

        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    # Time per output token after the first, per request (vLLM's TPOT). ITL: one gap per
    # token (a chunk carrying several tokens, when the worker's stream lags, spreads its
    # wait over them; until 2026-11-29 each chunk counted as one gap, which overstated it).
    tpot = [(r["latency"] - r["ttft"]) / max(out_len - 1, 1) for r in results]
    return {"input_len": in_len, "output_len": out_len, "concurrency": concurrency,
            "requests": requests, "wall_s": wall,
            "output_tokens_per_s": requests * out_len / wall,
            "ttft_ms_p50": pct(ttft, 0.5) * 1e3, "ttft_ms_p99": pct(ttft, 0.99) * 1e3,
            "itl_ms_p50": pct(gaps, 0.5) * 1e3, "itl_ms_p99": pct(gaps, 0.99) * 1e3,
            "tpot_ms_p50": pct(tpot, 0.5) * 1e3, "tpot_ms_p99": pct(tpot, 0.99) * 1e3,
            "chunks_per_request_min": min(r["chunks"] for r in results)}


def hf_baseline(preset: str, in_len: int, out_len: int, batch: int, device: str) -> dict:
    """transformers generate, one batch of `batch` equal-length prompts, greedy."""
    from benchmarks.gpu_correctness import build_hf

    model = build_hf(preset, device, seed=0)
    rng = random.Random(7)
    ids = torch.tensor([[rng.randrange(model.config.vocab_size) for _ in range(in_len)]
                        for _ in range(batch)], device=device)
    kw = {"do_sample": False, "pad_token_id": 0}
    model.generate(ids[:, :32], max_new_tokens=2, min_new_tokens=2, **kw)  # warm up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    sync()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=out_len, min_new_tokens=out_len, **kw)
    sync()
    total = time.perf_counter() - t0
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"input_len": in_len, "output_len": out_len, "concurrency": batch,
            "output_tokens_per_s": batch * out_len / total, "ttft_ms": ttft * 1e3,
            "itl_ms_mean": (total - ttft) / max(out_len - 1, 1) * 1e3, "wall_s": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--shapes", default="1000:1000,4000:200", help="input:output pairs")
    ap.add_argument("--concurrency", default="1,16,64,256")
    ap.add_argument("--hf-concurrency", default="1,16")
    ap.add_argument("--serve-args", default="--max-num-batched-tokens 8192")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-baton", action="store_true", help="only the transformers baseline")
    ap.add_argument("--out", default="benchmarks/results/gpu_serve.json")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    from kernels.presets import get_preset

    vocab = get_preset(args.preset).hf_config["vocab_size"]
    result = {"benchmark": "gpu_serve", "preset": args.preset, "mode": "aggregated, 1 worker",
              "serve_args": args.serve_args, "baton": [], "transformers": []}
    if not args.no_baton:
        result.update(run_baton(args, shapes, levels, vocab))
        write_result(args.out, result)
    for in_len, out_len in shapes:
        for c in [int(x) for x in args.hf_concurrency.split(",") if x]:
            res = hf_baseline(args.preset, in_len, out_len, c, args.device)
            result["transformers"].append(res)
            print("transformers", res, flush=True)
            write_result(args.out, result)  # after each: a timeout keeps what was measured


def run_baton(args: argparse.Namespace, shapes: list[tuple[int, ...]], levels: list[int],
              vocab: int) -> dict:
    logs: list[str] = []
    baton = []
    t0 = time.perf_counter()
    with baton_serve(args.preset, "--load-format", "dummy", "--device", args.device,
                     "--prefill", "0", "--decode", "1", *args.serve_args.split(),
                     timeout=600, log_lines=logs) as url:
        startup_s = time.perf_counter() - t0
        MODEL_NAME[0] = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        asyncio.run(load(url, 64, 8, 4, 8, vocab))  # warm-up
        for in_len, out_len in shapes:
            for c in levels:
                n = max(c, 4) if c > 1 else 2
                res = asyncio.run(load(url, in_len, out_len, c, n, vocab))
                baton.append(res)
                print("baton", res, flush=True)
    startup = [ln.strip() for ln in logs if any(
        k in ln for k in ("KV cache", "CUDA graphs", "attention backend", "fused"))]
    return {"baton": baton, "startup_seconds": startup_s, "startup_log": startup}


if __name__ == "__main__":
    main()
