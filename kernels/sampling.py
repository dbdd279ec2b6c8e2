"""Token sampling for one step: greedy, temperature, top-k, top-p, presence and frequency
penalties, per-request seeds, and log-probabilities of the raw model distribution (as
vLLM reports them).

Sampling from `softmax(logits)` is done as argmax(probs / Exp(1) noise): equivalent
to a categorical draw, needs no host sync, and lets a seeded request draw its own
noise from its own generator so its output does not depend on batch composition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels import greedy


@dataclass
class SamplingBatch:
    """Per-row sampling settings for the rows that sample this step."""

    temperatures: list[float]
    top_ks: list[int]  # <= 0: disabled
    top_ps: list[float]
    generators: list[torch.Generator | None]  # per-request seeded generator, or None
    num_logprobs: list[int]  # top alternatives to report per row (0 = chosen token only)
    banned_token_ids: list[tuple[int, ...]]  # e.g. EOS while below min_tokens
    # Per row: (presence, frequency, the tokens generated so far), or None: no penalty.
    penalties: list[tuple[float, float, Sequence[int]] | None] | None = None
    # Per row: OpenAI's logit_bias ({token id: added to its logit}), or None.
    logit_biases: list[dict[int, float] | None] | None = None
    # Structured outputs: [B, ceil(V / 32)] int32 bitmasks of the tokens each row may
    # sample (engine/structured.py; all bits set for a row without a grammar), or None.
    token_masks: torch.Tensor | None = None
    # Per row: vLLM's / transformers' repetition penalty (penalty, the prompt's distinct
    # token ids as a tensor on the logits' device, the output so far), or None.
    repetition: list[tuple[float, torch.Tensor, Sequence[int]] | None] | None = None
    # Per row: vLLM's min_p (0: off): tokens below min_p x the likeliest token's
    # probability (after temperature) are not sampled.
    min_ps: list[float] | None = None

    @property
    def all_greedy(self) -> bool:
        return all(t == 0.0 for t in self.temperatures)

    @property
    def penalized(self) -> bool:
        return self.penalties is not None and any(p is not None for p in self.penalties)

    @property
    def biased(self) -> bool:
        return self.logit_biases is not None and any(self.logit_biases)

    @property
    def repeated(self) -> bool:
        return self.repetition is not None and any(r is not None for r in self.repetition)


@dataclass
class SampleResult:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32, logprob of the chosen token
    top_ids: torch.Tensor | None  # [B, K] when any row asked for alternatives
    top_logprobs: torch.Tensor | None
    # token_ids and logprobs as float64 [2, B] (exact), where the sampler wrote them so.
    packed: torch.Tensor | None = None


def sample(logits: torch.Tensor, batch: SamplingBatch,
           default_generator: torch.Generator | None = None) -> SampleResult:
    """logits: [B, V] float32, left unchanged. Reported logprobs are those of the raw
    logits, before logit biases, penalties, bans, temperature, top-k and top-p (vLLM's
    default `raw_logprobs`)."""
    raw = logits
    k = max(batch.num_logprobs, default=0)
    masked = batch.token_masks is not None
    if (batch.all_greedy and k == 0 and not any(batch.banned_token_ids) and not masked
            and not batch.penalized and not batch.biased and not batch.repeated
            and greedy.usable(logits)):
        token_ids, chosen, packed = greedy.argmax_with_logprob(logits)  # one kernel
        return SampleResult(token_ids, chosen, None, None, packed)
    # Only a row asking for alternatives needs the whole [B, V] log-distribution; the
    # chosen token's logprob is its logit minus the row's logsumexp (no [B, V] write).
    logprobs_all = torch.log_softmax(logits, dim=-1) if k > 0 else None
    if any(batch.banned_token_ids) or batch.penalized or batch.biased or masked or \
            batch.repeated:
        logits = logits.clone()
        if batch.biased:
            for row, bias in enumerate(batch.logit_biases):
                if bias:
                    ids = torch.tensor(list(bias), dtype=torch.int64, device=logits.device)
                    logits[row, ids] += torch.tensor(list(bias.values()),
                                                     dtype=logits.dtype, device=logits.device)
        if batch.repeated:
            apply_repetition_penalty(logits, batch.repetition)
        if batch.penalized:
            apply_penalties(logits, batch.penalties)
        for row, banned in enumerate(batch.banned_token_ids):
            if banned:
                logits[row, list(banned)] = float("-inf")
        if masked:
            apply_token_masks(logits, batch.token_masks)
    if batch.all_greedy:
        token_ids = logits.argmax(dim=-1)
    else:
        token_ids = _sample_random(logits, batch, default_generator)
    top_ids = top_lp = None
    if logprobs_all is None:
        chosen = raw.gather(1, token_ids[:, None]).squeeze(1) - torch.logsumexp(raw, dim=-1)
    else:
        chosen = logprobs_all.gather(1, token_ids[:, None]).squeeze(1)
        top_lp, top_ids = logprobs_all.topk(k, dim=-1)
    return SampleResult(token_ids, chosen, top_ids, top_lp)


def apply_token_masks(logits: torch.Tensor, masks: torch.Tensor) -> None:
    """In place: -inf for every token whose bit is clear in its row's bitmask (bit t % 32
    of int32 word t // 32; tokens past the mask's width are clear)."""
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    words = masks.to(logits.device, non_blocking=True)
    allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().flatten(1)
    vocab = logits.shape[1]
    if allowed.shape[1] < vocab:
        logits[:, allowed.shape[1]:] = float("-inf")
    logits[:, : allowed.shape[1]].masked_fill_(~allowed[:, :vocab], float("-inf"))


