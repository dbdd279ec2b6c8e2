"""Decode attention for one sequence (batch 1) in one kernel that starts reading the
KV cache before the previous kernel has finished.

At batch 1 an 8B layer's attention reads 4 MiB of KV at 1k context: ~1 us of HBM time,
yet FlashInfer's decode (its split-KV kernel plus the merge kernel) takes ~8.6 us a layer
on the H200, ~0.27 ms of a 4.15 ms step (docs/gpu_fast_path.md). What it waits on is
latency: launch, a dependent load of the page list, then the loads of K and V, then a
second kernel for the merge. Two things here cut that chain:

- Everything in the cache but this step's own token was written by earlier steps, so
  under programmatic dependent launch (kernels/pdl.py) each program loads its page ids
  and its first tile of K and V *before* waiting for the QKV product, i.e. while that
  product's last wave still streams weights. Only q and the one new token's K/V (written
  by the QKV product's epilogue or the RoPE + KV-write kernel) are read after the wait.
  The page lists and sequence length are written by copies queued before the step's
  graph, never inside it, so they too may be read early.
- The KV range is split over (kv head, split) programs; each writes its unnormalised
  partial output and softmax statistics, and the last program of a KV head to finish
  (an atomic ticket, reset by that program for the next layer) merges them, so there is
  no second kernel.

A program handles one KV head's GROUP query heads (padded to ROWS >= 16 rows for the
tensor-core dot). Splits: as many as the context has BLOCK_T-token tiles, at most
MAX_SPLITS, of equal length; a split longer than one tile loops over the rest after the
wait.

Only for one decode row (the batch-1 CUDA graph; DecodeGraphs), without sliding window,
soft cap or ALiBi, and with 1/sqrt(head_dim) scaling, which covers the model families
Baton serves. Numerics as FlashInfer's tensor-core decode: float32 scores and softmax,
probabilities rounded to the cache dtype for the PV product; agrees with the torch
reference to bf16 rounding, not bit for bit (tests/test_one_row_attention.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from kernels import pdl
from kernels.attention.rope_kv_write import triton_unavailable_reason


@functools.cache
def _kernel():
    """Built on first use, after TRITON_INTERPRET is read (CPU tests run the same source
    in Triton's interpreter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def one_row_attention_kernel(
            q_ptr, cache_ptr, indptr_ptr, indices_ptr, last_ptr, out_ptr,
            part_ptr, stat_ptr, ticket_ptr,
            c_block, c_kv, c_tok, c_head, qk_scale,
            GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
            PAGE: tl.constexpr, BLOCK_T: tl.constexpr, MAX_SPLITS: tl.constexpr,
            USE_PDL: tl.constexpr):
        head = tl.program_id(0)
        split = tl.program_id(1)
        first_page = tl.load(indptr_ptr)
        n_pages = tl.load(indptr_ptr + 1) - first_page
        seq_len = (n_pages - 1) * PAGE + tl.load(last_ptr)
        # Every program derives the same split of [0, seq_len): at most MAX_SPLITS
        # chunks of about equal length, no more chunks than BLOCK_T tiles. Positions are
        # looked up one by one, so a chunk need not start on a page.
        n_splits = tl.minimum(MAX_SPLITS, tl.cdiv(seq_len, BLOCK_T))
        per_split = tl.cdiv(seq_len, n_splits)
        n_splits = tl.cdiv(seq_len, per_split)
        start = split * per_split
        stop = tl.minimum(start + per_split, seq_len)
        t = tl.arange(0, BLOCK_T)
        d = tl.arange(0, HEAD_DIM)
        # The first tile, but for this step's token, before the wait (see the docstring).
        pos = start + t
        inside = pos < stop
        block = tl.load(indices_ptr + first_page + pos // PAGE, mask=inside, other=0)
        tok = block.to(tl.int64) * c_block + (pos % PAGE) * c_tok + head * c_head
        k_ptrs = cache_ptr + tok[:, None] + d[None, :]
        early = (inside & (pos < seq_len - 1))[:, None]
        k = tl.load(k_ptrs, mask=early, other=0.0)
        v = tl.load(k_ptrs + c_kv, mask=early, other=0.0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        if split < n_splits:
            new = ((pos == seq_len - 1) & inside)[:, None]
            k = tl.where(new, tl.load(k_ptrs, mask=new, other=0.0), k)
            v = tl.where(new, tl.load(k_ptrs + c_kv, mask=new, other=0.0), v)
            r = tl.arange(0, ROWS)
            q_rows = head * GROUP + r
            q = tl.load(q_ptr + q_rows[:, None] * HEAD_DIM + d[None, :],
                        mask=(r < GROUP)[:, None], other=0.0)
            # Scores in log2 units (qk_scale folds in log2(e)); exp2 below.
            s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(inside[None, :], s, float("-inf"))
            m = tl.max(s, axis=1)
            p = tl.exp2(s - m[:, None])
            l_sum = tl.sum(p, axis=1)
            acc = tl.dot(p.to(v.dtype), v)
            for tile in range(start + BLOCK_T, stop, BLOCK_T):
                pos = tile + t
                inside = pos < stop
                block = tl.load(indices_ptr + first_page + pos // PAGE, mask=inside, other=0)
                tok = block.to(tl.int64) * c_block + (pos % PAGE) * c_tok + head * c_head
                k_ptrs = cache_ptr + tok[:, None] + d[None, :]
                k = tl.load(k_ptrs, mask=inside[:, None], other=0.0)
                v = tl.load(k_ptrs + c_kv, mask=inside[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k)) * qk_scale
                s = tl.where(inside[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_sum = l_sum * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m = m_new
            row_ok = (r < GROUP)[:, None]
            dt = out_ptr.dtype.element_ty
            if n_splits == 1:
                o = acc / l_sum[:, None]
                tl.store(out_ptr + q_rows[:, None] * HEAD_DIM + d[None, :], o.to(dt),
                         mask=row_ok)
            else:
                slot = head * MAX_SPLITS + split
                tl.store(part_ptr + (slot * GROUP + r)[:, None] * HEAD_DIM + d[None, :], acc,
                         mask=row_ok)
                tl.store(stat_ptr + (slot * 2) * GROUP + r, m, mask=r < GROUP)
                tl.store(stat_ptr + (slot * 2 + 1) * GROUP + r, l_sum, mask=r < GROUP)
                # Every thread's partial stores, then the ticket (release); the last
                # program of this head to take one sees all the partials (acquire).
                tl.debug_barrier()
                ticket = tl.atomic_add(ticket_ptr + head, 1, sem="acq_rel")
                if ticket == n_splits - 1:
                    tl.debug_barrier()
                    # All splits' partials of the head's GROUP rows in one round of loads
                    # (.cg: around L1, which may hold an earlier layer's partials).
                    sp = tl.arange(0, MAX_SPLITS)
                    g = tl.arange(0, GROUP)
                    live = sp < n_splits
                    slots = head * MAX_SPLITS + sp
                    ms = tl.load(stat_ptr + (slots * 2)[:, None] * GROUP + g[None, :],
                                 mask=live[:, None], other=float("-inf"), cache_modifier=".cg")
                    ls = tl.load(stat_ptr + (slots * 2 + 1)[:, None] * GROUP + g[None, :],
                                 mask=live[:, None], other=0.0, cache_modifier=".cg")
                    parts = tl.load(part_ptr + ((slots * GROUP)[:, None, None]
                                                + g[None, :, None]) * HEAD_DIM
                                    + d[None, None, :], mask=live[:, None, None], other=0.0,
                                    cache_modifier=".cg")
                    w = tl.exp2(ms - tl.max(ms, axis=0)[None, :])
                    o = tl.sum(w[:, :, None] * parts, axis=0) / tl.sum(w * ls, axis=0)[:, None]
                    tl.store(out_ptr + (head * GROUP + g)[:, None] * HEAD_DIM + d[None, :],
                             o.to(dt))
                    tl.atomic_xchg(ticket_ptr + head, 0)

    return one_row_attention_kernel


def one_row_unavailable_reason(num_heads: int, num_kv_heads: int, head_dim: int,
                               dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the one-row kernel cannot serve this model here (None when it can)."""
    if device.type != "cuda":
        return "needs a CUDA device"
    reason = triton_unavailable_reason()
    if reason is not None:
        return reason
    group = num_heads // num_kv_heads
    if group * num_kv_heads != num_heads or group > 16 or group & (group - 1):
        return (f"{num_heads} query heads over {num_kv_heads} KV heads: not a power-of-two "
                "group of at most 16")
    if head_dim not in (64, 128, 256):
        return f"head_dim {head_dim} is not 64, 128 or 256"
    if group * head_dim > 1024:
        # The merge holds [splits, group, head_dim] float32 at once: past this it spills
        # registers (ptxas, sm_90a); not measured there.
        return f"{group} query heads per KV head x head_dim {head_dim} > 1024"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"takes bf16/fp16, not {dtype}"
    return None


@dataclass(frozen=True)
class OneRowConfig:
    block_t: int = 64  # tokens per tile (four 16-token pages); >= 16 (tensor-core dot)
    max_splits: int = 32  # per KV head: 8 heads x 32 = 256 programs at >= 2k context
    num_warps: int = 4
    # Longest context it serves: past it the batch-1 decode graph runs FlashInfer's
    # kernels (DecodeGraphs), which won at 4k in the 8B step on the H200
    # (offline_h200_one_row_v2.json: 4.29 vs 4.33 ms; 4.06 vs 4.15 ms at 1k).
    max_context: int = 2048


# What the engine builds (benchmarks.offline --one-row-config sets it, to compare tiles).
DEFAULT_CONFIG = OneRowConfig()


class OneRowAttention:
    """The kernel's scratch (partials, statistics, tickets) for one model runner: shared
    by every layer, as the layers' kernels run one after another on one stream."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, config: OneRowConfig | None = None) -> None:
        config = config or DEFAULT_CONFIG
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        pow2 = all(n > 0 and n & (n - 1) == 0 for n in (config.block_t, config.max_splits))
        assert pow2 and config.block_t >= 16 and config.max_splits >= 2, \
            f"{config}: block_t (>= 16) and max_splits (>= 2) must be powers of two"

        self.config = config
        slots = num_kv_heads * config.max_splits * self.group
        self.partials = torch.empty(slots * head_dim, dtype=torch.float32, device=device)
        self.stats = torch.empty(2 * slots, dtype=torch.float32, device=device)
        # Zero between uses: the merging program puts its head's back to 0.
        self.tickets = torch.zeros(num_kv_heads, dtype=torch.int32, device=device)
        self.qk_scale = math.log2(math.e) / math.sqrt(head_dim)

    def __call__(self, q: torch.Tensor, kv_layer: torch.Tensor, kv_indptr: torch.Tensor,
                 kv_indices: torch.Tensor, last_page_len: torch.Tensor) -> torch.Tensor:
        """q [1, num_heads, head_dim] (this step's token, rotated); kv_layer the layer's
        strided [blocks, 2, page, kv_heads, head_dim] view holding its K/V already;
        page lists in FlashInfer's CSR form, on the device. Returns [1, heads, head_dim]."""
        assert q.shape == (1, self.num_heads, self.head_dim) and q.stride(2) == 1 \
            and q.stride(1) == self.head_dim, "one contiguous row of query heads"
        cb, ckv, ctok, chead, cd = kv_layer.stride()
        assert cd == 1
        out = torch.empty(1, self.num_heads, self.head_dim, dtype=q.dtype, device=q.device)
        c = self.config
        _kernel()[(self.num_kv_heads, c.max_splits)](
            q, kv_layer, kv_indptr, kv_indices, last_page_len, out,
            self.partials, self.stats, self.tickets, cb, ckv, ctok, chead, self.qk_scale,
            GROUP=self.group, ROWS=max(16, self.group), HEAD_DIM=self.head_dim,
            PAGE=kv_layer.shape[2], BLOCK_T=c.block_t, MAX_SPLITS=c.max_splits,
            num_warps=c.num_warps, **pdl.kernel_kwargs(q))
        return out


class OneRowPlan:
    """A decode plan for the batch-1 graph: rows of one token go to the one-row kernel,
    reading the page lists from the device buffers the FlashInfer wrapper was planned
    into (so staging and planning stay as they are); anything else to the wrapper."""

    def __init__(self, wrapper, attention: OneRowAttention, kv_indptr: torch.Tensor,
                 kv_indices: torch.Tensor, last_page_len: torch.Tensor) -> None:
        self.wrapper = wrapper
        self.attention = attention
        self.buffers = (kv_indptr, kv_indices, last_page_len)

    def run(self, q: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != 1:
            return self.wrapper.run(q, kv_layer)
        return self.attention(q, kv_layer, *self.buffers)
