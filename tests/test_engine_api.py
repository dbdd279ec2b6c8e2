"""The offline `LLM` API on a tiny checkpoint: stop strings, min_tokens, seeded sampling,
text round trips; and the streaming detokenizer on multi-byte UTF-8 and stop strings.

A random-weight model's text is arbitrary, so stop strings are cut from its own greedy
output rather than written by hand."""

from __future__ import annotations

import pytest

from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer, TokenizerBundle

PROMPT = "Once upon a time"
OTHERS = ["The river had been rising for three days", "def f(x):", "1 2 3 4"]


@pytest.fixture(scope="module")
def llm(checkpoint_dir) -> LLM:
    return LLM(str(checkpoint_dir("tiny-llama")), num_kv_blocks=512)


@pytest.fixture(scope="module")
def tok(llm: LLM) -> TokenizerBundle:
    return llm.engine.tokenizer


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, **{"max_tokens": 16, **kw})


@pytest.fixture(scope="module")
def base(llm: LLM, tok: TokenizerBundle):
    """Greedy output for PROMPT without stops, and the text end offset of each token."""
    out = llm.generate([PROMPT], greedy())[0]
    ends = [len(tok.decode(out.token_ids[: i + 1])) for i in range(len(out.token_ids))]
    assert out.text == tok.decode(out.token_ids) and len(out.text) > 8
    return out, ends


def split_stop(tok: TokenizerBundle, out, ends: list[int]) -> str:
    """Two characters straddling a token boundary that no single token's text contains."""
    pieces = [tok.decode([t]) for t in out.token_ids]
    for i in range(1, len(ends) - 1):
        s = out.text[ends[i] - 1 : ends[i] + 1]
        if len(s) == 2 and ends[i - 1] < ends[i] < ends[i + 1] and all(s not in p
                                                                        for p in pieces):
            return s
    raise AssertionError(f"no token boundary to split in {out.text!r}")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens(llm: LLM, tok: TokenizerBundle, base,
                                         include: bool) -> None:
    out, ends = base
    stop = split_stop(tok, out, ends)
    at = out.text.find(stop)
    res = llm.generate([PROMPT], greedy(stop=[stop], include_stop_str_in_output=include))[0]
    assert res.finish_reason == "stop"
    assert res.text == out.text[: at + len(stop)] if include else out.text[:at]
    # Generation ends on the token that completed the stop string.
    n = next(i + 1 for i, end in enumerate(ends) if end >= at + len(stop))
    assert res.token_ids == out.token_ids[:n]


def test_stop_string_never_found_runs_to_length(llm: LLM, base) -> None:
    out, _ = base
    res = llm.generate([PROMPT], greedy(stop=["\x00never\x00"]))[0]
    assert res.finish_reason == "length"
    assert (res.text, res.token_ids) == (out.text, out.token_ids)


def test_min_tokens_bans_stop_token_ids(llm: LLM, base) -> None:
    out, _ = base
    first = out.token_ids[0]
    res = llm.generate([PROMPT], greedy(stop_token_ids=[first]))[0]
    assert (res.token_ids, res.finish_reason) == ([first], "stop")
    res = llm.generate([PROMPT], greedy(stop_token_ids=[first], min_tokens=4))[0]
    assert len(res.token_ids) >= 5 or res.finish_reason == "length"
    assert first not in res.token_ids[:4]
    assert res.finish_reason == "length" or res.token_ids[-1] == first
    res = llm.generate([PROMPT], greedy(stop_token_ids=[first], min_tokens=6, max_tokens=6))[0]
    assert len(res.token_ids) == 6 and first not in res.token_ids
    assert res.finish_reason == "length"


def test_min_tokens_holds_back_every_stop_token(llm: LLM, tok: TokenizerBundle) -> None:
    # Half the vocabulary (EOS included) stops the request, but not in the first 8 tokens.
    half = tok.vocab_size // 2
    assert all(e < half for e in tok.eos_token_ids)
    params = SamplingParams(max_tokens=30, temperature=30.0, seed=3, min_tokens=8,
                            stop_token_ids=list(range(half)))
    res = llm.generate([PROMPT], params)[0]
    assert all(t >= half for t in res.token_ids[:8])
    assert res.finish_reason == "stop" and len(res.token_ids) > 8
    assert res.token_ids[-1] < half and all(t >= half for t in res.token_ids[:-1])