def apply_repetition_penalty(
        logits: torch.Tensor,
        repetition: list[tuple[float, torch.Tensor, Sequence[int]] | None]) -> None:
    """In place, the repetition penalty of vLLM and transformers: the logit of every token
    in the prompt or the output so far is divided by the penalty where positive and
    multiplied by it where not (> 1 discourages repeats, < 1 encourages them). A token
    listed twice gets the same value twice: each is computed from the logits before."""
    for row, rep in enumerate(repetition):
        if rep is None:
            continue
        penalty, prompt_ids, output = rep
        ids = torch.cat([prompt_ids, torch.as_tensor(output, dtype=torch.int64,
                                                     device=logits.device)])
        seen = logits[row, ids]
        logits[row, ids] = torch.where(seen > 0, seen / penalty, seen * penalty)


def apply_penalties(logits: torch.Tensor,
                    penalties: list[tuple[float, float, Sequence[int]] | None]) -> None:
    """In place, OpenAI's presence and frequency penalties: each token generated so far
    loses `presence` once and `frequency` per time it was generated."""
    vocab = logits.shape[-1]
    for row, pen in enumerate(penalties):
        if pen is None or not pen[2]:
            continue
        presence, frequency, tokens = pen
        counts = torch.bincount(torch.as_tensor(tokens, device=logits.device),
                                minlength=vocab)[:vocab].to(logits.dtype)
        logits[row] -= frequency * counts + presence * (counts > 0).to(logits.dtype)


def _sample_random(logits: torch.Tensor, batch: SamplingBatch,
                   default_generator: torch.Generator | None) -> torch.Tensor:
    device = logits.device
    temps = torch.tensor(batch.temperatures, dtype=torch.float32, device=device)
    greedy = temps == 0.0
    scaled = logits / torch.where(greedy, 1.0, temps)[:, None]
    if batch.min_ps is not None and any(batch.min_ps):
        scaled = apply_min_p(scaled, batch.min_ps)
    scaled = apply_top_k_top_p(scaled, batch.top_ks, batch.top_ps)
    probs = torch.softmax(scaled, dim=-1)
    noise = torch.empty_like(probs)
    for row, gen in enumerate(batch.generators):
        noise[row].exponential_(generator=gen or default_generator)
    drawn = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), drawn)


def apply_min_p(logits: torch.Tensor, min_ps: list[float]) -> torch.Tensor:
    """-inf for tokens whose probability is below min_p times the row's likeliest (vLLM's
    order: after temperature, before top-k and top-p)."""
    probs = logits.softmax(dim=-1)
    floor = torch.tensor(min_ps, dtype=probs.dtype, device=logits.device)[:, None] * \
        probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < floor, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_ks: list[int],
                      top_ps: list[float]) -> torch.Tensor:
    vocab = logits.shape[-1]
    use_k = any(0 < k < vocab for k in top_ks)
    use_p = any(p < 1.0 for p in top_ps)
    if not (use_k or use_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if use_k:
        ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=logits.device)
        cutoff = sorted_logits.gather(1, (ks - 1)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < cutoff, float("-inf"))
    if use_p:
        # top_p >= 1 keeps everything: float32 cumulative sums can pass 1.0 before the
        # tail, which would otherwise cut a top_p=1 row batched with a top_p<1 one.
        ps = torch.tensor([p if p < 1.0 else float("inf") for p in top_ps],
                          dtype=torch.float32, device=logits.device)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (keeps >= 1).
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= ps[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
