"""The tensor-parallel NCCL communicator (kernels/tp_comm.py) on two GPUs, skipped without
them or without CuPy: its all-reduce and all-gather equal torch.distributed's, a CUDA graph
of 64 all-reduces and an all-gather captures and replays on fresh inputs, and a TP=2 engine
with decode graphs (`tp_cuda_graphs`) gives TP=1's greedy tokens. Each rank of the first
test is a spawned process that reports through a pipe, so a hung collective fails the test
after a timeout instead of hanging it. On CPU: `ParallelContext` routes its collectives
through a communicator when it has one, and a missing CuPy is reported, not raised."""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import sys
import time
import traceback

import pytest
import torch

WORLD = 2
HIDDEN = 4096  # the 8B shape's all-reduce width
CALLS = 64  # all-reduces in one 8B decode step, about


def two_gpus(fn):
    for mark in (pytest.mark.gpu,
                 pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
                 pytest.mark.skipif(importlib.util.find_spec("cupy") is None,
                                    reason="needs CuPy")):
        fn = mark(fn)
    return fn


def _per_call_us(fn, calls: int = 200) -> float:
    """Host-and-device time per call, launches back to back (the decode-step pattern)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def _rank(rank: int, world: int, init: str, conn) -> None:
    try:
        conn.send(("ok", _checks(rank, world, init)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def _checks(rank: int, world: int, init: str) -> dict:
    import torch.distributed as dist

    from engine.tensor_parallel import TPComm
    from kernels.parallel import ParallelContext

    tp = TPComm(rank, world, init, f"cuda:{rank}")
    pc = tp.pc
    assert pc.comm is not None, "no NCCL communicator: see the tensor-parallel warning"
    dev = torch.device(f"cuda:{rank}")
    reference = ParallelContext(rank, world)  # torch.distributed's default (NCCL) group
    out: dict = {"nccl_version": pc.comm.nccl_version}
    # A graph holding a decode step's worth of all-reduces and the lm_head's all-gather.
    # Integer-valued bf16 inputs keep every sum exact: halving then summing over two ranks
    # gives back the first sum each time.
    base = (torch.arange(8 * HIDDEN, device=dev) % 5).view(8, HIDDEN)
    x = torch.zeros(8, HIDDEN, dtype=torch.bfloat16, device=dev)

    if world == 1:  # ParallelContext skips collectives of one rank: call CuPy's directly
        comm = pc.comm

        def reduce(t: torch.Tensor) -> torch.Tensor:
            return comm.all_reduce(t)

        def gather_last(t: torch.Tensor) -> torch.Tensor:
            return torch.cat(comm.all_gather(t).unbind(0), dim=-1)
    else:
        reduce, gather_last = pc.all_reduce, pc.all_gather_last_dim

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        y = reduce(x.clone())
        for _ in range(CALLS - 1):
            reduce(y.mul_(1 / world))
        return y, gather_last(x[:, :16])

    x.copy_(base + rank)
    step()  # warm up eagerly, as the decode graphs do
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, gathered = step()
    replays_ok = []
    for k in range(4):
        x.copy_(base + rank + k)
        graph.replay()
        torch.cuda.synchronize()
        summed = sum(base + r + k for r in range(world)).to(torch.bfloat16)
        cat = torch.cat([(base + r + k)[:, :16] for r in range(world)], -1).to(torch.bfloat16)
        replays_ok.append(torch.equal(y, summed) and torch.equal(gathered, cat))
    out["graph_replays_ok"] = replays_ok

    # Against torch.distributed's NCCL group, only after the capture: its watchdog thread
    # must not be polling events while a graph is being captured.
    gen = torch.Generator(dev).manual_seed(rank)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        v = torch.randn(64, HIDDEN, device=dev, generator=gen).to(dtype)
        ours, theirs = reduce(v.clone()), v.clone()
        dist.all_reduce(theirs)
        out[f"all_reduce_equal_{dtype}"] = torch.equal(ours, theirs)
        out[f"all_gather_equal_{dtype}"] = torch.equal(
            gather_last(v[:, :300]), reference.all_gather_last_dim(v[:, :300]))

    small = torch.zeros(1, HIDDEN, dtype=torch.bfloat16, device=dev)
    out["all_reduce_b1_us"] = _per_call_us(lambda: reduce(small))
    out["torch_distributed_all_reduce_b1_us"] = _per_call_us(lambda: dist.all_reduce(small))
    out["graph_all_reduce_us"] = _per_call_us(graph.replay, 20) / CALLS
    # NCCL 2.26+ will not abort a communicator while a graph holding its collectives
    # lives: the graph goes first.
    torch.cuda.synchronize()
    graph.reset()
    del graph
    tp.close()
    return out


def _run_ranks(world: int) -> None:
    from engine.tensor_parallel import _free_port

    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")):
        os.environ.setdefault(k, v)
    ctx = mp.get_context("spawn")
    init = f"tcp://127.0.0.1:{_free_port()}"
    pipes = [ctx.Pipe() for _ in range(world)]
    procs = [ctx.Process(target=_rank, args=(r, world, init, pipes[r][1]))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = []
        for r, (ours, _) in enumerate(pipes):
            assert ours.poll(150), f"rank {r} did not finish (a collective hung?)"
            results.append(ours.recv())
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for r, (status, res) in enumerate(results):
        assert status == "ok", f"rank {r} failed:\n{res}"
    res = results[0][1]
    print("tp_comm:", res)
    for _, r in results:
        assert all(v for k, v in r.items() if "_equal_" in k), r
        assert r["graph_replays_ok"] == [True] * 4, r


@two_gpus
def test_all_reduce_matches_torch_distributed_and_captures_in_a_graph():
    _run_ranks(WORLD)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="needs CuPy")
def test_one_rank_group_runs_cupy_nccl_and_captures_in_a_graph():
    """The same checks with a group of one rank, where one GPU is all there is: CuPy's
    communicator API as installed (CuPy 14 takes the unique id as bytes), a graph of
    all-reduces and an all-gather, and equality with torch.distributed's NCCL."""
    _run_ranks(1)