def sampled(**kw) -> SamplingParams:
    # A hot temperature: the tiny model's greedy text repeats one token.
    return SamplingParams(**{"max_tokens": 12, "temperature": 20.0, "ignore_eos": True, **kw})


def test_seeded_sampling_is_reproducible_and_batch_independent(llm: LLM) -> None:
    alone = llm.generate([PROMPT], sampled(seed=7))[0]
    assert llm.generate([PROMPT], sampled(seed=7))[0].token_ids == alone.token_ids
    mixed = llm.generate(
        [*OTHERS, PROMPT, PROMPT],
        [sampled(seed=1), sampled(), sampled(seed=7, top_k=50), sampled(seed=7),
         sampled(seed=8)],
        arrival_steps=[0, 0, 2, 1, 0])
    assert mixed[3].token_ids == alone.token_ids
    assert mixed[4].token_ids != alone.token_ids


def test_text_round_trips(llm: LLM, tok: TokenizerBundle) -> None:
    """Without stop strings the text is the decode of the token ids, including bytes of a
    character the output ended in the middle of."""
    outs = llm.generate([PROMPT] * 16, [sampled(seed=s, max_tokens=20) for s in range(16)])
    for out in outs:
        assert out.text == tok.decode(out.token_ids)
    assert len({tuple(o.token_ids) for o in outs}) > 8


def test_streamed_chunks_add_up(llm: LLM, tok: TokenizerBundle, base) -> None:
    out, ends = base
    stop = split_stop(tok, out, ends)
    engine: LLMEngine = llm.engine
    engine.add_request("s0", tok.encode(PROMPT), greedy(stop=[stop]))
    engine.add_request("s1", tok.encode(PROMPT), sampled(seed=5, max_tokens=20))
    chunks: dict[str, list[str]] = {"s0": [], "s1": []}
    final = {}
    while engine.has_unfinished():
        for o in engine.step():
            chunks[o.request_id].append(o.new_text)
            if o.finished:
                final[o.request_id] = o
    for rid, o in final.items():
        assert "".join(chunks[rid]) == o.text
    assert final["s0"].text == out.text[: out.text.find(stop)]
    assert final["s1"].text == tok.decode(final["s1"].token_ids)
    assert engine.block_pool.num_used == 0


def stream_engine(llm: LLM, params: SamplingParams) -> list:
    engine: LLMEngine = llm.engine
    engine.add_request("x", engine.tokenizer.encode(PROMPT), params)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


# Known gaps in engine/llm_engine.py (outside this suite's remit to edit); strict, so the
# marker has to go when the engine is fixed.


def test_cumulative_text_is_what_was_streamed(llm: LLM, base) -> None:
    out, ends = base
    stop = out.text[: ends[1]] + "\x00"  # matches the first two tokens' text, then never
    outs = stream_engine(llm, greedy(stop=[stop], max_tokens=4))
    streamed = ""
    for o in outs:
        streamed += o.new_text
        assert o.text == streamed


def test_stop_string_on_the_last_token_reports_stop(llm: LLM, tok: TokenizerBundle,
                                                    base) -> None:
    out, ends = base
    stop = split_stop(tok, out, ends)
    n = next(i + 1 for i, end in enumerate(ends) if end >= out.text.find(stop) + len(stop))
    res = llm.generate([PROMPT], greedy(stop=[stop], max_tokens=n))[0]
    assert res.text == out.text[: out.text.find(stop)]
    assert res.finish_reason == "stop"


def test_stop_strings_wait_for_min_tokens_in_engine(llm: LLM, tok: TokenizerBundle,
                                                    base) -> None:
    out, ends = base
    res = llm.generate([PROMPT], greedy(stop=[split_stop(tok, out, ends)], min_tokens=16))[0]
    assert (res.text, res.finish_reason) == (out.text, "length")


# The streaming detokenizer, fed the ids the tokenizer itself produces.

MULTIBYTE = [
    "rocket 🚀 launch",
    "你好，世界！東京",
    "family 👩‍👩‍👧 and flag 🇫🇷 and skin 👍🏽",
    "é 𝔘𝔫𝔦 ☃ ẞ",
]


