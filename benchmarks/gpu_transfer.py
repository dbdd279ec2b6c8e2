"""KV pull bandwidth GPU0 -> GPU1 per transfer backend, in one run: the nixl backend
(`NixlBackend.pull`: one-sided READ of VRAM, one descriptor per run of blocks), the nccl
backend's data path (`NcclLink`: scattered runs staged through contiguous buffers, long
runs one send/recv each; `nccl_unstaged`: every run as it is, for comparison),
and torch.distributed NCCL send/recv of ONE contiguous buffer of the same byte count, the
ceiling issue 7 measures against (goal: >= 80% of it).

    source scripts/gpu_env.sh   # nixl from the carried wheels
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python -m benchmarks.gpu_transfer --out $OUT/gpu_transfer.json

Two processes, placed as 1P1D serving places workers (each sees only its own GPU): the
prefill side on GPU0, the decode side on GPU1, each with a KV cache of the llama-3.1-8b
shape (32 layers x K,V x 16 tokens x 8 KV heads x 128 x bf16 = 2 MiB per block) for 64k
tokens plus slack. A pipe replaces gRPC for control (NIXL metadata, the NCCL unique id,
lockstep). Prompts of 1k-64k tokens in two block placements: `contiguous` (ids 0..n-1 on
both sides, one run) and `scattered` (the first n ids of a shuffled free list on each side,
what a long-running pool hands out: about one run per block). The decode side times each
transfer lap to lap, in lockstep with the prefill side, after warm-up, and checks the bytes
that arrived. Each backend runs in a fresh pair of processes under a time limit, so a hang
costs only that backend and the result says which step it stopped in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import faulthandler
import gc
import os
import queue
import socket
import statistics
import time
import traceback

import torch
import torch.multiprocessing as mp

from benchmarks.block_placements import PLACEMENTS, block_ids
from benchmarks.common import write_result
from benchmarks.nccl_variants import VARIANTS, trace_medians
from kvtransfer.transfer.base import PeerInfo, coalesce

# Every process keeps NVLink multicast off (with it on, NCCL hangs on these machines): set
# here at import, before anything starts CUDA or spawns; the spawned processes inherit it
# and import this module again.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NCCL_ENV)

BLOCK_TOKENS = 16  # the default --block-size; --block-tokens 64 makes 8 MiB blocks


def block_shape(block_tokens: int) -> tuple[int, ...]:
    return (32, 2, block_tokens, 8, 128)  # layers, K/V, tokens, KV heads, head dim (bf16)


# torch_nccl first: the others' denominator. nccl_unstaged: the nccl link sending each run
# as it is (what it did before staging), to show what staging buys in the same run.
# nixl_threads4: NIXL's UCX thread-pool engine (kvtransfer/transfer/nixl.ucx_params), the
# descriptors of a READ split over 4 threads with their own workers and CUDA streams.
BACKENDS = ("torch_nccl", "nccl", "nccl_unstaged", "nixl", "nixl_threads4")
NIXL_THREADS4_ENV = {"BATON_NIXL_UCX_THREADS": "4", "BATON_NIXL_UCX_SPLIT": "8"}
GOAL = 0.8  # of the contiguous send/recv bandwidth


def pattern(ids: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """Bytes of source blocks `ids` [n, block_bytes]: a byte ramp offset by the block id,
    so a block landing in the wrong place or shifted within it shows."""
    ramp = (torch.arange(block_bytes, device=ids.device) % 251).to(torch.uint8)
    return ramp[None, :] + ((ids * 7) % 256).to(torch.uint8)[:, None]  # uint8 wraps


class Side:
    """One process's end: the pipe to the other side, the report queue to the parent."""

    def __init__(self, role: str, conn, reports, cfg: dict) -> None:
        self.role, self.conn, self.reports, self.cfg = role, conn, reports, cfg
        self.is_decode = role == "decode"

    def progress(self, text: str) -> None:
        self.reports.put(("progress", self.role, text))

    def result(self, backend: str, placement: str, tokens: int, value: dict) -> None:
        self.reports.put(("result", backend, placement, tokens, value))

    def send(self, tag: str, *payload) -> None:
        self.conn.send((tag, *payload))

    def expect(self, tag: str, timeout: float | None = None):
        timeout = timeout or self.cfg["step_timeout"]
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.role}: no {tag!r} from the other side in {timeout:.0f} s")
        msg = self.conn.recv()
        if msg[0] == "error":
            raise RuntimeError(f"the other side failed: {msg[1]}")
        if msg[0] != tag:
            raise RuntimeError(f"{self.role}: expected {tag!r}, got {msg[0]!r}")
        return msg[1:]

    def cases(self, placements=None):
        for tokens in self.cfg["tokens"]:
            for placement in placements or self.cfg["placements"]:
                n = tokens // self.cfg["block_tokens"]
                nb = self.cfg["num_blocks"]
                yield tokens, placement, block_ids(placement, n, "prefill", nb), \
                    block_ids(placement, n, "decode", nb)

    def timed(self, fn) -> list[float]:
        """Lap times of warmup + repeats calls of fn (lap to lap: a call's wait for the
        other side counts, as it does in serving); warm-up laps dropped."""
        warmup, laps = self.cfg["warmup"], []
        t = time.perf_counter()
        for i in range(warmup + self.cfg["repeats"]):
            fn()
            now = time.perf_counter()
            if i >= warmup:
                laps.append(now - t)
            t = now
        return laps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _prepare(side: Side, kv8: torch.Tensor, dst: list[int]) -> None:
    """Decode side: zero the destination blocks, then let the prefill side start."""
    if side.is_decode:
        kv8.index_fill_(0, torch.tensor(dst, device=kv8.device), 0)
        _sync(kv8.device)
        side.send("go")
    else:
        side.expect("go")


