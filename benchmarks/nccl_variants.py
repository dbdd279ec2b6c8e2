"""Staging plans the transfer benchmark runs the nccl link with, side by side with the
serving default, and the summary of the link's traces (kvtransfer/transfer/nccl_trace.py).

Each variant is a (plan, traced) pair; both sides of a link use the same one. `nccl` is
what serving runs, untraced, so its laps are what a pull costs; `nccl_traced` is the same
plan traced, to show what tracing itself costs beside it."""

from __future__ import annotations

import statistics

from kvtransfer.transfer.staging import DEFAULT_PLAN, StagingPlan

FULL_GRID = 1024  # copy programs: more than the tiles of any chunk, i.e. one per tile

VARIANTS: dict[str, tuple[StagingPlan, bool]] = {
    "nccl": (DEFAULT_PLAN, False),
    "nccl_traced": (DEFAULT_PLAN, True),
    # every copy on the 32-program Triton kernel (serving's plan before wide_edges)
    "nccl_narrow_edges": (StagingPlan(wide_edges=False), False),
    "nccl_narrow_edges_traced": (StagingPlan(wide_edges=False), True),
    # the copies on every SM (1.8 TB/s against 0.9 with 32 programs, gpu_staging_h200x2)
    "nccl_full_copies": (StagingPlan(copy_programs=FULL_GRID), True),
    # torch's index_select / index_copy_ for every copy: every SM too, launched from C++
    "nccl_torch_copies": (StagingPlan(copy_kernel="torch"), False),
    "nccl_torch_copies_traced": (StagingPlan(copy_kernel="torch"), True),
    # fewer, longer NCCL operations: each pays a fixed cost, and 32 MiB ones reached
    # 319 GB/s against 352 for 128 MiB
    "nccl_two_chunks": (StagingPlan(pieces=2), False),
    "nccl_one_chunk": (StagingPlan(pieces=1), False),
}


def _flatten(trace: dict) -> dict[str, float]:
    out = {k: v for k, v in trace.items() if isinstance(v, (int, float))}
    out.update({f"gpu_{k}_ms": v for k, v in trace.get("gpu", {}).items()})
    return out


def trace_medians(traces: list[dict]) -> dict[str, float]:
    """Per mark, the median over the transfers (marks every transfer has)."""
    flat = [_flatten(t) for t in traces]
    if not flat:
        return {}
    keys = [k for k in flat[0] if all(k in f for f in flat)]
    return {k: round(statistics.median(f[k] for f in flat), 4) for k in keys}
