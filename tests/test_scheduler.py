"""Scheduler + KVCacheManager + BlockPool without a model: a fake "model" returns sampled
tokens through `StepResult` and records which token each KV slot holds. Every step checks
the token budget, that the KV a request reads is its own, the pool's integrity, and that
each block's ref count equals the number of block tables holding it."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import pytest

from engine.kv_manager import KVCacheManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, StepResult
from engine.sequence import Sequence, SequenceStatus
from kvtransfer.block_pool import BlockPool

BS = 4
EOS = 2
STOP_ID = 3


def next_token(seq: Sequence) -> int:
    """A deterministic stand-in for a model: the next token is a function of the tokens so
    far, never EOS or STOP_ID, so a recomputed request continues exactly as before."""
    return (31 * sum(seq.token_ids) + 7 * seq.num_tokens) % 90 + 10


class Harness:
    def __init__(self, num_blocks: int = 64, budget: int = 64, max_seqs: int = 16,
                 max_model_len: int = 4096, caching: bool = True,
                 lookahead: bool = False, saturation: int = 0,
                 while_decoding: int = 0) -> None:
        self.pool = BlockPool(num_blocks, BS, caching)
        self.kv = KVCacheManager(self.pool)
        self.config = SchedulerConfig(max_seqs, budget, max_model_len, saturation,
                                      prefill_tokens_while_decoding=while_decoding)
        self.sched = Scheduler(self.config, self.kv, eos_token_ids=(EOS,))
        self.sched.decode_lookahead = lookahead
        self.outputs: list[SchedulerOutput] = []
        self.continues: list[bool] = []
        self.finished: list[Sequence] = []
        # What a real model would have written: the token at each slot of each block.
        self.kv_slots: dict[tuple[int, int], int] = {}

    def add(self, rid: str, prompt: list[int], **params) -> Sequence:
        params.setdefault("ignore_eos", True)
        seq = Sequence(rid, prompt, SamplingParams(**params))
        self.sched.add(seq)
        return seq

    def step(self, model: Callable[[Sequence], int] = next_token) -> SchedulerOutput:
        out = self.sched.schedule()
        assert out.num_tokens <= self.config.max_num_batched_tokens
        assert all(item.num_new_tokens >= 1 for item in out.scheduled)
        assert len(self.sched.running) <= self.config.max_num_seqs
        rows = [item.seq for item in out.scheduled if item.samples]
        for item in out.scheduled:
            seq = item.seq
            assert seq.status is SequenceStatus.RUNNING
            # The blocks cover every token that will have KV after this step.
            assert len(seq.block_table) * BS >= seq.num_computed_tokens + item.num_new_tokens
            assert item.samples == (seq.num_computed_tokens + item.num_new_tokens
                                    == seq.num_tokens)
            # KV read by this step (cached prefix, earlier chunks) holds this request's tokens:
            # a prefix hit or a revived block never serves another prompt's KV.
            for pos in range(seq.num_computed_tokens):
                slot = (seq.block_table[pos // BS], pos % BS)
                assert self.kv_slots.get(slot) == seq.token_ids[pos], (seq.request_id, pos)
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens
                             + item.num_new_tokens):
                self.kv_slots[(seq.block_table[pos // BS], pos % BS)] = seq.token_ids[pos]
        result = StepResult([model(s) for s in rows], [-1.0] * len(rows))
        # What the model runner asks before the host has this step's tokens.
        self.continues.append(self.sched.decode_continues(out))
        self.finished += self.sched.update(out, result)
        self.outputs.append(out)
        self.check()
        return out

    def check(self) -> None:
        self.pool.check_integrity()
        holders = self.sched.running + self.finished  # finished: held blocks (prefill role)
        refs = Counter(b for seq in holders for b in seq.block_table)
        assert all(self.pool.blocks[b].ref_count == refs[b] for b in range(self.pool.num_blocks))
        assert all(not seq.block_table for seq in self.sched.waiting)

    def run(self, max_steps: int = 10_000, model: Callable[[Sequence], int] = next_token
            ) -> None:
        for _ in range(max_steps):
            if not self.sched.num_unfinished:
                return
            self.step(model)
        raise AssertionError("did not finish")


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 100) for _ in range(n)]


def test_token_budget_respected_every_step() -> None:
    h = Harness(num_blocks=256, budget=24)
    lengths = [1, 5, 23, 24, 25, 60, 3, 100]
    seqs = [h.add(str(i), prompt(n, i), max_tokens=5) for i, n in enumerate(lengths)]
    h.run()
    assert max(out.num_tokens for out in h.outputs) == 24  # the budget is used, not exceeded
    assert all(s.finish_reason == "length" and s.num_output_tokens == 5 for s in seqs)
    # Work done = every prompt token plus every generated token but the last.
    total = sum(out.num_tokens for out in h.outputs)
    assert total == sum(lengths) + sum(4 for _ in lengths)
    assert h.pool.num_used == 0


def test_chunked_prefill_splits_a_long_prompt() -> None:
    h = Harness(budget=16)
    seq = h.add("a", prompt(50), max_tokens=3)
    chunks = [(item.num_new_tokens, item.samples) for out in [h.step() for _ in range(4)]
              for item in out.scheduled]
    assert chunks == [(16, False), (16, False), (16, False), (2, True)]
    assert seq.num_output_tokens == 1 and seq.num_computed_tokens == 50
    # Then one token per step.
    assert [(i.num_new_tokens, i.samples) for i in h.step().scheduled] == [(1, True)]
    h.run()
    assert seq.output_token_ids == expected_outputs(prompt(50), 3)


def expected_outputs(prompt_ids: list[int], n: int) -> list[int]:
    seq = Sequence("ref", prompt_ids, SamplingParams(max_tokens=n))
    for _ in range(n):
        seq.token_ids.append(next_token(seq))
    return seq.output_token_ids


def test_new_requests_join_while_others_decode() -> None:
    h = Harness(budget=32)
    a = h.add("a", prompt(10, 1), max_tokens=10)
    h.step()
    h.step()
    assert a.num_output_tokens == 2
    b = h.add("b", prompt(40, 2), max_tokens=4)
    out = h.step()
    # a keeps decoding; b takes the rest of the budget for its first chunk.
    assert [(i.seq.request_id, i.num_new_tokens, i.samples) for i in out.scheduled] == [
        ("a", 1, True), ("b", 31, False)]
    out = h.step()
    assert [(i.seq.request_id, i.num_new_tokens, i.samples) for i in out.scheduled] == [
        ("a", 1, True), ("b", 9, True)]
    h.run()
    assert a.output_token_ids == expected_outputs(prompt(10, 1), 10)
    assert b.output_token_ids == expected_outputs(prompt(40, 2), 4)
    assert h.pool.num_used == 0


def test_prefix_cache_hit_sets_num_cached_tokens() -> None:
    h = Harness()
    base = prompt(40, 3)
    a = h.add("a", base, max_tokens=2)
    h.run()
    assert a.num_cached_tokens == 0
    # A shared 32-token prefix (8 blocks) and a divergent tail.
    b = h.add("b", base[:32] + prompt(7, 4), max_tokens=2)
    out = h.step()
    assert b.num_cached_tokens == 32
    assert out.scheduled[0].num_new_tokens == 7
    # The same prompt again: every block is cached, but the last token is still computed
    # (its logits give the first output token), so one block less is a hit.
    c = h.add("c", list(base), max_tokens=2)
    out = h.step()
    assert c.num_cached_tokens == 36
    assert [(i.seq.request_id, i.num_new_tokens, i.samples) for i in out.scheduled] == [
        ("b", 1, True), ("c", 4, True)]
    # A prompt of exactly one cached block hits nothing: its only token must be computed.
    d = h.add("d", base[:1], max_tokens=1)
    h.run()
    assert d.num_cached_tokens == 0
    assert c.output_token_ids == a.output_token_ids
    assert h.pool.num_used == 0


def test_prefix_shared_between_running_requests() -> None:
    h = Harness(budget=64)
    base = prompt(33, 5)
    a = h.add("a", base, max_tokens=20)
    h.step()  # a's 8 full blocks are published as soon as they are computed
    b = h.add("b", list(base), max_tokens=20)
    h.step()
    assert b.num_cached_tokens == 32
    shared = a.block_table[:8]
    assert b.block_table[:8] == shared
    assert all(h.pool.blocks[blk].ref_count == 2 for blk in shared)
    assert a.block_table[8] != b.block_table[8]  # the partial block is private
    h.run()
    assert a.output_token_ids == b.output_token_ids
    assert h.pool.num_used == 0


def test_no_prefix_hits_when_caching_disabled() -> None:
    h = Harness(caching=False)
    base = prompt(20, 6)
    h.add("a", base, max_tokens=1)
    h.run()
    b = h.add("b", list(base), max_tokens=1)
    h.run()
    assert b.num_cached_tokens == 0 and h.pool.num_cached == 0


def test_preemption_when_blocks_run_out() -> None:
    # 10 blocks = 40 tokens; three requests growing to 20 tokens each cannot all fit.
    h = Harness(num_blocks=10, budget=64)
    prompts = [prompt(8, 10 + i) for i in range(3)]
    seqs = [h.add(str(i), p, max_tokens=12) for i, p in enumerate(prompts)]
    preempt_steps = []
    while h.sched.num_unfinished:
        running_before = list(h.sched.running)
        out = h.step()
        if out.preempted:
            preempt_steps.append(out)
            # The newest running request goes first.
            assert out.preempted[0] is running_before[-1]
            for victim in out.preempted:
                assert victim.status is SequenceStatus.WAITING and not victim.block_table
                assert victim.num_computed_tokens == 0
                assert h.sched.waiting[0] is out.preempted[-1]
            assert not any(i.seq in out.preempted for i in out.scheduled)
    assert preempt_steps and h.sched.num_preemptions == sum(s.num_preemptions for s in seqs)
    assert h.sched.num_preemptions > 0
    # Recomputed requests continue exactly where they were.
    for seq, p in zip(seqs, prompts):
        assert seq.finish_reason == "length"
        assert seq.output_token_ids == expected_outputs(p, 12)
        assert len(seq.logprobs) == 12
    assert h.pool.num_used == 0


def test_preempted_request_is_recomputed_from_its_tokens() -> None:
    h = Harness(num_blocks=8, budget=64, caching=False)
    a = h.add("a", prompt(12, 20), max_tokens=16)
    b = h.add("b", prompt(12, 21), max_tokens=16)
    while not b.num_preemptions:
        h.step()
    assert b.status is SequenceStatus.WAITING
    generated = b.num_output_tokens
    assert generated > 0
    while b.status is SequenceStatus.WAITING:
        h.step()
    # Readmitted: prompt + everything generated so far is prefilled again, in one chunk.
    first = next(i for i in h.outputs[-1].scheduled if i.seq is b)
    assert first.num_new_tokens == 12 + generated
    assert b.num_output_tokens == generated + 1
    h.run()
    assert a.output_token_ids == expected_outputs(prompt(12, 20), 16)
    assert b.output_token_ids == expected_outputs(prompt(12, 21), 16)
    assert h.pool.num_used == 0


def test_max_num_seqs() -> None:
    h = Harness(max_seqs=2)
    seqs = [h.add(str(i), prompt(5, i), max_tokens=3 + i) for i in range(5)]
    h.step()
    assert [s.request_id for s in h.sched.running] == ["0", "1"]
    assert len(h.sched.waiting) == 3
    h.run()
    assert all(s.finish_reason == "length" for s in seqs)
    assert max(len(out.scheduled) for out in h.outputs) == 2


def test_stop_at_max_tokens() -> None:
    h = Harness()
    seq = h.add("a", prompt(5), max_tokens=4)
    h.run()
    assert (seq.finish_reason, seq.num_output_tokens) == ("length", 4)
    assert seq.is_finished and h.finished == [seq]


def eos_model(seq: Sequence) -> int:
    return EOS if seq.num_output_tokens == 2 else next_token(seq)


def test_stop_at_eos() -> None:
    h = Harness()
    seq = h.add("a", prompt(5), max_tokens=10, ignore_eos=False)
    h.run(model=eos_model)
    assert seq.finish_reason == "stop"
    assert seq.num_output_tokens == 3 and seq.output_token_ids[-1] == EOS


def test_ignore_eos_runs_to_max_tokens() -> None:
    h = Harness()
    seq = h.add("a", prompt(5), max_tokens=6, ignore_eos=True)
    h.run(model=eos_model)
    assert seq.finish_reason == "length" and seq.num_output_tokens == 6
    assert EOS in seq.output_token_ids
    assert h.sched.banned_tokens(seq) == ()


def test_stop_token_ids() -> None:
    h = Harness()
    seq = h.add("a", prompt(5), max_tokens=10, stop_token_ids=[STOP_ID])
    h.run(model=lambda s: STOP_ID if s.num_output_tokens == 4 else next_token(s))
    assert seq.finish_reason == "stop" and seq.num_output_tokens == 5
    assert seq.output_token_ids[-1] == STOP_ID


def test_min_tokens_bans_eos_and_stop_ids() -> None:
    h = Harness()
    seq = h.add("a", prompt(5), max_tokens=10, min_tokens=3, ignore_eos=False,
                stop_token_ids=[STOP_ID])
    banned_seen = []

    def greedy_eos(s: Sequence) -> int:
        """Prefers EOS whenever the sampler would allow it."""
        banned = h.sched.banned_tokens(s)
        banned_seen.append(banned)
        return next_token(s) if EOS in banned else EOS

    h.run(model=greedy_eos)
    assert [set(b) for b in banned_seen] == [{EOS, STOP_ID}] * 3 + [set()]
    assert seq.num_output_tokens == 4 and seq.output_token_ids[-1] == EOS
    assert seq.finish_reason == "stop"


def test_eos_below_min_tokens_does_not_stop() -> None:
    # Should a sampler ignore the ban, EOS below min_tokens is just a token.
    h = Harness()
    seq = h.add("a", prompt(5), max_tokens=10, min_tokens=3, ignore_eos=False)
    h.run(model=lambda s: EOS)
    assert seq.output_token_ids == [EOS] * 3 and seq.finish_reason == "stop"


def test_min_tokens_with_ignore_eos_bans_only_stop_ids() -> None:
    h = Harness()
    seq = h.add("a", prompt(5), max_tokens=4, min_tokens=2, ignore_eos=True,
                stop_token_ids=[STOP_ID])
    assert h.sched.banned_tokens(seq) == (STOP_ID,)


def test_stop_at_max_model_len() -> None:
    h = Harness(max_model_len=20)
    seq = h.add("a", prompt(15), max_tokens=100)
    h.run()
    assert seq.finish_reason == "length"
    assert seq.num_tokens == 20 and seq.num_output_tokens == 5


@pytest.mark.parametrize("where", ["running", "mid-prefill", "waiting"])
def test_abort_frees_blocks(where: str) -> None:
    h = Harness(budget=8, max_seqs=1)
    a = h.add("a", prompt(20), max_tokens=10)
    b = h.add("b", prompt(6), max_tokens=10)
    h.step()
    if where == "running":
        for _ in range(3):
            h.step()
        assert a.num_output_tokens > 0
    target = b if where == "waiting" else a
    assert h.sched.abort(target.request_id) is target
    h.check()
    assert target.finish_reason == "abort" and target.is_finished
    assert not target.block_table
    assert h.sched.abort(target.request_id) is None
    assert h.sched.abort("nope") is None
    h.run()
    assert h.pool.num_used == 0
    other = a if target is b else b
    assert other.finish_reason == "length"


def test_hold_blocks_keeps_kv_after_finishing() -> None:
    """Prefill role: a finished request keeps its blocks until the decode side pulls them."""
    h = Harness()
    seq = h.add("a", prompt(9), max_tokens=1)
    seq.hold_blocks = True
    h.run()
    assert seq.finish_reason == "length" and len(seq.block_table) == 3
    assert h.pool.num_used == 3
    h.kv.free(seq)
    h.pool.check_integrity()
    assert h.pool.num_used == 0


def test_decode_lookahead_takes_only_free_blocks() -> None:
    """With lookahead (the GPU runner stages the next decode step), a decoding sequence
    also holds the block of its next token when one is left free; with none free nothing
    changes, nobody is preempted for it and waiting requests are not displaced."""
    h = Harness(num_blocks=2, budget=64, lookahead=True)
    a = h.add("a", prompt(3, 1), max_tokens=20)
    h.step()  # prefill: 3 tokens in block 0
    out = h.step()  # decodes position 3 (the end of block 0); position 4 needs block 1
    assert len(a.block_table) == 2 and h.pool.num_free == 0 and not out.preempted
    b = h.add("b", prompt(2, 2), max_tokens=4)
    for pos in (4, 5, 6, 7):  # block 1; at 7 the next token would need a third block
        out = h.step()
        assert [i.seq for i in out.scheduled] == [a] and not out.preempted
        assert a.num_computed_tokens == pos + 1 and len(a.block_table) == 2
    assert b.status is SequenceStatus.WAITING


@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 3, 5, 6, 7])
def test_random_workload_under_pressure(seed: int, lookahead: bool) -> None:
    """Random arrivals, budgets and a tight pool; prompts drawn from three shared prefixes.
    Everything finishes with the tokens of an unconstrained run, the fake KV is right at
    every step, and no block leaks, with and without decode lookahead blocks. (These seeds
    are ones that preempt and hit the cache.)"""
    rng = random.Random(seed)
    h = Harness(num_blocks=rng.randint(10, 16), budget=rng.randint(4, 40),
                max_seqs=rng.randint(2, 8), lookahead=lookahead)
    families = [prompt(24, 1000 * seed + f) for f in range(3)]
    specs = [(rng.choice(families)[: rng.randint(0, 24)] + prompt(rng.randint(1, 8), i),
              rng.randint(1, 10)) for i in range(16)]
    arrivals = sorted(rng.randint(0, 30) for _ in specs)
    seqs: list[Sequence] = []
    step = 0
    while len(seqs) < len(specs) or h.sched.num_unfinished:
        while len(seqs) < len(specs) and arrivals[len(seqs)] <= step:
            p, m = specs[len(seqs)]
            seqs.append(h.add(str(len(seqs)), p, max_tokens=m))
        h.step()
        step += 1
        assert step < 2000, "no progress"
    for seq, (p, m) in zip(seqs, specs):
        assert seq.finish_reason == "length"
        assert seq.output_token_ids == expected_outputs(p, m)
    assert h.sched.num_preemptions > 0
    assert any(seq.num_cached_tokens > 0 for seq in seqs)
    assert h.pool.num_used == 0


def test_decode_continues_predicts_the_next_step() -> None:
    """Whenever a step says the next one continues its rows (the runner then launches that
    step before the host has this one's tokens), the next step is exactly those rows, one
    token each; it says so neither for a prefill step, nor while a request waits, nor for a
    step in which a row reaches max_tokens or max_model_len."""
    h = Harness(max_model_len=40, max_seqs=2)
    h.add("a", prompt(5), max_tokens=6)
    h.add("b", prompt(30, seed=1), max_tokens=50)  # stopped by max_model_len at 40
    h.add("c", prompt(7, seed=2), max_tokens=20)  # waits for a free row, outlives "b"
    h.run()
    rows = [[(item.seq, item.num_new_tokens) for item in out.scheduled] for out in h.outputs]
    for i, says in enumerate(h.continues[:-1]):
        if says:
            assert rows[i + 1] == [(seq, 1) for seq, _ in rows[i]], i
    # Step 0 prefills; "c" waits until "a" finishes; "a" and "b" hit their limits.
    assert not h.continues[0]
    steps_with_c_waiting = [i for i, out in enumerate(h.outputs)
                            if all(item.seq.request_id != "c" for item in out.scheduled)]
    assert not any(h.continues[i] for i in steps_with_c_waiting)
    assert any(h.continues)
    # The step in which a request reaches its length limit says no.
    last_step = {item.seq.request_id: i for i, out in enumerate(h.outputs)
                 for item in out.scheduled}
    assert {seq.request_id: seq.finish_reason for seq in h.finished} == \
        {"a": "length", "b": "length", "c": "length"}
    assert not any(h.continues[i] for i in last_step.values())


def test_a_saturated_step_admits_no_second_long_prompt() -> None:
    """--prefill-saturation-tokens: once a step holds that many prompt tokens, the next
    prompt waits for the following step, so the first one's first token is not held back
    by the second's prefill; short prompts still share a step, and decode rows are not
    prompt tokens."""
    def first_steps(saturation: int) -> list[list[tuple[str, int]]]:
        h = Harness(num_blocks=256, budget=100, saturation=saturation)
        h.add("long", prompt(40, 1), max_tokens=3)
        h.add("next", prompt(40, 2), max_tokens=3)
        h.add("short", prompt(6, 3), max_tokens=3)
        h.run()
        return [[(i.seq.request_id, i.num_new_tokens) for i in out.scheduled]
                for out in h.outputs[:3]]

    assert first_steps(0)[0] == [("long", 40), ("next", 40), ("short", 6)]
    steps = first_steps(32)
    assert steps[0] == [("long", 40)]  # "long" samples its first token a step sooner
    assert steps[1] == [("long", 1), ("next", 40)]
    assert steps[2] == [("long", 1), ("next", 1), ("short", 6)]
    # Below the limit prompts still share a step: 6 + 6 + 6 < 32.
    h = Harness(num_blocks=256, budget=100, saturation=32)
    for i in range(3):
        h.add(str(i), prompt(6, i), max_tokens=2)
    assert [i.num_new_tokens for i in h.step().scheduled] == [6, 6, 6]


def test_a_step_with_decode_rows_takes_a_bounded_prompt_chunk() -> None:
    """--prefill-tokens-while-decoding: beside decode rows a long prompt goes in chunks of
    at most N tokens (the streams wait for one chunk at a time, not the whole budget);
    with no decode row in the step it takes the whole budget; decode rows themselves are
    never held back; every token still comes out as without the limit."""
    def run(while_decoding: int) -> tuple[list[list[tuple[str, int]]], dict[str, list[int]]]:
        h = Harness(num_blocks=256, budget=100, while_decoding=while_decoding)
        h.add("a", prompt(6, 1), max_tokens=12)
        h.add("b", prompt(6, 2), max_tokens=12)
        h.step()  # both prompts, no decode row yet: one step
        h.add("long", prompt(70, 3), max_tokens=3)
        h.run()
        steps = [[(i.seq.request_id, i.num_new_tokens) for i in out.scheduled]
                 for out in h.outputs]
        return steps, {s.request_id: s.output_token_ids for s in h.finished}

    plain, plain_tokens = run(0)
    assert plain[1] == [("a", 1), ("b", 1), ("long", 70)]
    steps, tokens = run(16)
    assert steps[0] == [("a", 6), ("b", 6)]
    # 70 prompt tokens beside two decode rows: 16 at a time, the rows in every step
    assert [n for step in steps[1:6] for rid, n in step if rid == "long"] == [16] * 4 + [6]
    assert all(("a", 1) in step and ("b", 1) in step for step in steps[1:6])
    assert tokens == plain_tokens

    # Alone (no decode row) a prompt takes the whole budget even with the limit set.
    h = Harness(num_blocks=256, budget=100, while_decoding=16)
    h.add("alone", prompt(70, 4), max_tokens=2)
    assert [i.num_new_tokens for i in h.step().scheduled] == [70]


def _arrived(h: Harness, rid: str, prompt_ids: list[int], first_token: int) -> Sequence:
    """A request whose prompt KV another worker computed (llm_engine.prepare_remote and
    commit_remote): blocks held, prompt computed, its first token sampled elsewhere."""
    seq = Sequence(rid, prompt_ids, SamplingParams(max_tokens=4, ignore_eos=True))
    seq.extend_sampled_elsewhere([first_token], [0.0])
    assert h.kv.allocate(seq, len(prompt_ids))
    seq.num_computed_tokens = len(prompt_ids)
    for pos, token in enumerate(prompt_ids):  # what the pull wrote
        h.kv_slots[(seq.block_table[pos // BS], pos % BS)] = token
    h.sched.add(seq)
    return seq


def test_arrived_requests_join_past_prompts_the_step_cannot_take() -> None:
    """With the prompt allowance spent, a request whose KV arrived (one token left) still
    joins the step, past prompts queued before it; and it turns the limit on by itself."""
    h = Harness(num_blocks=256, budget=100, while_decoding=16)
    h.add("a", prompt(6, 1), max_tokens=20)
    h.step()
    h.add("long", prompt(70, 3), max_tokens=3)
    h.add("long2", prompt(70, 4), max_tokens=3)
    _arrived(h, "kv", prompt(20, 5), 11)
    step = [(i.seq.request_id, i.num_new_tokens) for i in h.step().scheduled]
    assert step == [("a", 1), ("long", 16), ("kv", 1)]
    # Alone with a prompt, an arrived request still makes it a decoding step.
    h = Harness(num_blocks=256, budget=100, while_decoding=16)
    h.add("long", prompt(70, 3), max_tokens=3)
    _arrived(h, "kv", prompt(20, 5), 11)
    assert [(i.seq.request_id, i.num_new_tokens) for i in h.step().scheduled] == [
        ("long", 16), ("kv", 1)]


def test_the_limit_holds_to_the_token() -> None:
    """A step never takes more prompt tokens than the limit, even when one token of
    budget is left (randomized arrivals, limits below and above the chunk sizes)."""
    for seed in range(40):
        r = random.Random(seed)
        limit = r.choice([1, 2, 3, 5, 8, 17])
        h = Harness(num_blocks=512, budget=r.choice([9, 24, 64]), while_decoding=limit)
        for k in range(6):
            h.add(f"r{k}", prompt(r.randint(2, 60), 100 * seed + k), max_tokens=r.randint(1, 6))
        while h.sched.num_unfinished:
            out = h.step()
            decoding = any(i.num_new_tokens == 1 and i.seq.num_output_tokens > 1
                           for i in out.scheduled)
            prompt_tokens = sum(i.num_new_tokens for i in out.scheduled
                                if i.seq.num_output_tokens == 0 or not i.samples)
            if decoding:
                assert prompt_tokens <= limit, (seed, limit, out.scheduled)


def test_priority_orders_admission_and_preemption() -> None:
    """A lower priority value is more urgent: waiting requests are admitted most urgent
    first (arrival order within a priority), and memory is taken back from the least
    urgent running request, not the latest admitted; outputs stay exact."""
    h = Harness(num_blocks=64, max_seqs=1)
    low = h.add("low", prompt(8, 1), max_tokens=4, priority=5)
    first = h.add("first", prompt(8, 2), max_tokens=4)
    second = h.add("second", prompt(8, 3), max_tokens=4)
    urgent = h.add("urgent", prompt(8, 4), max_tokens=4, priority=-1)
    assert [s.request_id for s in h.sched.waiting] == ["urgent", "first", "second", "low"]
    order = []
    while h.sched.num_unfinished:
        out = h.step()
        order += [i.seq.request_id for i in out.scheduled if i.seq.request_id not in order]
    assert order == ["urgent", "first", "second", "low"]
    for seq, seed in ((low, 1), (first, 2), (second, 3), (urgent, 4)):
        assert seq.output_token_ids == expected_outputs(prompt(8, seed), 4)
    # 10 blocks: the background request runs first; an urgent one admitted after it keeps
    # its memory when the two no longer fit, and the background one is preempted.
    h = Harness(num_blocks=10, budget=64)
    background = h.add("bg", prompt(8, 5), max_tokens=16, priority=3)
    h.step()
    urgent = h.add("urgent", prompt(8, 6), max_tokens=16)
    victims = []
    while h.sched.num_unfinished:
        victims += h.step().preempted
    assert victims and all(v is background for v in victims)
    assert urgent.num_preemptions == 0
    assert background.output_token_ids == expected_outputs(prompt(8, 5), 16)
    assert urgent.output_token_ids == expected_outputs(prompt(8, 6), 16)
