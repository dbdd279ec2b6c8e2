"""PrefixView reads like the list prefix it stands for and stays a snapshot as the list
grows; the engine's outputs of running requests are such snapshots (their logprobs used
to be the sequence's live list, so a stream that read an output one step late sent one
logprob more than tokens, and a non-streamed body paired later tokens with earlier
tokens' logprobs)."""

from __future__ import annotations

import pytest

from engine.llm import LLM
from engine.prefix_view import PrefixView
from engine.sampling_params import SamplingParams


def test_reads_like_the_prefix_and_stays_a_snapshot() -> None:
    items = [10, 11, 12, 13, 14]
    v = PrefixView(items, 1, 4)  # items[1:4]
    want = [11, 12, 13]
    assert len(v) == 3 and list(v) == want and v == want and v == tuple(want)
    assert (v[0], v[2], v[-1], v[-3]) == (11, 13, 13, 11)
    assert v[1:] == [12, 13] and v[:-1] == [11, 12] and v[::2] == [11, 13] and v[5:] == []
    assert isinstance(v[1:], list) and repr(v) == repr(want)
    for bad in (3, -4):
        with pytest.raises(IndexError):
            v[bad]
    items.extend([15, 16])
    assert v == want and len(v) == 3 and v[-1] == 13
    assert v != [11, 12, 13, 14] and v != "abc"


def test_running_outputs_are_snapshots_with_aligned_logprobs() -> None:
    llm = LLM("tiny-llama", load_format="dummy", num_kv_blocks=64)
    engine = llm.engine
    engine.add_request("r", [5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0.0,
                                                          ignore_eos=True, logprobs=2))
    seen = []
    while engine.has_unfinished():
        seen += [o for o in engine.step() if o.request_id == "r"]
    final = seen[-1]
    assert final.finished and isinstance(final.token_ids, list) and len(final.token_ids) == 6
    for i, o in enumerate(seen):  # read after every later step has run
        n = i + 1
        assert len(o.token_ids) == len(o.logprobs) == len(o.top_logprobs) == n
        assert o.token_ids == final.token_ids[:n] and o.logprobs == final.logprobs[:n]
        assert o.top_logprobs == final.top_logprobs[:n]
