"""Bad requests get HTTP 400 with OpenAI's error JSON and leave the server serving; a client
that hangs up mid-stream frees its blocks on both workers; a dead decode worker's
requests move to another one (migration) and a dead prefill worker's are retried."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest

from cluster.local_server import baton_serve, wait_pools_empty

pytestmark = pytest.mark.slow
PRESET = "tiny-llama"


@pytest.fixture(scope="module")
def url(checkpoint_dir):
    with baton_serve(checkpoint_dir(PRESET), "--prefill", "1", "--decode", "1",
                     "--kv-blocks", "512", "--max-model-len", "1024") as u:
        yield u


def post(url: str, path: str, body, raw: bool = False) -> httpx.Response:
    data = body if raw else json.dumps(body)
    return httpx.post(f"{url}{path}", content=data,
                      headers={"Content-Type": "application/json"}, timeout=30)


OK = {"model": PRESET, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
CHAT = {"model": PRESET, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
BAD = [
    ("malformed json", "/v1/completions", '{"model": "tiny-llama", "prompt": ', None),
    ("max_tokens < 1", "/v1/completions", {**OK, "max_tokens": 0}, "max_tokens"),
    ("stream not a boolean", "/v1/completions", {**OK, "stream": "yes"}, "stream"),
    ("max_tokens a boolean", "/v1/completions", {**OK, "max_tokens": True}, "max_tokens"),
    ("n a float", "/v1/completions", {**OK, "n": 2.5}, "n"),
    ("prompt beyond context", "/v1/completions", {**OK, "prompt": [5] * 1100}, "max_tokens"),
    ("temperature < 0", "/v1/completions", {**OK, "temperature": -0.5}, "temperature"),
    ("empty messages", "/v1/chat/completions",
     {"model": PRESET, "messages": [], "max_tokens": 4}, "messages"),
    ("wrong type", "/v1/completions", {**OK, "max_tokens": "lots"}, "max_tokens"),
    ("prompt of wrong type", "/v1/completions", {**OK, "prompt": {"a": 1}}, "prompt"),
    ("token id out of vocab", "/v1/completions", {**OK, "prompt": [10**7]}, "prompt"),
    ("top_p out of range", "/v1/completions", {**OK, "top_p": 1.5}, "top_p"),
    ("n > 128", "/v1/completions", {**OK, "n": 129}, "n"),
    ("bad role", "/v1/chat/completions",
     {"model": PRESET, "messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("seed past 64 bits", "/v1/completions", {**OK, "seed": 2**63}, "seed"),
    ("stop token id past 32 bits", "/v1/completions", {**OK, "stop_token_ids": [2**40]},
     "stop_token_ids"),
    ("top_k past 32 bits", "/v1/completions", {**OK, "top_k": 2**40}, "top_k"),
    # Asked-for features this server lacks fail, rather than being silently ignored.
    ("functions (the deprecated tools)", "/v1/chat/completions",
     {**CHAT, "functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("a tool that is no function", "/v1/chat/completions",
     {**CHAT, "tools": [{"type": "function"}]}, "tools.0"),
    ("a tool with a bad name", "/v1/chat/completions",
     {**CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0"),
    ("tool_choice without tools", "/v1/chat/completions", {**CHAT, "tool_choice": "required"},
     "tool_choice"),
    ("an assistant tool call that is no function", "/v1/chat/completions", {**CHAT,
     "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                  "tool_calls": [{"id": "c", "type": "function", "function": "f"}]}]},
     "messages"),
    ("an assistant tool call with a numeric name", "/v1/chat/completions", {**CHAT,
     "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                  "tool_calls": [{"id": "c", "type": "function", "function": {
                      "name": 5, "arguments": "{}"}}]}]}, "messages"),
    ("tool_calls not a list", "/v1/chat/completions", {**CHAT,
     "messages": [{"role": "assistant", "content": None, "tool_calls": {"id": "c"}}]},
     "messages.0.tool_calls"),
    ("tool_choice naming no tool", "/v1/chat/completions", {**CHAT, "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {
        "type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ("response_format of unknown type", "/v1/chat/completions",
     {**CHAT, "response_format": {"type": "xml"}}, "response_format"),
    ("json_schema without a schema object", "/v1/chat/completions",
     {**CHAT, "response_format": {"type": "json_schema", "json_schema": "{}"}},
     "response_format"),
    # Accepted, but llguidance gives up on it after the first token (a parse row past its
    # limits): the call fails naming the field instead of returning broken JSON as "stop".
    ("json_schema too complex to follow", "/v1/chat/completions",
     {**CHAT, "max_tokens": 20, "response_format": {"type": "json_schema", "json_schema": {
         "name": "big", "schema": {"type": "object", "properties": {
             f"p{i}": {"type": "integer"} for i in range(600)}}}}}, "response_format"),
    ("response_format without a type", "/v1/chat/completions",
     {**CHAT, "response_format": {"json_schema": {"schema": {}}}}, "response_format"),
    ("json_schema of a bad type", "/v1/completions",
     {**OK, "response_format": {"type": "json_schema", "json_schema": {
         "name": "x", "schema": {"type": "objectx"}}}}, "response_format"),
    ("image part", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]},
     "messages.0.content"),
    ("logit_bias key not a token id", "/v1/completions", {**OK, "logit_bias": {"a": 10}},
     "logit_bias"),
    ("logit_bias beyond 100", "/v1/completions", {**OK, "logit_bias": {"5": 101}},
     "logit_bias"),
    ("logit_bias beyond the vocabulary", "/v1/completions",
     {**OK, "logit_bias": {"99999999": 1}}, "logit_bias"),
    ("repetition_penalty 0", "/v1/completions", {**OK, "repetition_penalty": 0},
     "repetition_penalty"),
    ("min_p above 1", "/v1/completions", {**OK, "min_p": 1.5}, "min_p"),
    # float32 on the wire: a tiny one arrived as 0 and failed on the worker (a 503)
    ("repetition_penalty tiny", "/v1/completions", {**OK, "repetition_penalty": 1e-46},
     "repetition_penalty"),
    ("a lone surrogate in the prompt", "/v1/completions", {**OK, "prompt": "\ud800"},
     "prompt"),
    ("a lone surrogate in a message", "/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": "\ud800"}]}, "messages"),
    ("a constraint past 1 MiB", "/v1/completions",
     {**OK, "guided_choice": [f"choice number {i}" for i in range(70_000)]}, "guided_choice"),
    ("a lone surrogate in guided_choice", "/v1/completions",
     {**OK, "guided_choice": ["\ud800x"]}, "guided_choice"),
    ("guided_json of a bad type", "/v1/completions",
     {**OK, "guided_json": {"type": "objectx"}}, "guided_json"),
    ("a forced tool call with guided_choice", "/v1/chat/completions", {
        **CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "required", "guided_choice": ["a"]}, "guided_choice"),
    ("priority not an integer", "/v1/completions", {**OK, "priority": "high"}, "priority"),
    ("priority past 32 bits", "/v1/completions", {**OK, "priority": 2**40}, "priority"),
    ("suffix", "/v1/completions", {**OK, "suffix": "end"}, "suffix"),
    ("best_of", "/v1/completions", {**OK, "best_of": 3}, "best_of"),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**CHAT, "top_logprobs": 2},
     "top_logprobs"),
    ("max_completion_tokens 0", "/v1/chat/completions", {**CHAT, "max_completion_tokens": 0},
     "max_completion_tokens"),
]


@pytest.mark.parametrize("name,path,body,param", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_openai_400(url, name, path, body, param):
    r = post(url, path, body, raw=isinstance(body, str))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] and err["param"].startswith(param), err
        assert not any(t in err["param"] for t in (".str", "[")), err  # no union members
    # ...and the server keeps serving.
    ok = post(url, "/v1/completions", OK)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_unknown_model_is_404_as_at_openai(url):
    for r in (post(url, "/v1/completions", {**OK, "model": "gpt-9", "n": 0}),
              httpx.get(f"{url}/v1/models/gpt-9")):
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "model_not_found"  # before any other check
    card = httpx.get(f"{url}/v1/models/{PRESET}").json()
    assert (card["id"], card["object"]) == (PRESET, "model")
    r = httpx.get(f"{url}/v1/nowhere")  # unknown paths answer in the same shape
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_null_means_the_default(url):
    """Clients send null for fields left unset (the openai client: temperature=None)."""
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stream", "presence_penalty",
                           "frequency_penalty", "logprobs", "echo"])
    r = post(url, "/v1/completions", {**OK, **nulls})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    r = post(url, "/v1/chat/completions", {**CHAT, **nulls, "echo": None})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None, r.text


def test_client_disconnect_frees_blocks_on_both_workers(url):
    body = {**OK, "max_tokens": 900, "ignore_eos": True, "stream": True,
            "prompt": "a long prompt " * 20}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = 0
        for line in r.iter_lines():
            lines += line.startswith("data:")
            if lines >= 3:
                break  # hang up while the decode worker is mid-generation
    workers = wait_pools_empty(url)
    assert {w["role"] for w in workers} == {"prefill", "decode"}


def test_client_gone_before_a_non_streaming_answer_stops_its_generation(url):
    """A client that times out on a non-streaming request: the router cancels its choices
    within its 0.5 s check, as when a stream's client hangs up, instead of the workers
    generating all 32 x 900 tokens for nobody."""
    import re

    def generated() -> float:
        text = httpx.get(f"{url}/metrics").text
        return float(re.search(r"^baton_generation_tokens_total ([\d.e+]+)$", text,
                               re.M).group(1))

    before = generated()
    body = {**OK, "max_tokens": 900, "ignore_eos": True, "n": 32,
            "prompt": "a long prompt " * 20}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=1.0)
    wait_pools_empty(url, timeout=60)
    assert generated() - before < 0.5 * 32 * 900


def test_stop_string_ends_stream_and_frees_blocks(url):
    first = post(url, "/v1/completions", {**OK, "max_tokens": 30, "ignore_eos": True}).json()
    text = first["choices"][0]["text"]
    stop = text[5:8]
    assert stop
    r = post(url, "/v1/completions", {**OK, "max_tokens": 30, "ignore_eos": True,
                                      "stop": [stop]}).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == text[: text.index(stop)]
    wait_pools_empty(url)


def test_decode_worker_death_migrates_request(checkpoint_dir):
    with baton_serve(checkpoint_dir(PRESET), "--prefill", "1", "--decode", "2",
                     "--kv-blocks", "512") as u:
        body = {**OK, "max_tokens": 200, "ignore_eos": True}
        ref = post(u, "/v1/completions", body).json()["choices"][0]["text"]
        text, killed = "", None
        with httpx.stream("POST", f"{u}/v1/completions", json={**body, "stream": True},
                          timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                chunk = json.loads(line[5:])
                assert "error" not in chunk, chunk
                text += "".join(c["text"] for c in chunk["choices"])
                if killed is None and len(text) > 5:
                    workers = httpx.get(f"{u}/health").json()["workers"]
                    busy = [w for w in workers if w["role"] == "decode" and w["in_flight"]]
                    assert len(busy) == 1, workers
                    killed = busy[0]["pid"]
                    os.kill(killed, signal.SIGKILL)  # mid-stream, no goodbye
        assert killed is not None
        assert text == ref  # one unbroken stream, the same tokens
        metrics = httpx.get(f"{u}/metrics").text
        assert "baton_migrations_total 1.0" in metrics


def test_a_killed_worker_is_restarted_on_its_address(checkpoint_dir):
    """`baton serve` starts a worker that died again, on the same address: the router finds
    it up at its next status poll and it serves again (here the only decode worker, so
    nothing could serve until it came back)."""
    from tests.test_discovery_e2e import wait_for

    with baton_serve(checkpoint_dir(PRESET), "--prefill", "1", "--decode", "1") as u:
        body = {**OK, "max_tokens": 12, "ignore_eos": True}
        ref = post(u, "/v1/completions", body).json()["choices"][0]["text"]
        (dead,) = [w for w in httpx.get(f"{u}/health").json()["workers"]
                   if w["role"] == "decode"]
        os.kill(dead["pid"], signal.SIGKILL)

        def back() -> bool:  # (the supervisor's restart count reaches the router on its
            # own path: it may trail the status poll that sees the new process)
            (w,) = [w for w in httpx.get(f"{u}/health").json()["workers"]
                    if w["role"] == "decode"]
            return w["healthy"] and w["pid"] not in (None, dead["pid"]) and w["restarts"]

        wait_for("the decode worker to be restarted", back, timeout=60)
        (w,) = [w for w in httpx.get(f"{u}/health").json()["workers"] if w["role"] == "decode"]
        assert w["address"] == dead["address"] and w["restarts"] == 1
        assert dead["restarts"] == 0
        assert post(u, "/v1/completions", body).json()["choices"][0]["text"] == ref
        wait_pools_empty(u)


def test_the_largest_seed_with_several_choices(url):
    """Choice j samples with seed + j, kept a signed 64-bit integer: the largest seed is
    as valid with n = 2 as with n = 1 (it was a 400 quoting a seed the client never sent)."""
    from router.app import _wrap_int64

    assert _wrap_int64(2**63) == -(2**63) and _wrap_int64(-(2**63) - 1) == 2**63 - 1
    r = post(url, "/v1/completions", {**OK, "temperature": 1.0, "seed": 2**63 - 1, "n": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text


def test_whole_floats_are_integers(url):
    """JSON does not tell 2.0 from 2: integer fields take it (and still refuse 2.5)."""
    r = post(url, "/v1/completions", {**OK, "max_tokens": 2.0, "n": 1.0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


def test_tokenize_and_detokenize(url, checkpoint_dir):
    """vLLM's /tokenize (a prompt, or messages rendered as chat completions renders them,
    tools included) and /detokenize; bad bodies are 400s naming the field."""
    from engine.tokenizer import TokenizerBundle

    tok = TokenizerBundle.from_dir(checkpoint_dir(PRESET))
    r = post(url, "/tokenize", {"model": PRESET, "prompt": "Hello there",
                                "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("Hello there") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 1024 and len(r["token_strs"]) == r["count"]
    assert post(url, "/tokenize", {"model": PRESET, "prompt": "Hello there",
                                   "add_special_tokens": False}).json()["tokens"] == \
        tok.encode("Hello there", add_special_tokens=False)
    messages = [{"role": "user", "content": "Hi"}]
    tools = [{"type": "function", "function": {"name": "f"}}]
    r = post(url, "/tokenize", {"model": PRESET, "messages": messages, "tools": tools}).json()
    assert r["tokens"] == tok.chat_prompt_ids(messages, tools)
    back = post(url, "/detokenize", {"model": PRESET, "tokens": r["tokens"]}).json()
    assert back["prompt"] == tok.apply_chat_template(messages, tools=tools)
    for path, body, param in (
            ("/tokenize", {"model": PRESET, "prompt": "\ud800"}, "prompt"),
            ("/tokenize", {"model": PRESET, "messages": [
                {"role": "assistant", "content": None, "tool_calls": 5}]},
             "messages.0.tool_calls"),
            ("/tokenize", {"model": PRESET, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content"),
            ("/tokenize", {"model": PRESET, "messages": []}, "messages"),
            ("/tokenize", {"model": PRESET}, "prompt"),
            ("/tokenize", {"model": PRESET, "prompt": "a", "messages": messages}, "prompt"),
            ("/tokenize", {"model": PRESET, "prompt": 5}, "prompt"),
            ("/detokenize", {"model": PRESET, "tokens": [10**9]}, "tokens"),
            ("/detokenize", {"model": PRESET, "tokens": ["a"]}, "tokens")):
        r = post(url, path, body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"].startswith(param), r.text
    assert post(url, "/tokenize", {"model": "gpt-9", "prompt": "a"}).status_code == 404


def test_priority_is_served(url):
    """vLLM's request priority reaches the workers (engine/scheduler.py orders by it)."""
    for priority in (-3, 0, 7, None):
        r = post(url, "/v1/completions", {**OK, "priority": priority})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
