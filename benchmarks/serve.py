"""Serving benchmark on one machine: AIPerf load against `baton serve`, aggregated vs
disaggregated in the same run; KV transfer bandwidth of nixl vs tcp for 1k/4k/16k-token
prompts; and the router's own time per request, from its spans.

    python -m benchmarks.serve --out benchmarks/results/serve_cpu.json

AIPerf (a heavy install) runs from its own venv: `make bench-deps` creates .venv-aiperf.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import write_result
from cluster.local_server import baton_serve, wait_pools_empty
from kernels.checkpoint_writer import write_checkpoint

AIPERF_METRICS = ("time_to_first_token", "inter_token_latency", "request_latency",
                  "output_token_throughput", "request_throughput")


def aiperf(url: str, model: str, tokenizer: Path, out: Path, concurrency: int, requests: int,
           isl: int, osl: int, binary: str) -> dict:
    cmd = [binary, "profile", "--model", model, "--url", url, "--endpoint-type", "completions",
           "--streaming", "--tokenizer", str(tokenizer), "--request-count", str(requests),
           "--concurrency", str(concurrency), "--synthetic-input-tokens-mean", str(isl),
           "--synthetic-input-tokens-stddev", "0", "--output-tokens-mean", str(osl),
           "--output-tokens-stddev", "0", "--extra-inputs", "ignore_eos:true",
           "--ui-type", "simple", "--artifact-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    exports = list(out.rglob("profile_export_aiperf.json"))
    if proc.returncode != 0 or not exports:
        raise RuntimeError(f"aiperf failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    data = json.loads(exports[0].read_text())
    found = {}
    for name in AIPERF_METRICS:
        m = data.get(name) or next((v for v in data.get("records", {}).values()
                                    if isinstance(v, dict) and v.get("tag") == name), None)
        if m:
            found[name] = {k: m.get(k) for k in ("unit", "avg", "p50", "p90", "p99")
                           if k in m}
    return {"concurrency": concurrency, "requests": requests, "isl": isl, "osl": osl,
            "command": " ".join(cmd), "metrics": found}


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def router_spans(url: str) -> dict:
    m = scrape(url)
    spans = {}
    for key, total in m.items():
        hit = re.match(r'baton_router_span_seconds_sum\{stage="(\w+)"\}', key)
        if hit:
            count = m.get(key.replace("_sum", "_count"), 0)
            spans[hit.group(1)] = {"mean_us": 1e6 * total / count if count else None,
                                   "count": count}
    reqs = sum(v for k, v in m.items() if k.startswith("baton_requests_total"))
    spans["requests"] = reqs
    return spans


def transfer(url: str, model: str, sizes: list[int], vocab: int, repeats: int) -> list[dict]:
    rows = []
    rng = random.Random(0)
    for n in sizes:
        for r in range(repeats):
            before = scrape(url)
            prompt = [rng.randrange(4, vocab) for _ in range(n)]  # fresh: no cache hits
            t0 = time.perf_counter()
            resp = httpx.post(f"{url}/v1/completions", timeout=600, json={
                "model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0,
                "ignore_eos": True})
            resp.raise_for_status()
            e2e = time.perf_counter() - t0
            after = scrape(url)
            key_b = [k for k in after if k.startswith("baton_kv_transfer_bytes_total")]
            key_s = [k for k in after if k.startswith("baton_kv_transfer_seconds_sum")]
            nbytes = sum(after[k] - before.get(k, 0.0) for k in key_b)
            secs = sum(after[k] - before.get(k, 0.0) for k in key_s)
            rows.append({"prompt_tokens": n, "repeat": r, "kv_bytes": nbytes,
                         "transfer_seconds": secs,
                         "gb_per_s": nbytes / secs / 1e9 if secs else None,
                         "request_seconds": e2e})
            print(f"  {n:6d} tokens: {nbytes / 2**20:8.1f} MiB in {secs * 1e3:8.1f} ms "
                  f"= {rows[-1]['gb_per_s'] or 0:.2f} GB/s", flush=True)
        wait_pools_empty(url, timeout=60)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aiperf", default=".venv-aiperf/bin/aiperf")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--isl", type=int, default=256)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--transfer-sizes", default="1024,4096,16384")
    ap.add_argument("--transfer-repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/serve_cpu.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="baton-bench-"))
    tiny = write_checkpoint("tiny-llama", work / "tiny-llama", progress=False)
    small = write_checkpoint("small-llama", work / "small-llama", progress=False)
    result: dict = {"benchmark": "serve", "serving": {}, "transfer": {}, "router_spans": {}}
    modes = {"aggregated": ["--prefill", "0", "--decode", "1"],
             "disaggregated_1p1d": ["--prefill", "1", "--decode", "1"]}
    for mode, flags in modes.items():
        print(f"== {mode}", flush=True)
        with baton_serve(tiny, *flags, "--kv-blocks", "4096") as url:
            runs = []
            for c in (int(x) for x in args.concurrency.split(",")):
                runs.append(aiperf(url, "tiny-llama", tiny, work / f"aiperf-{mode}-{c}", c,
                                   args.requests, args.isl, args.osl, args.aiperf))
                print(f"  concurrency {c}: {json.dumps(runs[-1]['metrics'])}", flush=True)
            result["serving"][mode] = runs
            result["router_spans"][mode] = router_spans(url)
    sizes = [int(x) for x in args.transfer_sizes.split(",")]
    for backend in ("nixl", "tcp"):
        print(f"== transfer over {backend}", flush=True)
        with baton_serve(small, "--prefill", "1", "--decode", "1", "--kv-transfer", backend,
                         "--kv-blocks", str(2 * max(sizes) // 16 + 64),
                         "--max-num-batched-tokens", "2048", timeout=300) as url:
            result["transfer"][backend] = transfer(url, "small-llama", sizes, 1024,
                                                   args.transfer_repeats)
    result["transfer_model"] = {"preset": "small-llama", "kv_bytes_per_token": 8192}
    print(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
