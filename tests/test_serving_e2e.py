"""End to end through HTTP with the official `openai` client against a live `baton serve`:
aggregated, 1P1D over NIXL and over tcp, and 2P2D all give transformers' greedy tokens,
streaming or not, one at a time or 32 at once."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re

import httpx
import openai
import pytest
import torch

from cluster.local_server import baton_serve, wait_pools_empty
from tests.hf_oracle import hf_greedy, hf_greedy_constrained, load_hf

pytestmark = pytest.mark.slow
PRESET = "tiny-llama-untied"  # a tied tiny model echoes its input whatever the KV
MAX_NEW = 12
TEXTS = ["Hello there, how are you today?", "The quick brown fox", "1, 2, 3, 4,",
         "Grüße aus München — ça va? 你好，世界 🙂", "def fibonacci(n):\n    return",
         "A long story begins: " + "once upon a time, " * 40]

HAVE_NIXL = importlib.util.find_spec("nixl") is not None
MODES = {
    "aggregated": ["--prefill", "0", "--decode", "1"],
    "1p1d-nixl": ["--prefill", "1", "--decode", "1", "--kv-transfer", "nixl"],
    "1p1d-tcp": ["--prefill", "1", "--decode", "1", "--kv-transfer", "tcp"],
    # Decode workers hand tokens to streams three at a time after the first (every test
    # below must still see the same tokens and text).
    "2p2d": ["--prefill", "2", "--decode", "2", "--stream-interval", "3"],
}


@pytest.fixture(scope="module")
def model_dir(checkpoint_dir):
    return checkpoint_dir(PRESET)


@pytest.fixture(scope="module")
def expected(model_dir):
    """transformers' greedy continuation of each prompt (as the router tokenizes it)."""
    from engine.tokenizer import TokenizerBundle

    tok = TokenizerBundle.from_dir(model_dir)
    hf = load_hf(model_dir)
    prompts = [tok.encode(t) for t in TEXTS]
    return prompts, [hf_greedy(hf, p, MAX_NEW)[0] for p in prompts]


@pytest.fixture(scope="module", params=sorted(MODES))
def server(request, model_dir):
    if "nixl" in request.param and not HAVE_NIXL:
        pytest.skip("NIXL is not installed (pip install nixl-cu12)")
    with baton_serve(model_dir, *MODES[request.param], "--kv-blocks", "512") as url:
        health = httpx.get(f"{url}/health").json()
        backends = {w["kv_backend"] for w in health["workers"]}
        if request.param.endswith("nixl"):
            assert backends == {"nixl"}
        if request.param.endswith("tcp"):
            assert backends == {"tcp"}
        yield url, request.param


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_models_and_health(server):
    url, mode = server
    models = client(url).models.list()
    assert [m.id for m in models.data] == [PRESET]
    health = httpx.get(f"{url}/health").json()
    assert health["mode"] == ("aggregated" if mode == "aggregated" else "disaggregated")


def test_greedy_tokens_equal_transformers(server, expected):
    url, _ = server
    prompts, refs = expected
    c = client(url)
    for text, prompt, ref in zip(TEXTS, prompts, refs):
        r = c.completions.create(model=PRESET, prompt=text, max_tokens=MAX_NEW, temperature=0,
                                 extra_body={"return_token_ids": True, "ignore_eos": True})
        choice = r.choices[0]
        assert choice.prompt_token_ids == prompt
        assert choice.token_ids == ref, f"diverged on {text!r}"
        assert r.usage.completion_tokens == MAX_NEW
        assert choice.finish_reason == "length"
    wait_pools_empty(url)