def _report(side: Side, backend: str, placement: str, tokens: int, kv8: torch.Tensor,
            src: list[int], dst: list[int], laps: list[float], runs: int) -> None:
    if not side.is_decode:
        return
    _sync(kv8.device)
    ok = True
    for i in range(0, len(dst), 256):
        s = torch.tensor(src[i : i + 256], device=kv8.device)
        d = torch.tensor(dst[i : i + 256], device=kv8.device)
        ok = ok and torch.equal(kv8[d], pattern(s, kv8.shape[1]))
    nbytes = len(dst) * kv8.shape[1]
    med = statistics.median(laps)
    side.result(backend, placement, tokens, {
        "bytes": nbytes, "blocks": len(dst), "runs": runs, "ms_median": med * 1e3,
        "ms_all": [round(x * 1e3, 4) for x in laps], "gb_per_s": nbytes / med / 1e9,
        "data_ok": ok})


def run_torch_nccl(side: Side, kv8: torch.Tensor) -> None:
    import torch.distributed as dist

    kind = "nccl" if kv8.is_cuda else "gloo"  # gloo: a CPU dry run of this script
    side.progress(f"torch_nccl: init_process_group ({kind})")
    dist.init_process_group(
        kind, init_method=f"tcp://127.0.0.1:{side.cfg['port']}", rank=int(side.is_decode),
        world_size=2, timeout=datetime.timedelta(seconds=side.cfg["step_timeout"]))
    for tokens, placement, _, _ in side.cases(placements=("contiguous",)):
        side.progress(f"torch_nccl: {tokens} tokens, one buffer")
        n = tokens // side.cfg["block_tokens"]
        buf = kv8[:n].view(-1)  # blocks 0..n-1: one contiguous region
        _prepare(side, kv8, list(range(n)))

        def move(buf=buf) -> None:
            if side.is_decode:
                dist.recv(buf, 0)
            else:
                dist.send(buf, 1)
            _sync(buf.device)

        laps = side.timed(move)
        _report(side, "torch_nccl", placement, tokens, kv8, list(range(n)), list(range(n)),
                laps, 1)
    _finish(side)
    dist.destroy_process_group()


