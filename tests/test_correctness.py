"""Greedy output of Baton's engine equals Hugging Face transformers token for token, on every
tiny preset, in one continuous batch: staggered arrivals, chunked prefill, shared prefixes
hitting the prefix cache, and preemption forced by a tiny block budget."""

from __future__ import annotations

import random

import pytest
import torch

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.conftest import TINY_PRESETS
from tests.hf_oracle import hf_greedy, load_hf

MAX_NEW = 8
LENGTHS = [1, 2, 3, 5, 8, 15, 16, 17, 31, 33, 47, 64, 65, 90, 128, 129, 200, 255,
           300, 333, 400, 457, 512, 600]


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """30 prompts of 1..600 tokens; six of them share long prefixes with earlier ones."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in LENGTHS]
    base = prompts[LENGTHS.index(400)]
    for cut, extra in [(100, 7), (100, 40), (256, 1), (320, 33), (16, 5), (399, 2)]:
        prompts.append(base[:cut] + [rng.randrange(vocab) for _ in range(extra)])
    assert len(prompts) == 30
    return prompts


@pytest.fixture(scope="module")
def reference(checkpoint_dir):
    cache = {}

    def get(preset: str):
        if preset not in cache:
            path = checkpoint_dir(preset)
            model = load_hf(path)
            prompts = make_prompts(model.config.vocab_size)
            cache[preset] = (path, prompts, [hf_greedy(model, p, MAX_NEW) for p in prompts])
        return cache[preset]

    return get


SCENARIOS = {
    # Everything at once, plenty of blocks, big steps.
    "batch": dict(num_kv_blocks=1024, max_num_batched_tokens=4096),
    # Requests join mid-flight and long prompts are cut into 64-token chunks.
    "chunked": dict(num_kv_blocks=1024, max_num_batched_tokens=64),
    # 48 blocks (768 tokens) cannot hold the batch: requests get preempted and recomputed.
    "preempt": dict(num_kv_blocks=48, max_num_batched_tokens=128),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_greedy_matches_transformers(preset, scenario, reference):
    path, prompts, expected = reference(preset)
    llm = LLM(str(path), **SCENARIOS[scenario])
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=0)
    # Prompts join every few steps; the prefix-sharing ones come once their base is cached.
    late = 3 if scenario == "batch" else 60
    arrivals = [i // 3 if i < 24 else late + i for i in range(len(prompts))]
    outs = llm.generate(prompts, params, arrival_steps=arrivals)

    for i, (out, (tokens, logprobs)) in enumerate(zip(outs, expected)):
        assert out.token_ids == tokens, f"prompt {i} ({len(prompts[i])} tokens) diverged"
        assert out.logprobs == pytest.approx(logprobs, abs=1e-4)

    stats = llm.engine.scheduler
    if scenario == "preempt":
        assert stats.num_preemptions > 0, "tiny block budget should have forced preemption"
    if scenario != "preempt":
        hits = [o.num_cached_tokens for o in outs[24:]]
        assert all(h > 0 for h in hits[:4]), f"shared prefixes missed the cache: {hits}"
    pool = llm.engine.block_pool
    pool.check_integrity()
    assert pool.num_used == 0, "blocks leaked"


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_penalties_match_a_reference_loop_over_transformers(checkpoint_dir, device) -> None:
    """Greedy with presence and frequency penalties: the engine's tokens equal a plain loop
    over transformers' logits with OpenAI's formula applied (the tied tiny model repeats
    itself, so the penalties change its output). On a GPU the engine runs in float32 with
    its CUDA sampler (the penalized rows' bincount there), the reference on the CPU."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from tests.hf_oracle import load_hf

    model_dir = checkpoint_dir("tiny-llama")
    hf = load_hf(model_dir)
    prompts = [[5, 9, 14, 3, 7], [100, 200, 300, 400, 500, 600, 700]]
    presence, frequency, new = 0.6, 0.4, 24

    def reference(prompt: list[int]) -> list[int]:
        out: list[int] = []
        for _ in range(new):
            with torch.inference_mode():
                logits = hf(torch.tensor([prompt + out])).logits[0, -1].double()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long),
                                    minlength=logits.numel()).double() if out else 0
            penalized = logits - frequency * counts - presence * (torch.as_tensor(counts) > 0)
            out.append(int(penalized.argmax()))
        return out

    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True,
                            presence_penalty=presence, frequency_penalty=frequency)
    plain = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    kwargs = {"device": "cuda", "dtype": "float32"} if device == "cuda" else {}
    with LLM(str(model_dir), **kwargs) as llm:
        got = [o.token_ids for o in llm.generate(prompts, params)]
        unpenalized = [o.token_ids for o in llm.generate(prompts, plain)]
    assert got == [reference(p) for p in prompts]
    assert got != unpenalized


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_repetition_penalty_and_min_p_match_transformers(checkpoint_dir, device) -> None:
    """Greedy under a repetition penalty equals a plain loop over transformers' logits
    through transformers' own RepetitionPenaltyLogitsProcessor (prompt and output tokens
    count, as vLLM counts them); sampling with min_p never picks a token below min_p x
    the likeliest's probability at temperature 5 (it does without min_p)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from tests.hf_oracle import load_hf

    model_dir = checkpoint_dir("tiny-llama")
    hf = load_hf(model_dir)
    prompts = [[5, 9, 14, 3, 7, 9, 14], [100, 200, 300, 400, 500, 600, 700]]
    penalty, new = 1.6, 24
    processor = RepetitionPenaltyLogitsProcessor(penalty)

    def reference(prompt: list[int]) -> list[int]:
        ids = list(prompt)
        for _ in range(new):
            with torch.inference_mode():
                logits = hf(torch.tensor([ids])).logits[:, -1].float()
            ids.append(int(processor(torch.tensor([ids]), logits).argmax()))
        return ids[len(prompt):]

    kwargs = {"device": "cuda", "dtype": "float32"} if device == "cuda" else {}
    greedy = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    with LLM(str(model_dir), **kwargs) as llm:
        got = [o.token_ids for o in llm.generate(
            prompts, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True,
                                    repetition_penalty=penalty))]
        plain = [o.token_ids for o in llm.generate(prompts, greedy)]
        sampled = {min_p: llm.generate(prompts, SamplingParams(
            max_tokens=new, temperature=5.0, ignore_eos=True, seed=7, min_p=min_p))
            for min_p in (0.0, 0.3)}
    assert got == [reference(p) for p in prompts] and got != plain

    def below_floor(prompt: list[int], out: list[int], min_p: float) -> int:
        ids, n = list(prompt), 0
        for tok in out:
            with torch.inference_mode():
                probs = (hf(torch.tensor([ids])).logits[0, -1].float() / 5.0).softmax(-1)
            n += int(probs[tok] < min_p * probs.max() * 0.999)  # float32 slack
            ids.append(tok)
        return n

    assert sum(below_floor(p, o.token_ids, 0.3) for p, o in zip(prompts, sampled[0.3])) == 0
    assert sum(below_floor(p, o.token_ids, 0.3) for p, o in zip(prompts, sampled[0.0])) > 0


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_prompt_logprobs_equal_transformers(checkpoint_dir, monkeypatch, device) -> None:
    """prompt_logprobs (echo with logprobs): entry i is transformers' log-softmax at
    position i for prompt token i + 1, with the top alternatives; computed across prefill
    chunks (and slices of rows within them), and again in full for a prompt that is cached
    by then (a cached prefix has no logits), while a request beside it without them still
    hits the cache."""
    from engine import prompt_logprobs
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from tests.hf_oracle import load_hf

    model_dir = checkpoint_dir("tiny-llama-untied")
    hf = load_hf(model_dir)
    prompt = [(13 * i) % 1000 + 3 for i in range(150)]
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].double(), -1)
    want = [ref[p, prompt[p + 1]].item() for p in range(len(prompt) - 1)]
    scored = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    monkeypatch.setattr(prompt_logprobs, "ROWS_PER_SLICE", 16)
    kwargs = {"device": "cuda", "dtype": "float32"} if device == "cuda" else {}
    tol = 1e-4 if device == "cpu" else 2e-3  # (GPU matmuls sum in another order)
    with LLM(str(model_dir), max_num_batched_tokens=64, **kwargs) as llm:  # 3 chunks
        first = llm.generate([prompt], scored)[0]
        plain, again = llm.generate([prompt, prompt], [SamplingParams(max_tokens=2),
                                                       scored])
    for out in (first, again):
        assert len(out.prompt_logprobs) == len(prompt) - 1
        assert max(abs(a - b) for a, b in zip(out.prompt_logprobs, want)) < tol
        top = ref[0].topk(3)
        assert [t for t, _ in out.prompt_top_logprobs[0]] == top.indices.tolist()
    assert again.num_cached_tokens == 0 and plain.num_cached_tokens > 0
