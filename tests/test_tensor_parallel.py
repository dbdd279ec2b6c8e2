"""Tensor parallelism across real processes (gloo on CPU): a TP=2 engine produces the
same greedy tokens and logprobs as TP=1 and as transformers, with its KV heads, MLP and
vocabulary split across two ranks, and its follower process leaves on close."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.hf_oracle import hf_greedy, load_hf


def _prompts() -> list[list[int]]:
    # Mixed lengths incl. one over the chunk size and two sharing a prefix.
    base = [(13 * i) % 1000 + 3 for i in range(150)]
    return [[5, 6, 7], base, [*base[:100], 9, 9, 9], [(7 * i) % 997 + 2 for i in range(300)]]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
def test_tp2_equals_tp1_and_transformers(checkpoint_dir, preset: str) -> None:
    model_dir = checkpoint_dir(preset)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    kw = {"num_kv_blocks": 128, "max_num_batched_tokens": 128}
    with LLM(str(model_dir), tp=2, **kw) as llm:
        followers = llm.engine.tp.followers
        assert llm.engine.runner.kv_spec.num_kv_heads * 2 == llm.engine.model_config.num_kv_heads
        tp2 = llm.generate(_prompts(), params)
    assert all(p.poll() is not None for p in followers), "follower outlived close()"
    with LLM(str(model_dir), **kw) as llm:
        tp1 = llm.generate(_prompts(), params)
    hf = load_hf(model_dir)
    for a, b, prompt in zip(tp2, tp1, _prompts()):
        ref_ids, ref_lps = hf_greedy(hf, prompt, 12)
        assert a.token_ids == b.token_ids == ref_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, ref_lps)) < 1e-4


def test_tp_that_does_not_divide_the_kv_heads_names_the_flag(checkpoint_dir) -> None:
    # tiny-mistral has one KV head: it cannot be split over two ranks.
    with pytest.raises(ValueError, match="num_key_value_heads=1 is not divisible by --tp 2"):
        LLM(str(checkpoint_dir("tiny-mistral")), tp=2, num_kv_blocks=64)


def test_tp_config_is_validated() -> None:
    with pytest.raises(ValueError, match="--tp"):
        EngineConfig(model="x", tp=0)