@two_gpus
def test_tp2_with_decode_graphs_equals_tp1():
    """The engine path: a TP=2 worker captures decode graphs with the communicator's
    all-reduces inside and gives the same greedy tokens as TP=1 (mini-llama, bf16). Rows
    end at different lengths and two requests join a running batch, so the steps every
    rank launched ahead are both used and wasted (a row finished, a request joined)."""
    pytest.importorskip("flashinfer")
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    prompts = [[(7 * i + j) % 4000 + 1 for j in range(n)] for i, n in
               enumerate([5, 17, 130, 300, 64, 1, 999])]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
              for m in (24, 9, 31, 16, 24, 40, 5)]
    arrivals = [0, 0, 0, 0, 0, 12, 20]
    outs, launched = {}, {}
    for tp in (2, 1):
        with LLM("mini-llama", load_format="dummy", device="cuda", dtype="bfloat16", tp=tp,
                 num_kv_blocks=512, max_num_seqs=8, tp_cuda_graphs=True) as llm:
            runner = llm.engine.runner
            assert runner.graphs is not None, runner.graphs_off_reason
            assert runner.stages_next_decode
            if tp > 1:
                assert runner.pc.comm is not None
                followers = llm.engine.tp.followers
            runner.graphs.host_timer = {}  # counts the steps launched ahead, and the hits
            outs[tp] = [o.token_ids for o in llm.generate(prompts, params, arrivals)]
            launched[tp] = dict(runner.graphs.host_timer)
        if tp > 1:
            assert all(p.poll() is not None for p in followers), "follower outlived close()"
    assert outs[2] == outs[1]
    print("steps launched ahead (and used):", launched)
    for tp in (2, 1):
        assert 0 < launched[tp].get("launched_used", 0) <= launched[tp].get("launched", 0), \
            launched


@two_gpus
def test_tp2_launching_ahead_through_preemption_host_tier_seeds_and_logprobs():
    """Launched-ahead TP steps among what breaks their pattern: a pool too small for every
    sequence (preemption, recompute), a host KV tier (offloads, and hits copied back by
    every rank between steps), seeded temperature sampling (the leader's ids are what the
    followers stage from) and rows asking for logprobs (never launched ahead). TP=2 gives
    TP=1's tokens (mini-llama, bf16, decode graphs)."""
    pytest.importorskip("flashinfer")
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    prompts = [[(11 * i + 3 * j) % 3000 + 5 for j in range(n)] for i, n in
               enumerate([60, 40, 70, 33, 50, 64, 45, 12])]
    params = [SamplingParams(max_tokens=120, temperature=0.8, seed=100 + i, ignore_eos=True)
              if i % 3 == 1 else
              SamplingParams(max_tokens=120, temperature=0.0, logprobs=2, ignore_eos=True)
              if i % 3 == 2 else
              SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
              for i in range(len(prompts))]
    outs, seen = {}, {}
    for tp in (2, 1):
        with LLM("mini-llama", load_format="dummy", device="cuda", dtype="bfloat16", tp=tp,
                 num_kv_blocks=48, host_kv_blocks=64, max_num_seqs=8,
                 tp_cuda_graphs=True) as llm:
            assert llm.engine.runner.stages_next_decode
            llm.engine.runner.graphs.host_timer = {}
            outs[tp] = [o.token_ids for o in llm.generate(prompts, params)]
            seen[tp] = (llm.engine.scheduler.num_preemptions,
                        llm.engine.tiers.stats.hits["host"],
                        llm.engine.runner.graphs.host_timer.get("launched_used", 0))
    print("preemptions, host-tier hits, steps launched ahead and used:", seen)
    assert outs[2] == outs[1]
    assert all(p > 0 and h > 0 and used > 0 for p, h, used in seen.values()), seen


class _FakeComm:
    """Rank 0 of two, whose peer holds x + 10."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append("all_reduce")
        return x.mul_(2).add_(10)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append("all_gather")
        return torch.stack([x, x + 10])


def test_parallel_context_routes_collectives_through_its_comm():
    from kernels.parallel import ParallelContext

    comm = _FakeComm()
    pc = ParallelContext(0, 2, comm=comm)
    x = torch.ones(3, 4)
    assert pc.all_reduce(x) is x and torch.equal(x, torch.full((3, 4), 12.0))
    gathered = pc.all_gather_last_dim(torch.arange(12.0).view(3, 4))
    assert torch.equal(gathered, torch.cat([torch.arange(12.0).view(3, 4),
                                            torch.arange(12.0).view(3, 4) + 10], -1))
    assert comm.calls == ["all_reduce", "all_gather"]
    assert pc == ParallelContext(0, 2)  # the communicator is not part of the placement
    one = ParallelContext(0, 1, comm=comm)
    assert one.all_reduce(x) is x and one.all_gather_last_dim(x) is x and len(comm.calls) == 2


def test_missing_cupy_is_a_reason_not_an_error(monkeypatch):
    from kernels import tp_comm

    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(sys.modules, "cupy.cuda", None)
    assert "CuPy is not installed" in tp_comm.unavailable_reason()
