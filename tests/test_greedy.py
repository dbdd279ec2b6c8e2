"""The one-kernel greedy sampler (kernels/greedy.py) against torch's argmax and
logsumexp: in Triton's interpreter on CPU (a vocabulary that leaves a partial last
piece, ties across pieces, a row whose maximum sits in its last piece), and on a GPU
with the Llama 3 vocabulary through `sample()` itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import greedy
from kernels.attention.rope_kv_write import triton_unavailable_reason

needs_triton = pytest.mark.skipif(triton_unavailable_reason() is not None,
                                  reason="triton is not installed")
REPO = Path(__file__).resolve().parents[1]


def _logits(rows: int, vocab: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, vocab, generator=g) * 3
    x[0, 5] = x[0, vocab - 3] = 40.0  # a tie across pieces: the first index wins
    if rows > 1:
        x[1, vocab - 1] = 50.0  # the maximum in the partial last piece
    return x.to(device)


def check(rows: int, vocab: int, device: str) -> None:
    x = _logits(rows, vocab, device)
    for _ in range(2):  # the second call finds the tickets reset by the first
        ids, lp, packed = greedy.argmax_with_logprob(x)
        assert torch.equal(ids, x.argmax(dim=-1))
        assert torch.equal(packed, torch.stack([ids.double(), lp.double()]))
        want = x.gather(1, ids[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1)
        torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)
    assert ids[0].item() == 5


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test covers it")
def test_matches_torch_in_triton_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", "from tests.test_greedy import check; check(3, 10000, 'cpu')"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 64])
def test_sample_uses_it_and_matches_torch_on_gpu(rows) -> None:
    from kernels.sampling import SamplingBatch, sample

    check(rows, 128256, "cuda")
    x = _logits(rows, 128256, "cuda")
    batch = SamplingBatch([0.0] * rows, [0] * rows, [1.0] * rows, [None] * rows,
                          [0] * rows, [()] * rows)
    assert greedy.usable(x)
    got = sample(x, batch)
    assert torch.equal(got.token_ids, x.argmax(dim=-1))
    want = torch.log_softmax(x, dim=-1).gather(1, got.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(got.logprobs, want, atol=1e-5, rtol=1e-5)
