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
- the logits (lm_head) are computed inside the graph for every row;
- the next step is staged (inputs, page lists, plan) while this one runs, and at small
  batch replayed before the host has read this one's tokens (`launch_staged`), so the
  GPU does not wait for the host between steps.

All buckets share one memory pool (captured largest first), so their activations cost
about as much as the largest bucket's alone.

Under tensor parallelism each rank captures its own graphs, and a graph holds the step's
all-reduces and the lm_head's all-gather: NCCL calls of the group's own communicator
(kernels/tp_comm.py) on the capture stream; torch.distributed's hung in capture, so the
runner captures under TP only with that communicator. Capture is collective (the warm-up
forwards all-reduce), so every rank captures the same buckets in the same order; every rank
gets the same step, so each replays the same bucket. The leader's step broadcast (gloo,
host memory) and `_fill` run before the replay, outside the graph. A follower's `_fill`
cannot overwrite inputs a previous replay still reads: the leader sends the next step only
after it has the last replay's tokens, which wait for that replay's final all-gather, which
every follower reaches only after its attention layers; where the ranks launch a step ahead
(ModelRunner.follow), `stage_next` and a miss after a launch wait on `filled` first, as one
process does.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from kernels.attention import AttentionMetadata
from kernels.attention.flashinfer_backend import DecodePageCache, FlashInferPlanner, PageLists
from kernels.attention.one_row import OneRowAttention, OneRowPlan

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
                 buckets: list[int], device: torch.device,
                 one_row: OneRowAttention | None = None) -> None:
        self.model = model
        # The batch-1 bucket's attention (kernels/attention/one_row.py), where enabled.
        self.one_row = one_row
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
        self.host_view = self.host_inputs.numpy()  # filled from lists without torch.tensor()
        self.pages = DecodePageCache()
        # Page lists are written into pinned host buffers and the block ids reach the GPU
        # by an asynchronous copy, so planning never waits for a step still running
        # (FlashInfer copies host-side block ids synchronously).
        max_pages = self.max_bs * max_blocks_per_seq
        self.host_pages = PageLists(torch.arange(self.max_bs + 1, dtype=torch.int32),
                                    torch.zeros(self.max_bs + 1, dtype=torch.int32).pin_memory(),
                                    torch.zeros(max_pages, dtype=torch.int32).pin_memory(),
                                    torch.zeros(self.max_bs, dtype=torch.int32).pin_memory())
        self.indices_stage = torch.zeros(max_pages, dtype=torch.int32, device=device)
        self.staged: StagedDecode | None = None
        # Recorded after the copies out of the pinned buffers (ours and FlashInfer's plan
        # info): staging waits on it before rewriting them. It has long passed in practice
        # (those copies precede the step now running), but nothing else guarantees it.
        self.filled = torch.cuda.Event() if device.type == "cuda" else None
        # Benchmarks set a dict here to collect host seconds per phase of run().
        self.host_timer: dict[str, float] | None = None
        i32 = torch.int32
        self.indptr = torch.zeros(self.max_bs + 1, dtype=i32, device=device)
        self.indices = torch.zeros(self.max_bs * max_blocks_per_seq, dtype=i32, device=device)
        self.last_page_len = torch.zeros(self.max_bs, dtype=i32, device=device)
        self.wrappers: dict[int, object] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        # With the one-row kernel: batch 1's graph for contexts past its max_context.
        self.long_graph: torch.cuda.CUDAGraph | None = None
        self.long_logits: torch.Tensor | None = None
        self.last_replayed: torch.cuda.CUDAGraph | None = None  # benchmarks time it alone

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def release(self) -> None:
        """Destroys the captured graphs now. Under TP they hold the group's NCCL
        collectives, and NCCL (2.26 and later) will not destroy or abort a communicator
        while a graph that captured it exists: its close would hang."""
        torch.cuda.synchronize(self.device)
        for graph in [*self.graphs.values(), *filter(None, [self.long_graph])]:
            graph.reset()
        self.graphs.clear()
        self.logits.clear()
        self.long_graph = self.long_logits = self.last_replayed = None

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
            if b == 1 and self.one_row is not None:
                # Past the one-row kernel's best context, batch 1 replays a graph of
                # FlashInfer's kernels over the same inputs and plan.
                long_meta = self._meta(b, one_row=False)
                self._forward(b, long_meta)
                self.long_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.long_graph, pool=pool):
                    self.long_logits = self._forward(b, long_meta)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # what remains reserved is the graphs' private pool
        used = torch.cuda.memory_reserved(self.device) - reserved_before
        report = GraphCaptureReport(list(self.buckets), time.perf_counter() - t0, used)
        log.info("CUDA graphs: %d decode buckets up to batch %d captured in %.1f s, %.0f MiB",
                 len(self.buckets), self.max_bs, report.seconds, used / 2**20)
        return report

    def _meta(self, b: int, one_row: bool = True) -> AttentionMetadata:
        plan = self.wrappers[b]
        if b == 1 and one_row and self.one_row is not None:
            # The wrapper is still planned each step: planning copies the page lists
            # into these buffers, which the one-row kernel reads.
            plan = OneRowPlan(plan, self.one_row, self.indptr[:2], self.indices,
                              self.last_page_len[:1])
        return AttentionMetadata(
            slot_mapping=self.inputs[2, :b], block_tables=None, seq_lens=None,
            query_lens_cpu=[1] * b, seq_lens_cpu=[1] * b, block_size=self.block_size,
            plan=plan)

    def _forward(self, b: int, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.model(self.inputs[0, :b], self.inputs[1, :b], self.kv_layers, meta)
        return self.model.compute_logits(hidden)

    def _fill(self, b: int, ids: list[int], positions: list[int], slots: list[int],
              tables: list[list[int]], seq_lens: list[int],
              table_keys: list[str] | None = None, timed: bool = True) -> None:
        """Stage a step's inputs, padded to bucket b, and plan the bucket's wrapper."""
        timer = self.host_timer if timed else None
        t0 = time.perf_counter() if timer is not None else 0.0
        n = len(ids)
        host = self.host_view
        host[0, :n] = ids
        host[1, :n] = positions
        host[2, :n] = slots
        host[0:2, n:b] = 0
        host[2, n:b] = self.scratch_slot
        # The whole buffer (6 KB at 256 rows), not [:, :b]: a column slice is strided, and
        # torch copies strided host memory through an unpinned contiguous temporary plus
        # a device-side scatter (two stream operations instead of one async copy).
        self.inputs.copy_(self.host_inputs, non_blocking=True)
        t1 = time.perf_counter() if timer is not None else 0.0
        if table_keys is None:  # capture and callers without keys: no mirror to reuse
            pages = PageLists.build(tables + [[self.scratch_block]] * (b - n),
                                    [1] * b, seq_lens + [1] * (b - n), self.block_size)
        else:
            pages = self.pages.page_lists(table_keys, tables, seq_lens, self.block_size,
                                          pad_rows=b - n, pad_block=self.scratch_block,
                                          out=self.host_pages)
            on_device = self.indices_stage[: len(pages.kv_indices)]
            on_device.copy_(pages.kv_indices, non_blocking=True)
            pages = dataclasses.replace(pages, kv_indices=on_device)
        t2 = time.perf_counter() if timer is not None else 0.0
        self.planner.plan_decode(self.wrappers[b], pages)
        if self.filled is not None:
            self.filled.record()
        if timer is not None:
            self._tally("inputs", t1 - t0)
            self._tally("page_lists", t2 - t1)
            self._tally("plan", time.perf_counter() - t2)

    def _tally(self, key: str, amount: float) -> None:
        """Adds to a phase of `host_timer` (seconds, or a count)."""
        self.host_timer[key] = self.host_timer.get(key, 0.0) + amount

    def run(self, ids: list[int], positions: list[int], slots: list[int],
            tables: list[list[int]], seq_lens: list[int],
            table_keys: list[str] | None = None) -> torch.Tensor:
        """Replays the bucket for len(ids) decode rows; returns their logits [n, vocab].
        `table_keys` name each row's block table and its epoch (StepInputs.table_keys), so
        page lists are built from mirrors instead of from the lists each step."""
        n = len(ids)
        b = self.bucket_for(n)
        assert b is not None, f"batch {n} exceeds the largest graph bucket {self.max_bs}"
        staged, self.staged = self.staged, None
        if staged is not None and staged.matches(positions, table_keys):
            if self.host_timer is not None:
                self._tally("staged_hits", 1)
            if staged.launched:  # already queued behind the previous step: nothing to do
                if self.host_timer is not None:
                    self._tally("launched_used", 1)
                    self._tally("steps", 1)
                return self._graph(b, positions)[1][:n]
        else:
            if staged is not None and staged.launched and self.filled is not None:
                self.filled.synchronize()  # (long passed: the host has seen later copies)
            self._fill(b, ids, positions, slots, tables, seq_lens, table_keys)
        t0 = time.perf_counter() if self.host_timer is not None else 0.0
        graph, logits = self._graph(b, positions)
        graph.replay()
        self.last_replayed = graph
        if self.host_timer is not None:
            self._tally("replay", time.perf_counter() - t0)
            self._tally("steps", 1)
        return logits[:n]

    def _graph(self, b: int, positions: list[int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The graph a step of bucket b replays and its logits: at batch 1 past the
        one-row kernel's max_context (a decode row's context is its position + 1), the
        FlashInfer one."""
        if (b == 1 and self.long_graph is not None
                and positions[0] + 1 > self.one_row.config.max_context):
            return self.long_graph, self.long_logits
        return self.graphs[b], self.logits[b]

    def stage_next(self, step, token_ids: torch.Tensor) -> None:
        """Called after this step's replay and sampling were queued, before the host waits
        for them: stages and plans the decode step that continues every row by one token,
        its input ids copied on the device from this step's sampled `token_ids`. Device
        writes are queued behind this step's kernels, so nothing it still reads changes.
        The next `run` uses it only if the scheduler asks for exactly that step (same
        rows at the same positions); a row that finished, a new request or a
        preemption makes it a miss, and the step is staged as usual."""
        self.staged = None
        if not step.table_keys:
            return
        bs = self.block_size
        positions = [p + 1 for p in step.positions]
        slots = []
        for table, p in zip(step.tables, positions):
            if p // bs >= len(table):
                return  # the block of the next token is not allocated (pool was full)
            slots.append(table[p // bs] * bs + p % bs)
        seq_lens = [s + 1 for s in step.seq_lens]
        n = len(positions)
        b = self.bucket_for(n)
        if b is None:
            return
        t0 = time.perf_counter()
        if self.filled is not None:
            self.filled.synchronize()
        self._fill(b, step.ids, positions, slots, step.tables, seq_lens, step.table_keys,
                   timed=False)
        self.inputs[0, :n].copy_(token_ids)
        self.staged = StagedDecode(positions, list(step.table_keys))
        if self.host_timer is not None:  # overlapped with the GPU: counted apart
            self._tally("staging", time.perf_counter() - t0)

    def launch_staged(self) -> None:
        """Replays the staged step now, before the host has seen this step's tokens, so
        the GPU does not idle while the host turns them into the next step (part of the
        ~0.1 ms a batch-1 8B step spends between graphs). Its logits wait in the bucket's
        buffer for `run`, which only returns them if the scheduler asks for exactly that
        step. Otherwise the work is wasted and the real step runs after it; safe, because
        the replay only writes each row's next KV slot inside blocks the row holds
        (`stage_next` checks), which a finished row's next user overwrites later in stream
        order, and which the continuing rows' real step rewrites with the same values.
        Callers launch only when every row is sure to continue unless it samples a stop
        token (Scheduler.decode_continues)."""
        staged = self.staged
        if staged is None or staged.launched:
            return
        graph = self._graph(self.bucket_for(len(staged.positions)), staged.positions)[0]
        graph.replay()
        self.last_replayed = graph
        staged.launched = True
        if self.host_timer is not None:
            self._tally("launched", 1)

    def drop_staged(self) -> None:
        """A step that is not a graphed decode step ran: whatever was staged is stale."""
        self.staged = None


@dataclass
class StagedDecode:
    """What `stage_next` planned for; `run` replays it only for exactly this step. Rows
    and positions decide it: a key names one table's life, whose blocks never change
    while it grows, so the same key and position give the same slot and page list, and a
    decode row's length is its position + 1."""

    positions: list[int]
    table_keys: list[str]
    launched: bool = False  # replayed ahead by launch_staged()

    def matches(self, positions: list[int], table_keys: list[str] | None) -> bool:
        return table_keys == self.table_keys and positions == self.positions
