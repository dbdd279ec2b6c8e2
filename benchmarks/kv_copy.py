"""Tier copy bandwidth: the tiered store moving KV blocks device <-> host, beside one
large pinned copy (the machine's limit) in the same run.

    python -m benchmarks.kv_copy --device cuda --out benchmarks/results/kv_copy_h200.json

Blocks have the 8B model's size (32 layers x 2 x 16 tokens x 8 KV heads x 128 x bf16 =
2 MiB). Offload copies block by block into pinned slots (what eviction does); load copies
them back into device blocks (what a host-tier hit does).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import write_result
from kvtransfer.events import EventRecorder
from kvtransfer.tiered_store import TieredStore


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 3) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--blocks", type=int, default=512)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/kv_copy.json")
    args = ap.parse_args()
    dev = args.device
    shape = (args.layers, 2, 16, 8, 128)
    kv = torch.randn(args.blocks + 1, *shape, device=dev).to(torch.bfloat16)
    block_bytes = kv[0].numel() * kv.element_size()
    total = args.blocks * block_bytes
    pinned = dev.startswith("cuda")
    flat_host = torch.empty(total, dtype=torch.uint8, pin_memory=pinned)
    flat_dev = kv[: args.blocks].view(-1).view(torch.uint8)
    d2h = timed(lambda: flat_host.copy_(flat_dev, non_blocking=True), dev)
    h2d = timed(lambda: flat_dev.copy_(flat_host, non_blocking=True), dev)

    store = TieredStore(kv, args.blocks, EventRecorder("bench", "x"))
    tokens = [(i,) for i in range(args.blocks)]

    def offload_all() -> None:
        store._host_index.clear()
        store._free_slots = list(range(args.blocks - 1, -1, -1))
        for i in range(args.blocks):
            store.offload(i, 10_000 + i, tokens[i])

    def load_all() -> None:
        for i in range(args.blocks):
            store.load(10_000 + i, tokens[i], i)

    off_s = timed(offload_all, dev)
    load_s = timed(load_all, dev)
    ok = torch.equal(kv[: args.blocks].cpu(), store.host.cpu()[: args.blocks]) \
        if len(store.host) else None
    gb = total / 1e9
    res = {"block_bytes": block_bytes, "blocks": args.blocks, "pinned": pinned,
           "one_copy_d2h_gb_s": gb / d2h, "one_copy_h2d_gb_s": gb / h2d,
           "tier_offload_gb_s": gb / off_s, "tier_load_gb_s": gb / load_s,
           "offload_fraction_of_one_copy": d2h / off_s, "load_fraction_of_one_copy": h2d / load_s,
           "round_trip_exact": ok}
    print(res, flush=True)
    write_result(args.out, {"benchmark": "kv_copy", "device": dev, **res})


if __name__ == "__main__":
    main()
