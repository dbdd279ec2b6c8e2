"""Turning generated tokens into OpenAI response bodies and SSE chunks."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.tokenizer import IncrementalDetokenizer, TokenizerBundle
from router.tools import ForcedCallStream, ToolPlan, may_be_call, parse_calls


@dataclass
class ChoiceState:
    """Everything one choice accumulated: what the final body and usage need."""

    index: int
    prompt_token_ids: list[int]
    detok: IncrementalDetokenizer
    # Another choice of the same prompt (n > 1) already counts the prompt in usage.
    shares_prompt: bool = False
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cached_tokens: int = 0
    route: dict[str, str] = field(default_factory=dict)  # role -> worker address
    # Where its time to first token went, in ms (router/generation.py TokenEvent.timing,
    # plus the router's own "ttft_ms").
    timing: dict[str, float] = field(default_factory=dict)
    # echo: the prompt's text, returned before the completion, and (with logprobs) the
    # prompt's logprobs (entry i for prompt token i + 1); max_tokens 0 with echo scores
    # the prompt only (the one token the worker generates is dropped).
    echo_text: str | None = None
    echo_offsets: list[int] | None = None  # each prompt token's start in echo_text
    score_only: bool = False
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class Delta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str | None


def usage(choices: list[ChoiceState]) -> dict:
    """As OpenAI counts: each prompt once, however many choices (n) it has."""
    firsts = [c for c in choices if not c.shares_prompt]
    prompt = sum(len(c.prompt_token_ids) for c in firsts)
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in firsts)}}


def _token_str(tok: TokenizerBundle, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tok: TokenizerBundle, token_ids: list[int], logprobs: list[float],
                        tops: list[list[tuple[int, float]]], text_offset: int) -> dict:
    tokens = [_token_str(tok, t) for t in token_ids]
    offsets, pos = [], text_offset
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    top = [{_token_str(tok, t): lp for t, lp in row} for row in tops] if tops else None
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top,
            "text_offset": offsets}


def echo_logprobs(tok: TokenizerBundle, state: ChoiceState, with_top: bool) -> dict:
    """The prompt's part of an echoed completion's logprobs: the first token has none."""
    ids = state.prompt_token_ids
    lps = [None, *(state.prompt_logprobs or [])][: len(ids)]
    lps += [None] * (len(ids) - len(lps))
    tops = [None, *({_token_str(tok, t): lp for t, lp in row}
                    for row in state.prompt_top_logprobs or [])][: len(ids)]
    tops += [None] * (len(ids) - len(tops))
    body = completion_logprobs(tok, ids, lps, [], 0)
    body["top_logprobs"] = tops if with_top else None
    if state.echo_offsets is not None:
        body["text_offset"] = list(state.echo_offsets)
    return body


def chat_logprobs(tok: TokenizerBundle, token_ids: list[int], logprobs: list[float],
                  tops: list[list[tuple[int, float]]]) -> dict:
    def entry(t: int, lp: float) -> dict:
        s = _token_str(tok, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    content = []
    for i, (t, lp) in enumerate(zip(token_ids, logprobs)):
        e = entry(t, lp)
        e["top_logprobs"] = [entry(a, b) for a, b in tops[i]] if i < len(tops) else []
        content.append(e)
    return {"content": content}


class Formatter:
    """Builds bodies for one request (completion or chat), streaming or not."""

    def __init__(self, kind: str, request_id: str, model: str, tok: TokenizerBundle,
                 return_token_ids: bool, logprobs: int | None,
                 tools: ToolPlan | None = None,
                 on_calls: Callable[[int], None] | None = None) -> None:
        self.kind = kind
        self.tools = tools  # replies are read for tool calls (router/tools.py)
        self.on_calls = on_calls or (lambda n: None)  # counts the calls returned
        self._content_sent: dict[int, int] = {}  # streamed chars of each choice's text
        self._forced: dict[int, ForcedCallStream] = {}  # a forced call's, by choice
        self.id = request_id
        self.model = model
        self.tok = tok
        self.return_token_ids = return_token_ids
        self.logprobs = logprobs
        self.created = int(time.time())
        self._text_offset: dict[int, int] = {}

    def _lp(self, index: int, token_ids, logprobs, tops,
            echo: ChoiceState | None = None) -> dict | None:
        """`echo`: the choice whose prompt part goes first (its first chunk, or the whole
        body)."""
        if self.logprobs is None:
            return None
        tops = tops if self.logprobs > 0 else []
        if self.kind == "chat":
            return chat_logprobs(self.tok, token_ids, logprobs, tops)
        off = self._text_offset.get(index, 0)
        head = None
        if echo is not None:
            head = echo_logprobs(self.tok, echo, self.logprobs > 0)
            off += len(echo.echo_text) if echo.echo_offsets is not None \
                else sum(len(t) for t in head["tokens"])
        body = completion_logprobs(self.tok, token_ids, logprobs, tops, off)
        self._text_offset[index] = off + sum(len(t) for t in body["tokens"])
        if head is not None:
            body = {"tokens": head["tokens"] + body["tokens"],
                    "token_logprobs": head["token_logprobs"] + body["token_logprobs"],
                    "top_logprobs": None if head["top_logprobs"] is None
                    else head["top_logprobs"] + (body["top_logprobs"] or []),
                    "text_offset": head["text_offset"] + body["text_offset"]}
        return body

    def chunk(self, d: Delta, state: ChoiceState, first: bool) -> str:
        echo = None  # the choice's first completion chunk leads with its prompt
        if self.kind == "chat":
            delta, finish = self._chat_delta(d, state)
            if first:
                delta = {"role": "assistant", **delta}
            choice: dict = {"index": d.index, "delta": delta, "logprobs": None,
                            "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            echo = state if first and state.echo_text is not None else None
            choice = {"index": d.index, "text": (echo.echo_text if echo else "") + d.text,
                      "logprobs": None, "finish_reason": d.finish_reason}
            obj = "text_completion"
        choice["logprobs"] = self._lp(d.index, d.token_ids, d.logprobs, d.top_logprobs, echo)
        if self.return_token_ids:
            choice["token_ids"] = d.token_ids
            if first:
                choice["prompt_token_ids"] = state.prompt_token_ids
        return self._sse({"id": self.id, "object": obj, "created": self.created,
                          "model": self.model, "choices": [choice]})

    def _chat_delta(self, d: Delta, state: ChoiceState) -> tuple[dict, str | None]:
        """A chat chunk's delta and finish reason. With tools, text that may be a call
        is held back (router/tools.py may_be_call) until the reply ends, then sent as the
        calls it parses to or as text."""
        if self.tools is None:
            return {"content": d.text}, d.finish_reason
        if self.tools.forced:  # the arguments stream as they come
            stream = self._forced.setdefault(d.index, ForcedCallStream(self.tools))
            calls = stream.delta(state.text)
            if d.finish_reason:
                self._forced.pop(d.index, None)
                if stream.call is None:  # cut before the name was whole: as text
                    return {"content": state.text}, d.finish_reason
                self.on_calls(1)
                return {"tool_calls": calls} if calls else {}, \
                    _finish_with_calls(d.finish_reason)
            return ({"tool_calls": calls} if calls else {}), None
        sent = self._content_sent.get(d.index, 0)
        if not d.finish_reason:
            upto = max(may_be_call(self.tools, state.text), sent)
            self._content_sent[d.index] = upto
            return {"content": state.text[sent:upto]}, None
        self._content_sent.pop(d.index, None)
        content, calls = parse_calls(self.tools, state.text)
        if not calls:
            return {"content": state.text[sent:]}, d.finish_reason
        # the text around the calls not yet sent (what was sent is its start)
        head = (content or "")[sent:]
        delta: dict = {"content": head or None,
                       "tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
        self.on_calls(len(calls))
        return delta, _finish_with_calls(d.finish_reason)

    def usage_chunk(self, choices: list[ChoiceState]) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._sse({"id": self.id, "object": obj, "created": self.created,
                          "model": self.model, "choices": [], "usage": usage(choices),
                          "baton_timing": [c.timing for c in choices]})

    def full(self, choices: list[ChoiceState]) -> dict:
        out = []
        for c in choices:
            self._text_offset.pop(c.index, None)
            echo = c if c.echo_text is not None and self.kind != "chat" else None
            lp = self._lp(c.index, c.token_ids, c.logprobs, c.top_logprobs, echo)
            if self.kind == "chat":
                message: dict = {"role": "assistant", "content": c.text}
                finish = c.finish_reason
                if self.tools is not None:
                    content, calls = parse_calls(self.tools, c.text)
                    if calls:
                        message = {"role": "assistant", "content": content,
                                   "tool_calls": calls}
                        finish = _finish_with_calls(finish)
                        self.on_calls(len(calls))
                item: dict = {"index": c.index, "message": message,
                              "logprobs": lp, "finish_reason": finish}
            else:
                item = {"index": c.index, "text": (c.echo_text or "") + c.text,
                        "logprobs": lp, "finish_reason": c.finish_reason}
            if self.return_token_ids:
                item["token_ids"] = c.token_ids
                item["prompt_token_ids"] = c.prompt_token_ids
            out.append(item)
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        # Baton extras: where each choice ran and where its time to first token went
        # (clients ignore unknown fields).
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": out, "usage": usage(choices),
                "baton_route": [c.route for c in choices],
                "baton_timing": [c.timing for c in choices]}

    @staticmethod
    def _sse(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    @staticmethod
    def error_event(status: int, message: str, param: str | None = None) -> str:
        return Formatter._sse({"error": {"message": message, "type": "internal_server_error"
                                         if status >= 500 else "invalid_request_error",
                                         "param": param, "code": None}})


def _finish_with_calls(reason: str | None) -> str | None:
    """A reply that ended on its own and made calls finished for "tool_calls"; one cut
    at max_tokens keeps "length"."""
    return "tool_calls" if reason == "stop" else reason
