"""CUDA graphs for decode steps.

An eager decode step of an 8B model launches ~800 small kernels; at small batch the GPU
idles between them. A graph per batch-size bucket, captured once at start-up and
replayed each step, removes that launch cost. Graphs need static addresses, so:

- token ids, positions and KV slots live in one device buffer, filled from one pinned
  host buffer with a single copy per step;
- FlashInfer's decode wrapper for each bucket keeps its page lists in shared device
  buffers (`use_cuda_graph=True`) and is re-planned, outside the graph, before replay;
- a batch of n rows runs in the smallest bucket >= n; padding rows decode one token of
  a scratch block that the block pool never hands out, so they touch no real KV;
- the logits (lm_head) are computed inside the graph for every row.

All buckets share one memory pool (captured largest first), so their activations cost
about as much as the largest bucket's alone.

Under tensor parallelism each rank captures its own graphs, and a graph holds the step's
all-reduces and the lm_head's all-gather: NCCL calls of the group's own communicator
(kernels/tp_comm.py) on the capture stream; torch.distributed's hung in capture, so the
runner captures under TP only with that communicator. Capture is collective (the warm-up
forwards all-reduce), so every rank captures the same buckets in the same order; every rank
gets the same step, so each replays the same bucket. The leader's step broadcast (gloo,
host memory) and `_fill` run before the replay, outside the graph. A follower never syncs
its host, yet its `_fill` cannot overwrite inputs a previous replay still reads: the leader
sends the next step only after sampling from the last replay, and sampling waits for that
replay's final all-gather, which every follower reaches only after its attention layers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from kernels.attention import AttentionMetadata
from kernels.attention.flashinfer_backend import FlashInferPlanner, PageLists

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


@dataclass
class GraphCaptureReport:
    buckets: list[int]
    seconds: float
    memory_bytes: int


class DecodeGraphs:
    def __init__(self, model, kv_layers: list[torch.Tensor], planner: FlashInferPlanner,
                 scratch_block: int, block_size: int, max_blocks_per_seq: int,
                 buckets: list[int], device: torch.device) -> None:
        self.model = model
        self.kv_layers = kv_layers
        self.planner = planner
        self.block_size = block_size
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        self.buckets = sorted(buckets)
        self.max_bs = self.buckets[-1]
        self.device = device
        # Rows: token ids, positions, KV slots. One pinned host mirror, one copy per step.
        self.inputs = torch.zeros(3, self.max_bs, dtype=torch.int64, device=device)
        self.host_inputs = torch.zeros(3, self.max_bs, dtype=torch.int64).pin_memory()
        i32 = torch.int32
        self.indptr = torch.zeros(self.max_bs + 1, dtype=i32, device=device)
        self.indices = torch.zeros(self.max_bs * max_blocks_per_seq, dtype=i32, device=device)
        self.last_page_len = torch.zeros(self.max_bs, dtype=i32, device=device)
        self.wrappers: dict[int, object] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    @torch.inference_mode()
    def capture(self) -> GraphCaptureReport:
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        reserved_before = torch.cuda.memory_reserved(self.device)
        pool = None
        for b in reversed(self.buckets):
            wrapper = self.planner.graph_decode_wrapper(b, self.indptr, self.indices,
                                                        self.last_page_len)
            self.wrappers[b] = wrapper
            self._fill(b, [], [], [], [], [])
            meta = self._meta(b)
            for _ in range(2):  # warm up: kernel selection, lazy allocations
                self._forward(b, meta)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self._forward(b, meta)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # what remains reserved is the graphs' private pool
        used = torch.cuda.memory_reserved(self.device) - reserved_before
        report = GraphCaptureReport(list(self.buckets), time.perf_counter() - t0, used)
        log.info("CUDA graphs: %d decode buckets up to batch %d captured in %.1f s, %.0f MiB",
                 len(self.buckets), self.max_bs, report.seconds, used / 2**20)
        return report

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.inputs[2, :b], block_tables=None, seq_lens=None,
            query_lens_cpu=[1] * b, seq_lens_cpu=[1] * b, block_size=self.block_size,
            plan=self.wrappers[b])

    def _forward(self, b: int, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.model(self.inputs[0, :b], self.inputs[1, :b], self.kv_layers, meta)
        return self.model.compute_logits(hidden)

    def _fill(self, b: int, ids: list[int], positions: list[int], slots: list[int],
              tables: list[list[int]], seq_lens: list[int]) -> None:
        """Stage a step's inputs, padded to bucket b, and plan the bucket's wrapper."""
        n = len(ids)
        pad = b - n
        host = self.host_inputs
        host[0, :n] = torch.tensor(ids, dtype=torch.int64)
        host[1, :n] = torch.tensor(positions, dtype=torch.int64)
        host[2, :n] = torch.tensor(slots, dtype=torch.int64)
        host[0, n:b] = 0
        host[1, n:b] = 0
        host[2, n:b] = self.scratch_slot
        self.inputs[:, :b].copy_(host[:, :b], non_blocking=True)
        pages = PageLists.build(tables + [[self.scratch_block]] * pad,
                                [1] * b, seq_lens + [1] * pad, self.block_size)
        self.planner.plan_decode(self.wrappers[b], pages)

    def run(self, ids: list[int], positions: list[int], slots: list[int],
            tables: list[list[int]], seq_lens: list[int]) -> torch.Tensor:
        """Replays the bucket for len(ids) decode rows; returns their logits [n, vocab]."""
        n = len(ids)
        b = self.bucket_for(n)
        assert b is not None, f"batch {n} exceeds the largest graph bucket {self.max_bs}"
        self._fill(b, ids, positions, slots, tables, seq_lens)
        self.graphs[b].replay()
        return self.logits[b][:n]
