"""Tokenizer, chat template and streaming detokenization over HF `tokenizers`. Torch-free,
so the router (which tokenizes and detokenizes) shares it with the workers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from engine.errors import InvalidRequestError
from kernels.errors import CheckpointError


@dataclass
class TokenizerBundle:
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: tuple[int, ...] = ()
    special_ids: frozenset[int] = field(default_factory=frozenset)
    # (source, compiled) of chat_template: _compiled_template().
    _template: tuple[str, jinja2.Template] | None = field(default=None, init=False,
                                                          repr=False, compare=False)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> TokenizerBundle:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path} not found (Baton needs a fast tokenizer.json)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"{path} cannot be loaded: {e}") from None
        conf_path = model_dir / "tokenizer_config.json"
        conf = _read_json(conf_path) if conf_path.is_file() else {}
        eos_ids = _eos_ids(model_dir)

        def token_str(v):
            return v.get("content") if isinstance(v, dict) else v

        specials = frozenset(
            i for i, t in tok.get_added_tokens_decoder().items() if t.special
        )
        return cls(tok, conf.get("chat_template"), token_str(conf.get("bos_token")),
                   token_str(conf.get("eos_token")), eos_ids, specials)

    @classmethod
    def from_preset(cls, preset_name: str) -> TokenizerBundle:
        """The tokenizer `baton make-model` would write, built in memory (dummy weights)."""
        from kernels.presets import get_preset
        from kernels.tokenizer_builder import build_tokenizer

        preset = get_preset(preset_name)
        hf = preset.hf_config
        tok, ids = build_tokenizer(preset.family, hf["vocab_size"],
                                   hf["max_position_embeddings"])
        conf = ids["tokenizer_config"]
        specials = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        return cls(tok, conf.get("chat_template"), conf.get("bos_token"),
                   conf.get("eos_token"), tuple(ids["eos_token_ids"]), specials)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        except (TypeError, UnicodeError):  # a lone surrogate ("\ud800") in JSON's escapes
            raise InvalidRequestError("text is not valid Unicode (a lone surrogate?)",
                                      param="prompt") from None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template; use /v1/completions",
                                      param="messages")
        try:
            return self._compiled_template().render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", tools=tools)
        except (jinja2.TemplateError, TypeError, ValueError) as e:  # messages it cannot render
            raise InvalidRequestError(f"chat template failed: {e}", param="messages") from None

    def _compiled_template(self) -> jinja2.Template:
        """The chat template, compiled once: compiling a real model's template (Llama 3.1's
        is 5 KB) took ~11 ms, paid by every chat request when it was compiled per call."""
        if self._template is None or self._template[0] != self.chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_exception
            # As transformers renders templates: JSON as written (no HTML escaping, no
            # \u escapes), so tool schemas read the same to the model either way.
            env.filters["tojson"] = _tojson
            self._template = (self.chat_template, env.from_string(self.chat_template))
        return self._template[1]

    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None,
                        add_generation_prompt: bool = True) -> list[int]:
        # The template writes the BOS text itself; do not let the post-processor add another.
        text = self.apply_chat_template(messages, add_generation_prompt, tools=tools)
        try:
            return self.encode(text, add_special_tokens=False)
        except InvalidRequestError as e:
            raise InvalidRequestError(str(e), param="messages") from None


def _tojson(value, ensure_ascii: bool = False, indent: int | None = None,
            separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_template_exception(msg: str):
    """`raise_exception(...)` inside a chat template: the request's messages are wrong."""
    raise InvalidRequestError(msg, param="messages")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _eos_ids(model_dir: Path) -> tuple[int, ...]:
    for name in ("generation_config.json", "config.json"):
        p = model_dir / name
        if p.is_file():
            eos = _read_json(p).get("eos_token_id")
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (int(eos),)
    return ()


class IncrementalDetokenizer:
    """Text for a stream of token ids, emitted only once complete UTF-8 is known, with
    stop strings found across chunk boundaries and held back until they cannot match.

    As in vLLM, stop strings count only from token `min_tokens + 1` on (a stop string
    may still start in earlier text), and the earliest match among them wins."""

    def __init__(self, bundle: TokenizerBundle, stop: list[str], skip_special_tokens: bool,
                 include_stop_str_in_output: bool = False, min_tokens: int = 0) -> None:
        self.bundle = bundle
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.min_tokens = min_tokens
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # everything decoded so far
        self.emitted = 0  # chars of self.text already handed out
        self.stopped = False

    def add_token(self, token_id: int) -> str:
        """Feed one token; returns the newly safe text (may be empty)."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        chunk = self.stream.step(self.bundle.tokenizer, token_id)
        if chunk:
            old_len = len(self.text)
            self.text += chunk
            match = self._find_stop(old_len) if len(self.token_ids) > self.min_tokens else None
            if match is not None:
                at, s = match
                self.text = self.text[: at + len(s)] if self.include_stop else self.text[:at]
                self.stopped = True
                return self._take(len(self.text))
        return self._take(len(self.text) - self.holdback)

    def _find_stop(self, old_len: int) -> tuple[int, str] | None:
        """The earliest stop string ending in the text added after `old_len` (one ending
        before it was looked for then). Its start is >= emitted: that much is held back."""
        best: tuple[int, str] | None = None
        for s in self.stop:
            at = self.text.find(s, max(0, old_len - len(s) + 1))
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        return best

    def flush(self) -> str:
        """The rest of the text, once the sequence has finished without a stop string: the
        held-back tail, and bytes of an unfinished UTF-8 character the stream is still
        waiting on (as U+FFFD, like a full decode), so `text == decode(token_ids)`."""
        if not self.stopped:
            full = self.bundle.tokenizer.decode(self.token_ids,
                                                skip_special_tokens=self.skip_special_tokens)
            if len(full) > len(self.text) and full.startswith(self.text):
                self.text = full
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
