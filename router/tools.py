"""Tool calling (OpenAI's `tools` / `tool_choice`) for chat completions.

The tools go to the chat template (as Hugging Face's `apply_chat_template(tools=...)`
passes them), and the model answers in its family's tool-call format, which the router
reads back into `tool_calls`:
- `hermes` (ChatML templates: Qwen, Hermes): `<tool_call>\\n{"name": ..., "arguments":
  {...}}\\n</tool_call>`, one block per call, after optional text;
- `llama3_json` (Llama 3.1+): the whole reply is `{"name": ..., "parameters": {...}}`
  (several calls: a JSON list of them, or separated by ';').

`tool_choice` "required" or a named function constrains decoding to that format with
the tools' parameter schemas (a grammar, engine/structured.py), so the call always
parses and its arguments match the schema; "auto" leaves the model free and reads a call
if the reply is one; "none" neither renders nor reads tools. The format follows the
template (`format_for`) unless `--tool-call-parser` names one.

Streaming: a forced call streams as OpenAI streams calls (id and name, then the arguments
as generated: `ForcedCallStream`). Otherwise text streams as it comes until it may be the
start of a call (the hermes tag, or a reply opening with "{" for llama3_json); from there
it is held back, and at the end goes out either as one delta carrying the parsed calls
(finish_reason "tool_calls") or, if it was no call after all, as text."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.errors import InvalidRequestError
from engine.structured import JSON_DEFAULTS

FORMATS = ("hermes", "llama3_json")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
MAX_TOOLS_CHARS = 1 << 20


def format_for(chat_template: str | None) -> str | None:
    """The tool-call format a chat template speaks, or None when it has none we know."""
    t = chat_template or ""
    if HERMES_OPEN in t or "<|im_start|>" in t:
        return "hermes"
    if "<|start_header_id|>" in t or "<|python_tag|>" in t:
        return "llama3_json"
    return None


@dataclass
class ToolPlan:
    """What one chat request does with tools: the functions (name -> parameters schema),
    whether replies are read for calls, and the grammar forcing one ("" when free)."""

    fmt: str
    functions: dict[str, dict] = field(default_factory=dict)
    tools: list[dict] = field(default_factory=list)  # as the template gets them
    grammar: str = ""
    parallel: bool = True  # parallel_tool_calls: false keeps a reply's first call only

    @property
    def forced(self) -> bool:
        return bool(self.grammar)


def plan_tools(tools: list[Any] | None, tool_choice: Any, fmt: str | None,
               parallel: bool = True) -> ToolPlan | None:
    """Validate `tools` and `tool_choice` (400s naming them) and plan the request; None
    when tools play no part (none given, or tool_choice "none")."""
    if tool_choice not in (None, "none", "auto", "required") and not isinstance(tool_choice,
                                                                                dict):
        raise InvalidRequestError(f"tool_choice must be none, auto, required or "
                                  f"{{'type': 'function', 'function': {{'name': ...}}}}, got "
                                  f"{tool_choice!r}", param="tool_choice")
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return None
    if len(json.dumps(tools)) > MAX_TOOLS_CHARS:  # compiled into a grammar when forced
        raise InvalidRequestError(f"tools are larger than {MAX_TOOLS_CHARS} characters of "
                                  "JSON", param="tools")
    functions: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
                not isinstance(fn, dict):
            raise InvalidRequestError("each tool must be {'type': 'function', 'function': "
                                      "{...}}", param=f"tools.{i}")
        name, params = fn.get("name"), fn.get("parameters")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRequestError(f"tools.{i}.function.name must be 1-64 letters, digits, "
                                      f"'_', '.' or '-', got {name!r}", param=f"tools.{i}")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequestError("function parameters must be a JSON Schema object",
                                      param=f"tools.{i}")
        if name in functions:
            raise InvalidRequestError(f"two tools are named {name!r}", param=f"tools.{i}")
        functions[name] = _arguments_schema(params)
    if tool_choice == "none":
        return None
    if fmt is None:
        raise InvalidRequestError("tool calling is not supported for this model's chat "
                                  "template (start the router with --tool-call-parser "
                                  f"{' or '.join(FORMATS)} if it speaks one)", param="tools")
    plan = ToolPlan(fmt, functions, [t for t in tools if isinstance(t, dict)],
                    parallel=parallel)
    if tool_choice in (None, "auto"):
        return plan
    names = list(functions)
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if tool_choice.get("type") == "function" and \
            isinstance(fn, dict) else None
        if name not in functions:
            raise InvalidRequestError(f"tool_choice names no given tool: {tool_choice!r}",
                                      param="tool_choice")
        names = [name]
    try:
        plan.grammar = _forcing_grammar(fmt, {n: functions[n] for n in names})
    except InvalidRequestError:
        raise
    except (TypeError, ValueError, UnicodeError) as e:  # e.g. "$defs" that is no object
        raise InvalidRequestError(f"a tool's parameters schema is not valid: {e}",
                                  param="tools") from None
    return plan


def _arguments_schema(params: dict | None) -> dict:
    """A function's arguments as a JSON Schema object: none (or an empty schema) is no
    arguments, as OpenAI reads an omitted `parameters`; a schema without a type is an
    object's (arguments are always an object; an empty schema would admit a number)."""
    if not params:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    if "type" not in params:
        return {"type": "object", **params}
    return params


