"""Disaggregated against aggregated serving on two GPUs, same run, same requests.

    source scripts/gpu_env.sh && python -m benchmarks.gpu_disagg --out $OUT/gpu_disagg.json

Layouts (llama-3.1-8b shape, random bf16 weights):
- `1P1D`: one prefill worker on GPU0, one decode worker on GPU1, KV moved by `--kv-transfer`;
- `2xagg`: two aggregated workers, one per GPU, the router spreading requests.

Per layout: (1) the TTFT of a lone 4k-token prompt (what disaggregation adds: one KV
transfer), then (2) a mixed open-loop load at each of `--rates`: chat requests (short
prompt, long answer) arrive with long-prompt requests (document questions) mixed in, so
on an aggregated worker long prefills land in the middle of others' decoding; (3) a
closed-loop concurrency sweep of chat-shaped requests (`--concurrency`); (4) multi-turn
chat sessions whose prompts grow turn by turn (`--sessions-concurrency`). Reported: TTFT
and ITL p50/p99 per class, output tokens/s in all and per GPU, and goodput = requests per
second that met TTFT <= 1 s and a mean inter-token gap <= 25 ms (DistServe's definition;
`--slo-ttft`, `--slo-itl`). With `--tp N` each worker spans N GPUs (1P1D: prefill on GPUs
0..N-1, decode on N..2N-1) and KV pulls also report the bandwidth per rank pair.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import httpx

from benchmarks import gpu_serve
from benchmarks import serve as serve_bench
from benchmarks.common import counter_by_label, write_result
from benchmarks.gpu_serve import pct
from cluster.local_server import baton_serve


def layout(name: str, tp: int, decode_gpus: str = "") -> tuple[list[str], list[str]]:
    """(workers, GPU placement) of a layout, each worker on `tp` GPUs: 1P1D puts prefill
    on the first tp GPUs and decode on the next tp (or on `decode_gpus`: "1,0" puts a TP=2
    decode worker on the prefill worker's GPUs in reverse, so two GPUs carry a TP=2 1P1D
    whose rank-to-rank pulls still cross NVLink); 2xagg runs two aggregated replicas."""
    first = ",".join(str(g) for g in range(tp))
    second = decode_gpus or ",".join(str(g) for g in range(tp, 2 * tp))
    if name == "1P1D":
        return ["--prefill", "1", "--decode", "1"], ["--prefill-gpus", first,
                                                     "--decode-gpus", second]
    if name == "2xagg":
        return ["--prefill", "0", "--decode", "2"], ["--decode-gpus", f"{first},{second}"]
    raise ValueError(f"--layouts: unknown layout {name!r} "
                     "(1P1D, 2xagg, NAME@CHUNK, "
                     "NAME/overflow=SECONDS/local=TOKENS/sat=TOKENS/mix=TOKENS)")


LAYOUT_OPTIONS = {"overflow": "--prefill-overflow-wait", "local": "--local-prefill-threshold",
                  "sat": "--prefill-saturation-tokens",
                  "mix": "--prefill-tokens-while-decoding"}


def layout_options(options: list[str]) -> list[str]:
    """`baton serve` flags of a layout's "/NAME=VALUE" options."""
    flags = []
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in LAYOUT_OPTIONS:
            raise ValueError(f"--layouts: unknown option {option!r} (overflow=SECONDS, "
                             "local=TOKENS, sat=TOKENS, mix=TOKENS)")
        flags += [LAYOUT_OPTIONS[key], value]
    return flags


def placements(url: str) -> dict[str, float]:
    """The router's baton_routing_decisions so far, by kind (disaggregated, local,
    overflow)."""
    return counter_by_label(httpx.get(f"{url}/metrics", timeout=10).text,
                            "baton_routing_decisions", "kind")


async def lone_ttft(url: str, in_len: int, repeats: int, vocab: int) -> dict:
    rng = random.Random(7)
    ttfts = []
    async with httpx.AsyncClient(timeout=120) as client:
        for i in range(repeats + 1):
            prompt = [rng.randrange(vocab) for _ in range(in_len)]
            r = await gpu_serve.one_request(client, url, prompt, 2)
            if i:  # the first is a warm-up
                ttfts.append(r["ttft"])
    return {"prompt_tokens": in_len, "repeats": repeats,
            "ttft_ms_median": 1e3 * statistics.median(ttfts),
            "ttft_ms_all": [1e3 * t for t in ttfts]}