def test_streaming_equals_non_streaming(server, expected):
    url, mode = server
    _, refs = expected
    c = client(url)
    stream = c.completions.create(model=PRESET, prompt=TEXTS[3], max_tokens=MAX_NEW,
                                  temperature=0, stream=True,
                                  stream_options={"include_usage": True},
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    tokens, text, usage, finish, sizes = [], "", None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            tokens += ch.token_ids
            sizes.append(len(ch.token_ids))
            text += ch.text
            finish = ch.finish_reason or finish
    assert tokens == refs[3]
    if mode == "2p2d":
        # --stream-interval 3: the prefill worker's token alone, the decode worker's first
        # at once, then at least three per chunk until the last (more when a stream lags
        # and queued outputs are merged).
        assert sizes[0] == 1 and all(n >= 3 for n in sizes[2:-1]) and len(sizes) < MAX_NEW
    full = c.completions.create(model=PRESET, prompt=TEXTS[3], max_tokens=MAX_NEW,
                                temperature=0, extra_body={"ignore_eos": True})
    assert text == full.choices[0].text  # multi-byte text streamed without breaking it
    assert usage.completion_tokens == MAX_NEW and finish == "length"


def test_top_logprobs_stay_level_with_their_tokens(server):
    """One row of alternatives per token, the chosen (greedy) token's the best of its
    row, in every mode: the first token comes from the prefill worker with its row, the
    decode worker's rows follow from the second token on."""
    url, _ = server
    c = client(url)
    r = c.completions.create(model=PRESET, prompt=TEXTS[0], max_tokens=MAX_NEW, logprobs=2,
                             temperature=0, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == MAX_NEW
    for tok, chosen, row in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(row) == 2 and row[tok] == pytest.approx(max(row.values())) == \
            pytest.approx(chosen)
    rows = []
    for chunk in c.completions.create(model=PRESET, prompt=TEXTS[0], max_tokens=MAX_NEW,
                                      logprobs=2, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True}):
        for ch in chunk.choices:
            if ch.logprobs:
                rows += ch.logprobs.top_logprobs
    assert rows == lp.top_logprobs
    r = c.chat.completions.create(model=PRESET, messages=[{"role": "user", "content": "Hi"}],
                                  max_tokens=MAX_NEW, temperature=0, logprobs=True,
                                  top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == MAX_NEW and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)


def test_a_stop_string_ends_the_usage_too(server):
    """Tokens generated after the one completing a stop string are neither returned nor
    counted (the workers do not see stop strings; the router cuts there)."""
    url, _ = server
    c = client(url)
    free = c.completions.create(model=PRESET, prompt=TEXTS[2], max_tokens=MAX_NEW,
                                temperature=0, extra_body={"return_token_ids": True,
                                                           "ignore_eos": True})
    ids, text = free.choices[0].token_ids, free.choices[0].text
    stop = text[len(text) // 3:len(text) // 3 + 2]  # ends in the first half of the text
    assert stop.strip(), text
    r = c.completions.create(model=PRESET, prompt=TEXTS[2], max_tokens=MAX_NEW,
                             temperature=0, stop=[stop], logprobs=0,
                             extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and text.startswith(choice.text + stop)
    kept = choice.token_ids
    assert kept == ids[:len(kept)] and len(kept) < MAX_NEW
    assert r.usage.completion_tokens == len(kept) == len(choice.logprobs.tokens)


def test_n_choices(server, expected):
    """n > 1: choices numbered prompt by prompt; greedy choices are the same tokens; a
    seeded request's choice 0 is what n=1 gives; usage counts each prompt once."""
    url, _ = server
    prompts, refs = expected
    c = client(url)
    r = c.completions.create(model=PRESET, prompt=[TEXTS[0], TEXTS[1]], n=3, max_tokens=4,
                             temperature=0, extra_body={"return_token_ids": True,
                                                        "ignore_eos": True})
    assert [ch.index for ch in r.choices] == list(range(6))
    for ch in r.choices:
        assert ch.token_ids == refs[ch.index // 3][:4]
    assert r.usage.prompt_tokens == len(prompts[0]) + len(prompts[1])
    assert r.usage.completion_tokens == 6 * 4
    sampled = dict(model=PRESET, prompt=TEXTS[2], max_tokens=8, temperature=1.0, seed=7,
                   extra_body={"return_token_ids": True, "ignore_eos": True})
    one = c.completions.create(**sampled)
    four = c.completions.create(n=4, **sampled)
    assert four.choices[0].token_ids == one.choices[0].token_ids
    assert len({tuple(ch.token_ids) for ch in four.choices}) > 1  # seeds 7, 8, 9, 10
    stream = c.chat.completions.create(model=PRESET, n=2, max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": "Hi"}],
                                       stream=True, stream_options={"include_usage": True})
    texts, roles = {0: "", 1: ""}, set()
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.delta.role:
                roles.add(ch.index)
    assert roles == {0, 1} and texts[0] == texts[1]


def test_penalties_served_as_the_engine_applies_them(server, model_dir, expected):
    """presence/frequency penalties reach the worker that samples each token (the decode
    worker, from the second token on when disaggregated): the same tokens as the engine
    in this process."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    prompts, _ = expected
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                            presence_penalty=0.8, frequency_penalty=0.5)
    with LLM(str(model_dir)) as llm:
        want = llm.generate([prompts[2]], params)[0].token_ids
    url, _ = server
    r = client(url).completions.create(
        model=PRESET, prompt=TEXTS[2], max_tokens=16, temperature=0, presence_penalty=0.8,
        frequency_penalty=0.5, extra_body={"return_token_ids": True, "ignore_eos": True})
    assert r.choices[0].token_ids == want


def test_echo_scores_the_prompt_as_transformers_does(server, model_dir, expected):
    """Completions with echo (what evaluation harnesses send to score text): the prompt's
    text comes back before the completion, and with logprobs its tokens' logprobs, None
    for the first, then transformers' log-softmax at each next prompt token; max_tokens 0
    scores the prompt only. Streaming gives the same."""
    import torch

    prompts, refs = expected
    hf = load_hf(model_dir)
    ids = prompts[5]  # the long one: chunked prefill on the way
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    want = [ref[p, ids[p + 1]].item() for p in range(len(ids) - 1)]
    c = client(server[0])
    r = c.completions.create(model=PRESET, prompt=TEXTS[5], max_tokens=0, echo=True,
                             logprobs=2, temperature=0)
    ch = r.choices[0]
    assert ch.text == TEXTS[5] and ch.finish_reason == "length"
    lp = ch.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) < 1e-4
    assert lp.top_logprobs[0] is None and all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # offsets point into the text returned (BOS, not in it, takes no room)
    starts = [o for o, t in zip(lp.text_offset, lp.tokens) if t.strip() and "<" not in t]
    assert starts and all(0 <= o < len(ch.text) for o in starts)
    assert sum(ch.text[o:o + len(t)] == t for o, t in zip(lp.text_offset, lp.tokens)
               if t.strip()) >= 0.8 * len(starts)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    # With a completion: the prompt, then the greedy tokens, logprobs for both.
    r = c.completions.create(model=PRESET, prompt=TEXTS[2], max_tokens=4, echo=True,
                             logprobs=0, temperature=0,
                             extra_body={"return_token_ids": True, "ignore_eos": True})
    ch = r.choices[0]
    assert ch.token_ids == refs[2][:4] and ch.text.startswith(TEXTS[2])
    assert len(ch.logprobs.tokens) == len(prompts[2]) + 4
    assert ch.logprobs.top_logprobs is None
    streamed = list(c.completions.create(model=PRESET, prompt=TEXTS[2], max_tokens=4,
                                         echo=True, logprobs=0, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True}))
    assert "".join(s.choices[0].text for s in streamed if s.choices) == ch.text
    assert [x for s in streamed if s.choices and s.choices[0].logprobs
            for x in s.choices[0].logprobs.token_logprobs] == ch.logprobs.token_logprobs
    # max_tokens 0 without echo is still refused
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=PRESET, prompt=TEXTS[2], max_tokens=0)


def test_logit_bias_reaches_the_worker_that_samples_each_token(server, expected):
    """logit_bias on every token: the prefill worker's first and the decode worker's
    others (disaggregated). +100 on one token makes greedy decoding emit only it; -100 on
    the tokens greedy would pick bans them."""
    _, refs = expected
    c = client(server[0])
    forced = refs[0][0] + 1
    r = c.completions.create(model=PRESET, prompt=TEXTS[0], max_tokens=6, temperature=0,
                             logit_bias={str(forced): 100},
                             extra_body={"return_token_ids": True, "ignore_eos": True})
    assert r.choices[0].token_ids == [forced] * 6
    banned = set(refs[0][:6])
    r = c.completions.create(model=PRESET, prompt=TEXTS[0], max_tokens=6, temperature=0,
                             logit_bias={str(t): -100 for t in banned},
                             extra_body={"return_token_ids": True, "ignore_eos": True})
    assert not banned & set(r.choices[0].token_ids)


def test_response_format_json_schema(server, model_dir, expected):
    """Structured outputs: greedy tokens under a JSON schema equal transformers' under the
    same grammar in every mode (the prefill worker samples the first token under it, the
    decode worker the rest), the reply parses, and a stream says the same."""
    from engine.structured import grammar_for
    from engine.tokenizer import TokenizerBundle
    from tests.test_structured_outputs import RESPONSE_FORMAT

    url, _ = server
    c = client(url)
    tok = TokenizerBundle.from_dir(model_dir)
    hf = load_hf(model_dir)
    grammar = grammar_for(RESPONSE_FORMAT)
    prompts, _ = expected
    r = c.completions.create(model=PRESET, prompt=TEXTS[0], max_tokens=64, temperature=0,
                             extra_body={"return_token_ids": True,
                                         "response_format": RESPONSE_FORMAT})
    assert r.choices[0].token_ids == hf_greedy_constrained(hf, tok, prompts[0], grammar, 64)
    assert r.choices[0].finish_reason == "stop"
    assert set(json.loads(r.choices[0].text)) == {"answer", "count"}
    # Complete at the first token: the prefill worker ends it (nothing sampled after).
    one = {"type": "json_schema", "json_schema": {"name": "one", "schema": {"const": 1}}}
    r = c.completions.create(model=PRESET, prompt=TEXTS[1], max_tokens=8, temperature=0,
                             extra_body={"return_token_ids": True, "response_format": one,
                                         "min_tokens": 3})
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("1", "stop")
    assert len(r.choices[0].token_ids) == 1
    # vLLM's fields: guided_choice, and structured_outputs' regex
    r = c.completions.create(model=PRESET, prompt=TEXTS[2], max_tokens=8, temperature=0,
                             extra_body={"guided_choice": ["red", "green", "blue"],
                                         "response_format": {"type": "text"}})
    assert r.choices[0].text in ("red", "green", "blue")
    r = c.chat.completions.create(model=PRESET, max_tokens=8, temperature=0,
                                  messages=[{"role": "user", "content": "What time is it?"}],
                                  extra_body={"structured_outputs": {
                                      "regex": "[0-9]{2}:[0-9]{2}",
                                      "disable_any_whitespace": True}})
    assert re.fullmatch("[0-9]{2}:[0-9]{2}", r.choices[0].message.content)
    messages = [{"role": "user", "content": "Is it raining? Reply in JSON."}]
    r = c.chat.completions.create(model=PRESET, messages=messages, max_tokens=64,
                                  temperature=0, response_format=RESPONSE_FORMAT,
                                  extra_body={"return_token_ids": True})
    assert r.choices[0].token_ids == hf_greedy_constrained(
        hf, tok, tok.chat_prompt_ids(messages), grammar, 64)
    assert json.loads(r.choices[0].message.content)["answer"] in ("yes", "no")
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=PRESET, messages=messages, max_tokens=64, temperature=0, stream=True,
        response_format=RESPONSE_FORMAT) if ch.choices)
    assert streamed == r.choices[0].message.content
    # guided_choice beside response_format {"type": "text"} counts as vLLM's
    metrics = httpx.get(f"{url}/metrics").text
    assert 'baton_constrained_requests_total{kind="response_format"} 4.0' in metrics
    assert 'baton_constrained_requests_total{kind="vllm"} 2.0' in metrics


def test_repetition_penalty_reaches_the_worker_that_samples_each_token(server, model_dir,
                                                                        expected):
    """vLLM's repetition_penalty over the wire: greedy tokens equal transformers' loop
    through its RepetitionPenaltyLogitsProcessor in every mode (the prefill worker's first
    token and the decode worker's others), and differ from plain greedy."""
    from transformers import RepetitionPenaltyLogitsProcessor

    url, _ = server
    prompts, refs = expected
    hf = load_hf(model_dir)
    processor = RepetitionPenaltyLogitsProcessor(0.3)  # < 1: repeats favoured
    ids = list(prompts[2])
    for _ in range(MAX_NEW):
        logits = hf(torch.tensor([ids])).logits[:, -1].float()
        ids.append(int(processor(torch.tensor([ids]), logits).argmax()))
    r = client(url).completions.create(
        model=PRESET, prompt=TEXTS[2], max_tokens=MAX_NEW, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True, "repetition_penalty": 0.3,
                    "min_p": 0.1})
    assert r.choices[0].token_ids == ids[len(prompts[2]):]
    assert r.choices[0].token_ids != refs[2]


def test_chat(server, model_dir):
    url, _ = server
    c = client(url)
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hi."}]
    r = c.chat.completions.create(model=PRESET, messages=messages, max_tokens=8,
                                  temperature=0, extra_body={"return_token_ids": True})
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    from engine.tokenizer import TokenizerBundle

    tok = TokenizerBundle.from_dir(model_dir)
    assert r.choices[0].prompt_token_ids == tok.chat_prompt_ids(messages)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=PRESET, messages=messages, max_tokens=8, temperature=0, stream=True)
        if ch.choices)
    assert streamed == msg.content


def test_32_concurrent_requests(server, expected):
    url, _ = server
    _, refs = expected

    async def one(c: openai.AsyncOpenAI, i: int) -> list[int]:
        kw = dict(model=PRESET, prompt=TEXTS[i % len(TEXTS)], max_tokens=MAX_NEW,
                  temperature=0, extra_body={"return_token_ids": True, "ignore_eos": True})
        if i % 2 == 0:
            return (await c.completions.create(**kw)).choices[0].token_ids
        stream = await c.completions.create(stream=True, **kw)
        return [t async for chunk in stream for ch in chunk.choices for t in ch.token_ids]

    async def run() -> list[list[int]]:
        c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(c, i) for i in range(32)))

    for i, tokens in enumerate(asyncio.run(run())):
        assert tokens == refs[i % len(TEXTS)], f"request {i} diverged under load"
    wait_pools_empty(url)
