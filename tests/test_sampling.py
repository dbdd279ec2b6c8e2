"""kernels/sampling.py against plain references: greedy, top-k/top-p masks, seeded and
batch-independent draws, the empirical distribution of temperature sampling, bans, and
logprobs of the raw logits."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.sampling import SamplingBatch, apply_top_k_top_p, sample


def batch(n: int, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
          seeds: list[int | None] | None = None, num_logprobs: int = 0,
          banned: tuple[int, ...] = ()) -> SamplingBatch:
    seeds = seeds if seeds is not None else [None] * n
    return SamplingBatch(
        temperatures=[temperature] * n, top_ks=[top_k] * n, top_ps=[top_p] * n,
        generators=[None if s is None else torch.Generator().manual_seed(s) for s in seeds],
        num_logprobs=[num_logprobs] * n, banned_token_ids=[banned] * n)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=gen(seed)) * scale


def test_greedy_is_argmax() -> None:
    logits = random_logits(16, 300)
    res = sample(logits.clone(), batch(16, temperature=0.0))
    assert torch.equal(res.token_ids, logits.argmax(dim=-1))
    assert res.token_ids.dtype == torch.int64 and res.top_ids is None


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_1_and_tiny_top_p_equal_greedy(temperature: float) -> None:
    logits = random_logits(32, 500, seed=1)
    greedy = logits.argmax(dim=-1)
    for seed in range(5):
        k1 = sample(logits.clone(), batch(32, temperature, top_k=1), gen(seed))
        p0 = sample(logits.clone(), batch(32, temperature, top_p=1e-6), gen(seed))
        assert torch.equal(k1.token_ids, greedy)
        assert torch.equal(p0.token_ids, greedy)


def kept(masked: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in masked]


def reference_keep(logits: list[float], k: int, p: float) -> set[int]:
    """The textbook definition, in float64: the k largest, then the smallest prefix of the
    renormalised distribution whose mass reaches p."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    if 0 < k < len(logits):
        order = order[:k]
    m = max(logits[i] for i in order)
    weights = [math.exp(logits[i] - m) for i in order]
    total = sum(weights)
    out, mass = set(), 0.0
    for i, w in zip(order, weights):
        out.add(i)
        mass += w / total
        if p < 1.0 and mass >= p:
            break
    return out


@pytest.mark.parametrize("k", [-1, 0, 1, 2, 7, 50, 64, 1000])
def test_top_k_mask(k: int) -> None:
    logits = random_logits(6, 64, seed=2)
    masked = apply_top_k_top_p(logits.clone(), [k] * 6, [1.0] * 6)
    want = min(k, 64) if k > 0 else 64
    for row, keep in zip(logits, kept(masked)):
        assert keep == set(row.topk(want).indices.tolist())
    # Kept entries are unchanged.
    assert torch.equal(masked[torch.isfinite(masked)], logits[torch.isfinite(masked)])


def test_top_p_mask_keeps_the_smallest_prefix_reaching_p() -> None:
    logits = random_logits(1, 40, seed=3)
    probs = torch.softmax(logits.double(), dim=-1)[0]
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    for m in [0, 1, 2, 5, 17, 38]:
        # p halfway between two cumulative sums: exactly tokens 0..m survive.
        lo = cum[m - 1].item() if m else 0.0
        p = (lo + cum[m].item()) / 2
        (keep,) = kept(apply_top_k_top_p(logits.clone(), [-1], [p]))
        assert keep == set(order[: m + 1].tolist()), (m, p)


def test_top_k_top_p_masks_match_reference() -> None:
    rows = []
    for seed in range(40):
        logits = random_logits(1, 30, seed=100 + seed, scale=1.0 + seed / 10)
        k = [-1, 3, 10, 29, 30][seed % 5]
        p = [1.0, 0.9, 0.5, 0.25, 0.75, 0.99][seed % 6]
        rows.append((logits[0], k, p))
    # One batched call, mixed settings per row (also covers top_p=1 rows next to p<1 ones).
    logits = torch.stack([r[0] for r in rows])
    masked = apply_top_k_top_p(logits.clone(), [r[1] for r in rows], [r[2] for r in rows])
    for (row, k, p), keep in zip(rows, kept(masked)):
        assert keep == reference_keep(row.tolist(), k, p), (k, p)


