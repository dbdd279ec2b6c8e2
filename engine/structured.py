"""Structured outputs: generated text constrained to a grammar (OpenAI's `response_format`
json_object / json_schema), with llguidance (the Rust library vLLM's `guidance` backend
uses; no dependencies of its own).

The router turns `response_format` into an llguidance grammar (`grammar_for`) and sends it
with the request (SamplingParams.grammar); whichever worker samples a token keeps a
matcher for the request, built on its first sample from the grammar and every token
generated so far (the prefill worker's first token, those before a migration), so
disaggregated and migrated requests continue where they were. Each step, a row with a
grammar gets a bitmask of the tokens the grammar allows (computed on the host while the
forward runs; kernels/sampling.apply_token_masks), and its sampled token advances the
matcher. A grammar that is complete ends the request ("stop") with no extra step for an
end-of-sequence token.

JSON is compact unless a schema asks otherwise (`"x-guidance": {"whitespace_flexible":
true}`): free whitespace lets a model pad forever, and a bounded schema then always
ends."""

from __future__ import annotations

import collections
import json
import logging
import threading
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidRequestError
from engine.sequence import Sequence

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

JSON_DEFAULTS = {"whitespace_flexible": False}
# The finish reason of a request whose grammar failed while generating (llguidance gives up
# on a parse too complex for its limits): the worker fails the call naming response_format.
GRAMMAR_ERROR = "grammar_error"
VALIDATED_GRAMMARS = 256  # compiled grammars a worker keeps (apps reuse their schemas)


def grammar_for(response_format: Any, param: str = "response_format") -> str:
    """The llguidance grammar for an OpenAI `response_format` ("" for plain text); a
    malformed one is a 400 naming `param` (the field it came from)."""
    from llguidance import LLMatcher

    def bad(msg: str) -> InvalidRequestError:
        return InvalidRequestError(f"{param} {msg}", param=param)

    if response_format is None:
        return ""
    if not isinstance(response_format, dict):
        raise bad("must be an object")
    if "type" not in response_format:
        raise bad("needs a type (text, json_object or json_schema)")
    kind = response_format["type"]
    if kind == "text":
        return ""
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise bad("of type json_schema needs a json_schema object")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise bad("json_schema.schema must be a JSON Schema object")
    else:
        raise bad(f"type must be text, json_object or json_schema, got {kind!r}")
    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                     defaults=JSON_DEFAULTS)
        error = LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError, UnicodeError) as e:  # UnicodeError: a lone surrogate
        raise bad(f"schema is not valid: {e}") from None
    if error:
        raise bad(f"schema is not supported: {error}")
    return grammar


def grammar_failed() -> InvalidRequestError:
    """What a request whose grammar failed while generating (GRAMMAR_ERROR) answers."""
    return InvalidRequestError("the output constraint (response_format, guided_*, or a forced "
                               "tool call) could not be followed: its grammar failed while "
                               "generating, most often a schema too complex for the parser "
                               "(e.g. hundreds of optional properties)",
                               param="response_format")


# vLLM's constraints beside OpenAI's response_format: the older guided_* request fields
# and the newer structured_outputs object (json, regex, choice, grammar: a Lark grammar).
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
# structured_outputs' options, not constraints: accepted and left at Baton's behaviour
# (compact JSON already, no fallback backend to disable).
STRUCTURED_OUTPUT_OPTIONS = frozenset({"disable_any_whitespace", "disable_fallback",
                                       "disable_additional_properties", "whitespace_pattern"})


def guided_grammar(fields: dict[str, Any]) -> tuple[str, str] | None:
    """(grammar, param) for vLLM's constraint fields of a request that set one (a 400
    naming it when malformed, or when it sets several), else None. `fields`: the
    guided_* fields and `structured_outputs`, unset ones None."""
    from llguidance import LLMatcher

    given = {k: v for k, v in fields.items() if v is not None}
    so = given.pop("structured_outputs", None)
    if so is not None:
        if not isinstance(so, dict):
            raise InvalidRequestError("structured_outputs must be an object",
                                      param="structured_outputs")
        given.update({f"structured_outputs.{k}": v for k, v in so.items()
                      if v is not None and k not in STRUCTURED_OUTPUT_OPTIONS
                      and not (k == "json_object" and v is False)})
    if not given:
        return None
    if len(given) > 1:
        raise InvalidRequestError(f"set one output constraint, not {sorted(given)}",
                                  param=sorted(given)[1])
    (param, value), = given.items()
    kind = param.rsplit(".", 1)[-1].removeprefix("guided_")

    def bad(msg: str) -> InvalidRequestError:
        return InvalidRequestError(f"{param} {msg}", param=param)

    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise bad("is not JSON") from None
        if not isinstance(value, dict):
            raise bad("must be a JSON Schema object")
        return grammar_for({"type": "json_schema", "json_schema": {"schema": value}},
                           param), param
    if kind == "json_object":
        if value is not True:
            raise bad("must be true")
        return grammar_for({"type": "json_object"}, param), param
    try:
        if kind == "regex":
            if not isinstance(value, str) or not value:
                raise bad("must be a non-empty regular expression")
            grammar = LLMatcher.grammar_from_regex(value)
        elif kind == "choice":
            if not isinstance(value, list) or not value or \
                    not all(isinstance(c, str) and c for c in value):
                raise bad("must be a non-empty list of non-empty strings")
            grammar = LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c, ensure_ascii=False)
                                       for c in dict.fromkeys(value)))
        elif kind == "grammar":
            if not isinstance(value, str) or not value.strip():
                raise bad("must be a Lark grammar")
            grammar = LLMatcher.grammar_from_lark(value)
        else:
            raise bad("is not a known constraint (json, json_object, regex, choice, grammar)")
        error = LLMatcher.validate_grammar(grammar)
    except InvalidRequestError:
        raise
    except (ValueError, TypeError, UnicodeError) as e:  # UnicodeError: a lone surrogate
        raise bad(f"is not valid: {e}") from None
    if error:
        raise bad(f"is not valid: {error}")
    return grammar, param


