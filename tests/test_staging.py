"""Staged transfers (kvtransfer/transfer/staging.py): how a transfer is cut into chunks,
which both sides of a link must agree on, and that gathering blocks in transfer order
and scattering them back puts every byte where the runs say (on CPU here; the two-GPU
link runs the same calls in tests/test_nccl_gpu.py)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from kvtransfer.transfer import coalesce
from kvtransfer.transfer.staging import (
    DEFAULT_PLAN,
    DIRECT_RUN_BYTES,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    StagingPlan,
    as_block_rows,
    block_order,
)

MIB = 1 << 20


@pytest.mark.parametrize("counts", [[64], [16, 16], [DIRECT_RUN_BYTES // (2 * MIB)] * 5])
def test_long_runs_go_as_they_are(counts):
    assert DEFAULT_PLAN.chunks(counts, 2 * MIB) is None


@pytest.mark.parametrize("blocks,block_bytes", [(64, 2 * MIB), (4096, 2 * MIB), (7000, 8192),
                                                (3, 5 * MIB), (100, 24 * MIB)])
def test_chunks_cover_the_transfer_in_order_within_bounds(blocks, block_bytes):
    chunks = DEFAULT_PLAN.chunks([1] * blocks, block_bytes)
    assert chunks is not None
    assert chunks[0][0] == 0 and chunks[-1][1] == blocks
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    for lo, hi in chunks:
        assert 1 <= hi - lo <= DEFAULT_PLAN.max_chunk_blocks(block_bytes)
        if hi != blocks and block_bytes <= MIN_CHUNK_BYTES:
            assert MIN_CHUNK_BYTES <= (hi - lo) * block_bytes <= MAX_CHUNK_BYTES


def test_a_small_transfer_still_pipelines():
    """A 1k-token prompt of the 8B shape (64 blocks of 2 MiB) goes in 4 chunks."""
    assert len(DEFAULT_PLAN.chunks([1] * 64, 2 * MIB)) == 4


def test_a_plan_sets_the_pieces_and_bounds():
    one = StagingPlan(pieces=1)
    assert one.chunks([1] * 64, 2 * MIB) == [(0, 64)]  # 128 MiB: one buffer's worth
    assert len(one.chunks([1] * 128, 2 * MIB)) == 2  # 256 MiB: bounded by the buffer
    assert StagingPlan(pieces=2).chunks([1] * 64, 2 * MIB) == [(0, 32), (32, 64)]
    assert StagingPlan().chunks([1] * 64, 2 * MIB) == DEFAULT_PLAN.chunks([1] * 64, 2 * MIB)
    with pytest.raises(ValueError):
        StagingPlan(min_chunk_bytes=2 * MAX_CHUNK_BYTES)
    with pytest.raises(ValueError):
        StagingPlan(pieces=0)
    with pytest.raises(ValueError):
        StagingPlan(copy_programs=0)


def test_trace_medians_keep_the_marks_every_transfer_has():
    from benchmarks.nccl_variants import trace_medians

    traces = [{"runs": 3, "host_taken_ms": 0.1 * i, "gpu": {"start": 0.0, "end": 1.0 * i}}
              for i in (1, 2, 3)]
    traces[1]["gpu"]["op0"] = 0.5
    assert trace_medians(traces) == {"runs": 3, "host_taken_ms": 0.2, "gpu_start_ms": 0.0,
                                     "gpu_end_ms": 2.0}
    assert trace_medians([]) == {}


def test_both_sides_cut_the_same_chunks():
    rng = random.Random(0)
    src = rng.sample(range(5000), 900)
    dst = rng.sample(range(5000), 900)
    runs = coalesce(src, dst)
    counts = [r.count for r in runs]
    assert DEFAULT_PLAN.chunks(counts, 8192) == DEFAULT_PLAN.chunks(list(counts), 8192)
    assert block_order([(r.src_start, r.count) for r in runs]).tolist() == src
    assert block_order([(r.dst_start, r.count) for r in runs]).tolist() == dst


def test_gather_then_scatter_lands_every_block_where_the_runs_say():
    rng = random.Random(1)
    shape = (256, 2, 4, 2, 8)  # blocks, K/V, tokens, heads, dim: 512-byte bf16 blocks
    sender = torch.randn(shape).to(torch.bfloat16)
    receiver = torch.zeros(shape, dtype=torch.bfloat16)
    block_bytes = sender[0].numel() * sender.element_size()
    src, dst = rng.sample(range(256), 100), rng.sample(range(256), 100)
    runs = coalesce(src, dst)
    chunks = DEFAULT_PLAN.chunks([r.count for r in runs], block_bytes)
    send_ids = torch.from_numpy(block_order([(r.src_start, r.count) for r in runs]))
    recv_ids = torch.from_numpy(block_order([(r.dst_start, r.count) for r in runs]))
    rows_s, rows_r = as_block_rows(sender, block_bytes), as_block_rows(receiver, block_bytes)
    assert rows_s.data_ptr() == sender.data_ptr()
    for lo, hi in chunks:
        wire = torch.index_select(rows_s, 0, send_ids[lo:hi])  # the staging buffer
        rows_r.index_copy_(0, recv_ids[lo:hi], wire.clone())
    assert torch.equal(receiver[dst], sender[src])
    untouched = sorted(set(range(256)) - set(dst))
    assert not receiver[untouched].any()


def test_block_order_of_long_and_empty_runs():
    assert block_order([(10, 3), (2, 1), (7, 2)]).tolist() == [10, 11, 12, 2, 7, 8]
    assert block_order([]).tolist() == []


def test_blocks_must_be_whole_words():
    with pytest.raises(ValueError, match="8-byte"):
        as_block_rows(torch.zeros(4, 3, dtype=torch.uint8), 3)


def test_a_gpu_worker_leaves_room_for_its_nccl_staging_buffers():
    """The staging buffers are made when a link joins, after the KV cache took its share:
    the cache leaves room for STAGED_LINKS_RESERVED links' two buffers each."""
    from cluster.worker_main import transfer_reserve_bytes
    from kvtransfer.transfer.staging import MAX_CHUNK_BYTES, STAGED_LINKS_RESERVED

    assert transfer_reserve_bytes("nccl", "cuda") == STAGED_LINKS_RESERVED * 2 * MAX_CHUNK_BYTES
    assert transfer_reserve_bytes("nccl", "cuda:1") == 2**30
    assert transfer_reserve_bytes("nixl", "cuda") == transfer_reserve_bytes("auto", "cuda") == 0
    assert transfer_reserve_bytes("nccl", "cpu") == 0
