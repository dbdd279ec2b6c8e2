"""The engine loop: requests in, one scheduled forward pass per `step()`, outputs out."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from engine.config import ConfigError, EngineConfig
from engine.errors import InvalidRequestError
from engine.kv_manager import KVCacheManager
from engine.model_runner import ModelRunner
from engine.prefix_view import PrefixView
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence
from engine.structured import Grammars
from engine.tensor_parallel import TPLeader, rank_device
from engine.tokenizer import IncrementalDetokenizer, TokenizerBundle
from kernels.config import ModelConfig
from kernels.parallel import ParallelContext
from kvtransfer.block_pool import BlockPool
from kvtransfer.events import EventRecorder, KVEventBatch, Tier
from kvtransfer.tiered_store import ShardedTiers, TieredStore
from kvtransfer.transfer.base import KV_HEAD_DIM

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RequestOutput:
    """One step's report on a request. `token_ids`, `logprobs` and `top_logprobs` hold
    everything generated so far: real lists once the request has finished, read-only
    snapshot views (engine/prefix_view.py) while it runs."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: Seq[int]  # all generated so far
    new_token_ids: list[int]
    text: str  # all generated text so far (stop strings applied)
    new_text: str
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int
    logprobs: Seq[float] = field(default_factory=list)
    top_logprobs: Seq[list[tuple[int, float]]] = field(default_factory=list)
    # On the request's first output from this engine only (None on the others): seconds
    # from its arrival here to the first step that computed it (the queue), and from
    # then to this output's token (its prefill, chunks and other rows' work included; a
    # preemption before the first token counts there too).
    queue_seconds: float | None = None
    first_token_seconds: float | None = None
    # time.monotonic() when that first token was ready: the service that sends it reports
    # how long the hand-off to gRPC took (the engine thread -> event loop hop, under the GIL).
    first_token_at: float | None = None
    # params.prompt_logprobs: entry i for prompt token i + 1 (complete on every output)
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None


def make_tiered_store(cfg: EngineConfig, runner: ModelRunner, events: EventRecorder,
                      mc: ModelConfig, tp_leader: TPLeader | None = None) -> TieredStore | None:
    """G2/G3 sized from the config, or None when neither is asked for."""
    block_bytes = runner.kv_spec.block_bytes
    tp = runner.pc.tp_size
    host = cfg.host_kv_block_count(block_bytes)
    disk = cfg.disk_kv_block_count(block_bytes * tp)  # a file holds every rank's heads
    if host <= 0 and (disk <= 0 or not cfg.disk_kv_dir):
        return None
    # Disk blocks are only valid for the same weights, dtype and cache layout; they hold
    # whole blocks (all KV heads) at any TP size, so the layout is that of TP=1.
    whole = dataclasses.replace(runner.kv_spec, num_blocks=0,
                                num_kv_heads=runner.kv_spec.num_kv_heads * tp)
    ident = xxhash.xxh3_128_digest(repr((
        cfg.model, cfg.load_format, cfg.seed, sorted(dataclasses.asdict(mc).items(), key=str),
        dataclasses.astuple(whole))).encode())
    lossless = cfg.disk_kv_lossless if cfg.disk_kv_lossless is not None \
        else not runner.kv_cache.is_cuda
    prefetch = cfg.max_num_batched_tokens // cfg.block_size if cfg.disk_kv_prefetch else 0
    sharded = None
    if tp_leader is not None:
        shape = list(runner.kv_cache.shape[1:])
        shape[KV_HEAD_DIM - 1] *= tp
        kv = runner.kv_cache
        sharded = ShardedTiers(
            tuple(shape), read_blocks=lambda ids: tp_leader.read_kv(kv, ids),
            write_blocks=lambda ids, full: tp_leader.write_kv(kv, ids, full),
            read_host=lambda slots: tp_leader.read_host(store.host, slots))
    store = TieredStore(runner.kv_cache, host, events, cfg.disk_kv_dir, disk, ident,
                        lossless_disk=lossless, disk_policy=cfg.disk_kv_policy,
                        prefetch_blocks=prefetch, sharded=sharded)
    return store


def _ms(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds * 1e3:.3f}"


