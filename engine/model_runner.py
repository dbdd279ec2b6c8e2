"""Owns the model and its KV cache on one device; turns a `SchedulerOutput` into one
forward pass and sampled tokens.

KV cache: one tensor [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim].
A block is one contiguous region across all layers (one descriptor per block for
transfers and offload); each layer sees a strided view in FlashInfer's paged NHD
layout. Rationale and costs: docs/kv_layout.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.scheduler import Scheduler, SchedulerOutput, StepResult
from kernels.attention import AttentionMetadata
from kernels.config import ModelConfig
from kernels.loader import init_dummy_weights, load_weights
from kernels.models import build_model
from kernels.parallel import ParallelContext
from kernels.sampling import SamplingBatch, sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVCacheSpec:
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def block_bytes(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, cfg: EngineConfig, model_dir: str | None,
                 pc: ParallelContext | None = None) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.device = torch.device(cfg.device)
        self.pc = pc or ParallelContext()
        self.model = build_model(model_cfg, self.pc, cfg.attention_backend, self.device)
        if cfg.load_format == "dummy":
            init_dummy_weights(self.model, seed=cfg.seed, progress=True)
        else:
            load_weights(self.model, model_dir, progress=model_cfg.num_params() > 1e9)
        self.model.eval()
        self.kv_spec = self._size_kv_cache()
        s = self.kv_spec
        self.kv_cache = torch.zeros(s.num_blocks, s.num_layers, 2, s.block_size,
                                    s.num_kv_heads, s.head_dim, dtype=s.dtype, device=self.device)
        self.kv_layers = [self.kv_cache[:, i] for i in range(s.num_layers)]
        self.default_generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB each), %d tokens in all",
                 s.num_blocks, s.block_size, s.block_bytes / 2**20, s.num_blocks * s.block_size)

    def _size_kv_cache(self) -> KVCacheSpec:
        m = self.model_cfg
        heads = self.pc.shard(m.num_kv_heads, "num_key_value_heads")
        probe = KVCacheSpec(1, m.num_layers, self.cfg.block_size, heads, m.head_dim, m.dtype)
        if self.cfg.num_kv_blocks is not None:
            n = self.cfg.num_kv_blocks
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = total * (1 - self.cfg.gpu_memory_utilization) + 2 * 2**30  # activations
            n = int(max(free - reserve, 0) // probe.block_bytes)
        else:
            n = int(self.cfg.cpu_kv_cache_gb * 2**30 // probe.block_bytes)
            n = min(n, -(-self.cfg.max_num_seqs * m.max_position_embeddings // probe.block_size))
        if n < 1:
            raise MemoryError("no memory left for the KV cache after loading the weights")
        return KVCacheSpec(n, m.num_layers, self.cfg.block_size, heads, m.head_dim, m.dtype)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, scheduler: Scheduler) -> StepResult:
        input_ids, positions, meta, logits_rows = self._prepare(out)
        hidden = self.model(input_ids, positions, self.kv_layers, meta)
        if not logits_rows:
            return StepResult([], [])
        logits = self.model.compute_logits(hidden[logits_rows])
        batch = self._sampling_batch(out, scheduler)
        res = sample(logits, batch, self.default_generator)
        token_ids = res.token_ids.tolist()
        logprobs = res.logprobs.tolist()
        top = None
        if res.top_ids is not None:
            ids, lps = res.top_ids.tolist(), res.top_logprobs.tolist()
            top = [list(zip(ids[r][:k], lps[r][:k])) for r, k in enumerate(batch.num_logprobs)]
        return StepResult(token_ids, logprobs, top)

    def _prepare(self, out: SchedulerOutput):
        bs = self.cfg.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        q_lens, seq_lens, logits_rows = [], [], []
        for item in out.scheduled:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + n])
            positions = range(start, start + n)
            pos.extend(positions)
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in positions)
            q_lens.append(n)
            seq_lens.append(start + n)
            if item.samples:
                logits_rows.append(len(ids) - 1)
        max_blocks = max(len(item.seq.block_table) for item in out.scheduled)
        tables = [item.seq.block_table + [0] * (max_blocks - len(item.seq.block_table))
                  for item in out.scheduled]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int64, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=dev),
            query_lens_cpu=q_lens,
            seq_lens_cpu=seq_lens,
            block_size=bs,
        )
        return (torch.tensor(ids, dtype=torch.int64, device=dev),
                torch.tensor(pos, dtype=torch.int64, device=dev), meta, logits_rows)

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
        )
