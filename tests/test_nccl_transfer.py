"""The nccl transfer backend on CPU: its pure pieces (run splitting, unique-id bytes, group
batching), the wire messages and the flag's errors without CUDA. The transfers themselves
need two GPUs: tests/test_nccl_gpu.py and benchmarks/gpu_transfer.py (run on two H200s)."""

from __future__ import annotations

import argparse

import pytest
import torch

from engine.rpc import worker_pb2 as pb
from engine.rpc import worker_pb2_grpc as pb_grpc
from kvtransfer.transfer import create_backend, split_runs
from kvtransfer.transfer.nccl_link import (
    group_batches,
    run_extents,
    unique_id_candidates,
    unique_id_to_bytes,
    wait_for,
)

# -- pure pieces --------------------------------------------------------------------------


class _Polled:
    """What wait_for reads of a cupy.cuda.Event (`done`, `synchronize`), counted: its
    control flow on CPU. With real events: tests/test_nccl_gpu.py."""

    def __init__(self, polls_until_done: int) -> None:
        self.left, self.polls, self.synced = polls_until_done, 0, False

    @property
    def done(self) -> bool:
        self.polls += 1
        self.left -= 1
        return self.left < 0

    def synchronize(self) -> None:
        self.synced = True


def test_wait_for_polls_a_short_transfer_and_sleeps_on_a_long_one():
    quick = _Polled(polls_until_done=3)
    wait_for(quick, spin_s=10.0)
    assert (quick.polls, quick.synced) == (4, False)
    slow = _Polled(polls_until_done=10**9)
    wait_for(slow, spin_s=0.001)
    assert slow.synced and slow.polls >= 1


def test_split_runs_reads_the_runs_a_decode_worker_cut():
    assert split_runs([5, 6, 7, 20, 3, 4], [3, 1, 2]) == [(5, 3), (20, 1), (3, 2)]
    assert split_runs([], []) == []


@pytest.mark.parametrize("ids,lengths", [([5, 6, 8], [3]), ([5, 6], [1]), ([5, 6], [2, 0]),
                                         ([5, 6], [3, -1])])
def test_split_runs_rejects_plans_that_are_not_runs(ids, lengths):
    with pytest.raises(ValueError):
        split_runs(ids, lengths)


def test_unique_id_survives_the_wire_in_both_char_signednesses():
    raw = bytes(range(64, 192))  # values above 127 included
    signed = tuple(b - 256 if b > 127 else b for b in raw)  # what CuPy gives on x86
    assert unique_id_to_bytes(signed) == raw
    assert unique_id_to_bytes(tuple(raw)) == raw  # ... and on Arm
    # bytes first (CuPy 14 takes only bytes), then the tuples of older CuPys.
    assert unique_id_candidates(raw) == [raw, signed, tuple(raw)]
    assert unique_id_candidates(bytes(128)) == [bytes(128), tuple(bytes(128))]
    with pytest.raises(ValueError):
        unique_id_candidates(b"short")


def test_runs_become_byte_extents_in_groups_of_bounded_size():
    assert run_extents([(3, 2), (0, 1)], 4096) == [(3 * 4096, 2 * 4096), (0, 4096)]
    batches = group_batches(2500, max_ops=1024)
    assert [len(b) for b in batches] == [1024, 1024, 452]
    assert [i for b in batches for i in b] == list(range(2500))
    assert group_batches(0) == []


def test_nccl_messages_round_trip_and_are_served():
    req = pb.NcclSendRequest(request_id="r1", peer="baton-decode-1-5000", seq=7,
                             block_ids=[5, 6, 7, 20], run_lengths=[3, 1])
    back = pb.NcclSendRequest.FromString(req.SerializeToString())
    assert back == req and list(back.run_lengths) == [3, 1] and back.seq == 7
    conn = pb.NcclConnectRequest(peer="d", unique_id=bytes(range(128)))
    assert pb.NcclConnectRequest.FromString(conn.SerializeToString()).unique_id == \
        bytes(range(128))
    assert hasattr(pb_grpc.WorkerStub, "__init__")
    assert {"NcclConnect", "NcclSend"} <= set(dir(pb_grpc.WorkerServicer))


# -- the flag -----------------------------------------------------------------------------


class _NoControl:
    async def fetch_metadata(self, address):
        raise AssertionError

    async def read_blocks(self, address, request_id, block_ids):
        raise AssertionError

    async def nccl_connect(self, address, peer, unique_id):
        raise AssertionError

    async def nccl_send(self, address, plan):
        raise AssertionError


def test_nccl_without_cuda_is_an_error_naming_the_flag():
    kv = torch.zeros(8, 4)
    with pytest.raises(RuntimeError, match=r"--kv-transfer nccl: .*--device cuda"):
        create_backend("nccl", kv, "w", _NoControl())
    with pytest.raises(ValueError, match="nccl"):
        create_backend("nvlink", kv, "w", _NoControl())
    assert create_backend("auto", kv, "w", _NoControl()).name in ("nixl", "tcp")


def test_worker_cli_takes_nccl():
    from cluster.worker_main import add_engine_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert p.parse_args(["--kv-transfer", "nccl"]).kv_transfer == "nccl"


def test_connect_backoff_doubles_to_its_cap_and_clears_on_success():
    from kvtransfer.transfer.nccl import ConnectBackoff
    from kvtransfer.transfer.nccl_link import LinkBroken

    b = ConnectBackoff(first=2.0, cap=10.0)
    b.check("p", "host:1", now=0.0)  # never failed: go
    assert [b.failed("p", now=0.0) for _ in range(4)] == [2.0, 4.0, 8.0, 10.0]
    with pytest.raises(LinkBroken, match="not retried for another 10 s"):
        b.check("p", "host:1", now=0.0)
    b.check("p", "host:1", now=10.0)  # waited out
    b.check("q", "host:2", now=0.0)  # other peers are not held back
    b.succeeded("p")
    assert b.failed("p", now=20.0) == 2.0  # a success starts the doubling over
