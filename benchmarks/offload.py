"""Tiered KV cache benchmark: a multi-turn chat workload whose working set is ~4x the
device KV capacity, against one `baton serve` worker with the host/disk tiers off and
on, in the same run: TTFT p50/p99, prefix hit ratio, and hits per tier.

    python -m benchmarks.offload --out benchmarks/results/offload_cpu.json

Per-tier hit counts come from the worker's own totals, logged at shutdown. Mode
`host+disk/no-prefetch` (only when named in --modes) is host+disk with disk reads made at
admission instead of ahead of it (`--no-disk-kv-prefetch`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import write_result
from benchmarks.prefix_routing import make_sessions, summarize, workload
from cluster.local_server import baton_serve
from kernels.checkpoint_writer import write_checkpoint

TOTALS = re.compile(r"tiered KV totals: offloaded host (\d+) disk (\d+); hits host (\d+) "
                    r"disk (\d+); bad disk blocks dropped (\d+); disk hits skipped (\d+) "
                    r"\(slower than recompute: disk (\S+) ms/block, prefill (\S+) ms/block\)"
                    r"(?:; disk writes dropped (\d+) \(disk behind\); offloads skipped (\d+))?"
                    r"(?:.*?; disk read-ahead (\d+) blocks: ready (\d+), waited for (\d+), "
                    r"late (\d+), unused (\d+))?")


def run_mode(model: str, load: list[str], args: argparse.Namespace, flags: list[str]) -> dict:
    logs: list[str] = []
    with baton_serve(model, *load, "--device", args.device, "--prefill", "0",
                     "--decode", "1", "--kv-blocks", str(args.kv_blocks), *flags,
                     log_lines=logs, timeout=300) as url:
        start_load = os.getloadavg()
        log, samples, wall, _ = asyncio.run(workload(
            url, Path(model).name, make_sessions(args), 1.0, args.out_len))
    res = summarize(log, samples, wall, start_load)
    found = [m.groups() for ln in logs if (m := TOTALS.search(ln))]
    if found:
        keys = ("offloaded_host", "offloaded_disk", "hit_blocks_host", "hit_blocks_disk",
                "bad_disk_blocks", "disk_hits_skipped")
        res["tiers"] = dict(zip(keys, map(int, found[-1][:6])))
        res["tiers"]["disk_ms_per_block"], res["tiers"]["prefill_ms_per_block"] = found[-1][6:8]
        if found[-1][8] is not None:
            res["tiers"]["disk_writes_dropped"] = int(found[-1][8])
            res["tiers"]["offloads_skipped_busy"] = int(found[-1][9])
        if found[-1][10] is not None:
            keys = ("prefetched", "prefetch_hits", "prefetch_waits", "prefetch_late",
                    "prefetch_unused")
            res["tiers"].update(zip(keys, map(int, found[-1][10:15])))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small-llama")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kv-blocks", type=int, default=80, help="device (G1) blocks")
    ap.add_argument("--host-kv-gb", type=float, default=0.06)
    ap.add_argument("--disk-kv-gb", type=float, default=0.2)
    ap.add_argument("--disk-mode-host-gb", type=float, default=0.002,
                    help="host tier in the host+disk modes (tiny: hits come from disk)")
    ap.add_argument("--systems", type=int, default=4)
    ap.add_argument("--system-len", type=int, default=384)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--msg-len", type=int, default=48)
    ap.add_argument("--out-len", type=int, default=16)
    ap.add_argument("--think", type=float, default=1.0, help="seconds between turns (mean)")
    ap.add_argument("--rate", type=float, default=1.0, help="session arrivals per second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="off,host,host+disk")
    ap.add_argument("--no-warm-restart", action="store_true")
    ap.add_argument("--repeats", type=int, default=2,
                    help="rounds of all modes, interleaved (the machine is shared and noisy)")
    ap.add_argument("--out", default="benchmarks/results/offload_cpu.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="baton-offload-"))
    model = args.preset if args.device != "cpu" else str(
        write_checkpoint(args.preset, work / args.preset, progress=False))
    load = ["--load-format", "dummy"] if args.device != "cpu" else []
    working_set = args.systems * args.system_len + args.sessions * args.turns * (
        args.msg_len + args.out_len)
    g1_tokens = args.kv_blocks * 16
    print(f"working set ~{working_set} tokens, G1 {g1_tokens} tokens "
          f"({working_set / g1_tokens:.1f}x)", flush=True)
    def disk(i: int) -> list[str]:  # a small host tier, so most hits come from the files
        return ["--host-kv-gb", str(args.disk_mode_host_gb),
                "--disk-kv-dir", str(work / f"disk{i}"), "--disk-kv-gb", str(args.disk_kv_gb)]

    def disk_no_prefetch(i: int) -> list[str]:  # its own directory: no warm start
        return [*disk(i)[:3], str(work / f"disk-np{i}"), *disk(i)[4:], "--no-disk-kv-prefetch"]

    modes = {"off": lambda i: [], "host": lambda i: ["--host-kv-gb", str(args.host_kv_gb)],
             "host+disk": disk, "host+disk/no-prefetch": disk_no_prefetch}
    modes = {m: f for m, f in modes.items() if m in args.modes.split(",")}
    warm = "host+disk" in modes and not args.no_warm_restart
    runs: dict[str, list[dict]] = {m: [] for m in [*modes, *(["host+disk, warm restart"]
                                                               if warm else [])]}
    load_avg = {"start": os.getloadavg()}
    for i in range(args.repeats):
        for mode, flags in modes.items():
            runs[mode].append(run_mode(model, load, args, flags(i)))
            print(mode, json.dumps(runs[mode][-1]), flush=True)
    if warm:  # the same workload again on the last disk directory: a restarted worker's
        runs["host+disk, warm restart"].append(  # blocks
            run_mode(model, load, args, disk(args.repeats - 1)))
        print("warm restart", json.dumps(runs["host+disk, warm restart"][-1]), flush=True)
    results = {m: {"ttft_p50_ms_median": statistics.median(r["ttft_p50_ms"] for r in rs),
                   "ttft_p99_ms_median": statistics.median(r["ttft_p99_ms"] for r in rs),
                   "hit_ratio": rs[-1]["hit_ratio"], "tiers": rs[-1].get("tiers"), "runs": rs}
               for m, rs in runs.items()}
    load_avg["end"] = os.getloadavg()
    off = results["off"]["ttft_p50_ms_median"] if "off" in results else None
    write_result(args.out, {
        "benchmark": "offload", "preset": args.preset, "device": args.device,
        "g1_blocks": args.kv_blocks, "working_set_tokens": working_set,
        "working_set_over_g1": working_set / g1_tokens, "load_average": load_avg,
        "workload": {k: getattr(args, k) for k in ("systems", "system_len", "sessions", "turns",
                                                   "msg_len", "out_len", "think", "rate", "seed")},
        "modes": results,
        "ttft_p50_off_over_on": {m: off / r["ttft_p50_ms_median"] for m, r in results.items()
                                 if m != "off" and off is not None}})


if __name__ == "__main__":
    main()