async def greedy_tokens(url: str, prompts: int, vocab: int, in_len: int = 300,
                        out_len: int = 32) -> list[list[int]]:
    """Greedy output of fixed prompts, one at a time: every layout (and a run of another
    --tp or --block-size) must produce the same tokens for the same checkpoint."""
    rng = random.Random(11)
    out = []
    async with httpx.AsyncClient(timeout=120) as client:
        for _ in range(prompts):
            tokens: list[int] = []
            await gpu_serve.one_request(client, url, [rng.randrange(vocab) for _ in range(in_len)],
                                        out_len, tokens)
            out.append(tokens)
    return out


async def mixed_load(url: str, args: argparse.Namespace, rate: float, vocab: int) -> dict:
    """Open loop: Poisson arrivals for `duration` seconds; each arrival is a long-prompt
    request with probability `long_share`, else a chat request."""
    rng = random.Random(int(rate * 1000))
    arrivals, t = [], 0.0
    while t < args.duration:
        t += rng.expovariate(rate)
        kind = "long" if rng.random() < args.long_share else "chat"
        in_len, out_len = (args.long_in, args.long_out) if kind == "long" else \
            (args.chat_in, args.chat_out)
        arrivals.append((t, kind, [rng.randrange(vocab) for _ in range(in_len)], out_len))
    results: list[dict] = []
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        t0 = time.perf_counter()

        async def fire(at: float, kind: str, prompt: list[int], out_len: int) -> None:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            results.append(await _request(client, url, prompt, out_len, kind))

        await asyncio.gather(*(fire(*a) for a in arrivals))
        wall = time.perf_counter() - t0
    return summarize(results, wall, args, {"rate_per_s": rate})


def summarize(results: list[dict], wall: float, args: argparse.Namespace, head: dict) -> dict:
    """TTFT and ITL percentiles per request class, goodput under the SLOs, output tokens
    per second in all and per GPU (both layouts use 2 x --tp GPUs)."""
    ok = [r for r in results if "error" not in r]
    out: dict = {**head, "requests": len(results), "errors": len(results) - len(ok),
                 "wall_s": wall}
    for kind in ("chat", "long", "turn", "all"):
        rs = [r for r in ok if kind == "all" or r["kind"] == kind]
        if not rs:
            continue
        ttft = [r["ttft"] for r in rs]
        gaps = [g for r in rs for g in r["gaps"]]
        out[kind] = {"n": len(rs), "ttft_p50_ms": 1e3 * pct(ttft, 0.5),
                     "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
                     "itl_p50_ms": 1e3 * pct(gaps, 0.5) if gaps else None,
                     "itl_p99_ms": 1e3 * pct(gaps, 0.99) if gaps else None}
    good = [r for r in ok if r["ttft"] <= args.slo_ttft and
            (not r["gaps"] or statistics.mean(r["gaps"]) <= args.slo_itl)]
    out["goodput_req_per_s"] = len(good) / wall
    out["slo_attainment"] = len(good) / max(len(results), 1)
    # Stricter: the request's 99th-percentile gap within the ITL SLO, so a request stalled
    # behind another's prefill fails even when its mean gap passes (the mean is DistServe's
    # rule, above).
    strict = [r for r in good if not r["gaps"] or pct(r["gaps"], 0.99) <= args.slo_itl]
    out["goodput_p99_itl_req_per_s"] = len(strict) / wall
    out["output_tokens_per_s"] = sum(r["tokens"] for r in ok) / wall
    out["output_tokens_per_s_per_gpu"] = out["output_tokens_per_s"] / (2 * args.tp)
    return out


