"""Per-request generation settings (OpenAI fields plus vLLM's extras). Torch-free."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

INT32_MAX = 2**31 - 1


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # <= 0 disables
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # None: none; 0: chosen token only; k: plus top-k
    # The same for each prompt token after the first (engine/prompt_logprobs.py); a
    # request asking for them computes its whole prompt, cached or not.
    prompt_logprobs: int | None = None
    # OpenAI's: subtracted from the logit of every token already generated, once
    # (presence) and per occurrence (frequency); the prompt does not count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # OpenAI's: added to these tokens' logits before sampling ({token id: bias in [-100,
    # 100]}; -100 bans a token, 100 all but forces it).
    logit_bias: dict[int, float] = field(default_factory=dict)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # An llguidance grammar the generated tokens must match (engine/structured.py; the
    # router makes it from OpenAI's response_format); "" for none.
    grammar: str = ""
    # vLLM's request priority: lower is more urgent. A worker admits waiting requests in
    # priority order (arrival order within one), schedules running ones so, and preempts
    # the least urgent first; the default 0 everywhere is first come, first served.
    priority: int = 0
    # vLLM's (transformers' too): > 1 discourages every token of the prompt and output so
    # far (kernels/sampling.apply_repetition_penalty); 1 is off.
    repetition_penalty: float = 1.0
    # vLLM's: tokens less likely than min_p x the likeliest are not sampled; 0 is off.
    min_p: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def bad(param: str, msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param} {msg}", param=param)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", f"must be at least 1, got {self.max_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", f"must be >= 0 and finite, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", f"must be a positive integer, or -1 or 0 (disabled), "
                               f"got {self.top_k}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"must be in [0, max_tokens={self.max_tokens}], "
                                    f"got {self.min_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and -2.0 <= v <= 2.0):
                raise bad(name, f"must be in [-2, 2], got {v}")
        # Bounded away from 0: the wire carries it as a float32, and a tiny one blows the
        # logits up to inf.
        if not (math.isfinite(self.repetition_penalty)
                and 0.01 - 1e-6 <= self.repetition_penalty <= 10):  # float32 slack
            raise bad("repetition_penalty", f"must be in [0.01, 10], got "
                                            f"{self.repetition_penalty}")
        if not (math.isfinite(self.min_p) and 0.0 <= self.min_p <= 1.0):
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad("logprobs", f"must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise bad("prompt_logprobs", f"must be in [0, 20], got {self.prompt_logprobs}")
        for token, bias in self.logit_bias.items():
            if not (isinstance(token, int) and 0 <= token <= INT32_MAX):
                raise bad("logit_bias", f"keys must be token ids, got {token!r}")
            if not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
                raise bad("logit_bias", f"values must be in [-100, 100], got {bias}")
        if not isinstance(self.grammar, str):
            raise bad("response_format", "grammar must be a string")
        if any(not s for s in self.stop):
            raise bad("stop", "strings must not be empty")
        # The wire to the workers carries these as 32- and 64-bit integers.
        if self.max_tokens > INT32_MAX:
            raise bad("max_tokens", f"must be at most {INT32_MAX}, got {self.max_tokens}")
        if self.top_k > INT32_MAX:
            raise bad("top_k", f"must be at most {INT32_MAX}, got {self.top_k}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise bad("seed", f"must fit a signed 64-bit integer, got {self.seed}")
        if not isinstance(self.priority, int) or not -INT32_MAX <= self.priority <= INT32_MAX:
            raise bad("priority", f"must be an integer in [{-INT32_MAX}, {INT32_MAX}], got "
                                  f"{self.priority!r}")
        if any(not 0 <= t <= INT32_MAX for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"must be token ids in [0, {INT32_MAX}]")