def run_nccl(side: Side, kv8: torch.Tensor, staged: bool = True, label: str = "nccl") -> None:
    from cupy.cuda import nccl

    from kvtransfer.transfer.nccl_link import RECEIVER, SENDER, NcclLink, new_unique_id

    plan, traced = VARIANTS.get(label, VARIANTS["nccl"])
    side.progress(f"nccl: join (NCCL {nccl.get_version()})")
    rank = RECEIVER if side.is_decode else SENDER
    if side.is_decode:  # as in serving: the decode side makes the id
        uid = new_unique_id()
        side.send("uid", uid)
    else:
        (uid,) = side.expect("uid")
    link = NcclLink(rank, uid, 0, kv8.data_ptr(), kv8.shape[1], name=side.role,
                    compute_stream=torch.cuda.default_stream().cuda_stream,
                    kv_cache=kv8 if staged else None, plan=plan, trace=traced)
    step = side.cfg["step_timeout"]
    link.ready.result(timeout=step)
    for tokens, placement, src, dst in side.cases():
        runs = coalesce(src, dst)
        side.progress(f"nccl: {tokens} tokens, {placement} ({len(runs)} runs)")
        mine = [(r.dst_start if side.is_decode else r.src_start, r.count) for r in runs]
        _prepare(side, kv8, dst)
        link.traces.clear()
        laps = side.timed(lambda mine=mine: link.submit(mine).result(timeout=step))
        if traced:  # the timed laps' transfers, warm-up dropped
            timed = list(link.traces)[-side.cfg["repeats"]:]
            side.reports.put(("trace", label, placement, tokens, side.role,
                              trace_medians(timed)))
        _report(side, label, placement, tokens, kv8, src, dst, laps, len(runs))
    _finish(side)
    side.progress("nccl: teardown: abort")
    link.abort()
    side.progress("nccl: teardown: join the link thread")
    link.wait_closed(30)
    # Dropped whole, in whatever order the collector frees its parts, as a backend drops
    # a failed link: a crash here (it once did, SIGSEGV) would take a worker down.
    side.progress("nccl: teardown: release the link")
    link = None
    gc.collect()
    torch.cuda.synchronize()
    side.progress("nccl: teardown: done")


def run_nixl(side: Side, kv8: torch.Tensor, label: str = "nixl") -> None:
    from kvtransfer.transfer.nixl import NixlBackend

    side.progress("nixl: agent")
    if not side.is_decode:  # the prefill side only registers its memory: READs are one-sided
        async def unused(address: str) -> bytes:
            raise AssertionError("the prefill side fetches no metadata")

        backend = NixlBackend(kv8, "bench-prefill", unused)
        side.send("meta", backend.metadata(), backend.agent_name, backend.base_address)
        for tokens, placement, _, _ in side.cases():
            side.progress(f"nixl: {tokens} tokens, {placement} (decode side reads)")
            _prepare(side, kv8, [])
        _finish(side)
        backend.close()
        return
    meta, name, base = side.expect("meta")

    async def fetch(address: str) -> bytes:
        return meta

    backend = NixlBackend(kv8, "bench-decode", fetch)
    peer = PeerInfo("pipe", name, base, kv8.shape[1])
    loop = asyncio.new_event_loop()
    step = side.cfg["step_timeout"]
    for tokens, placement, src, dst in side.cases():
        runs = coalesce(src, dst)
        side.progress(f"nixl: {tokens} tokens, {placement} ({len(runs)} descriptors)")
        _prepare(side, kv8, dst)

        def pull(src=src, dst=dst) -> None:
            loop.run_until_complete(asyncio.wait_for(
                backend.pull(peer, "bench", src, dst), step))

        laps = side.timed(pull)
        _report(side, label, placement, tokens, kv8, src, dst, laps, len(runs))
    _finish(side)
    backend.close()
    loop.close()


def _finish(side: Side) -> None:
    """Neither side tears down while the other may still be moving bytes."""
    if side.is_decode:
        side.send("done")
    else:
        side.expect("done", timeout=side.cfg["phase_timeout"])


def run_nccl_unstaged(side: Side, kv8: torch.Tensor) -> None:
    run_nccl(side, kv8, staged=False, label="nccl_unstaged")


def nccl_variant(label: str):
    return lambda side, kv8: run_nccl(side, kv8, label=label)


def run_nixl_threads4(side: Side, kv8: torch.Tensor) -> None:
    os.environ.update(NIXL_THREADS4_ENV)  # this phase's own processes only
    run_nixl(side, kv8, label="nixl_threads4")


RUNNERS = {"torch_nccl": run_torch_nccl, "nccl_unstaged": run_nccl_unstaged,
           "nixl": run_nixl, "nixl_threads4": run_nixl_threads4,
           **{label: nccl_variant(label) for label in VARIANTS}}


