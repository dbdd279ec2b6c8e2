"""The prefill -> decode handoff at engine level (no processes): a prefill engine holds a
request's blocks, a decode engine admits it remotely, the blocks are copied across with
the coalesced runs a transfer backend would use, and decoding continues to the same
tokens as one aggregated engine. Held blocks are freed on release or lease expiry."""

from __future__ import annotations

import dataclasses
import time

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kvtransfer.transfer import coalesce


def run_to_end(engine: LLMEngine) -> dict:
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


@pytest.fixture(scope="module", params=["tiny-qwen3", "tiny-llama-untied"])
def model(checkpoint_dir, request):
    # The untied head's outputs depend on the whole context; a tied tiny model mostly
    # echoes its last input token, so wrong KV could still give the same tokens.
    return str(checkpoint_dir(request.param))


def make(model: str, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model, num_kv_blocks=256, **kw), detokenize=False)


@pytest.mark.parametrize("decode_has_prefix", [False, True])
def test_handoff_matches_aggregated(model, decode_has_prefix):
    prompt = [(i * 37) % 1000 + 3 for i in range(150)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=0)
    agg = make(model)
    agg.add_request("a", prompt, params)
    ref = run_to_end(agg)["a"]
    expected = ref.token_ids

    prefill, decode = make(model), make(model)
    if decode_has_prefix:  # the decode worker already caches the first 64 tokens
        decode.add_request("warm", [*prompt[:64], 7], dataclasses.replace(params, max_tokens=1))
        run_to_end(decode)
    first_only = dataclasses.replace(params, max_tokens=1)
    prefill.add_request("r", prompt, first_only, hold_kv=True)
    first = run_to_end(prefill)["r"]
    held_seq, _ = prefill.held["r"]
    src_blocks = list(held_seq.block_table)
    assert prefill.block_pool.num_used == len(src_blocks)

    adm = decode.prepare_remote("r", prompt, first.token_ids, first.logprobs, params)
    assert adm is not None
    assert adm.num_local_hit_blocks == (4 if decode_has_prefix else 0)
    src = src_blocks[adm.num_local_hit_blocks:]
    for run in coalesce(src, adm.fill_block_ids):  # what a transfer backend moves
        decode.runner.kv_cache[run.dst_start : run.dst_start + run.count] = \
            prefill.runner.kv_cache[run.src_start : run.src_start + run.count]
    assert prefill.release("r") and prefill.block_pool.num_used == 0
    decode.commit_remote(adm)
    out = run_to_end(decode)["r"]
    assert out.token_ids == expected
    assert max(abs(a - b) for a, b in zip(out.logprobs[1:], ref.logprobs[1:])) < 1e-5
    assert out.num_cached_tokens == (64 if decode_has_prefix else 0)
    decode.block_pool.check_integrity()
    assert decode.block_pool.num_used == 0


def test_held_blocks_expire_without_a_decode_side(model):
    prefill = LLMEngine(EngineConfig(model=model, num_kv_blocks=64), detokenize=False,
                        kv_lease_seconds=0.05)
    prefill.add_request("r", list(range(3, 40)),
                        SamplingParams(max_tokens=1, temperature=0.0), hold_kv=True)
    run_to_end(prefill)
    assert prefill.block_pool.num_used == 3
    assert prefill.expire_held(time.monotonic()) == []
    assert prefill.expire_held(time.monotonic() + 1.0) == ["r"]
    assert prefill.block_pool.num_used == 0 and not prefill.held


def test_resume_continues_where_another_worker_stopped(model):
    prompt = list(range(5, 60))
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=1234, ignore_eos=True)
    one = make(model)
    one.add_request("a", prompt, params)
    full = run_to_end(one)["a"].token_ids
    other = make(model)  # a fresh worker picks up after 6 tokens, as migration does
    other.add_request("b", prompt, params, resume=full[:6])
    assert run_to_end(other)["b"].token_ids == full


def test_an_arrived_request_joins_past_a_prompt_that_finds_no_blocks(model):
    """On a decode worker, a request whose KV arrived holds its blocks; a more urgent
    local prompt (an overflow prefill, priority 0) queued ahead of it that cannot get
    blocks must not keep it waiting: with nothing running, nothing else would ever free
    memory (both stalled forever before). Both finish."""
    engine = LLMEngine(EngineConfig(model=model, num_kv_blocks=16), detokenize=False)
    kv_prompt = [(7 * i) % 900 + 5 for i in range(160)]  # 10 of 16 blocks
    adm = engine.prepare_remote("kv", kv_prompt, [42], [0.0], SamplingParams(
        max_tokens=8, ignore_eos=True, priority=5))
    engine.commit_remote(adm)
    engine.add_request("local", [(3 * i) % 900 + 5 for i in range(120)],  # 8 blocks
                       SamplingParams(max_tokens=8, ignore_eos=True))
    assert [s.request_id for s in engine.scheduler.waiting] == ["local", "kv"]
    done = {}
    for _ in range(200):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.finish_reason
        if not engine.has_unfinished():
            break
    assert done == {"kv": "length", "local": "length"}
    engine.block_pool.check_integrity()
    assert engine.block_pool.num_used == 0


def test_a_step_whose_rows_a_priority_sort_would_move_is_not_launched_ahead(model):
    """decode_continues (the runner launches the next step before reading this one's
    tokens) is false when the next step's priority order will differ from this one's
    rows: an urgent arrived request admitted behind a background one."""
    engine = make(model)
    engine.add_request("bg", [5, 6, 7, 8], SamplingParams(max_tokens=16, ignore_eos=True,
                                                          priority=3))
    engine.step()
    adm = engine.prepare_remote("kv", [9, 10, 11, 12], [42], [0.0], SamplingParams(
        max_tokens=16, ignore_eos=True))
    engine.commit_remote(adm)
    out = engine.scheduler.schedule()
    assert [i.seq.request_id for i in out.scheduled] == ["bg", "kv"]
    assert not engine.scheduler.decode_continues(out)
