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


def record(logits: torch.Tensor, chunks: list[PromptRows]) -> None:
    """Append each chunk's prompt logprobs (and top alternatives) to its sequence; `logits`
    holds the chunks' rows, in order."""
    lps = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor([t for c in chunks for t in c.seq.prompt_token_ids[
        c.first_target : c.first_target + c.count]], dtype=torch.int64, device=lps.device)
    chosen = lps.gather(1, targets[:, None])[:, 0].tolist()
    k = max(c.seq.params.prompt_logprobs for c in chunks)
    top_ids = top_lps = None
    if k:
        top = lps.topk(k, dim=-1)
        top_ids, top_lps = top.indices.tolist(), top.values.tolist()
    row = 0
    for c in chunks:
        seq, want = c.seq, c.seq.params.prompt_logprobs
        seq.prompt_logprobs.extend(chosen[row : row + c.count])
        if want:
            seq.prompt_top_logprobs.extend(
                list(zip(top_ids[r][:want], top_lps[r][:want]))
                for r in range(row, row + c.count))
        row += c.count
