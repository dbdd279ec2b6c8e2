"""Tool calling (router/tools.py): tools and tool_choice planned or refused naming the
field, replies read back into tool_calls in both formats, and served end to end: a forced
call is transformers' greedy decoding under the same grammar, token for token, in the
Llama 3 (JSON) and ChatML (hermes) formats, aggregated and disaggregated, streamed or
not."""

from __future__ import annotations

import json

import httpx
import pytest

from engine.errors import InvalidRequestError
from router.tools import format_for, may_be_call, parse_calls, plan_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False,
                   "required": ["city", "days"],
                   "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False,
    "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}


def test_formats_follow_the_chat_template():
    from engine.tokenizer import TokenizerBundle

    assert format_for(TokenizerBundle.from_preset("tiny-llama").chat_template) == "llama3_json"
    assert format_for(TokenizerBundle.from_preset("tiny-qwen2").chat_template) == "hermes"
    assert format_for(TokenizerBundle.from_preset("tiny-mistral").chat_template) is None
    assert format_for(None) is None


def test_plans_and_refusals():
    assert plan_tools(None, None, "hermes") is None
    assert plan_tools([WEATHER], "none", "hermes") is None
    auto = plan_tools([WEATHER, TIME], "auto", "hermes")
    assert not auto.forced and set(auto.functions) == {"get_weather", "get_time"}
    assert plan_tools([WEATHER, TIME], "required", "llama3_json").forced
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}},
                       "hermes")
    assert named.forced and "get_time" in named.grammar and "get_weather" not in named.grammar
    for tools, choice, fmt, param in (
            (None, "required", "hermes", "tool_choice"),
            ([WEATHER], "sometimes", "hermes", "tool_choice"),
            ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "hermes",
             "tool_choice"),
            ([WEATHER, WEATHER], "auto", "hermes", "tools.1"),
            ([{"type": "function", "function": {"name": "x", "parameters": [1]}}], "auto",
             "hermes", "tools.0"),
            ([WEATHER], "auto", None, "tools"),
            ([WEATHER], {"type": "function", "function": "get_weather"}, "hermes",
             "tool_choice"),
            ([{"type": "function", "function": {"name": "get_weather\n"}}], "auto", "hermes",
             "tools.0"),
            ([{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "$defs": [1]}}}], "required", "hermes", "tools"),
            ([{"type": "function", "function": {"name": f"f{i}", "description": "x" * 100}}
              for i in range(11_000)], "auto", "hermes", "tools")):
        with pytest.raises(InvalidRequestError) as e:
            plan_tools(tools, choice, fmt)
        assert e.value.param == param


