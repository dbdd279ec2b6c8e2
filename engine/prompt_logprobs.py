"""Prompt logprobs (OpenAI's `echo` with `logprobs`, vLLM's `prompt_logprobs`): the
log-probability the model gives each prompt token after the ones before it, and the top
alternatives there. Evaluation harnesses score text this way (loglikelihood tasks send
`echo=true, logprobs=1, max_tokens=0`).

The logits come from the prefill's own forward: a chunk's rows whose next token is still
in the prompt are added to the rows whose logits are computed, the logits are split off
from the sampling rows, and each row's log-softmax is read at the prompt's next token. A
request that asks for them computes its whole prompt (a cached prefix has no logits), and
after a preemption only positions not yet recorded are read again."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sequence import Sequence


@dataclass
class PromptRows:
    """The prompt-logprob rows of one scheduled chunk: `count` rows from `first_row` of
    the step's tokens, predicting prompt tokens `first_target`.. of `seq`."""

    seq: Sequence
    first_row: int
    first_target: int
    count: int


def rows_of_chunk(seq: Sequence, start: int, n: int, first_row: int) -> PromptRows | None:
    """The rows of a chunk of `n` tokens from position `start` (at step row `first_row`)
    whose logits give prompt logprobs not yet recorded; None when there are none."""
    if seq.params.prompt_logprobs is None:
        return None
    # Position p predicts token p + 1; recorded so far: targets 1 .. len(prompt_logprobs).
    lo = max(start, len(seq.prompt_logprobs))
    hi = min(start + n, seq.num_prompt_tokens - 1)
    if hi <= lo:
        return None
    return PromptRows(seq, first_row + lo - start, lo + 1, hi - lo)


# Rows scored at a time: a step's logits for every prompt position at once would be
# [8192 tokens x 128k vocabulary] floats (4 GiB); a slice's are a 256th of that.
ROWS_PER_SLICE = 256


class Scorer:
    """Scores one step's prompt rows slice by slice (`add`, in row order), then hands
    each chunk's logprobs to its sequence (`finish`)."""

    def __init__(self, chunks: list[PromptRows]) -> None:
        self.chunks = chunks
        self.targets = [t for c in chunks for t in c.seq.prompt_token_ids[
            c.first_target : c.first_target + c.count]]
        self.k = max(c.seq.params.prompt_logprobs for c in chunks)
        self.chosen: list[float] = []
        self.top_ids: list[list[int]] = []
        self.top_lps: list[list[float]] = []

    def add(self, logits: torch.Tensor) -> None:
        lps = torch.log_softmax(logits.float(), dim=-1)
        lo = len(self.chosen)
        targets = torch.tensor(self.targets[lo : lo + len(lps)], dtype=torch.int64,
                               device=lps.device)
        self.chosen += lps.gather(1, targets[:, None])[:, 0].tolist()
        if self.k:
            top = lps.topk(self.k, dim=-1)
            self.top_ids += top.indices.tolist()
            self.top_lps += top.values.tolist()

    def finish(self) -> None:
        row = 0
        for c in self.chunks:
            seq, want = c.seq, c.seq.params.prompt_logprobs
            seq.prompt_logprobs.extend(self.chosen[row : row + c.count])
            if want:
                seq.prompt_top_logprobs.extend(
                    list(zip(self.top_ids[r][:want], self.top_lps[r][:want]))
                    for r in range(row, row + c.count))
            row += c.count


def score(compute_logits, hidden: torch.Tensor, rows: list[int],
          chunks: list[PromptRows]) -> None:
    """Prompt logprobs of a step's `rows` of `hidden`, a slice of rows at a time. Every TP
    rank computes the slices' logits (the vocabulary all-gather is collective); the leader,
    which scheduled the `chunks`, keeps the scores (followers pass none)."""
    scorer = Scorer(chunks) if chunks else None
    for lo in range(0, len(rows), ROWS_PER_SLICE):
        logits = compute_logits(hidden[rows[lo : lo + ROWS_PER_SLICE]])
        if scorer is not None:
            scorer.add(logits)
    if scorer is not None:
        scorer.finish()