def child(backend: str, role: str, gpu: str, conn, reports, cfg: dict) -> None:
    faulthandler.enable(all_threads=True)  # a crash in native code shows where, in the log
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before CUDA starts in this process
    side = Side(role, conn, reports, cfg)
    try:
        side.progress(f"setup on {device.type} {gpu}")
        if device.type == "cuda":
            torch.cuda.set_device(0)
        nb = cfg["num_blocks"]
        kv = torch.empty(nb, *block_shape(cfg["block_tokens"]), dtype=torch.bfloat16,
                         device=device)
        kv8 = kv.view(nb, -1).view(torch.uint8)  # [blocks, block bytes]
        if role == "prefill":
            for i in range(0, nb, 512):
                ids = torch.arange(i, min(i + 512, nb), device=device)
                kv8[i : i + len(ids)] = pattern(ids, kv8.shape[1])
        else:
            kv8.zero_()
        _sync(device)
        RUNNERS[backend](side, kv8)
        reports.put(("done", role))
    except BaseException as e:
        text = traceback.format_exc()
        reports.put(("error", role, text))
        with contextlib.suppress(Exception):  # the pipe may be gone too
            conn.send(("error", f"{role}: {type(e).__name__}: {e}"))


def run_backend(backend: str, cfg: dict, gpus: list[str], on_result, on_trace) -> dict:
    """Both sides of one backend in fresh processes; returns how the phase ended."""
    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    a, b = ctx.Pipe()
    procs = {role: ctx.Process(target=child, args=(backend, role, gpu, conn, reports, cfg),
                               daemon=True)
             for role, gpu, conn in (("prefill", gpus[0], a), ("decode", gpus[1], b))}
    for p in procs.values():
        p.start()
    where: dict[str, str] = {}
    status: dict = {"ok": False}
    ended: set[str] = set()
    deadline = time.monotonic() + cfg["phase_timeout"]
    while len(ended) < 2:
        left = deadline - time.monotonic()
        if left <= 0:
            status["hung"] = {r: where.get(r) for r in procs if r not in ended}
            print(f"[{backend}] HUNG: {status['hung']}", flush=True)
            break
        try:
            msg = reports.get(timeout=min(left, 2.0))
        except queue.Empty:
            dead = {r: p.exitcode for r, p in procs.items() if not p.is_alive() and r not in ended}
            if dead:
                status["died"] = {r: {"exitcode": c, "in": where.get(r)} for r, c in dead.items()}
                print(f"[{backend}] DIED: {status['died']}", flush=True)
                break
            continue
        kind, role = msg[0], msg[1]
        if kind == "progress":
            where[role] = msg[2]
            print(f"[{backend}] {role}: {msg[2]}", flush=True)
        elif kind == "result":
            on_result(*msg[1:])
        elif kind == "trace":
            on_trace(*msg[1:])
        elif kind == "error":
            status.setdefault("errors", {})[role] = {"in": where.get(role),
                                                     "traceback": msg[2][-3000:]}
            print(f"[{backend}] {role} failed in {where.get(role)}:\n{msg[2]}", flush=True)
            ended.add(role)
        elif kind == "done":
            ended.add(role)
    status["ok"] = len(ended) == 2 and "errors" not in status
    for p in procs.values():
        p.join(timeout=15)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    return status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1024,4096,16384,65536")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--phase-timeout", type=float, default=180.0,
                    help="seconds for one backend's pair of processes, setup included")
    ap.add_argument("--step-timeout", type=float, default=60.0,
                    help="seconds for one wait inside a phase (a handshake, a transfer)")
    ap.add_argument("--slack-blocks", type=int, default=1024,
                    help="KV blocks past the largest prompt's (the scattered free list)")
    ap.add_argument("--block-tokens", type=int, default=BLOCK_TOKENS,
                    help="tokens per KV block (a worker's --block-size): fewer, larger "
                         "blocks mean fewer runs when blocks are scattered")
    ap.add_argument("--placements", default=",".join(PLACEMENTS),
                    help=f"block placements to move, of {', '.join(PLACEMENTS)}")
    ap.add_argument("--device", default="cuda",
                    help="cpu: a dry run of the harness (gloo, NIXL DRAM; nccl fails)")
    ap.add_argument("--out", default="benchmarks/results/gpu_transfer.json")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if args.device == "cpu":
        gpus = ["-", "-"]
    elif visible:  # the launcher's own view: the children pick from it
        gpus = visible.split(",")
    else:
        gpus = [str(i) for i in range(torch.cuda.device_count())]
    block_bytes = torch.Size(block_shape(args.block_tokens)).numel() * 2
    num_blocks = max(tokens) // args.block_tokens + args.slack_blocks
    placements = args.placements.split(",")
    if not set(placements) <= set(PLACEMENTS):
        ap.error(f"--placements: unknown {sorted(set(placements) - set(PLACEMENTS))}")
    cfg = {"tokens": tokens, "num_blocks": num_blocks, "device": args.device,
           "placements": placements,
           "block_tokens": args.block_tokens,
           "warmup": args.warmup, "repeats": args.repeats, "phase_timeout": args.phase_timeout,
           "step_timeout": args.step_timeout, "port": free_port()}
    result: dict = {
        "benchmark": "gpu_transfer", "goal": f">= {GOAL} of contiguous NCCL send/recv",
        "block_tokens": args.block_tokens, "block_bytes": block_bytes,
        "kv_blocks_per_gpu": num_blocks,
        "kv_gib_per_gpu": num_blocks * block_bytes / 2**30, "tokens": tokens,
        "warmup": args.warmup, "repeats": args.repeats, "phases": {}, "cases": {},
        "nccl_env": {k: os.environ[k] for k in NCCL_ENV}, "nixl_threads4_env": NIXL_THREADS4_ENV}
    if len(gpus) < 2:
        result["error"] = f"needs 2 GPUs, sees {len(gpus)}"
        write_result(args.out, result)
        raise SystemExit(result["error"])

    def on_result(backend: str, placement: str, tokens: int, value: dict) -> None:
        result["cases"].setdefault(backend, {}).setdefault(placement, {})[str(tokens)] = value
        add_ratios(result)
        ratio = value.get("ratio_to_contiguous_send_recv")
        print(f"  {backend:14s} {placement:11s} {tokens:6d} tokens: {value['gb_per_s']:7.1f} "
              f"GB/s, {value['ms_median']:8.3f} ms, {value['runs']} runs"
              + (f", {ratio:.0%} of contiguous send/recv" if ratio else "")
              + ("" if value["data_ok"] else "  DATA MISMATCH"), flush=True)
        write_result(args.out, result)

    def on_trace(backend: str, placement: str, tokens: int, role: str, medians: dict) -> None:
        traces = result.setdefault("nccl_traces_median_ms", {})
        traces.setdefault(backend, {}).setdefault(placement, {}).setdefault(
            str(tokens), {})["sender" if role == "prefill" else "receiver"] = medians

    unknown = [b for b in args.backends.split(",") if b not in RUNNERS]
    if unknown:
        ap.error(f"--backends: unknown {unknown}; known: {sorted(RUNNERS)}")
    for backend in args.backends.split(","):
        t0 = time.monotonic()
        print(f"=== {backend}", flush=True)
        status = run_backend(backend, cfg, gpus[:2], on_result, on_trace)
        status["seconds"] = round(time.monotonic() - t0, 1)
        result["phases"][backend] = status
        add_ratios(result)
        write_result(args.out, result)
    print(summary(result), flush=True)


