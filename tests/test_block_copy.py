"""Block gather/scatter of staged transfers (kernels/block_copy.py) against torch's
index_select / index_copy_: in Triton's interpreter on CPU (rows that leave a partial
last tile, ids out of order), and on a GPU with 2 MiB blocks of the 8B shape."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import block_copy
from kernels.attention.rope_kv_write import triton_unavailable_reason

needs_triton = pytest.mark.skipif(triton_unavailable_reason() is not None,
                                  reason="triton is not installed")
REPO = Path(__file__).resolve().parents[1]


def check(blocks: int, words: int, n: int, device: str) -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(-2**62, 2**62, (blocks, words), generator=g).to(device)
    ids = torch.randperm(blocks, generator=g)[:n].to(device)
    buf = torch.empty(n, words, dtype=torch.int64, device=device)
    block_copy.gather_rows(rows, ids, buf)
    assert torch.equal(buf, rows[ids])
    dest = torch.zeros_like(rows)
    block_copy.scatter_rows(buf, ids, dest)
    assert torch.equal(dest[ids], rows[ids])
    untouched = torch.ones(blocks, dtype=torch.bool, device=device)
    untouched[ids] = False
    assert not dest[untouched].any()


def test_bad_shapes_are_refused() -> None:
    rows = torch.zeros(8, 16, dtype=torch.int64)
    with pytest.raises(ValueError, match="equal words"):
        block_copy.gather_rows(rows, torch.zeros(2, dtype=torch.int64),
                               torch.zeros(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        block_copy.gather_rows(rows, torch.zeros(3, dtype=torch.int64),
                               torch.zeros(2, 16, dtype=torch.int64))


def test_torch_fallback_matches() -> None:
    check(40, 300, 17, "cpu")  # no TRITON_INTERPRET here: the torch ops


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test covers it")
def test_matches_torch_in_triton_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = ("from tests.test_block_copy import check; "
            f"check(24, {block_copy.TILE + 100}, 9, 'cpu')")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_matches_torch_on_gpu() -> None:
    check(512, (2 << 20) // 8, 300, "cuda")
