"""Structured outputs (engine/structured.py): the token masks, OpenAI's response_format
turned into grammars (or refused naming it), and greedy decoding under a JSON schema equal
to transformers' greedy decoding under the same grammar, token for token, ending when the
grammar is complete."""

from __future__ import annotations

import json

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.structured import grammar_for
from kernels.sampling import SamplingBatch, apply_token_masks, sample
from tests.hf_oracle import hf_greedy_constrained

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "count"],
          "properties": {"answer": {"enum": ["yes", "no"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 99}}}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}}


def _mask_of(allowed: list[set[int]], vocab: int) -> torch.Tensor:
    words = torch.zeros(len(allowed), (vocab + 31) // 32, dtype=torch.int64)
    for row, ids in enumerate(allowed):
        for t in ids:
            words[row, t // 32] |= 1 << (t % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_masks_leave_only_allowed_tokens():
    torch.manual_seed(0)
    vocab = 100  # not a multiple of 32: the last word's high bits are past the vocabulary
    logits = torch.randn(3, vocab)
    allowed = [{3, 31, 63, 95}, set(range(vocab)), {99}]
    masked = logits.clone()
    apply_token_masks(masked, _mask_of(allowed, vocab))
    for row, ids in enumerate(allowed):
        keep = torch.tensor([t in ids for t in range(vocab)])
        assert torch.equal(masked[row][keep], logits[row][keep])
        assert torch.isinf(masked[row][~keep]).all()
    batch = SamplingBatch([0.0] * 3, [-1] * 3, [1.0] * 3, [None] * 3, [0] * 3, [()] * 3,
                          token_masks=_mask_of(allowed, vocab))
    picked = sample(logits, batch).token_ids.tolist()
    assert picked == [max(ids, key=lambda t, r=r: logits[r, t]) for r, ids in
                      enumerate(allowed)]


def test_response_format_becomes_a_grammar_or_a_400():
    assert grammar_for(None) == grammar_for({"type": "text"}) == ""
    assert "json_schema" in grammar_for({"type": "json_object"})
    assert '"enum"' in grammar_for(RESPONSE_FORMAT)
    for bad in ({"type": "xml"}, {"type": "json_schema"},
                {"type": "json_schema", "json_schema": {"schema": [1]}},
                {"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}}, "x",
                {"json_schema": {"schema": {}}}):
        with pytest.raises(InvalidRequestError) as e:
            grammar_for(bad)
        assert e.value.param == "response_format"


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    from engine.tokenizer import TokenizerBundle
    from tests.hf_oracle import load_hf

    path = checkpoint_dir("tiny-llama-untied")
    return path, TokenizerBundle.from_dir(path), load_hf(path)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_engine_greedy_under_a_schema_equals_transformers_under_the_same_grammar(model, device):
    """On CUDA, decode CUDA graphs run (rows with a grammar are never launched ahead)."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    path, tok, hf = model
    grammar = grammar_for(RESPONSE_FORMAT)
    prompts = ["Is the sky blue? Answer in JSON:", "Count the apples: 1, 2, 3,"]
    kwargs = {"device": "cuda", "dtype": "float32"} if device == "cuda" else {}
    with LLM(str(path), num_kv_blocks=256, **kwargs) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0,
                                                    grammar=grammar))
        free = llm.generate(prompts[:1], SamplingParams(
            max_tokens=24, temperature=0, grammar=grammar_for({"type": "json_object"})))
    for prompt, out in zip(prompts, outs):
        expected = hf_greedy_constrained(hf, tok, tok.encode(prompt), grammar, 64)
        assert out.token_ids == expected
        assert out.finish_reason == "stop"  # the grammar completed, no EOS step needed
        reply = json.loads(tok.decode(out.token_ids))
        assert reply["answer"] in ("yes", "no") and 0 <= reply["count"] <= 99
    # Free-form JSON: what came out, up to the length limit, is a prefix of a JSON object.
    import llguidance

    llt = llguidance.LLTokenizer(tok.tokenizer.to_str(), n_vocab=hf.config.vocab_size)
    check = llguidance.LLMatcher(llt, grammar_for({"type": "json_object"}))
    assert tok.decode(free[0].token_ids).startswith("{")
    assert check.consume_tokens(free[0].token_ids), check.get_error()


def test_a_grammar_the_tokenizer_cannot_serve_is_refused(model):
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    path, _, _ = model
    with LLM(str(path), num_kv_blocks=64) as llm, pytest.raises(InvalidRequestError) as e:
        llm.generate(["hi"], SamplingParams(max_tokens=4, grammar="%% not a grammar"))
    assert e.value.param == "response_format"


def test_a_batch_of_grammar_rows_gets_each_its_own_mask(model):
    """Several rows with grammars (computed on llguidance's threads) beside one without:
    each row's mask is what its own matcher allows alone."""
    import llguidance

    from engine.sampling_params import SamplingParams
    from engine.sequence import Sequence
    from engine.structured import Grammars

    _, tok, hf = model
    vocab = hf.config.vocab_size
    grammars = Grammars(tok.tokenizer.to_str(), vocab, tok.eos_token_ids)
    formats = [RESPONSE_FORMAT, None, {"type": "json_object"}, RESPONSE_FORMAT]
    rows = [Sequence(str(i), [5, 6], SamplingParams(grammar=grammar_for(f)))
            for i, f in enumerate(formats)]
    first = tok.encode('{"', add_special_tokens=False)
    rows[3].extend_sampled_elsewhere(first, [0.0] * len(first))  # caught up on creation
    masks = grammars.masks(rows)
    assert (masks[1] == -1).all()
    for seq, row in zip(rows, masks):
        if seq.params.grammar:
            alone = llguidance.LLMatcher(grammars.tokenizer, seq.params.grammar)
            alone.consume_tokens(seq.output_token_ids)
            expected = torch.frombuffer(bytearray(alone.compute_bitmask()), dtype=torch.int32)
            assert torch.equal(row, expected[: len(row)])
    assert not torch.equal(masks[0], masks[3])  # one is past '{"' already


def test_a_grammar_complete_at_the_length_limit_stops_and_one_too_complex_fails(model):
    """Complete on the token that also reaches max_tokens: "stop", not "length" (a
    prefill worker samples with max_tokens 1, so a one-token reply was handed to a decode
    worker that sampled past the grammar's end). A grammar llguidance gives up on while
    generating ends the request as GRAMMAR_ERROR, never as "stop" with broken JSON."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from engine.structured import GRAMMAR_ERROR

    path, tok, _ = model
    one = grammar_for({"type": "json_schema", "json_schema": {"schema": {"const": 1}}})
    big = grammar_for({"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(600)}}}})
    with LLM(str(path), num_kv_blocks=256) as llm:
        done, failed = llm.generate(["Say one:", "JSON:"], [
            SamplingParams(max_tokens=1, temperature=0, grammar=one),
            SamplingParams(max_tokens=20, temperature=0, grammar=big)])
    assert tok.decode(done.token_ids) == "1" and done.finish_reason == "stop"
    assert failed.finish_reason == GRAMMAR_ERROR


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason="needs 2 GPUs")])])
def test_tensor_parallel_decodes_under_a_grammar_as_one_process(model, device):
    """Under --tp 2 the leader masks and samples; the followers run the same steps (no
    step is launched ahead under a grammar, which on CUDA they otherwise are): the tokens
    equal TP=1's."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    path, _, _ = model
    params = SamplingParams(max_tokens=48, temperature=0, grammar=grammar_for(RESPONSE_FORMAT))
    prompts = ["Is the sky blue? Answer in JSON:", "Count the apples: 1, 2, 3,"]
    on = {"device": "cuda", "dtype": "float32"} if device == "cuda" else {}
    with LLM(str(path), num_kv_blocks=128, **on) as llm:
        one = [o.token_ids for o in llm.generate(prompts, params)]
    with LLM(str(path), num_kv_blocks=128, tp=2, **on) as llm:
        two = [o.token_ids for o in llm.generate(prompts, params)]
    assert two == one


def test_vllm_constraint_fields_become_grammars_or_400s():
    from engine.structured import guided_grammar

    none = dict.fromkeys(["guided_json", "guided_regex", "guided_choice", "guided_grammar",
                          "structured_outputs"])
    assert guided_grammar(none) is None
    for fields, param in (({"guided_choice": ["yes", "no"]}, "guided_choice"),
                          ({"guided_regex": r"\d{3}"}, "guided_regex"),
                          ({"guided_json": '{"type": "object"}'}, "guided_json"),
                          ({"guided_grammar": 'start: "a" "b"*'}, "guided_grammar"),
                          ({"structured_outputs": {"choice": ["über", "x"]}},
                           "structured_outputs.choice")):
        grammar, got = guided_grammar({**none, **fields})
        assert grammar and got == param
    for fields, param in (({"guided_choice": []}, "guided_choice"),
                          ({"guided_choice": ["a", 1]}, "guided_choice"),
                          ({"guided_regex": "(unclosed"}, "guided_regex"),
                          ({"guided_json": "{not json"}, "guided_json"),
                          ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
                          ({"structured_outputs": {"shape": "x"}}, "structured_outputs.shape"),
                          ({"structured_outputs": "regex"}, "structured_outputs"),
                          ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex")):
        with pytest.raises(InvalidRequestError) as e:
            guided_grammar({**none, **fields})
        assert e.value.param == param, (fields, e.value.param)


def test_engine_greedy_under_a_choice_and_a_regex(model):
    """vLLM's guided_choice and guided_regex: replies are one of the choices / match the
    regex, and equal transformers under the same grammar."""
    import re

    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from engine.structured import guided_grammar

    path, tok, hf = model
    none = dict.fromkeys(["guided_json", "guided_regex", "guided_choice", "guided_grammar",
                          "structured_outputs"])
    choice, _ = guided_grammar({**none, "guided_choice": ["yes", "no", "maybe later"]})
    phone, _ = guided_grammar({**none, "guided_regex": r"\+?[0-9]{3}-[0-9]{4}"})
    prompt = "Will it rain tomorrow? Answer:"
    with LLM(str(path), num_kv_blocks=128) as llm:
        picked, number = llm.generate([prompt, prompt], [
            SamplingParams(max_tokens=16, temperature=0, grammar=choice),
            SamplingParams(max_tokens=16, temperature=0, grammar=phone)])
    assert tok.decode(picked.token_ids) in ("yes", "no", "maybe later")
    assert re.fullmatch(r"\+?[0-9]{3}-[0-9]{4}", tok.decode(number.token_ids))
    for out, grammar in ((picked, choice), (number, phone)):
        assert out.finish_reason == "stop"
        assert out.token_ids == hf_greedy_constrained(hf, tok, tok.encode(prompt), grammar, 16)


def test_grammars_compile_once_and_requests_get_their_own_matcher(model):
    """Workers compile a request's grammar off the engine thread before admitting it
    (engine/rpc_server.py prepare_grammar); the engine then copies the compiled matcher,
    and each request advances its own copy."""
    from engine.sampling_params import SamplingParams
    from engine.sequence import Sequence
    from engine.structured import Grammars

    _, tok, hf = model
    grammars = Grammars(tok.tokenizer.to_str(), hf.config.vocab_size, tok.eos_token_ids)
    grammar = grammar_for(RESPONSE_FORMAT)
    compiled = grammars.prepare(grammar)
    assert grammars.prepare(grammar) is compiled
    a, b = (Sequence(str(i), [5], SamplingParams(grammar=grammar)) for i in range(2))
    grammars.masks([a, b])
    assert a.matcher is not compiled and b.matcher is not a.matcher
    first = tok.encode('{"', add_special_tokens=False)
    for t in first:
        a.append_token(t, 0.0)
        assert grammars.advance(a, t) is None
    assert not torch.equal(*grammars.masks([a, b]))  # b is where a was
    with pytest.raises(InvalidRequestError):
        grammars.prepare("%% not a grammar")