def resolve_model(cfg: EngineConfig) -> tuple[ModelConfig, str | None, TokenizerBundle | None]:
    """Model config, checkpoint dir and tokenizer for `cfg.model` (a dir, or a preset name
    with load_format=dummy)."""
    path = Path(cfg.model)
    if path.is_dir():
        mc = ModelConfig.from_dir(path)
        tok = TokenizerBundle.from_dir(path) if (path / "tokenizer.json").is_file() else None
        model_dir: str | None = str(path)
    elif cfg.load_format == "dummy":
        from kernels.presets import get_preset

        mc = ModelConfig.from_hf(get_preset(cfg.model).hf_config)
        tok, model_dir = TokenizerBundle.from_preset(cfg.model), None
    else:
        raise ConfigError(f"--model: {cfg.model!r} is not a checkpoint directory (for a "
                          "preset without files use --load-format dummy, or write one with "
                          "`baton make-model`)")
    dtype = cfg.dtype and _DTYPES[cfg.dtype]
    if dtype is None and cfg.device != "cpu":
        dtype = torch.bfloat16
    if dtype is not None:
        mc = dataclasses.replace(mc, dtype=dtype)
    return mc, model_dir, tok


@dataclass
class RemoteAdmission:
    """A decode-side request whose prompt KV is being pulled from a prefill worker:
    blocks are allocated, the sequence is not scheduled until `commit_remote`."""

    seq: Sequence
    num_local_hit_blocks: int  # leading prompt blocks this worker already held
    fill_block_ids: list[int]  # local blocks to fill, for prompt blocks from the hit on