def test_replies_read_back_into_calls():
    hermes = plan_tools([WEATHER, TIME], "auto", "hermes")
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo",'
            ' "days": 2}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
            '</tool_call>')
    content, calls = parse_calls(hermes, text)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Oslo", "days": 2}), ("get_time", {})]
    assert len({c["id"] for c in calls}) == 2
    assert parse_calls(hermes, "No call here.") == ("No call here.", [])
    unknown = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert parse_calls(hermes, unknown) == (unknown, [])
    # text between and after calls stays; parallel_tool_calls false keeps the first call
    around = text.replace("</tool_call>\n<tool_call>", "</tool_call>\nMeanwhile.\n<tool_call>")
    content, calls = parse_calls(hermes, around + "\nDone.")
    assert content == "Let me check.\nMeanwhile.\nDone."
    assert len(calls) == 2
    single = plan_tools([WEATHER, TIME], "auto", "hermes", parallel=False)
    assert [c["function"]["name"] for c in parse_calls(single, text)[1]] == ["get_weather"]
    llama = plan_tools([WEATHER], "auto", "llama3_json")
    _, calls = parse_calls(llama, ' {"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert parse_calls(llama, "{not json") == ("{not json", [])
    llama2 = plan_tools([WEATHER, TIME], "auto", "llama3_json")
    one = '{"name": "get_time", "parameters": {}}'
    two = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    for reply in (f"{one}; {two}", f"[{one}, {two}]", f"<|python_tag|>{one};{two}"):
        assert [c["function"]["name"] for c in parse_calls(llama2, reply)[1]] == \
            ["get_time", "get_weather"], reply
    assert parse_calls(llama2, f"{one} and then") == (f"{one} and then", [])
    # streaming: text goes out up to where a call may begin
    assert may_be_call(hermes, "Sure <tool") == len("Sure")
    assert may_be_call(hermes, "Sure\n<tool_call>{") == len("Sure")
    assert may_be_call(hermes, "Sure, and ") == len("Sure, and")
    assert may_be_call(hermes, "Sure.") == len("Sure.")
    assert may_be_call(llama, "  {") == 0 and may_be_call(llama, "Hi") == 2


def test_forced_arguments_are_objects_and_schema_references_resolve():
    """A tool without parameters takes none (an empty schema would admit `"arguments": 5`,
    which no call parses from); `$defs` / `definitions` and `$ref`s (pydantic writes them)
    are moved to the grammar's root, where llguidance looks references up."""
    import llguidance

    from engine.tokenizer import TokenizerBundle

    tok = TokenizerBundle.from_preset("tiny-qwen2")
    llt = llguidance.LLTokenizer(tok.tokenizer.to_str(), n_vocab=tok.vocab_size)
    ping = {"type": "function", "function": {"name": "ping"}}
    book = {"type": "function", "function": {"name": "book", "parameters": {
        "$defs": {"City": {"enum": ["Paris", "Oslo"]}},
        "definitions": {"Days": {"type": "integer", "minimum": 1, "maximum": 3}},
        "type": "object", "additionalProperties": False, "required": ["to", "days"],
        "properties": {"to": {"$ref": "#/$defs/City"},
                       "days": {"$ref": "#/definitions/Days"},
                       "then": {"anyOf": [{"type": "null"}, {"$ref": "#"}]}}}}}

    def admits(plan, text: str) -> bool:
        matcher = llguidance.LLMatcher(llt, plan.grammar)
        return matcher.consume_tokens(tok.encode(text, add_special_tokens=False)) and \
            matcher.is_stopped()

    plan = plan_tools([ping, book], "required", "hermes")
    call = '<tool_call>\n{"name":"%s","arguments":%s}\n</tool_call>'
    assert admits(plan, call % ("ping", "{}"))
    assert not admits(plan, call % ("ping", "5"))
    assert admits(plan, call % ("book", '{"to":"Oslo","days":2}'))
    assert admits(plan, call % ("book", '{"to":"Oslo","days":2,"then":{"to":"Paris",'
                                        '"days":1,"then":null}}'))
    assert not admits(plan, call % ("book", '{"to":"Rome","days":2}'))
    _, calls = parse_calls(plan, call % ("book", '{"to":"Oslo","days":2}'))
    assert json.loads(calls[0]["function"]["arguments"]) == {"to": "Oslo", "days": 2}


def test_forcing_grammars_admit_their_calls():
    import llguidance

    from engine.tokenizer import TokenizerBundle

    for preset, fmt, text in (
            ("tiny-qwen2", "hermes", '<tool_call>\n{"name":"get_weather","arguments":'
                                     '{"city":"Paris","days":3}}\n</tool_call>'),
            ("tiny-llama", "llama3_json", '{"name":"get_weather","parameters":'
                                          '{"city":"Paris","days":3}}')):
        tok = TokenizerBundle.from_preset(preset)
        plan = plan_tools([WEATHER, TIME], "required", fmt)
        llt = llguidance.LLTokenizer(tok.tokenizer.to_str(), n_vocab=tok.vocab_size)
        matcher = llguidance.LLMatcher(llt, plan.grammar)
        assert matcher.consume_tokens(tok.encode(text, add_special_tokens=False)), \
            matcher.get_error()
        assert matcher.is_stopped()
        _, calls = parse_calls(plan, text)
        assert calls[0]["function"]["name"] == "get_weather"


MODES = {"aggregated": ["--prefill", "0", "--decode", "1"],
         "1p1d": ["--prefill", "1", "--decode", "1", "--kv-transfer", "tcp"]}


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-llama-untied", "tiny-qwen2"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_forced_call_served_equals_transformers_under_its_grammar(checkpoint_dir, preset,
                                                                   mode):
    import openai

    from cluster.local_server import baton_serve
    from engine.tokenizer import TokenizerBundle
    from tests.hf_oracle import hf_greedy_constrained, load_hf

    model_dir = checkpoint_dir(preset)
    tok = TokenizerBundle.from_dir(model_dir)
    plan = plan_tools([WEATHER, TIME], "required", format_for(tok.chat_template))
    messages = [{"role": "user", "content": "Weather in Paris for three days?"}]
    expected = hf_greedy_constrained(load_hf(model_dir), tok,
                                     tok.chat_prompt_ids(messages, plan.tools), plan.grammar,
                                     96)
    with baton_serve(model_dir, *MODES[mode], "--kv-blocks", "256") as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        # (a stop string does not cut a forced call: the grammar decides where it ends)
        kw = dict(model=model_dir.name, messages=messages, tools=[WEATHER, TIME],
                  tool_choice="required", max_tokens=96, temperature=0, stop=["name"])
        r = c.chat.completions.create(**kw, extra_body={"return_token_ids": True})
        choice = r.choices[0]
        assert choice.token_ids == expected
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert args["city"] in ("Paris", "Oslo") and 1 <= args["days"] <= 7
        else:
            assert call.function.name == "get_time"
        # Streamed: no text goes out; the call's arguments come as they are generated,
        # accumulated by index as clients do, to the whole reply's call.
        deltas = [ch.choices[0] for ch in c.chat.completions.create(**kw, stream=True)
                  if ch.choices]
        pieces = [t for d in deltas for t in d.delta.tool_calls or []]
        assert len(pieces) > 2 and {t.index for t in pieces} == {0}
        assert pieces[0].function.name == call.function.name and pieces[0].id
        assert "".join(t.function.arguments or "" for t in pieces) == call.function.arguments
        assert not "".join(d.delta.content or "" for d in deltas)
        assert deltas[-1].finish_reason == "tool_calls"
        # A named function, and a conversation carrying the call and its result back.
        named = c.chat.completions.create(**{**kw, "tool_choice": {
            "type": "function", "function": {"name": "get_time"}}})
        assert named.choices[0].message.tool_calls[0].function.name == "get_time"
        metrics = httpx.get(f"{url}/metrics").text
        assert 'baton_constrained_requests_total{kind="tool_choice"} 3.0' in metrics
        assert "baton_tool_calls_total 3.0" in metrics
        follow = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": model_dir.name, "max_tokens": 4, "temperature": 0,
            "tools": [WEATHER], "messages": [*messages, {
                "role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]})
        assert follow.status_code == 200, follow.text


@pytest.mark.parametrize("text", [
    "Plain text, no call at all.",
    "I'll check.\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>",
    "A\n<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>\n  B \n"
    "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>",
    "Mentions <tool_call> but never closes it",
    "<tool_call>{\"name\": \"unknown\", \"arguments\": {}}</tool_call> tail"])
def test_streamed_reply_says_what_the_whole_reply_says(text):
    """A reply streamed in pieces of every size: the content deltas add up to the
    non-streamed content, and the calls are the same."""
    from engine.tokenizer import TokenizerBundle
    from router.responses import ChoiceState, Delta, Formatter

    tok = TokenizerBundle.from_preset("tiny-qwen2")
    plan = plan_tools([WEATHER, TIME], "auto", "hermes")
    whole = Formatter("chat", "x", "m", tok, False, None, plan)
    done = ChoiceState(0, [1], None, text=text, finish_reason="stop")
    message = whole.full([done])["choices"][0]["message"]
    for size in (1, 3, 7, len(text)):
        fmt = Formatter("chat", "x", "m", tok, False, None, plan)
        state = ChoiceState(0, [1], None)
        content, calls = "", []
        for at in range(0, len(text), size):
            piece = text[at:at + size]
            state.text += piece
            last = at + size >= len(text)
            delta, finish = fmt._chat_delta(Delta(0, piece, [], [], [], "stop" if last else
                                                  None), state)
            content += delta.get("content") or ""
            calls += delta.get("tool_calls") or []
        assert content == (message["content"] or "")
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
            [(c["function"]["name"], c["function"]["arguments"])
             for c in message.get("tool_calls", [])]
        assert finish == ("tool_calls" if calls else "stop")


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.device_count() >= 2, reason="needs 2 GPUs")
def test_forced_call_and_schema_on_gpus_1p1d(checkpoint_dir):
    """On two GPUs (prefill GPU0, decode GPU1, KV over nccl, float32): a forced tool call
    and a JSON-schema reply equal transformers' greedy under the same grammars."""
    from cluster.local_server import baton_serve
    from engine.structured import grammar_for
    from engine.tokenizer import TokenizerBundle
    from tests.hf_oracle import hf_greedy_constrained, load_hf
    from tests.test_structured_outputs import RESPONSE_FORMAT

    model_dir = checkpoint_dir("tiny-llama-untied")
    tok = TokenizerBundle.from_dir(model_dir)
    hf = load_hf(model_dir)
    plan = plan_tools([WEATHER, TIME], "required", format_for(tok.chat_template))
    messages = [{"role": "user", "content": "Weather in Paris for three days?"}]
    with baton_serve(model_dir, "--prefill", "1", "--decode", "1", "--device", "cuda",
                     "--dtype", "float32", "--prefill-gpus", "0", "--decode-gpus", "1",
                     "--kv-transfer", "nccl", "--kv-blocks", "256", timeout=300) as url:
        def chat(**body) -> dict:  # plain HTTP: the GPU machines lack the openai client
            r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                "model": model_dir.name, "messages": messages, "temperature": 0,
                "return_token_ids": True, **body})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]

        choice = chat(tools=[WEATHER, TIME], tool_choice="required", max_tokens=96)
        assert choice["token_ids"] == hf_greedy_constrained(
            hf, tok, tok.chat_prompt_ids(messages, plan.tools), plan.grammar, 96)
        assert choice["message"]["tool_calls"]
        choice = chat(response_format=RESPONSE_FORMAT, max_tokens=64)
        assert choice["token_ids"] == hf_greedy_constrained(
            hf, tok, tok.chat_prompt_ids(messages), grammar_for(RESPONSE_FORMAT), 64)
        assert json.loads(choice["message"]["content"])["answer"] in ("yes", "no")