@pytest.fixture(scope="module")
def bundle(checkpoint_dir) -> TokenizerBundle:
    return TokenizerBundle.from_dir(checkpoint_dir("tiny-llama"))


def stream(bundle: TokenizerBundle, ids: list[int], stop: list[str] | None = None,
           **kw) -> tuple[list[str], IncrementalDetokenizer]:
    d = IncrementalDetokenizer(bundle, stop or [], True, **kw)
    chunks = [d.add_token(t) for t in ids]
    chunks.append(d.flush())
    return chunks, d


@pytest.mark.parametrize("text", MULTIBYTE)
def test_streaming_emits_only_complete_characters(bundle: TokenizerBundle, text: str) -> None:
    ids = bundle.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # some characters span several tokens
    chunks, d = stream(bundle, ids)
    assert "".join(chunks) == bundle.decode(ids) == text == d.text
    assert not any("\ufffd" in c for c in chunks)
    # Once the decoded prefix ends on a whole character, all of it has been emitted.
    for i in range(len(ids)):
        prefix = bundle.decode(ids[: i + 1])
        if prefix.endswith("\ufffd"):
            assert chunks[i] == ""
        else:
            assert "".join(chunks[: i + 1]) == prefix
    for ch in "🚀你好世界東京é☃ẞ":
        if ch in text:
            assert any(ch in c for c in chunks)


def test_streaming_flush_emits_an_unfinished_character(bundle: TokenizerBundle) -> None:
    ids = bundle.encode("ok 🚀", add_special_tokens=False)
    chunks, d = stream(bundle, ids[:-1])  # cut inside the emoji
    assert "".join(chunks[:-1]) == "ok"
    assert chunks[-1].startswith(" ") and chunks[-1].endswith("\ufffd")
    assert d.text == bundle.decode(ids[:-1])


def test_streaming_skips_special_tokens(bundle: TokenizerBundle) -> None:
    eos = bundle.eos_token_ids[0]
    ids = bundle.encode("hi there", add_special_tokens=False)
    chunks, _ = stream(bundle, [*ids, eos])
    assert "".join(chunks) == "hi there"


def test_stop_string_held_back_until_it_cannot_match(bundle: TokenizerBundle) -> None:
    text = "one two three four"
    ids = bundle.encode(text, add_special_tokens=False)
    chunks, d = stream(bundle, ids, stop=["three"])
    assert d.stopped and d.text == "one two "
    assert "".join(chunks) == "one two "
    # Nothing after the stop string is ever emitted, even the part decoded with it.
    chunks, d = stream(bundle, ids, stop=["thr"], include_stop_str_in_output=True)
    assert "".join(chunks) == d.text == "one two thr"
    # The last len(stop) - 1 characters wait (they could start the stop string) until
    # flush, when the sequence has finished without it.
    chunks, d = stream(bundle, ids, stop=["two thirty"])
    assert not d.stopped and "".join(chunks) == text
    assert "".join(chunks[:-1]) == text[:-9] and chunks[-1] == text[-9:]


def test_earliest_stop_string_wins(bundle: TokenizerBundle) -> None:
    ids = bundle.encode("one two three four", add_special_tokens=False)
    assert [bundle.decode([i]) for i in ids][3:5] == [" th", "ree"]
    # Token "ree" completes both; the one that starts earlier in the text wins, whatever
    # the order of the list.
    for stops in (["ee", "thr"], ["thr", "ee"]):
        _, d = stream(bundle, ids, stop=stops)
        assert d.text == "one two "


def test_stop_strings_wait_for_min_tokens(bundle: TokenizerBundle) -> None:
    ids = bundle.encode("stop here, stop there, the end", add_special_tokens=False)
    _, d = stream(bundle, ids, stop=["stop"])
    assert d.text == ""
    n_first = len(bundle.encode("stop here,", add_special_tokens=False))
    _, d = stream(bundle, ids, stop=["stop"], min_tokens=n_first)
    assert d.text == "stop here, "
    _, d = stream(bundle, ids, stop=["stop"], min_tokens=len(ids))
    assert not d.stopped and d.text == "stop here, stop there, the end"
