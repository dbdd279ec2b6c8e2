"""Owns the model and its KV cache on one device; turns a `SchedulerOutput` into one
forward pass and sampled tokens.

KV cache: one tensor [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim].
A block is one contiguous region across all layers (one descriptor per block for
transfers and offload); each layer sees a strided view in FlashInfer's paged NHD
layout. Rationale and costs: docs/kv_layout.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine import prompt_logprobs
from engine.config import EngineConfig
from engine.cuda_graphs import DEFAULT_BUCKETS, DecodeGraphs, GraphCaptureReport
from engine.kv_sizing import MemoryReport, size_kv_cache
from engine.scheduler import Scheduler, SchedulerOutput, StepResult
from engine.tensor_parallel import TPComm
from kernels import pdl
from kernels.attention import AttentionMetadata, resolve_attention_backend
from kernels.attention.flashinfer_backend import FlashInferPlanner, PageLists
from kernels.attention.one_row import OneRowAttention, one_row_unavailable_reason
from kernels.config import ModelConfig
from kernels.layers import fused, gemv
from kernels.loader import init_dummy_weights, load_weights
from kernels.models import build_model
from kernels.parallel import ParallelContext
from kernels.sampling import SamplingBatch, sample

log = logging.getLogger(__name__)

@dataclass
class StepInputs:
    """One step's flattened inputs, built on the host from the scheduler's output."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    tables: list[list[int]] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)
    # Rows whose logits give prompt logprobs (engine/prompt_logprobs.py), after the
    # sampling rows' in the step's logits.
    prompt_rows: list[int] = field(default_factory=list)
    decode_only: bool = False
    # Per row: "serial#epoch" of its block table (Sequence.serial, .block_table_epoch), so
    # decode graphs can mirror tables across steps instead of rebuilding page lists.
    table_keys: list[str] = field(default_factory=list)
    # Under TP: every rank stages and launches the next decode step before the leader has
    # seen this one's tokens (decided by the leader: ModelRunner._ahead_allowed).
    launch_ahead: bool = False


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, cfg: EngineConfig, model_dir: str | None,
                 max_model_len: int | None = None, tp: TPComm | None = None) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.device = torch.device(cfg.device)
        self.tp = tp  # None: one process; else this rank's view of the TP group
        self.pc = tp.pc if tp is not None else ParallelContext()
        self.max_model_len = max_model_len or model_cfg.max_position_embeddings
        self.attention_backend = resolve_attention_backend(
            cfg.attention_backend, model_cfg.head_dim, self.device, model_cfg.dtype)
        self.model = build_model(model_cfg, self.pc, self.attention_backend, self.device)
        if cfg.load_format == "dummy":
            init_dummy_weights(self.model, seed=cfg.seed, progress=True)
        else:
            load_weights(self.model, model_dir, progress=model_cfg.num_params() > 1e9)
        self.model.eval()
        self.planner: FlashInferPlanner | None = None
        self.fused_rope_kv_write = False
        self.gemv_decode = False
        self.pdl = pdl.set_enabled(cfg.pdl)
        if self.attention_backend == "flashinfer":
            fused.enable(self.model)  # FlashInfer's norm/RoPE/SwiGLU kernels ride along
            self.fused_rope_kv_write = fused.set_rope_kv_write(self.model,
                                                               cfg.fused_rope_kv_write)
            self.gemv_decode = gemv.set_decode_gemv(self.model, cfg.gemv_decode)
            m = model_cfg
            self.planner = FlashInferPlanner(
                self.pc.shard(m.num_heads, "num_attention_heads"),
                self.pc.shard(m.num_kv_heads, "num_key_value_heads"),
                m.head_dim, cfg.block_size, m.dtype, self.device)
        self.one_row = self._one_row_attention(cfg.one_row_attention)
        self.memory = MemoryReport()
        self.graphs_off_reason = self._graphs_off_reason()
        self.kv_spec = size_kv_cache(self)
        if self.tp is not None:  # every rank must hold the same number of blocks
            self.kv_spec = dataclasses.replace(
                self.kv_spec, num_blocks=self.tp.agree_min(self.kv_spec.num_blocks))
        s = self.kv_spec
        # One block past the pool's: the scratch block padded graph rows write into.
        self.kv_cache = torch.zeros(s.num_blocks + 1, s.num_layers, 2, s.block_size,
                                    s.num_kv_heads, s.head_dim, dtype=s.dtype, device=self.device)
        self.kv_layers = [self.kv_cache[:, i] for i in range(s.num_layers)]
        self.default_generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.memory.kv_cache_bytes = s.num_blocks * s.block_bytes
        self.graphs: DecodeGraphs | None = None
        self._graphed_step = False  # whether the last forward replayed a decode graph
        self._pinned_results: torch.Tensor | None = None
        self.overlap_rows = cfg.overlap_decode_max_rows
        self.launched_ahead = False  # whether the last execute() queued the next step
        self._prompt_chunks: list[prompt_logprobs.PromptRows] = []  # this step's (_prepare)
        self.prepare_seconds = 0.0
        # Benchmarks flip this to time eager decode in one process. Never under TP: followers
        # would still replay graphs, and their collectives would not match the leader's.
        self.use_graphs = True
        self.stage_decode = True  # tests compare staged decode steps with unstaged ones
        self.graph_report: GraphCaptureReport | None = None
        if self.graphs_off_reason is not None:
            if self.pc.tp_size > 1 and self.pc.tp_rank == 0:
                log.warning("CUDA graphs are off under --tp %d (eager decode): %s",
                            self.pc.tp_size, self.graphs_off_reason)
        else:
            self._capture_graphs()
        tokens = s.num_blocks * s.block_size
        log.info("attention backend %s; KV cache: %d blocks of %d tokens (%.2f MiB each), "
                 "%d tokens = %.1f concurrent sequences at max_model_len %d; %s",
                 self.attention_backend, s.num_blocks, s.block_size, s.block_bytes / 2**20,
                 tokens, tokens / self.max_model_len, self.max_model_len, self.memory.summary())

    @property
    def stages_next_decode(self) -> bool:
        """Whether execute() stages the next decode step while the GPU runs this one (with
        decode graphs; under TP every rank stages alike, from the leader's token ids, and
        only for steps it launches ahead: `StepInputs.launch_ahead`)."""
        return (self.graphs is not None and self.use_graphs and self.stage_decode
                and (self.pc.tp_size == 1 or self.pc.comm is not None))

    def release_graphs(self) -> None:
        """Before the TP communicator closes (DecodeGraphs.release says why)."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None

    def _capture_graphs(self) -> None:
        s = self.kv_spec
        self.release_graphs()  # a recapture frees the old graphs' pool first
        torch.cuda.empty_cache()
        self.graphs = DecodeGraphs(
            self.model, self.kv_layers, self.planner, scratch_block=s.num_blocks,
            block_size=s.block_size, max_blocks_per_seq=-(-self.max_model_len // s.block_size),
            buckets=[b for b in DEFAULT_BUCKETS if b <= self.cfg.max_num_seqs] or [1],
            device=self.device, one_row=self.one_row)
        self.graph_report = self.graphs.capture()
        self.memory.graph_bytes = self.graph_report.memory_bytes

    def set_fused_rope_kv_write(self, on: bool) -> bool:
        """Benchmarks compare the fused RoPE + KV write with FlashInfer's RoPE and index_put
        in one process: switch, and recapture the decode graphs that hold the old kernels."""
        return self._switch_kernels("fused_rope_kv_write", fused.set_rope_kv_write, on)

    def set_gemv_decode(self, on: bool) -> bool:
        """Benchmarks compare the one-row GEMV path with cuBLAS and FlashInfer's kernels in
        one process, likewise."""
        return self._switch_kernels("gemv_decode", gemv.set_decode_gemv, on)

    @property
    def rope_fold(self) -> bool:
        return self.gemv_decode and all(
            m.fold_rope_in_gemv for m in self.model.modules() if hasattr(m, "fold_rope_in_gemv"))

    def set_rope_fold(self, on: bool) -> bool:
        return self._switch(lambda: gemv.set_rope_fold(self.model, on), "rope_fold")

    @property
    def overlap_decode(self) -> bool:
        return self.overlap_rows > 0 and self.stages_next_decode

    def set_overlap_decode(self, on: bool) -> bool:
        """Benchmarks compare launching the next decode step ahead with not doing so."""
        rows = self.cfg.overlap_decode_max_rows or EngineConfig.overlap_decode_max_rows
        self.overlap_rows = rows if on else 0
        return self.overlap_decode

    def _one_row_attention(self, on: bool) -> OneRowAttention | None:
        """The batch-1 graph's attention kernel's scratch, when it is on and can run here
        (under TP over this rank's heads: the planner's counts are per rank)."""
        if not on or self.planner is None:
            return None
        p = self.planner
        reason = one_row_unavailable_reason(p.num_heads, p.num_kv_heads, p.head_dim,
                                            p.dtype, self.device)
        if reason is not None:
            log.info("one-row decode attention off: %s", reason)
            return None
        return OneRowAttention(p.num_heads, p.num_kv_heads, p.head_dim, self.device)

    @property
    def one_row_attention(self) -> bool:
        """Whether batch-1 decode steps run it (it lives in the decode graphs)."""
        return self.one_row is not None and self.graphs is not None

    def set_one_row_attention(self, on: bool) -> bool:
        """Benchmarks compare the one-row attention kernel with FlashInfer's in one
        process: switch, and recapture the decode graphs."""
        return self._switch(lambda: setattr(self, "one_row", self._one_row_attention(on)),
                            "one_row_attention")

    def set_pdl(self, on: bool) -> bool:
        return self._switch_kernels("pdl", lambda _model, on: pdl.set_enabled(on), on)

    def _switch_kernels(self, attr: str, setter, on: bool) -> bool:
        """`attr` = setter(model, on), as `_switch` does it."""
        return self._switch(lambda: setattr(self, attr, setter(self.model, on)), attr)

    def _switch(self, apply: Callable[[], object], state: str) -> bool:
        """Flips a kernel choice (`apply`) and recaptures the decode graphs that hold the
        old kernels; returns the `state` attribute after. Only where FlashInfer runs in one
        process (under TP every rank would have to flip alike)."""
        if self.planner is not None and self.pc.tp_size == 1:
            apply()
            if self.graphs is not None:
                self._capture_graphs()
        return getattr(self, state)

    def _graphs_off_reason(self) -> str | None:
        """Why decode steps run eagerly, or None when they are captured. Under TP a graph
        replays the step's all-reduces too, so it needs the group's own NCCL communicator:
        torch.distributed's all-reduce hung in capture (docs/multi_gpu.md)."""
        if self.planner is None:
            return "decode graphs need the FlashInfer backend"
        if not self.cfg.cuda_graphs:
            return "cuda_graphs is off"
        if self.pc.tp_size > 1 and not self.cfg.tp_cuda_graphs:
            return "tp_cuda_graphs is off (--no-tp-cuda-graphs)"
        if self.pc.tp_size > 1 and self.pc.comm is None:
            return "tp_cuda_graphs needs CuPy's NCCL for the all-reduces (not loaded)"
        return None

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, scheduler: Scheduler) -> StepResult:
        t0 = time.perf_counter()
        step = self._prepare(out)
        self.prepare_seconds = time.perf_counter() - t0  # benchmarks: host share of a step
        if self.pc.tp_size == 1:
            return self._run_step(step, out, scheduler)
        # Decided before the followers get the step: they launch ahead alike.
        step.launch_ahead = (self.stages_next_decode and step.decode_only
                             and self._ahead_allowed(step, out, scheduler))
        try:
            return self._run_step(step, out, scheduler)
        except BaseException:
            # Once the step is out, the followers run its collectives (and, launched
            # ahead, the next step's); a leader that stops half-way cannot tell them, and
            # its next step's collectives would pair with theirs: a silent hang. The
            # worker goes down instead and the router retries its requests elsewhere.
            log.critical("tensor-parallel leader failed during a step; this worker stops",
                         exc_info=True)
            os._exit(1)

    def _run_step(self, step: StepInputs, out: SchedulerOutput, scheduler: Scheduler
                  ) -> StepResult:
        """The step's forward, sampling, and the next step's staging and launch."""
        tp = self.pc.tp_size > 1
        logits = self.forward(step)
        if logits is None:
            return StepResult([], [])
        batch = self._sampling_batch(out, scheduler)  # host work while the GPU runs
        res = sample(logits, batch, self.default_generator)
        self.launched_ahead = False
        staged = self._graphed_step and self.stages_next_decode and (not tp or step.launch_ahead)
        if staged:
            # Before the host waits for this step's tokens: stage and plan the step that
            # continues every row by one token, so that host work overlaps the GPU's.
            self._stage_next(step, res.token_ids)
        # One device->host copy (one sync) for both: ids and float32 logprobs are exact
        # in float64.
        packed = res.packed
        if packed is None:
            packed = torch.stack([res.token_ids.double(), res.logprobs.double()])
        if (staged and self.graphs.staged is not None
                and (tp or self._ahead_allowed(step, out, scheduler))):
            # (Alternatives are copied out after this: they would wait for the next step.)
            # Copy this step's results out first, then queue the next step behind them:
            # the host waits only for the copy while the GPU runs on.
            host = self._host_results(packed)
            done = torch.cuda.Event()
            done.record()
            self.graphs.launch_staged()
            self.launched_ahead = True
            done.synchronize()
            ids_lps = host.tolist()
        else:
            ids_lps = packed.tolist()
        token_ids = [int(t) for t in ids_lps[0]]
        logprobs = ids_lps[1]
        top = None
        if res.top_ids is not None:
            ids, lps = res.top_ids.tolist(), res.top_logprobs.tolist()
            top = [list(zip(ids[r][:k], lps[r][:k])) for r, k in enumerate(batch.num_logprobs)]
        return StepResult(token_ids, logprobs, top)

    def _ahead_allowed(self, step: StepInputs, out: SchedulerOutput, scheduler: Scheduler
                       ) -> bool:
        """Whether the step after this one may be launched before the host sees this one's
        tokens: a small batch (above `overlap_rows` the GPU step outlasts the host's work
        anyway), no top-logprob alternatives (copied out after the launch, they would wait
        for it), and every row continues unless it samples a stop token."""
        return (len(step.ids) <= self.overlap_rows
                and not any(item.seq.params.logprobs for item in out.scheduled if item.samples)
                and scheduler.decode_continues(out))

    def _stage_next(self, step: StepInputs, token_ids: torch.Tensor) -> None:
        """Stages the next decode step from this one's sampled ids; under TP the leader's
        ids go to every rank first (one NCCL broadcast on the step's stream), so all ranks
        stage, and launch, the same step."""
        if self.pc.tp_size > 1:
            token_ids = self.pc.comm.broadcast(token_ids.to(torch.int64).contiguous())
        self.graphs.stage_next(step, token_ids)

    @torch.inference_mode()
    def follow(self, step: StepInputs) -> None:
        """A TP follower's step: the forward pass, then, where the leader launches the next
        decode step ahead, the same staging and launch from the leader's token ids."""
        self.forward(step)
        if step.launch_ahead and self._graphed_step:
            self._stage_next(step, torch.empty(len(step.ids), dtype=torch.int64,
                                               device=self.device))
            if self.graphs.staged is not None:
                self.graphs.launch_staged()

    def _host_results(self, packed: torch.Tensor) -> torch.Tensor:
        """An asynchronous copy of [2, rows] results into pinned host memory. The
        destination is a contiguous view: into a strided one (a column slice of a wider
        buffer) torch copies through an unpinned temporary and blocks until the GPU gets
        there, which would hold back the launch that follows."""
        n = packed.numel()
        if self._pinned_results is None or self._pinned_results.numel() < n:
            self._pinned_results = torch.empty(max(n, 512), dtype=torch.float64,
                                               pin_memory=True)
        host = self._pinned_results[:n].view(packed.shape)
        host.copy_(packed, non_blocking=True)
        return host

    def forward(self, step: StepInputs) -> torch.Tensor | None:
        """Runs the step's forward pass; logits [rows that sample, vocab] in float32.
        Under tensor parallelism the leader first sends the step to the other ranks."""
        if self.tp is not None and self.pc.tp_rank == 0:
            self.tp.broadcast_step(step)
        # Graphs hold one-token rows that all sample (a one-token prompt chunk that does not
        # sample yet would leave the logits and the sampled rows misaligned).
        self._graphed_step = (self.graphs is not None and self.use_graphs
                              and step.decode_only and len(step.logits_rows) == len(step.ids)
                              and not step.prompt_rows
                              and self.graphs.bucket_for(len(step.ids)) is not None)
        if self._graphed_step:
            return self.graphs.run(step.ids, step.positions, step.slots, step.tables,
                                   step.seq_lens, step.table_keys or None)
        if self.graphs is not None:
            self.graphs.drop_staged()
        if not step.logits_rows and not step.prompt_rows:
            self._forward_eager(step)
            return None
        hidden = self._forward_eager(step)
        if step.prompt_rows:  # (followers: no chunks of their own, the same logits)
            prompt_logprobs.score(self.model.compute_logits, hidden, step.prompt_rows,
                                  self._prompt_chunks)
        if not step.logits_rows:
            return None
        return self.model.compute_logits(hidden[step.logits_rows])

    def _forward_eager(self, step: StepInputs) -> torch.Tensor:
        dev = self.device
        bs = self.cfg.block_size
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(step.slots, dtype=torch.int64, device=dev),
            block_tables=None, seq_lens=None, query_lens_cpu=step.query_lens,
            seq_lens_cpu=step.seq_lens, block_size=bs)
        if self.planner is not None:
            pages = PageLists.build(step.tables, step.query_lens, step.seq_lens, bs)
            meta.plan = self.planner.plan(pages, step.decode_only)
        else:  # the torch reference path reads padded tables and lengths on the device
            width = max(len(t) for t in step.tables)
            meta.block_tables = torch.tensor([t + [0] * (width - len(t)) for t in step.tables],
                                             dtype=torch.int64, device=dev)
            meta.seq_lens = torch.tensor(step.seq_lens, dtype=torch.int64, device=dev)
        return self.model(torch.tensor(step.ids, dtype=torch.int64, device=dev),
                          torch.tensor(step.positions, dtype=torch.int64, device=dev),
                          self.kv_layers, meta)

    def _prepare(self, out: SchedulerOutput) -> StepInputs:
        bs = self.cfg.block_size
        step = StepInputs()
        self._prompt_chunks = []
        for item in out.scheduled:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            table = seq.block_table
            rows = prompt_logprobs.rows_of_chunk(seq, start, n, len(step.ids))
            if rows is not None:
                self._prompt_chunks.append(rows)
                step.prompt_rows.extend(range(rows.first_row, rows.first_row + rows.count))
            if n == 1:  # decode rows: most rows of most steps, so no ranges or generators
                step.ids.append(seq.token_ids[start])
                step.positions.append(start)
                step.slots.append(table[start // bs] * bs + start % bs)
            else:
                step.ids.extend(seq.token_ids[start : start + n])
                positions = range(start, start + n)
                step.positions.extend(positions)
                step.slots.extend(table[p // bs] * bs + p % bs for p in positions)
            step.tables.append(table)
            step.table_keys.append(f"{seq.serial}#{seq.block_table_epoch}")
            step.query_lens.append(n)
            step.seq_lens.append(start + n)
            if item.samples:
                step.logits_rows.append(len(step.ids) - 1)
        step.decode_only = all(n == 1 for n in step.query_lens)
        return step

    def _sampling_batch(self, out: SchedulerOutput, scheduler: Scheduler) -> SamplingBatch:
        rows = [item.seq for item in out.scheduled if item.samples]
        # A seeded request draws token i from a generator seeded by (seed, i): the same
        # tokens whichever worker samples them, whatever else is in the batch, and after
        # preemption or migration.
        gens = [None if s.params.seed is None else
                torch.Generator(self.device).manual_seed(
                    (s.params.seed * 1_000_003 + s.num_output_tokens) % 2**63)
                for s in rows]
        return SamplingBatch(
            temperatures=[s.params.temperature for s in rows],
            top_ks=[s.params.top_k for s in rows],
            top_ps=[s.params.top_p for s in rows],
            generators=gens,
            num_logprobs=[s.params.logprobs or 0 for s in rows],
            banned_token_ids=[scheduler.banned_tokens(s) for s in rows],
            penalties=[(s.params.presence_penalty, s.params.frequency_penalty,
                        s.output_token_ids) if s.params.penalized else None for s in rows]
            if any(s.params.penalized for s in rows) else None,
            logit_biases=[s.params.logit_bias or None for s in rows]
            if any(s.params.logit_bias for s in rows) else None,
            repetition=[(s.params.repetition_penalty, self._prompt_ids_seen(s),
                         s.output_token_ids)
                        if s.params.repetition_penalty != 1.0 else None for s in rows]
            if any(s.params.repetition_penalty != 1.0 for s in rows) else None,
            min_ps=[s.params.min_p for s in rows] if any(s.params.min_p for s in rows)
            else None,
            token_masks=scheduler.grammars.masks(rows)
            if scheduler.grammars is not None and any(s.params.grammar for s in rows)
            else None,
        )

    def _prompt_ids_seen(self, seq) -> torch.Tensor:
        if seq.prompt_ids_seen is None:
            seq.prompt_ids_seen = torch.tensor(seq.prompt_token_ids, dtype=torch.int64,
                                               device=self.device).unique()
        return seq.prompt_ids_seen