def test_top_p_one_keeps_whole_vocab_next_to_a_top_p_row() -> None:
    # float32 cumulative sums over a large vocab pass 1.0 before the tail; a top_p=1 row
    # must still keep every token.
    logits = random_logits(2, 50_000, seed=4, scale=3.0)
    masked = apply_top_k_top_p(logits.clone(), [-1, -1], [1.0, 0.5])
    assert torch.isfinite(masked[0]).all()
    assert not torch.isfinite(masked[1]).all()


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    logits = random_logits(1, 1000, seed=5, scale=0.5)  # flat: draws vary a lot

    def draw(seed: int, others: int = 0, other_seeds: bool = False) -> int:
        seeds = [seed] + [(1000 + i if other_seeds else None) for i in range(others)]
        rows = logits.repeat(1 + others, 1)
        b = batch(1 + others, temperature=1.0, seeds=seeds)
        return int(sample(rows, b, gen(12345 + others)).token_ids[0])

    draws = [draw(s) for s in range(20)]
    assert draws == [draw(s) for s in range(20)]
    assert len(set(draws)) > 10  # different seeds, different tokens
    # The same seed gives the same token whatever else is in the batch.
    assert draws == [draw(s, others=5) for s in range(20)]
    assert draws == [draw(s, others=3, other_seeds=True) for s in range(20)]


def test_unseeded_rows_follow_the_default_generator() -> None:
    logits = random_logits(8, 1000, seed=6, scale=0.5)
    a = sample(logits.clone(), batch(8), gen(7)).token_ids
    b = sample(logits.clone(), batch(8), gen(7)).token_ids
    c = sample(logits.clone(), batch(8), gen(8)).token_ids
    assert torch.equal(a, b) and not torch.equal(a, c)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    nz = expected > 0
    return float(((counts[nz] - expected[nz]) ** 2 / expected[nz]).sum())


CHI2_DF4_P001 = 18.47  # chi-square critical value, 4 degrees of freedom, p = 0.001
N_DRAWS = 4000


def draw_counts(logits: list[float], **kwargs) -> torch.Tensor:
    rows = torch.tensor([logits]).repeat(N_DRAWS, 1)
    res = sample(rows, batch(N_DRAWS, **kwargs), gen(2024))
    return torch.bincount(res.token_ids, minlength=len(logits)).double()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_matches_softmax(temperature: float) -> None:
    logits = [1.0, 0.5, 0.0, -0.5, -1.5]
    counts = draw_counts(logits, temperature=temperature)
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64) / temperature, dim=0)
    assert chi_square(counts, probs) < CHI2_DF4_P001
    # And it is not simply the untempered distribution (the test can tell them apart).
    if temperature != 1.0:
        untempered = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=0)
        assert chi_square(counts, untempered) > CHI2_DF4_P001


def test_top_k_and_top_p_sampling_renormalise() -> None:
    logits = [2.0, 1.5, 1.0, 0.0, -1.0]
    counts = draw_counts(logits, top_k=3)
    probs = torch.softmax(torch.tensor(logits[:3], dtype=torch.float64), dim=0)
    assert counts[3:].sum() == 0
    assert chi_square(counts[:3], probs) < CHI2_DF4_P001
    # Mass of the top two is ~0.62 of the whole: top_p=0.6 keeps exactly two tokens.
    counts = draw_counts(logits, top_p=0.6)
    probs = torch.softmax(torch.tensor(logits[:2], dtype=torch.float64), dim=0)
    assert counts[2:].sum() == 0
    assert chi_square(counts[:2], probs) < CHI2_DF4_P001


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_banned_tokens_are_never_drawn(temperature: float) -> None:
    logits = torch.zeros(N_DRAWS, 5)
    logits[:, 0] = 10.0  # by far the likeliest
    logits[:, 3] = 9.0
    raw = logits.clone()
    res = sample(logits, batch(N_DRAWS, temperature, banned=(0, 3)), gen(9))
    assert not torch.isin(res.token_ids, torch.tensor([0, 3])).any()
    assert torch.equal(logits, raw)  # the caller's logits are left alone
    # Logprobs are of the raw distribution, where the banned tokens still count.
    raw_lp = torch.log_softmax(raw, dim=-1)
    assert torch.allclose(res.logprobs, raw_lp.gather(1, res.token_ids[:, None]).squeeze(1))


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = random_logits(4, 100, seed=10)
    b = SamplingBatch(temperatures=[0.0, 0.7, 1.3, 1.0], top_ks=[-1, 5, -1, 20],
                      top_ps=[1.0, 1.0, 0.8, 0.9], generators=[None, None, gen(1), None],
                      num_logprobs=[0, 3, 5, 0], banned_token_ids=[(), (), (), ()])
    res = sample(logits.clone(), b, gen(11))
    lp = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(res.logprobs, lp.gather(1, res.token_ids[:, None]).squeeze(1))
    # Top alternatives: as many as the most demanding row asked for, best first.
    assert res.top_ids.shape == res.top_logprobs.shape == (4, 5)
    want_lp, want_ids = lp.topk(5, dim=-1)
    assert torch.equal(res.top_ids, want_ids)
    assert torch.allclose(res.top_logprobs, want_lp)
    assert (res.top_logprobs[:, :-1] >= res.top_logprobs[:, 1:]).all()