class Grammars:
    """A worker's matchers: one per sampling request with a grammar, kept on its
    Sequence. `vocab_size` is the model's (the logits' width, which may exceed the
    tokenizer's)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Seq[int]) -> None:
        self.vocab_size, self.eos = vocab_size, list(eos_token_ids)
        self._tokenizer = None
        self._error: Exception | None = None
        self._executor = None
        self._compiled: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()  # prepare() runs on RPC threads too
        # Building llguidance's view of a 128k-token vocabulary takes about a second: done
        # beside start-up, so the first request with a grammar does not stall a step.
        self._built = threading.Thread(target=self._build, args=(tokenizer_json,),
                                       name="grammar-tokenizer", daemon=True)
        self._built.start()

    def _build(self, tokenizer_json: str) -> None:
        from llguidance import LLTokenizer

        try:
            self._tokenizer = LLTokenizer(tokenizer_json, n_vocab=self.vocab_size,
                                          eos_token=self.eos)  # a list: llguidance >= 1.9
        except Exception as e:  # the requests that need it fail, naming this
            self._error = e
            log.warning("structured outputs unavailable: llguidance cannot read the "
                        "tokenizer: %s", e)

    @property
    def tokenizer(self):
        self._built.join()
        if self._tokenizer is None:
            raise InvalidRequestError(f"response_format is unavailable here: llguidance "
                                      f"cannot read the model's tokenizer ({self._error})",
                                      param="response_format")
        return self._tokenizer

    def prepare(self, grammar: str):
        """The grammar compiled: a fresh matcher that requests copy (cheap) instead of
        compiling their own, kept for the last VALIDATED_GRAMMARS grammars (apps reuse
        their schemas). A worker's RPC handlers call this off the engine thread before
        admitting a request, so a large schema's compile (up to a second) stalls no step;
        an invalid grammar is a 400 naming response_format."""
        from llguidance import LLMatcher

        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled
        error = LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise InvalidRequestError(f"response_format grammar is not valid: {error}",
                                      param="response_format")
        compiled = LLMatcher(self.tokenizer, grammar)
        with self._lock:
            self._compiled[grammar] = compiled
            if len(self._compiled) > VALIDATED_GRAMMARS:
                self._compiled.popitem(last=False)
        return compiled

    def validate(self, grammar: str) -> None:
        """At admission, on the engine thread: a lookup once prepare() has run."""
        self.prepare(grammar)

    def _matcher(self, seq: Sequence):
        """The request's matcher, made on first use and caught up with every token the
        request has generated (here or on another worker)."""
        if seq.matcher is None:
            seq.matcher = self.prepare(seq.params.grammar).deep_copy()
            if seq.output_token_ids:
                seq.matcher.consume_tokens(seq.output_token_ids)
            if seq.matcher.is_error():
                log.warning("request %s: grammar error: %.300s", seq.request_id,
                            seq.matcher.get_error())
        return seq.matcher

    def masks(self, rows: Seq[Sequence]) -> torch.Tensor:
        """[rows, ceil(vocab / 32)] int32 bitmasks of the tokens each row may sample next
        (bit t % 32 of word t // 32); a row without a grammar allows every token, a row
        whose matcher failed only end-of-sequence."""
        import torch  # here: the router imports this module for grammar_for, torch-free

        words = (self.vocab_size + 31) // 32
        out = torch.full((len(rows), words), -1, dtype=torch.int32)
        pending = []
        for i, seq in enumerate(rows):
            if not seq.params.grammar:
                continue
            matcher = self._matcher(seq)
            if matcher.is_error():
                out[i].zero_()
                for t in self.eos:
                    out[i, t // 32] |= _bit(t % 32)
            else:
                pending.append((matcher, i))
        if len(pending) == 1:
            matcher, i = pending[0]
            matcher.unsafe_compute_mask_ptr(out[i].data_ptr(), words * 4)
        elif pending:  # on llguidance's threads, each row into its own slice of `out`
            if self._executor is None:
                from llguidance import LLExecutor

                self._executor = LLExecutor()
            self._executor.unsafe_compute_mask_ptr(pending, out.data_ptr(), words * 4,
                                                   len(rows))
        return out

    def advance(self, seq: Sequence, token_id: int) -> str | None:
        """Feed the request's newly sampled token to its matcher: "complete" when the
        grammar is (nothing may follow), GRAMMAR_ERROR when the matcher failed (the
        request cannot go on under it), else None."""
        if seq.matcher is None:  # made from every output token, this one included
            matcher = self._matcher(seq)
        else:
            matcher = seq.matcher
            if not matcher.consume_token(token_id):
                log.warning("request %s: token %d fails its grammar: %.300s",
                            seq.request_id, token_id, matcher.get_error())
        if matcher.is_error():
            return GRAMMAR_ERROR
        return "complete" if matcher.is_stopped() else None


def _bit(i: int) -> int:
    """Bit i of an int32 word, as a Python int that fits int32 (bit 31 is negative)."""
    return -(2**31) if i == 31 else 1 << i