def add_ratios(result: dict) -> None:
    """Each case's GB/s over the contiguous send/recv of the same size, and per backend
    and placement the worst of those against the goal."""
    base = result["cases"].get("torch_nccl", {}).get("contiguous", {})
    worst = {}
    for backend, by_placement in result["cases"].items():
        for placement, by_tokens in by_placement.items():
            for tok, v in by_tokens.items():
                if tok in base:
                    v["ratio_to_contiguous_send_recv"] = v["gb_per_s"] / base[tok]["gb_per_s"]
            ratios = [v["ratio_to_contiguous_send_recv"] for v in by_tokens.values()
                      if "ratio_to_contiguous_send_recv" in v]
            if ratios and backend != "torch_nccl":
                worst[f"{backend} {placement}"] = {"worst_ratio": min(ratios),
                                                   "meets_goal": min(ratios) >= GOAL}
    result["goal_check"] = worst


def summary(result: dict) -> str:
    lines = ["backend        placement   tokens   GB/s   ratio  data"]
    for backend, by_placement in result["cases"].items():
        for placement, by_tokens in by_placement.items():
            for tok, v in by_tokens.items():
                r = v.get("ratio_to_contiguous_send_recv")
                lines.append(f"{backend:14s} {placement:11s} {tok:>6s} {v['gb_per_s']:6.1f} "
                             f"{'' if r is None else f'{r:6.0%}':>6s}  "
                             f"{'ok' if v['data_ok'] else 'BAD'}")
    for backend, st in result["phases"].items():
        if not st.get("ok"):
            lines.append(f"{backend}: did not finish: "
                         f"{ {k: v for k, v in st.items() if k != 'errors'} }")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
