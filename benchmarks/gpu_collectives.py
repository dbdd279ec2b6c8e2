"""The collectives a tensor-parallel decode step makes, timed alone on two GPUs: the
leader's step broadcast (gloo, host memory) and the NCCL all-reduces of the layer outputs
(eager; `--graphs` also inside a CUDA graph, which hung on the H200 pair); plus NCCL
send/recv of one contiguous buffer the size of the 8B shape's KV for 1k-64k tokens, the
baseline the KV transfer backends are measured against. Rank 0 prints each number as it
is measured, so a hang still leaves the numbers before it.

    source scripts/gpu_env.sh
    python -m benchmarks.gpu_collectives --out $OUT/gpu_collectives.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import write_result

HIDDEN = 4096  # llama-3.1-8b
CALLS_PER_STEP = 64  # one after attention and one after the MLP, 32 layers


def _timed(fn, sync, iters: int) -> float:
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters * 1e6  # us per call


KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # layers x (K, V) x KV heads x head dim x bf16


def _rank(rank: int, world: int, port: int, queue, graphs: bool) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    control = dist.new_group(backend="gloo")
    out: dict = {}
    payload = torch.zeros(1024, dtype=torch.uint8)
    size = torch.zeros(1, dtype=torch.int64)

    def step_broadcast() -> None:  # what TPComm.broadcast_step does
        dist.broadcast(size, src=0, group=control)
        dist.broadcast(payload, src=0, group=control)

    def report(key: str, value) -> None:
        out[key] = value
        if rank == 0:
            print(key, value, flush=True)
            queue.put(dict(out))

    report("gloo_step_broadcast_us", _timed(step_broadcast, lambda: dist.barrier(control), 200))
    for batch in (1, 64, 256):
        x = torch.randn(batch, HIDDEN, device="cuda", dtype=torch.bfloat16)
        report(f"nccl_all_reduce_b{batch}_us", _timed(lambda x=x: dist.all_reduce(x),
                                                      torch.cuda.synchronize, 200))
    for tokens in (1024, 4096, 16384, 65536):
        buf = torch.empty(tokens * KV_BYTES_PER_TOKEN, dtype=torch.uint8, device="cuda")
        move = (lambda b=buf: dist.send(b, 1)) if rank == 0 else (lambda b=buf: dist.recv(b, 0))
        us = _timed(move, torch.cuda.synchronize, 5)
        report(f"nccl_send_recv_contiguous_{tokens}_tokens",
               {"bytes": buf.numel(), "ms": us / 1e3, "gb_per_s": buf.numel() / us / 1e3})
        del buf
    if not graphs:
        dist.barrier()
        dist.destroy_process_group()
        return
    for batch in (1, 64, 256):
        x = torch.randn(batch, HIDDEN, device="cuda", dtype=torch.bfloat16)
        # The same 64 calls of a decode step captured in one CUDA graph.
        try:
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                for _ in range(3):
                    dist.all_reduce(x)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(CALLS_PER_STEP):
                    dist.all_reduce(x)
            report(f"nccl_all_reduce_b{batch}_graph_us",
                   _timed(g.replay, torch.cuda.synchronize, 50) / CALLS_PER_STEP)
        except Exception as e:  # capture unsupported: the answer, not a failure
            report(f"nccl_all_reduce_b{batch}_graph_error", f"{type(e).__name__}: {e}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", action="store_true", help="also all-reduce in a CUDA graph")
    ap.add_argument("--out", default="benchmarks/results/gpu_collectives.json")
    args = ap.parse_args()
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                 ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(k, v)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_rank, args=(r, 2, port, queue, args.graphs))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    res = {"error": "rank 0 returned nothing"}
    while not queue.empty():  # the latest snapshot: everything measured before any hang
        res = queue.get()
    for p in procs:
        if p.is_alive():
            res["hung_after"] = list(res)[-1] if res else None
            p.kill()
    per_step = {b: res.get(f"nccl_all_reduce_b{b}_us", float("nan")) * CALLS_PER_STEP / 1e3
                for b in (1, 64, 256)}
    res["eager_all_reduce_ms_per_decode_step"] = per_step
    res["note"] = f"{CALLS_PER_STEP} all-reduces of [batch, {HIDDEN}] bf16 per 8B decode step"
    print(res, flush=True)
    write_result(args.out, {"benchmark": "gpu_collectives", **res})


if __name__ == "__main__":
    main()
