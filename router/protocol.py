"""OpenAI request/response shapes (pydantic), with vLLM's extras. Only request models are
validated strictly; responses are plain dicts built in `router.responses`."""

from __future__ import annotations

import contextlib
import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    model_validator,
)

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.structured import GUIDED_FIELDS, grammar_for, guided_grammar


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields OpenAI's spec marks nullable, or clients send as null when unset (the official
# client sends `"temperature": null` for temperature=None): null means the default.
_NULL_IS_DEFAULT = frozenset({
    "temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty",
    "logprobs", "echo", "top_k", "ignore_eos", "min_tokens", "return_token_ids",
    "skip_special_tokens", "include_stop_str_in_output", "priority", "repetition_penalty",
    "min_p"})


MAX_N = 128  # choices per prompt, as OpenAI allows
# An output constraint (a schema, a regex, choices, a grammar) is compiled on the router
# and on each worker: a huge one would tie up CPU for seconds per request.
MAX_CONSTRAINT_CHARS = 1 << 20
# The fields that ask for one (engine/structured.py): OpenAI's and vLLM's.
CONSTRAINT_FIELDS = ("response_format", *GUIDED_FIELDS, "structured_outputs")


def _whole(v: Any) -> Any:
    """2.0 is the integer 2 (JSON does not tell them apart); true, "2" and 2.5 are not."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


Int = Annotated[StrictInt, BeforeValidator(_whole)]


def _unsupported(param: str, what: str) -> InvalidRequestError:
    return InvalidRequestError(f"{what} is not supported by this server", param=param)


class _Common(BaseModel):
    """Integer and boolean fields are strict, as OpenAI's are: `"stream": "yes"`,
    `"max_tokens": true` or `"n": "2"` is a 400 naming the field, not silently read as
    true, 1 or 2 (a whole float, 2.0, is an integer)."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in _NULL_IS_DEFAULT}
        return data

    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    n: Int = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # vLLM extras
    top_k: Int = -1
    ignore_eos: StrictBool = False
    min_tokens: Int = 0
    return_token_ids: StrictBool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    # OpenAI's: token ids (as JSON object keys, so strings) -> bias in [-100, 100]
    logit_bias: dict[str, float] | None = None
    # OpenAI's structured outputs (text, json_object, json_schema; engine/structured.py);
    # accepted on completions too, as vLLM does.
    response_format: dict | None = None
    # vLLM's: the same constraints as guided_json/regex/choice/grammar, or one object
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    priority: Int = 0  # vLLM's: lower is more urgent (engine/scheduler.py)
    _constraint: tuple[str, str] | None = PrivateAttr(default=None)
    repetition_penalty: float = 1.0  # vLLM's (kernels/sampling.py)
    min_p: float = 0.0  # vLLM's

    def check_supported(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequestError(f"n must be in [1, {MAX_N}], got {self.n}", param="n")

    def token_biases(self) -> dict[int, float]:
        out = {}
        for key, bias in (self.logit_bias or {}).items():
            try:
                out[int(key)] = bias
            except ValueError:
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}",
                                          param="logit_bias") from None
        return out

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, stop=stop, stop_token_ids=self.stop_token_ids or [],
            logprobs=logprobs, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=self.token_biases(), grammar=self.grammar(), priority=self.priority,
            repetition_penalty=self.repetition_penalty, min_p=self.min_p)

    def grammar(self) -> str:
        return self.constraint()[0]

    def constrained(self) -> bool:
        """Whether the request sets an output constraint field (valid or not)."""
        return any(getattr(self, name) is not None for name in CONSTRAINT_FIELDS)

    def constraint(self) -> tuple[str, str]:
        """(grammar, the field it came from) of the request's output constraint, ("", "")
        for none: OpenAI's response_format or one of vLLM's fields (engine/structured.py),
        never two. Compiled once per request (a large one takes a while: the router calls
        this in a thread first)."""
        if self._constraint is None:
            for name in CONSTRAINT_FIELDS:
                value = getattr(self, name)
                if value is not None and len(json.dumps(value)) > MAX_CONSTRAINT_CHARS:
                    raise InvalidRequestError(
                        f"{name} is larger than {MAX_CONSTRAINT_CHARS} characters of JSON",
                        param=name)
            guided = guided_grammar({k: getattr(self, k)
                                     for k in (*GUIDED_FIELDS, "structured_outputs")})
            from_format = grammar_for(self.response_format)
            if guided is not None and from_format:
                raise InvalidRequestError(f"set response_format or {guided[1]}, not both",
                                          param=guided[1])
            self._constraint = guided or ((from_format, "response_format") if from_format
                                          else ("", ""))
        return self._constraint


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: Int | None = 16
    logprobs: Int | None = None
    echo: StrictBool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_tokens == 0 and not self.echo:  # 0 scores the prompt: echo only
            raise InvalidRequestError("max_tokens must be at least 1 (0 only with echo)",
                                      param="max_tokens")
        if self.suffix:
            raise _unsupported("suffix", "suffix (fill in the middle)")
        if self.best_of not in (None, 1):
            raise _unsupported("best_of", "best_of > 1")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: text only (check_supported)
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""

    def for_template(self) -> dict:
        """The message as chat templates read it: its text, and an assistant's tool calls
        (arguments as objects, as Hugging Face templates expect) or a tool result's id."""
        out: dict = {"role": self.role, "content": self.text()}
        extra = self.model_extra or {}
        calls = extra.get("tool_calls")
        if calls is not None:
            out["tool_calls"] = [_call_for_template(c) for c in calls]
        for key in ("tool_call_id", "name"):
            if isinstance(extra.get(key), str):
                out[key] = extra[key]
        return out


def check_messages(messages: list[ChatMessage]) -> None:
    """What chat templates cannot take from messages, refused naming the field (chat
    completions and /tokenize)."""
    if not messages:
        raise InvalidRequestError("messages must not be empty", param="messages")
    for i, m in enumerate(messages):
        calls = (m.model_extra or {}).get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise InvalidRequestError("tool_calls must be a list",
                                      param=f"messages.{i}.tool_calls")
        for part in m.content if isinstance(m.content, list) else []:
            if part.get("type") != "text":
                raise _unsupported(f"messages.{i}.content",
                                   f"content of type {part.get('type')!r} (text only)")


def _call_for_template(call: Any) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequestError("an assistant message's tool_calls must be a list of "
                                  "{'type': 'function', 'function': {'name': str, "
                                  "'arguments': ...}}", param="messages")
    fn = dict(fn)
    if isinstance(fn.get("arguments"), str):
        with contextlib.suppress(ValueError):  # not JSON: the template shows the string
            fn["arguments"] = json.loads(fn["arguments"])
    return {**call, "function": fn}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: StrictBool = False
    top_logprobs: Int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict | None = None
    functions: list[Any] | None = None
    function_call: str | dict | None = None
    parallel_tool_calls: StrictBool | None = None  # false: a reply's first call only

    def check_supported(self) -> None:
        super().check_supported()
        if self.functions:  # the deprecated form of tools
            raise _unsupported("functions", "functions (use tools)")
        if self.function_call not in (None, "none", "auto"):
            raise _unsupported("function_call", f"function_call {self.function_call!r}")
        check_messages(self.messages)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true",
                                      param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise InvalidRequestError(f"top_logprobs must be in [0, 20], got "
                                      f"{self.top_logprobs}", param="top_logprobs")
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:
            raise InvalidRequestError(f"max_completion_tokens must be at least 1, got "
                                      f"{self.max_completion_tokens}",
                                      param="max_completion_tokens")