async def closed_load(url: str, args: argparse.Namespace, concurrency: int, vocab: int
                      ) -> dict:
    """Closed loop: `concurrency` users each send chat-shaped requests (--chat-in /
    --chat-out) back to back until --duration has passed."""
    rng = random.Random(concurrency)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()

        async def user() -> None:
            while time.perf_counter() - t0 < args.duration:
                prompt = [rng.randrange(vocab) for _ in range(args.chat_in)]
                results.append(await _request(client, url, prompt, args.chat_out, "chat"))

        await asyncio.gather(*(user() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarize(results, wall, args, {"concurrency": concurrency})


async def chat_sessions(url: str, args: argparse.Namespace, concurrency: int, vocab: int
                        ) -> dict:
    """Multi-turn chat: `concurrency` users each hold one conversation at a time on one of
    --session-systems system prompts; every turn sends the whole conversation so far (with
    the tokens the model really generated) plus a new message, so most of each prompt is
    a prefix the serving side may still hold. A user starts a new conversation after
    --session-turns turns, until --duration has passed."""
    rng = random.Random(1000 + concurrency)
    systems = [[rng.randrange(vocab) for _ in range(args.session_system_len)]
               for _ in range(args.session_systems)]
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()

        async def user(u: int) -> None:
            while time.perf_counter() - t0 < args.duration:
                history = list(systems[u % len(systems)])
                for _ in range(args.session_turns):
                    history += [rng.randrange(vocab) for _ in range(args.session_msg_len)]
                    tokens: list[int] = []
                    results.append(await _request(client, url, history, args.chat_out, "turn",
                                                  tokens))
                    history += tokens
                    if time.perf_counter() - t0 >= args.duration:
                        return

        await asyncio.gather(*(user(u) for u in range(concurrency)))
        wall = time.perf_counter() - t0
    return summarize(results, wall, args, {"concurrency": concurrency})


async def _request(client: httpx.AsyncClient, url: str, prompt: list[int], out_len: int,
                   kind: str, tokens: list[int] | None = None) -> dict:
    try:
        r = await gpu_serve.one_request(client, url, prompt, out_len, tokens)
    except (httpx.HTTPError, RuntimeError) as e:
        return {"kind": kind, "error": str(e)[:200]}
    return r | {"kind": kind}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--layouts", default="1P1D,2xagg,2xagg@2048")
    ap.add_argument("--kv-transfer", default="nixl",
                    help="nixl (rank to rank under --tp) or tcp (through the TP leaders)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per worker")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script")
    ap.add_argument("--lone-in", type=int, default=4000)
    ap.add_argument("--lone-repeats", type=int, default=8)
    ap.add_argument("--rates", default="4,8",
                    help="requests per second of the open-loop mixed load ('' for none)")
    ap.add_argument("--concurrency", default="",
                    help="closed-loop chat users, e.g. 8,16,32 (a concurrency sweep)")
    ap.add_argument("--sessions-concurrency", default="",
                    help="users of the multi-turn chat workload, e.g. 8,32")
    ap.add_argument("--session-systems", type=int, default=4)
    ap.add_argument("--session-system-len", type=int, default=1024)
    ap.add_argument("--session-msg-len", type=int, default=128)
    ap.add_argument("--session-turns", type=int, default=4)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per rate")
    ap.add_argument("--long-share", type=float, default=0.2)
    ap.add_argument("--chat-in", type=int, default=256)
    ap.add_argument("--chat-out", type=int, default=256)
    ap.add_argument("--long-in", type=int, default=8000)
    ap.add_argument("--long-out", type=int, default=32)
    ap.add_argument("--transfer-sizes", default="1024,4096,16384,65536",
                    help="1P1D: prompt sizes whose KV pull is timed (empty: skip)")
    ap.add_argument("--slo-ttft", type=float, default=1.0)
    ap.add_argument("--slo-itl", type=float, default=0.025)
    ap.add_argument("--serve-args", default="--max-num-batched-tokens 8192")
    ap.add_argument("--decode-gpus", default="",
                    help="1P1D: the decode worker's GPUs (default: the tp GPUs after prefill's)")
    ap.add_argument("--greedy-prompts", type=int, default=4,
                    help="prompts whose greedy tokens each layout records, to compare layouts")
    ap.add_argument("--out", default="benchmarks/results/gpu_disagg.json")
    args = ap.parse_args()
    rates = [float(x) for x in args.rates.split(",") if x]
    levels = [int(x) for x in args.concurrency.split(",") if x]
    session_levels = [int(x) for x in args.sessions_concurrency.split(",") if x]
    result: dict = {"benchmark": "gpu_disagg", "preset": args.preset, "tp": args.tp,
                    "kv_transfer": args.kv_transfer, "workload": {
                        k: getattr(args, k) for k in (
                            "lone_in", "lone_repeats", "duration", "long_share", "chat_in",
                            "chat_out", "long_in", "long_out", "slo_ttft", "slo_itl",
                            "session_systems", "session_system_len", "session_msg_len",
                            "session_turns")},
                    "gpus_per_layout": 2 * args.tp,
                    "layouts": {}}
    model, load = args.preset, ["--load-format", "dummy"]
    if args.device == "cpu":
        import tempfile
        from pathlib import Path

        from kernels.checkpoint_writer import write_checkpoint

        model, load = str(write_checkpoint(
            args.preset, Path(tempfile.mkdtemp()) / args.preset, progress=False)), []
    for name in args.layouts.split(","):
        # "2xagg@2048": the layout with another prefill chunk (max batched tokens), the
        # knob an aggregated deployment tunes to keep long prefills from stalling decode.
        # "1P1D/overflow=0.5/local=512": conditional disaggregation, with
        # --prefill-overflow-wait 0.5 (prefill on the decode worker while the prefill
        # worker is backed up more than 0.5 s) and --local-prefill-threshold 512;
        # "/sat=3000": --prefill-saturation-tokens 3000; "/mix=512":
        # --prefill-tokens-while-decoding 512.
        spec, *options = name.split("/")
        base, _, chunk = spec.partition("@")
        workers, gpus = layout(base, args.tp, args.decode_gpus)
        serve_args = args.serve_args.split() + (["--max-num-batched-tokens", chunk] if chunk
                                                else []) + layout_options(options)
        tp = ["--tp", str(args.tp)] if args.tp > 1 else []
        flags = [*workers, *(gpus if args.device != "cpu" else []), "--device", args.device,
                 *tp, *load, "--kv-transfer", args.kv_transfer, *serve_args]
        entry: dict = {"flags": flags}
        result["layouts"][name] = entry
        print(f"=== {name}: baton serve {' '.join(flags)}", flush=True)
        with baton_serve(model, *flags, timeout=300) as url:
            gpu_serve.MODEL_NAME[0] = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            vocab = 128000 if args.device != "cpu" else 250
            entry["lone"] = asyncio.run(lone_ttft(url, args.lone_in, args.lone_repeats, vocab))
            print(name, "lone", entry["lone"]["ttft_ms_median"], flush=True)
            entry["greedy"] = asyncio.run(greedy_tokens(url, args.greedy_prompts, vocab))
            write_result(args.out, result)
            if base == "1P1D" and args.transfer_sizes:  # KV bytes and seconds per pull
                entry["transfer"] = serve_bench.transfer(
                    url, gpu_serve.MODEL_NAME[0], [int(x) for x in args.transfer_sizes.split(",")],
                    vocab, 2)
                for row in entry["transfer"]:  # each rank pair moves its 1/tp of the KV
                    if row["gb_per_s"] and args.kv_transfer == "nixl":  # tcp: the leaders
                        row["gb_per_s_per_rank_pair"] = row["gb_per_s"] / args.tp
                write_result(args.out, result)
            runs = [("mixed", r, mixed_load) for r in rates] + \
                [("closed", c, closed_load) for c in levels] + \
                [("sessions", c, chat_sessions) for c in session_levels]
            for key, level, fn in runs:
                before = placements(url)
                entry.setdefault(key, []).append(asyncio.run(fn(url, args, level, vocab)))
                after = placements(url)  # where this level's prompts were prefilled
                entry[key][-1]["placements"] = {k: after[k] - before.get(k, 0) for k in after}
                print(name, key, entry[key][-1], flush=True)
                write_result(args.out, result)
    lay = result["layouts"]
    greedy = {n: e["greedy"] for n, e in lay.items() if "greedy" in e}
    if len(greedy) > 1:  # token agreement of every layout with the first
        (first, ref), *rest = greedy.items()
        result["greedy_agreement"] = {
            f"{n}_vs_{first}": sum(a == b for x, y in zip(g, ref) for a, b in zip(x, y))
            / max(sum(len(y) for y in ref), 1) for n, g in rest}
    # The lone prompt's added TTFT, 1P1D over the first aggregated layout in the run.
    agg = next((n for n in lay if n.split("@")[0].split("/")[0] == "2xagg"), None)
    if "1P1D" in lay and agg and "lone" in lay["1P1D"] and "lone" in lay[agg]:
        added = lay["1P1D"]["lone"]["ttft_ms_median"] / lay[agg]["lone"]["ttft_ms_median"] - 1
        result["added_ttft_lone_vs"] = agg
        result["added_ttft_lone_1p1d_over_agg"] = added
        result["lone_in"] = args.lone_in
        if args.lone_in == 4000:  # the key earlier results use
            result["added_ttft_4k_1p1d_over_agg"] = added
    write_result(args.out, result)


if __name__ == "__main__":
    main()