def _hoisted(name: str, params: dict, defs: dict) -> dict:
    """`params` with its `$defs` / `definitions` moved into `defs` (the grammar's root,
    where a `$ref` is looked up) under names of this tool, and its `$ref`s rewritten to
    them; a reference into the schema itself points at a copy of it there."""
    own = {**params.get("$defs", {}), **params.get("definitions", {})}
    body = {k: v for k, v in params.items() if k not in ("$defs", "definitions")}
    root = f"{name}__root"

    def ref(target: str) -> str:
        for prefix in ("#/$defs/", "#/definitions/"):
            if target.startswith(prefix):
                return f"#/$defs/{name}__{target[len(prefix):]}"
        if target == "#" or target.startswith("#/"):
            defs[root] = fixed_body
            return f"#/$defs/{root}{target[1:]}"
        return target  # a remote reference: llguidance refuses it, naming it

    def fix(node):
        if isinstance(node, dict):
            return {k: ref(v) if k == "$ref" and isinstance(v, str) else fix(v)
                    for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    fixed_body: dict = {}
    fixed_body.update(fix(body))
    for key, sub in own.items():
        defs[f"{name}__{key}"] = fix(sub)
    return fixed_body


def _forcing_grammar(fmt: str, functions: dict[str, dict]) -> str:
    """A grammar admitting exactly one call of one of `functions` in `fmt`."""
    from llguidance import LLMatcher

    args_key = "parameters" if fmt == "llama3_json" else "arguments"
    defs: dict = {}
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", args_key],
              "properties": {"name": {"const": name},
                             args_key: _hoisted(name, params, defs)}}
             for name, params in functions.items()]
    schema: dict = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {**schema, "x-guidance": JSON_DEFAULTS}  # compact, as response_format's
    if defs:
        schema["$defs"] = defs
    if fmt == "llama3_json":
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema))
    else:
        grammar = LLMatcher.grammar_from_lark(
            f'start: "{HERMES_OPEN}\\n" call "\\n{HERMES_CLOSE}"\ncall: %json {json.dumps(schema)}')
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequestError(f"a tool's parameters schema is not supported: {error}",
                                  param="tools")
    return grammar


def parse_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished reply: the calls it makes to known tools, and
    the text around them (None when there is none). A reply that is no call is all
    content. A forced call's arguments are its text as generated (what streamed, piece by
    piece: `ForcedCallStream`); others' are re-serialized from the parsed JSON."""
    if plan.forced:  # complete, or cut at max_tokens (then its arguments are too)
        framed = forced_frame(plan, text)
        if framed is not None:
            return None, [_new_call(framed[0], framed[1])]
    if plan.fmt == "hermes":
        calls = []
        for body in _HERMES_CALL.findall(text):
            call = _call_of(plan, body, "arguments")
            if call is None:
                return text, []
            calls.append(call)
        if not calls:
            return text, []
        rest = hermes_content(text)  # the text around the calls, as it streamed
        return (rest if rest.strip() else None), calls[: None if plan.parallel else 1]
    calls = [_call_of(plan, obj, "parameters") for obj in _json_values(text)]
    if not calls or None in calls:
        return text, []
    return None, calls[: None if plan.parallel else 1]