@pytest.mark.parametrize("fmt,text", [
    ("hermes", '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo","days":2}}\n'
               '</tool_call>'),
    ("llama3_json", '{"name":"get_time","parameters":{"zone":"UTC"}}')])
def test_a_forced_call_streams_its_arguments_as_they_come(fmt, text):
    """Cut at every point: the deltas, accumulated by index, give the whole reply's call
    (its arguments as generated); cut at max_tokens, both give the partial arguments."""
    from engine.tokenizer import TokenizerBundle
    from router.responses import ChoiceState, Delta, Formatter

    tok = TokenizerBundle.from_preset("tiny-qwen2")
    plan = plan_tools([WEATHER, TIME], "required", fmt)
    for end, reason in ((len(text), "stop"), (text.index(":{") + 6, "length")):
        reply = text[:end]
        whole = Formatter("chat", "x", "m", tok, False, None, plan).full(
            [ChoiceState(0, [1], None, text=reply, finish_reason=reason)])["choices"][0]
        (call,) = whole["message"]["tool_calls"]
        assert whole["message"]["content"] is None
        assert whole["finish_reason"] == ("tool_calls" if reason == "stop" else "length")
        fmt_ = Formatter("chat", "x", "m", tok, False, None, plan)
        state, pieces = ChoiceState(0, [1], None), []
        for at in range(0, end, 3):
            state.text += reply[at:at + 3]
            delta, finish = fmt_._chat_delta(Delta(0, "", [], [], [], reason if at + 3 >= end
                                                   else None), state)
            assert not delta.get("content")
            pieces += delta.get("tool_calls") or []
        assert pieces[0]["function"]["name"] == call["function"]["name"]
        assert "".join(p["function"]["arguments"] for p in pieces) == \
            call["function"]["arguments"]
        assert finish == whole["finish_reason"]
    assert json.loads(parse_calls(plan, text)[1][0]["function"]["arguments"])
