"""Continuous batching with chunked prefill, vLLM v1 style: there are no phases. Every
step each running request's computed tokens catch up with its tokens, under one
token budget; new requests join while budget and blocks remain; when blocks run out
the newest running request is preempted (its blocks freed, recomputed later).

CPU only and model-free: `schedule()` returns a plain `SchedulerOutput`, and
`update()` applies the sampled tokens, so both are unit-testable without a model.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING

from engine.kv_manager import KVCacheManager
from engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:  # torch-free at import, as unit tests use it
    from engine.structured import Grammars


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    # A step already holding this many prompt tokens admits no new request (0: no limit).
    # Past the size where a step keeps the GPU busy, a second long prompt in the same step
    # adds no throughput and only delays the first one's first token: two 3000-token
    # prompts prefilled together both finish when the second would have alone.
    prefill_saturation_tokens: int = 0
    # A step that carries decode rows takes at most this many prompt tokens (0: only the
    # step budget). A decode row waits for its step, so a long prompt chunk beside it is
    # an inter-token gap for every stream: on a disaggregated decode worker prefilling an
    # overflowed 3000-token prompt in one step, ITL p99 went from 13 ms to 97-169 ms
    # (gpu_disagg_overflow_h200x2.json). A step without decode rows (a prefill worker, an
    # idle replica) still takes the whole budget.
    prefill_tokens_while_decoding: int = 0


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    # True when this chunk brings the sequence level with its tokens: its last row samples.
    samples: bool


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class StepResult:
    """What the model runner produced for the sampling rows, in scheduled order."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        self.config = config
        self.kv = kv
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # lifetime count, for metrics and tests
        # Set by the engine when the runner stages the next decode step while this one runs
        # (decode CUDA graphs): a decoding sequence then also gets, when a block is left
        # free, the block its next token will land in, so the runner knows that token's slot.
        self.decode_lookahead = False
        # Structured outputs' matchers (engine/structured.py), set by an engine whose model
        # has a tokenizer: the model runner asks it for token masks, update() advances it.
        self.grammars: Grammars | None = None

    # Waiting requests, from the head of the queue, whose disk (G3) blocks are read ahead
    # each step (KVCacheManager.prefetch): the ones the next steps will admit.
    PREFETCH_LOOKAHEAD = 8

    def add(self, seq: Sequence) -> None:
        """Queue behind every request of its priority or a more urgent one (a lower value:
        SamplingParams.priority), ahead of less urgent ones; arrival order otherwise."""
        p = seq.params.priority
        if not self.waiting or self.waiting[-1].params.priority <= p:
            self.waiting.append(seq)  # the common case: one priority
        else:
            at = next(i for i, w in enumerate(self.waiting) if w.params.priority > p)
            self.waiting.insert(at, seq)
        self.kv.prefetch((seq,), new_pass=False)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, "abort")
                    return seq
        return None

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        saturation = self.config.prefill_saturation_tokens or budget + 1
        prompt_tokens = 0  # taken by this step (chunks of prompts, not decode rows)
        # Prompt tokens this step may take in all (`prefill_tokens_while_decoding`). A
        # decode row is a sequence with one token left to compute, running or arrived
        # (its KV computed elsewhere) and about to join.
        prompt_limit = budget
        cap = self.config.prefill_tokens_while_decoding
        if cap and (any(s.num_uncomputed_tokens == 1 for s in self.running) or any(
                s.block_table and s.num_uncomputed_tokens == 1 for s in self.waiting)):
            prompt_limit = cap
        # Most urgent first (a stable sort: admission order within a priority, and no
        # change at all with one priority): they get the budget first, and the tail,
        # preempted first for memory, is the least urgent.
        self.running.sort(key=_priority)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if seq.num_uncomputed_tokens > 1:  # a prompt chunk: within what is left for prompts
                n = min(n, prompt_limit - prompt_tokens)
                if n <= 0:
                    i += 1
                    continue
            while not self.kv.allocate(seq, n):
                victim = self.running.pop()  # the least urgent, latest admitted
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n, n == seq.num_uncomputed_tokens))
                budget -= n
                if seq.num_uncomputed_tokens > 1:
                    prompt_tokens += n
                i += 1
        # Admit new work only if nobody was preempted: memory is tight otherwise. Prompts
        # in arrival order; once the step takes no more prompt tokens, requests behind them
        # whose KV has arrived (one token left) still join: their streams need no prefill.
        j = 0
        blocked = False  # a prompt found no blocks: only arrived requests may still join
        while (j < len(self.waiting) and budget > 0 and not out.preempted
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[j]
            arrived = bool(seq.block_table) and seq.num_uncomputed_tokens == 1
            if not arrived and (blocked or (seq.num_uncomputed_tokens > 1 and prompt_tokens
                                            >= min(prompt_limit, saturation))):
                j += 1  # no prompt joins this step: look for arrived requests behind it
                continue
            cached = self.kv.find_cached_prefix(seq) if not seq.block_table else []
            uncomputed = seq.num_uncomputed_tokens - len(cached) * self.kv.block_size
            n = min(uncomputed, budget)
            if uncomputed > 1:
                n = min(n, prompt_limit - prompt_tokens)
            if not self.kv.allocate(seq, n, cached):
                # An arrived request holds its blocks and needs at most one more: it may
                # still fit, and when nothing runs it is what frees memory (a prompt ahead
                # of it, by priority or by a race, would otherwise wait for it forever).
                blocked = True
                j += 1
                continue
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            del self.waiting[j]
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n, n == seq.num_uncomputed_tokens))
            budget -= n
            if uncomputed > 1:
                prompt_tokens += n
        if self.decode_lookahead:
            # Last, from what scheduling and admission left free: a lookahead block never
            # costs a preemption or an admission (allocate changes nothing when it fails).
            for item in out.scheduled:
                if item.num_new_tokens == 1 and item.samples:
                    self.kv.allocate(item.seq, 2)
        self.kv.prefetch(islice(self.waiting, self.PREFETCH_LOOKAHEAD))
        return out

    def update(self, out: SchedulerOutput, result: StepResult) -> list[Sequence]:
        """Advance computed counters, append sampled tokens, finish what is done."""
        finished = []
        row = 0
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            self.kv.cache_full_blocks(seq)
            if not item.samples:
                continue
            top = result.top_logprobs[row] if result.top_logprobs is not None else None
            token = result.token_ids[row]
            seq.append_token(token, result.logprobs[row], top)
            row += 1
            reason = self.check_stop(seq)
            if seq.params.grammar and self.grammars is not None:
                state = self.grammars.advance(seq, token)
                if state == "complete" and reason in (None, "length"):
                    reason = "stop"  # nothing else may follow, whatever the length limit
                elif state is not None and state != "complete":
                    reason = state  # GRAMMAR_ERROR: the worker fails the call
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def decode_continues(self, out: SchedulerOutput) -> bool:
        """Whether the next step will be this decode step's rows, one token further,
        unless one of them samples a stop token or is aborted: nothing waits to join and
        no row reaches a length limit with this step's token (update() has not run yet).
        The model runner launches that next step before the host sees this one's tokens."""
        if self.waiting:
            return False
        limit = self.config.max_model_len
        for item in out.scheduled:
            seq = item.seq
            if item.num_new_tokens != 1 or not item.samples:
                return False
            if seq.params.grammar:  # its next mask depends on this step's token
                return False
            if (seq.num_output_tokens + 1 >= seq.params.max_tokens
                    or seq.num_tokens + 1 >= limit):
                return False
        # The next step sorts its rows by priority: a row admitted this step behind a less
        # urgent one would move, and the step staged from this one's order would not match.
        priorities = [item.seq.params.priority for item in out.scheduled]
        return priorities == sorted(priorities)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish a running sequence for a reason found outside (a stop string)."""
        if seq in self.running:
            self.running.remove(seq)
            self._finish(seq, reason)

    def check_stop(self, seq: Sequence) -> str | None:
        p = seq.params
        token = seq.token_ids[-1]
        if seq.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop"
            if token in p.stop_token_ids:
                return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def banned_tokens(self, seq: Sequence) -> tuple[int, ...]:
        """Tokens that may not be sampled yet: EOS and stop tokens below min_tokens (not
        under a grammar: where it allows only the end, banning it left nothing to sample;
        the grammar decides where the reply ends)."""
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens or p.grammar:
            return ()
        eos = () if p.ignore_eos else tuple(self.eos_token_ids)
        return eos + tuple(p.stop_token_ids)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        # back at the head of its priority: it arrived before everything waiting there
        p = seq.params.priority
        at = next((i for i, w in enumerate(self.waiting) if w.params.priority >= p),
                  len(self.waiting))
        self.waiting.insert(at, seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.block_table and not (seq.hold_blocks and reason != "abort"):
            self.kv.free(seq)


def _priority(seq: Sequence) -> int:
    return seq.params.priority