def _json_values(text: str) -> list:
    """A Llama 3 reply as its JSON values: one call, a list of calls, or calls separated
    by ';' (all three occur); [] unless the whole reply is such values."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    decoder, values, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            value, at = decoder.raw_decode(body, at)
        except ValueError:
            return []
        values.extend(value if isinstance(value, list) else [value])
        while at < len(body) and (body[at].isspace() or body[at] == ";"):
            at += 1
    return values


def hermes_content(text: str) -> str:
    """A hermes reply's text outside its call blocks, a line each, without the blank space
    around the blocks; it begins as the reply did (what streamed before the first block
    is its start)."""
    first, *rest = _HERMES_CALL.split(text)[::2]  # split() also returns each block's body
    return first.rstrip() + "".join("\n" + seg.strip() for seg in rest if seg.strip())


def _call_of(plan: ToolPlan, body: Any, args_key: str) -> dict | None:
    """The call a reply's JSON makes (`body`: its text, or the value already parsed), or
    None when it is no call of a known tool."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return None
    obj = body
    if not isinstance(obj, dict) or obj.get("name") not in plan.functions:
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if not isinstance(args, dict):
        return None
    return _new_call(obj["name"], json.dumps(args, ensure_ascii=False))


def _new_call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _frame(plan: ToolPlan) -> tuple[str, str]:
    """(head, between) before a forced call's name and arguments: decoding under the
    forcing grammar writes exactly `head NAME between ARGS` and then closes the frame
    (compact JSON, the name first)."""
    if plan.fmt == "hermes":
        return f'{HERMES_OPEN}\n{{"name":"', '","arguments":'
    return '{"name":"', '","parameters":'


def forced_frame(plan: ToolPlan, text: str) -> tuple[str, str, bool] | None:
    """A forced call's reply so far: None until its name is complete; then (name, the
    arguments' text so far, whether they are complete). Arguments are one JSON object,
    so they are complete exactly when it decodes."""
    head, between = _frame(plan)
    if not text.startswith(head):
        return None
    end = text.find(between, len(head))
    if end < 0:
        return None
    start = end + len(between)
    try:
        _, stop = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return text[len(head):end], text[start:], False
    return text[len(head):end], text[start:stop], True


class ForcedCallStream:
    """Streams a forced call as OpenAI streams calls: a first delta with the call's id,
    name and the arguments so far once the name is complete, then the arguments as they
    are generated. What a whole reply returns (`parse_calls`) is the same call."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.call: dict | None = None
        self.sent = 0  # characters of the arguments streamed

    def delta(self, text: str) -> list[dict]:
        framed = forced_frame(self.plan, text)
        if framed is None:
            return []
        name, args, _ = framed
        piece, self.sent = args[self.sent:], len(args)
        if self.call is None:
            self.call = _new_call(name, piece)
            return [{"index": 0, **self.call}]
        return [{"index": 0, "function": {"arguments": piece}}] if piece else []


def may_be_call(plan: ToolPlan, text: str) -> int:
    """How much of a streamed reply's text so far can go out as content: up to where a
    call may begin (the rest is held back until the reply ends)."""
    if plan.fmt == "llama3_json":
        stripped = text.lstrip()
        if not stripped:
            return 0  # leading whitespace: not yet known
        return 0 if stripped[0] == "{" or stripped.startswith("<|python_tag|>") else len(text)
    at = text.find(HERMES_OPEN)
    if at < 0:
        at = len(text)
        # a tail that could be the start of the tag stays back
        for k in range(min(len(HERMES_OPEN) - 1, len(text)), 0, -1):
            if HERMES_OPEN.startswith(text[-k:]):
                at = len(text) - k
                break
    # and so does blank space before it: a call's content drops it (hermes_content)
    while at > 0 and text[at - 1].isspace():
        at -= 1
    return at
