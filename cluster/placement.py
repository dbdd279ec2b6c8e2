"""Which GPUs each worker of `baton serve` gets.

Each worker sees only its own GPUs (CUDA_VISIBLE_DEVICES) and uses them as cuda:0..tp-1,
so a tensor-parallel worker's ranks never collide with another worker's and a
non-contiguous list such as `--decode-gpus 1,3` works. Prefill and decode pools come
from `--prefill-gpus` / `--decode-gpus`; without them workers take GPUs in order
(prefill first), sharing GPUs round-robin when there are fewer than they need.
"""

from __future__ import annotations

from dataclasses import dataclass


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class Placement:
    role: str
    gpus: tuple[int, ...]  # empty on CPU

    @property
    def visible_devices(self) -> str:
        return ",".join(str(g) for g in self.gpus)


def parse_gpus(text: str, flag: str) -> list[int]:
    if not text:
        return []
    try:
        gpus = [int(x) for x in text.split(",")]
    except ValueError:
        raise PlacementError(f"{flag}: expected comma-separated GPU indices, got {text!r}"
                             ) from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise PlacementError(f"{flag}: GPU indices must be distinct and >= 0, got {text!r}")
    return gpus


def place_workers(roles: list[str], device: str, tp: int, gpu_count: int,
                  prefill_gpus: str = "", decode_gpus: str = "") -> list[Placement]:
    if not device.startswith("cuda"):
        if prefill_gpus or decode_gpus:
            raise PlacementError("--prefill-gpus/--decode-gpus need --device cuda")
        return [Placement(r, ()) for r in roles]
    if gpu_count < 1:
        raise PlacementError("--device cuda: no CUDA GPU is visible on this machine")
    pools = {"prefill": parse_gpus(prefill_gpus, "--prefill-gpus"),
             "decode": parse_gpus(decode_gpus, "--decode-gpus")}
    pools["both"] = pools["decode"]
    for flag, gpus in (("--prefill-gpus", pools["prefill"]), ("--decode-gpus", pools["decode"])):
        if any(g >= gpu_count for g in gpus):
            raise PlacementError(f"{flag}: this machine has GPUs 0..{gpu_count - 1}, "
                                 f"got {','.join(map(str, gpus))}")
    out: list[Placement] = []
    taken = {"prefill": 0, "decode": 0, "both": 0}
    next_free = 0
    for role in roles:
        pool = pools[role]
        if pool:
            start = taken[role] * tp
            chunk = pool[start : start + tp]
            if len(chunk) < tp:
                flag = "--prefill-gpus" if role == "prefill" else "--decode-gpus"
                n = roles.count(role)
                raise PlacementError(f"{flag}: {n} {role} worker(s) x --tp {tp} need "
                                     f"{n * tp} GPUs, got {len(pool)}")
            taken[role] += 1
        else:
            if tp > gpu_count:
                raise PlacementError(f"--tp {tp}: this machine has {gpu_count} GPU(s)")
            chunk = [(next_free + i) % gpu_count for i in range(tp)]
            next_free += tp
        out.append(Placement(role, tuple(chunk)))
    return out


def shared_gpus(placements: list[Placement]) -> dict[int, int]:
    """GPU -> how many workers it serves, for the GPUs that serve more than one."""
    seen: dict[int, int] = {}
    for p in placements:
        for g in p.gpus:
            seen[g] = seen.get(g, 0) + 1
    return {g: n for g, n in seen.items() if n > 1}


def check_memory_shares(placements: list[Placement], utilization: float,
                        kv_blocks: int | None) -> None:
    """`--gpu-memory-utilization` is each worker's share of its GPU: workers sharing one
    must not ask for more than the card (said at start-up, not as a worker's MemoryError).
    With --kv-blocks the caches are sized by count and the share is not used."""
    shared = shared_gpus(placements)
    if kv_blocks is not None or not shared:
        return
    most = max(shared.values())
    if utilization * most > 1.0:
        raise ValueError(
            f"--gpu-memory-utilization {utilization:.2f} is each worker's share of its GPU, "
            f"and {most} workers share GPU(s) {sorted(shared)}: {utilization * most:.2f} of a "
            f"card; give each at most {0.9 / most:.2f} (or size caches with --kv-blocks)")


def check_kv_transfer(placements: list[Placement], kv_transfer: str) -> None:
    """NCCL refuses a communicator whose two ranks sit on one GPU ("Duplicate GPU
    detected"), so `--kv-transfer nccl` needs every prefill worker on other GPUs than every
    decode worker; said at start-up rather than as every pull failing."""
    if kv_transfer != "nccl":
        return
    prefill = {g for p in placements if p.role == "prefill" for g in p.gpus}
    decode = {g for p in placements if p.role == "decode" for g in p.gpus}
    if both := prefill & decode:
        raise PlacementError(
            f"--kv-transfer nccl: GPU(s) {sorted(both)} would hold both ends of a "
            "prefill-decode pair, and NCCL refuses two ranks on one GPU; give the pools "
            "their own GPUs (--prefill-gpus / --decode-gpus) or use --kv-transfer nixl")