def test_no_top_logprobs_when_none_asked() -> None:
    res = sample(random_logits(3, 50), batch(3, temperature=1.0), gen(0))
    assert res.top_ids is None and res.top_logprobs is None
    assert res.logprobs.shape == (3,) and (res.logprobs <= 0).all()


def test_mixed_greedy_and_random_rows() -> None:
    logits = random_logits(6, 200, seed=12, scale=0.5)
    b = SamplingBatch(temperatures=[0.0, 1.0] * 3, top_ks=[-1] * 6, top_ps=[1.0] * 6,
                      generators=[None] * 6, num_logprobs=[0] * 6,
                      banned_token_ids=[(), (), (int(logits[2].argmax()),), (), (), ()])
    res = sample(logits.clone(), b, gen(13))
    greedy = logits.argmax(dim=-1)
    assert res.token_ids[0] == greedy[0] and res.token_ids[4] == greedy[4]
    # A banned argmax on a greedy row: the runner-up.
    assert res.token_ids[2] == logits[2].topk(2).indices[1]


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA GPU"))])
def test_presence_and_frequency_penalties_follow_openais_formula(device) -> None:
    """logit[t] -= frequency * count(t) + presence * (count(t) > 0), over the tokens
    generated so far; a row without penalties is untouched; logprobs stay raw."""
    logits = torch.tensor([[5.0, 4.9, 4.0, 1.0], [5.0, 4.9, 4.0, 1.0]], device=device)
    b = batch(2, temperature=0.0)
    b.penalties = [(0.5, 0.3, [0, 0, 2]), None]  # token 0 twice, token 2 once
    res = sample(logits, b)
    # row 0: 5 - 0.6 - 0.5 = 3.9, 4.9, 4 - 0.3 - 0.5 = 3.2, 1.0 -> token 1
    assert res.token_ids.tolist() == [1, 0]
    expected = torch.log_softmax(logits, -1)
    assert torch.allclose(res.logprobs.to(device), expected[[0, 1], [1, 0]])
    assert logits[0, 0] == 5.0  # the caller's logits are left alone
    # Negative penalties favour repeats.
    b.penalties = [(-1.0, 0.0, [3]), None]
    assert sample(logits, b).token_ids.tolist() == [0, 0]  # 1.0 + 1.0 < 5.0
    b.penalties = [(0.0, -2.0, [3, 3, 3]), None]
    assert sample(logits, b).token_ids.tolist() == [3, 0]  # 1.0 + 6.0 > 5.0


def test_logit_bias_moves_the_choice_and_leaves_logprobs_raw() -> None:
    """OpenAI's logit_bias: added to those tokens' logits before sampling (-100 bans, 100
    forces); the reported logprobs are the raw distribution's; rows without it are
    untouched, and greedy rows take the general path (not the one-kernel argmax)."""
    logits = torch.tensor([[5.0, 4.9, 4.0, 1.0], [5.0, 4.9, 4.0, 1.0]])
    b = batch(2, temperature=0.0)
    b.logit_biases = [{0: -100.0}, None]
    res = sample(logits, b)
    assert res.token_ids.tolist() == [1, 0]
    expected = torch.log_softmax(logits, -1)
    assert torch.allclose(res.logprobs, expected[[0, 1], [1, 0]])
    b.logit_biases = [{3: 100.0}, {2: 0.5, 3: 4.5}]
    assert sample(logits, b).token_ids.tolist() == [3, 3]  # 1 + 4.5 > 5 > 4 + 0.5
    assert logits[0, 0] == 5.0  # the caller's logits are left alone
