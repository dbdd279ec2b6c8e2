"""What a staged KV transfer (kvtransfer/transfer/staging.py) is made of, measured apart
on two GPUs: NCCL send/recv throughput by operation size (the staged path sends one
operation per chunk), and how fast the block gather runs (kernels/block_copy.py, with a
small and a full grid, beside torch's index_select). Chooses the chunk size and says
whether the copies or the sends limit a staged transfer.

    source scripts/gpu_env.sh && python -m benchmarks.gpu_staging --out $OUT/gpu_staging.json
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch
import torch.multiprocessing as mp

from benchmarks.common import write_result

os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                   "NVSHMEM_DISABLE_NVLS": "1"})
MIB = 1 << 20
BLOCK_BYTES = 2 * MIB  # the 8B shape's KV block


def _timed(fn, sync, repeats: int = 5) -> float:
    fn()
    sync()
    laps = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        laps.append(time.perf_counter() - t0)
    return sorted(laps)[len(laps) // 2]


def _nccl_side(rank: int, uid, q, total_mib: int, sizes: list[int]) -> None:
    import cupy
    from cupy.cuda import nccl

    from kvtransfer.transfer.nccl_link import init_communicator

    os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)
    cupy.cuda.runtime.setDevice(0)
    comm = init_communicator(2, uid, rank)
    stream = cupy.cuda.Stream(non_blocking=True)
    buf = torch.empty(total_mib * MIB, dtype=torch.uint8, device="cuda")
    out = {}
    for op_mib in sizes:
        n = total_mib // op_mib

        def move(op_mib=op_mib, n=n) -> None:
            for i in range(n):
                ptr = buf.data_ptr() + i * op_mib * MIB
                if rank == 0:
                    comm.send(ptr, op_mib * MIB, nccl.NCCL_INT8, 1, stream.ptr)
                else:
                    comm.recv(ptr, op_mib * MIB, nccl.NCCL_INT8, 0, stream.ptr)

        s = _timed(move, stream.synchronize)
        out[str(op_mib)] = {"ops": n, "ms": s * 1e3, "gb_per_s": total_mib * MIB / s / 1e9,
                            "us_per_op": s * 1e6 / n}
    if rank == 1:
        q.put(out)


def _pipeline_side(rank: int, uid, q) -> None:
    """64 chunks of 128 MiB (a 64k-token transfer of the 8B shape): sends alone, then with
    the sender gathering each chunk on a second stream (as NcclLink._staged does), then
    with the receiver also scattering; the receiver reports each mode's time."""
    import cupy
    from cupy.cuda import nccl

    from kernels import block_copy
    from kvtransfer.transfer.nccl_link import init_communicator

    os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)
    cupy.cuda.runtime.setDevice(0)
    torch.cuda.set_device(0)
    comm = init_communicator(2, uid, rank)
    send_stream = cupy.cuda.Stream(non_blocking=True)
    copy_stream = cupy.cuda.Stream(non_blocking=True)
    words, chunk, n = BLOCK_BYTES // 8, 64, 4096
    rows = torch.zeros(n + 1024, words, dtype=torch.int64, device="cuda")
    order = list(range(len(rows)))
    random.Random(rank).shuffle(order)
    ids = torch.tensor(order[:n], device="cuda")
    bufs = [torch.empty(chunk, words, dtype=torch.int64, device="cuda") for _ in range(2)]
    filled = [cupy.cuda.Event(disable_timing=True) for _ in range(2)]
    freed = [cupy.cuda.Event(disable_timing=True) for _ in range(2)]
    ext = torch.cuda.ExternalStream(copy_stream.ptr)
    out = {}
    for mode in ("sends_only", "sender_gathers", "both_copy"):
        copies = mode != "sends_only" and (rank == 0 or mode == "both_copy")

        def run(copies=copies) -> None:
            with torch.cuda.stream(ext):
                for c in range(n // chunk):
                    b, part = c % 2, ids[c * chunk:(c + 1) * chunk]
                    if rank == 0:
                        if copies:
                            copy_stream.wait_event(freed[b])
                            block_copy.gather_rows(rows, part, bufs[b])
                            filled[b].record(copy_stream)
                            send_stream.wait_event(filled[b])
                        comm.send(bufs[b].data_ptr(), chunk * BLOCK_BYTES, nccl.NCCL_INT8, 1,
                                  send_stream.ptr)
                        freed[b].record(send_stream)
                    else:
                        send_stream.wait_event(freed[b])
                        comm.recv(bufs[b].data_ptr(), chunk * BLOCK_BYTES, nccl.NCCL_INT8, 0,
                                  send_stream.ptr)
                        filled[b].record(send_stream)
                        if copies:
                            copy_stream.wait_event(filled[b])
                            block_copy.scatter_rows(bufs[b], part, rows)
                        freed[b].record(copy_stream if copies else send_stream)
            done = cupy.cuda.Event(disable_timing=True)
            done.record(copy_stream)
            send_stream.wait_event(done)

        out[mode + "_ms"] = _timed(run, send_stream.synchronize) * 1e3
    if rank == 1:
        q.put(out)


def _two_ranks(target, *args) -> dict:
    """Run target(rank, unique_id, queue, *args) on GPUs 0 and 1; rank 1 reports."""
    from kvtransfer.transfer.nccl_link import new_unique_id

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    uid = new_unique_id()
    procs = [ctx.Process(target=target, args=(r, uid, q, *args)) for r in (0, 1)]
    for p in procs:
        p.start()
    out = q.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return out


def gather_speeds(blocks: int, chunk_blocks: int) -> dict:
    from kernels import block_copy

    words = BLOCK_BYTES // 8
    rows = torch.empty(blocks + 1024, words, dtype=torch.int64, device="cuda")
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    ids = torch.tensor(order[:blocks], device="cuda")
    buf = torch.empty(chunk_blocks, words, dtype=torch.int64, device="cuda")
    total = blocks * BLOCK_BYTES
    out = {}

    def chunks(fn):
        def run() -> None:
            for lo in range(0, blocks, chunk_blocks):
                fn(ids[lo:lo + chunk_blocks])
        return run

    for programs in (32, 132, 1 << 20):
        block_copy.PROGRAMS = programs
        s = _timed(chunks(lambda i: block_copy.gather_rows(rows, i, buf[: len(i)])),
                   torch.cuda.synchronize)
        out[f"triton_gather_programs_{min(programs, 4096)}"] = total / s / 1e9
        s = _timed(chunks(lambda i: block_copy.scatter_rows(buf[: len(i)], i, rows)),
                   torch.cuda.synchronize)
        out[f"triton_scatter_programs_{min(programs, 4096)}"] = total / s / 1e9
    block_copy.PROGRAMS = 32
    s = _timed(chunks(lambda i: torch.index_select(rows, 0, i, out=buf[: len(i)])),
               torch.cuda.synchronize)
    out["torch_index_select"] = total / s / 1e9
    s = _timed(lambda: buf.copy_(rows[:chunk_blocks]), torch.cuda.synchronize)
    out["contiguous_copy_one_chunk"] = chunk_blocks * BLOCK_BYTES / s / 1e9
    return {"gb_per_s_read": out, "blocks": blocks, "chunk_blocks": chunk_blocks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total-mib", type=int, default=4096)
    ap.add_argument("--op-mib", default="8,32,128,512")
    ap.add_argument("--out", default="benchmarks/results/gpu_staging.json")
    args = ap.parse_args()
    from benchmarks.common import environment

    result = {"environment": environment(), "benchmark": "gpu_staging",
              "nccl_send_recv_by_op_mib": _two_ranks(
                  _nccl_side, args.total_mib, [int(x) for x in args.op_mib.split(",")])}
    print(result["nccl_send_recv_by_op_mib"], flush=True)
    result["pipeline_64k_tokens"] = _two_ranks(_pipeline_side)
    print(result["pipeline_64k_tokens"], flush=True)
    result["gather"] = gather_speeds(4096, 64)
    print(result["gather"], flush=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
