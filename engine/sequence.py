"""One request's state inside a worker: its tokens, how many have KV in the cache, and
the blocks that hold them. Everything else is derived from these counters."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from engine.sampling_params import SamplingParams

_SERIALS = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    # When a step first computed any of it (its wait in this worker's queue ends), and
    # whether its first output here has reported that wait (RequestOutput timing).
    first_scheduled_time: float | None = None
    timing_reported: bool = False
    status: SequenceStatus = SequenceStatus.WAITING
    # token_ids = prompt + generated; KV exists for token_ids[:num_computed_tokens].
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    # Prompt tokens whose KV came from a cache the first time the request was scheduled.
    num_cached_tokens: int = -1
    block_table: list[int] = field(default_factory=list)
    # Bumped whenever block_table is emptied (its blocks freed): a table only grows within
    # one epoch, which lets the model runner mirror it incrementally.
    block_table_epoch: int = 0
    # Unique in this process (request ids are not: the offline API reuses "0", "1", ...),
    # so (serial, epoch) names one table's life.
    serial: int = field(default_factory=lambda: next(_SERIALS), init=False)
    # Hashes of the full blocks of token_ids, extended as blocks fill.
    block_hashes: list[int] = field(default_factory=list)
    num_published_blocks: int = 0  # leading blocks already offered to the prefix cache
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # params.prompt_logprobs: entry i is prompt token i + 1's (engine/prompt_logprobs.py)
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    num_preemptions: int = 0
    # Prefill role: on finishing, keep the blocks until the decode side has pulled them.
    hold_blocks: bool = False
    # params.grammar: the llguidance matcher of what it generated (engine/structured.py),
    # made by the worker that samples it.
    matcher: Any = None
    # params.repetition_penalty: the prompt's distinct token ids, on the sampling device,
    # made once (a 100k-token prompt took ~10 ms a step to reduce again each time).
    prompt_ids_seen: Any = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def extend_sampled_elsewhere(self, token_ids: list[int], logprobs: list[float]) -> None:
        """Tokens another worker sampled for it (a prefill worker's first token, or those
        generated before a migration). Their top-logprob rows were sent from there: a
        request that asked for them gets empty rows here, so every later row stays level
        with its token."""
        self.token_ids.extend(token_ids)
        self.logprobs.extend(logprobs)
        if self.params.logprobs:
            self.top_logprobs.extend([] for _ in token_ids)

    def append_token(self, token_id: int, logprob: float,
                     top: list[tuple[int, float]] | None = None) -> None:
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        if top is not None:
            self.top_logprobs.append(top)
