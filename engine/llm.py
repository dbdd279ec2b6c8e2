"""Offline API used by tests and benchmarks: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **engine_kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: Seq[str | list[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 arrival_steps: Seq[int] | None = None) -> list[RequestOutput]:
        """Runs every prompt to completion in one continuous batch; results in input order.
        `arrival_steps[i]` holds prompt i back until that engine step, so tests can make
        requests join a batch that is already running."""
        if params is None:
            params = SamplingParams()
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(plist)} sampling "
                                      "params", param="params")
        arrivals = list(arrival_steps) if arrival_steps is not None else [0] * len(prompts)
        ids = [self._ids(p) for p in prompts]
        pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
        results: dict[str, RequestOutput] = {}
        step = 0
        while pending or self.engine.has_unfinished():
            while pending and arrivals[pending[0]] <= step:
                i = pending.pop(0)
                self.engine.add_request(str(i), ids[i], plist[i])
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
            step += 1
        return [results[str(i)] for i in range(len(prompts))]

    def _ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            return self.engine.tokenizer.encode(prompt)
        return list(prompt)
