"""Greedy sampling in one kernel: each row's argmax and the log-probability of it.

Every decode step reports the chosen token's logprob (its logit minus the row's
logsumexp), so a greedy step ran torch's argmax and logsumexp over the [B, vocab] float32
logits: four reduction kernels, ~55 us a step at batch 1 on the H200 with a 128k vocab
(offline_h200_profile.json: argmax alone 28 us, one block walking the whole row). Here
the row is cut into CHUNK-wide pieces, one program each (32 programs for one 128k row);
a program writes its piece's max, first argmax and sum of exp(x - max), and the last to
finish a row (an atomic ticket) combines them: logprob = -log(sum_c s_c * exp(m_c - M)),
since the chosen logit is M itself.

Ties go to the lowest index, as torch.argmax does (a NaN logit, which torch.argmax would
pick, is passed over here). Used for greedy steps without banned tokens or requested
alternatives, on CUDA (`kernels/sampling.py`); the CPU test runs the same source in
Triton's interpreter.
"""

from __future__ import annotations

import functools

import torch

from kernels import pdl
from kernels.attention.rope_kv_write import triton_unavailable_reason

CHUNK = 4096
MAX_ROWS = 4096  # tickets kept per device; larger batches use torch


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def greedy(logits_ptr, row_stride, vocab, part_ptr, part_idx_ptr, ticket_ptr,
               ids_ptr, logprob_ptr, packed_ptr, rows,
               CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
               CHUNKS_P2: tl.constexpr, USE_PDL: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        offs = c * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(logits_ptr + row.to(tl.int64) * row_stride + offs, mask=offs < vocab,
                    other=float("-inf"))
        m = tl.max(x, axis=0)
        first = tl.argmax(x, axis=0, tie_break_left=True)
        s = tl.sum(tl.exp(x - m), axis=0)
        s = tl.where(m == float("-inf"), 0.0, s)  # an all -inf piece adds nothing
        slot = row * CHUNKS + c
        tl.store(part_ptr + 2 * slot, m)
        tl.store(part_ptr + 2 * slot + 1, s)
        tl.store(part_idx_ptr + slot, c * CHUNK + first)
        tl.debug_barrier()
        done = tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel")
        if done == CHUNKS - 1:  # the row's last piece to finish combines them all
            cc = tl.arange(0, CHUNKS_P2)
            cm = cc < CHUNKS
            base = row * CHUNKS + cc
            ms = tl.load(part_ptr + 2 * base, mask=cm, other=float("-inf"),
                         cache_modifier=".cg")
            ss = tl.load(part_ptr + 2 * base + 1, mask=cm, other=0.0, cache_modifier=".cg")
            idx = tl.load(part_idx_ptr + base, mask=cm, other=2147483647,
                          cache_modifier=".cg")
            top = tl.max(ms, axis=0)
            best = tl.min(tl.where(ms == top, idx, 2147483647), axis=0)
            total = tl.sum(ss * tl.exp(ms - top), axis=0)
            lp = -tl.log(total)
            tl.store(ids_ptr + row, best.to(tl.int64))
            tl.store(logprob_ptr + row, lp)
            # Both again as float64 [2, rows] (exact): the host copies one buffer.
            tl.store(packed_ptr + row, best.to(tl.float64))
            tl.store(packed_ptr + rows + row, lp.to(tl.float64))
            tl.atomic_xchg(ticket_ptr + row, 0)  # ready for the next step

    return greedy


@functools.cache
def _tickets(device: torch.device, stream: int) -> torch.Tensor:
    """Per-row tickets, zero between launches (the combining program resets its row's).
    One set per stream: launches on one stream never overlap, on two they might."""
    return torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)


def usable(logits: torch.Tensor) -> bool:
    return (logits.is_cuda and logits.dtype == torch.float32 and logits.dim() == 2
            and 0 < logits.shape[0] <= MAX_ROWS and logits.stride(1) == 1
            and triton_unavailable_reason() is None)


def argmax_with_logprob(logits: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, V] float32 -> (argmax [B] int64, its log-softmax value [B] float32,
    both as float64 [2, B] for one host copy)."""
    rows, vocab = logits.shape
    chunks = -(-vocab // CHUNK)
    ids = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    packed = torch.empty(2, rows, dtype=torch.float64, device=logits.device)
    parts = torch.empty(rows * chunks * 2, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(rows * chunks, dtype=torch.int32, device=logits.device)
    tickets = _tickets(logits.device, torch.cuda.current_stream(logits.device).cuda_stream
                       if logits.is_cuda else 0)
    _kernel()[(rows, chunks)](
        logits, logits.stride(0), vocab, parts, part_idx, tickets, ids,
        logprobs, packed, rows, CHUNK=CHUNK, CHUNKS=chunks,
        CHUNKS_P2=1 << (chunks - 1).bit_length(), num_warps=4, **pdl.kernel_kwargs(logits))
    return ids, logprobs, packed