class LLMEngine:
    """Not thread-safe: a worker serialises calls (one engine thread plus a lock)."""

    def __init__(self, cfg: EngineConfig, detokenize: bool = True,
                 kv_lease_seconds: float = 30.0) -> None:
        self.cfg = cfg
        self.kv_lease_seconds = kv_lease_seconds
        self.model_config, model_dir, self.tokenizer = resolve_model(cfg)
        mc = self.model_config
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        self.tp: TPLeader | None = None
        runner_cfg = cfg
        if cfg.tp > 1:  # followers start first: the runner's set-up is collective
            pc = ParallelContext(0, cfg.tp)  # fail here, before spawning, if it cannot split
            for total, what in ((mc.num_heads, "num_attention_heads"),
                                (mc.num_kv_heads, "num_key_value_heads"),
                                (mc.intermediate_size, "intermediate_size")):
                pc.shard(total, what)
            self.tp = TPLeader(cfg)
            runner_cfg = dataclasses.replace(cfg, device=rank_device(cfg, 0))
        self.runner = ModelRunner(mc, runner_cfg, model_dir, max_model_len=self.max_model_len,
                                  tp=self.tp)
        # Every block stored in / evicted from the prefix cache becomes a KV event; the
        # worker publishes one batch per step to routers' prefix indexes.
        self.events = EventRecorder(worker_id="local", instance_id=uuid.uuid4().hex)
        pool = BlockPool(self.runner.kv_spec.num_blocks, cfg.block_size,
                         cfg.enable_prefix_caching, on_event=self.events.record)
        self.tiers = make_tiered_store(cfg, self.runner, self.events, mc, self.tp)
        if self.tiers is not None:
            pool.on_evict = self.tiers.offload
            if self.tp is not None:  # followers repeat the host-tier copies on their shards
                self.tiers.mirror = self.tp.mirror_tier_copy
        self.kv = KVCacheManager(pool, tiers=self.tiers)
        tok_eos = self.tokenizer.eos_token_ids if self.tokenizer else ()
        eos = tuple(dict.fromkeys(mc.eos_token_ids + tok_eos))
        sched_cfg = SchedulerConfig(
            cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len,
            cfg.prefill_saturation_tokens,
            prefill_tokens_while_decoding=cfg.prefill_tokens_while_decoding)
        self.scheduler = Scheduler(sched_cfg, self.kv, eos)
        self.scheduler.decode_lookahead = self.runner.stages_next_decode
        if self.tokenizer is not None:  # structured outputs need the vocabulary's bytes
            self.scheduler.grammars = Grammars(self.tokenizer.tokenizer.to_str(),
                                               mc.vocab_size, eos)
        self.detokenize = detokenize and self.tokenizer is not None
        self.detok: dict[str, IncrementalDetokenizer] = {}
        self.seqs: dict[str, Sequence] = {}
        # Prefill role: finished requests whose blocks wait for the decode side (deadline).
        self.held: dict[str, tuple[Sequence, float]] = {}

    def close(self) -> None:
        """Stops tensor-parallel followers and flushes disk KV writes."""
        if self.tiers is not None:
            self.tiers.before_step()  # under TP: blocks still to gather for disk, while the
            st = self.tiers.stats  # followers are there to answer
            log.info("tiered KV totals: offloaded host %d disk %d; hits host %d disk %d; "
                     "bad disk blocks dropped %d; disk hits skipped %d (slower than "
                     "recompute: disk %s ms/block, prefill %s ms/block); disk writes dropped "
                     "%d (disk behind); offloads skipped %d (host slots all being written); "
                     "disk read-ahead %d blocks: ready %d, waited for %d, late %d, unused %d",
                     st.offloaded_to_host, st.offloaded_to_disk, st.hits["host"],
                     st.hits["disk"], st.dropped_bad_disk_blocks, st.disk_hits_skipped,
                     _ms(self.tiers.disk_s_per_block), _ms(self.kv.recompute_s_per_block),
                     st.disk_writes_dropped, st.offloads_skipped_busy, st.prefetched,
                     st.prefetch_hits, st.prefetch_waits, st.prefetch_late, st.prefetch_unused)
            self.tiers.close()
            self.tiers = None
        if self.tp is not None:
            self.runner.release_graphs()  # before the communicator they captured
            self.tp.close()
            self.tp = None

    @property
    def block_pool(self) -> BlockPool:
        return self.kv.pool

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError naming the field when this worker cannot serve it."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})",
                                      param="prompt")
        if any(t >= vocab for t in params.logit_bias):
            raise InvalidRequestError(f"logit_bias keys must be token ids in [0, {vocab})",
                                      param="logit_bias")
        if params.grammar:
            if self.scheduler.grammars is None:
                raise InvalidRequestError("output constraints need the model's tokenizer, "
                                          "and this worker has none", param="response_format")
            self.scheduler.grammars.validate(params.grammar)
        if n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {n + params.max_tokens} tokens ({n} in the prompt, "
                f"{params.max_tokens} in the completion).", param="max_tokens")
        capacity = self.block_pool.num_blocks * self.cfg.block_size
        if n + params.max_tokens > capacity:
            raise InvalidRequestError(
                f"request needs {n + params.max_tokens} tokens of KV cache but the worker "
                f"holds {capacity} (--kv-blocks {self.block_pool.num_blocks} x --block-size "
                f"{self.cfg.block_size})", param="max_tokens")

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, hold_kv: bool = False,
                    resume: list[int] | None = None,
                    arrival_time: float | None = None) -> Sequence:
        """Queue a request. `hold_kv` (prefill role): keep its blocks after it finishes,
        until `release` or the lease runs out. `resume`: tokens already generated for it
        elsewhere (migration from a dead worker); they count towards max_tokens.
        `arrival_time` (time.monotonic()): when it reached this worker, if before now (its
        queue time counts from there)."""
        if request_id in self.seqs or request_id in self.held:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        self.validate(prompt_token_ids, params)
        seq = Sequence(request_id, list(prompt_token_ids), params, hold_blocks=hold_kv)
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        if resume:
            seq.extend_sampled_elsewhere(resume, [0.0] * len(resume))
        self._track(seq)
        self.scheduler.add(seq)
        return seq

    def _track(self, seq: Sequence) -> None:
        self.seqs[seq.request_id] = seq
        if self.detokenize:
            p = seq.params
            self.detok[seq.request_id] = IncrementalDetokenizer(
                self.tokenizer, p.stop, p.skip_special_tokens, p.include_stop_str_in_output,
                p.min_tokens)

    def prepare_remote(self, request_id: str, prompt_token_ids: list[int],
                       generated: list[int], logprobs: list[float],
                       params: SamplingParams) -> RemoteAdmission | None:
        """Decode role: allocate blocks for a prompt whose KV another worker computed.
        `generated` holds the tokens sampled so far (at least the first). None when the
        pool cannot hold it right now (retry later)."""
        if request_id in self.seqs:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        self.validate(prompt_token_ids, params)
        seq = Sequence(request_id, list(prompt_token_ids), params)
        seq.extend_sampled_elsewhere(generated, logprobs)
        n_prompt = len(prompt_token_ids)
        bs = self.cfg.block_size
        hits = self.kv.find_cached_prefix(seq)[: n_prompt // bs]
        if not self.kv.allocate(seq, n_prompt - len(hits) * bs, hits):
            return None
        seq.num_cached_tokens = len(hits) * bs
        fill = seq.block_table[len(hits) : self.kv.blocks_needed(n_prompt)]
        return RemoteAdmission(seq, len(hits), fill)

    def commit_remote(self, adm: RemoteAdmission, arrival_time: float | None = None) -> None:
        """The pulled KV is in place: the sequence joins the batch to decode.
        `arrival_time`: where its queue time here counts from (default now)."""
        seq = adm.seq
        seq.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.kv.cache_full_blocks(seq)
        self._track(seq)
        self.scheduler.add(seq)

    def cancel_remote(self, adm: RemoteAdmission) -> None:
        self.kv.free(adm.seq)

    def kv_snapshot(self) -> tuple[KVEventBatch | None, list[tuple[int, Tier]], int]:
        """Pending events flushed as a batch, then what the cache holds now and the id of
        the last batch it reflects: a consumer resyncs from (blocks, last id) and applies
        later batches on top."""
        pending = self.events.flush()
        blocks = [(h, Tier.DEVICE) for h in self.block_pool.cached_hashes()]
        if self.tiers is not None:
            blocks += self.tiers.snapshot()
        return pending, blocks, self.events.next_event_id - 1

    def release(self, request_id: str) -> bool:
        """Prefill role: the decode side has the KV (or gave up): free the blocks."""
        entry = self.held.pop(request_id, None)
        if entry is None:
            return False
        self.kv.free(entry[0])
        return True

    def expire_held(self, now: float) -> list[str]:
        """Free blocks whose decode side never came (it died, or the router did)."""
        expired = [rid for rid, (_, deadline) in self.held.items() if deadline <= now]
        for rid in expired:
            self.release(rid)
        return expired

    def abort_request(self, request_id: str) -> None:
        if self.scheduler.abort(request_id) is not None:
            self._forget(request_id)
        self.release(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if self.tiers is not None:
            self.tiers.before_step()  # under TP: blocks leaving for disk, from every rank
        if out.is_empty:
            return []
        # A step launched ahead by the last execute() that this one does not use still
        # runs first on the device: this step's time would include it.
        unmeasured = self.runner.launched_ahead
        t0 = time.perf_counter()
        result = self.runner.execute(out, self.scheduler)
        if not unmeasured:
            self._measure_prefill(out, time.perf_counter() - t0)
        self.scheduler.update(out, result)
        outputs = []
        for item in out.scheduled:
            if item.samples:
                outputs.append(self._output(item.seq))
        return outputs

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """Prefill speed measured on this worker's own steps: the tier store weighs it
        against disk reads; the router, against how long a prompt would queue here."""
        per_block = self.kv.recompute_s_per_block
        return self.cfg.block_size / per_block if per_block else None

    def _measure_prefill(self, out, seconds: float) -> None:
        """Seconds per block of a prefill-sized step (the sampled logits come back to
        the host, so the step has finished on the device when execute returns)."""
        # Prompt chunks only: a decode step of 256+ rows is not prefill speed.
        tokens = sum(item.num_new_tokens for item in out.scheduled if item.num_new_tokens > 1)
        if tokens < 256:
            return
        per_block = seconds / tokens * self.cfg.block_size
        prev = self.kv.recompute_s_per_block
        self.kv.recompute_s_per_block = per_block if prev is None else \
            0.8 * prev + 0.2 * per_block

    def _output(self, seq: Sequence) -> RequestOutput:
        new_id = seq.token_ids[-1]
        new_text = ""
        detok = self.detok.get(seq.request_id)
        if detok is not None:
            new_text = detok.add_token(new_id)
            if detok.stopped:  # a stop string, even on the token that also hit a limit
                if seq.is_finished:
                    seq.finish_reason = "stop"
                else:
                    self.scheduler.finish(seq, "stop")
            elif seq.is_finished:
                new_text += detok.flush()
        n = seq.num_output_tokens
        if seq.is_finished:  # nothing appends any more: hand out plain lists, once
            tokens, lps, tops = seq.output_token_ids, list(seq.logprobs), \
                list(seq.top_logprobs)
        else:  # O(1) snapshots, not O(tokens so far) copies every step
            tokens = PrefixView(seq.token_ids, len(seq.prompt_token_ids), len(seq.token_ids))
            lps = PrefixView(seq.logprobs, 0, n)
            tops = PrefixView(seq.top_logprobs, 0, n) if seq.top_logprobs else []
        out = RequestOutput(
            request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids,
            token_ids=tokens, new_token_ids=[new_id],
            text=detok.text[: detok.emitted] if detok else "", new_text=new_text,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason, num_cached_tokens=max(seq.num_cached_tokens, 0),
            logprobs=lps, top_logprobs=tops)
        if not seq.timing_reported:  # (a step computed it, so the scheduler stamped it)
            seq.timing_reported = True
            started = seq.first_scheduled_time
            out.first_token_at = time.monotonic()
            out.queue_seconds = started - seq.arrival_time
            out.first_token_seconds = out.first_token_at - started
        if seq.params.prompt_logprobs is not None:  # complete before the first token
            out.prompt_logprobs = seq.prompt_logprobs
            out.prompt_top_logprobs = seq.prompt_top_logprobs
        if seq.is_finished:
            self._forget(seq.request_id)
            if seq.hold_blocks and seq.block_table:
                self.held[seq.request_id] = (seq, time.monotonic() + self.kv_lease_seconds)
        return out

    def _forget(self, request_id: str) -> None:
        self.seqs.pop(request_id, None)
        self.detok.pop(request_id, None)
