"""FlashInfer paged attention: the GPU fast path behind the same interface as the torch one.

FlashInfer splits work into a *plan* (CPU: partition the batch's pages over thread
blocks, copy the page lists to the GPU) and a *run* (the kernel). Planning once per step
and running it in every layer is what makes it cheap, so the model runner owns one
`FlashInferPlanner`, plans each step into `AttentionMetadata.plan`, and the per-layer
`FlashInferAttention` only writes K/V and runs the planned wrapper.

Layout: each layer's view of the engine's cache is [num_blocks, 2, block_size, kv_heads,
head_dim] (FlashInfer's NHD paged layout) strided over blocks, because a block keeps all
layers together (docs/kv_layout.md). FlashInfer reads the page stride from the tensor,
so no copy is made.

Decode steps use the decode wrapper (tensor-core variant when a KV head serves >= 4
query heads, where it is faster); prefill and mixed steps use the paged prefill wrapper
with a causal mask aligned to the end of each sequence (cached prefix + new tokens).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from kernels.attention.metadata import AttentionMetadata
from kernels.attention.torch_paged import write_kv

log = logging.getLogger(__name__)

# Head sizes FlashInfer's FA2 kernels are instantiated for.
SUPPORTED_HEAD_DIMS = (64, 128, 256)
WORKSPACE_BYTES = 256 * 2**20


def flashinfer_unavailable_reason(head_dim: int, device: torch.device,
                                  dtype: torch.dtype) -> str | None:
    """Why FlashInfer cannot serve this model here (None when it can)."""
    if device.type != "cuda":
        return "FlashInfer needs a CUDA device"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} is not one of FlashInfer's {SUPPORTED_HEAD_DIMS}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"FlashInfer kernels take bf16/fp16, not {dtype}"
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything
        return f"flashinfer does not import: {e}"
    return None


@dataclass
class PageLists:
    """A step's pages in FlashInfer's CSR form, built on the host (int32)."""

    qo_indptr: torch.Tensor  # [B+1] cumulative query lengths
    kv_indptr: torch.Tensor  # [B+1] cumulative page counts
    kv_indices: torch.Tensor  # [sum pages] block ids
    last_page_len: torch.Tensor  # [B] tokens in each sequence's last page

    @classmethod
    def build(cls, tables: list[list[int]], query_lens: list[int], seq_lens: list[int],
              block_size: int) -> PageLists:
        qo, kv, idx, last = [0], [0], [], []
        for table, q, s in zip(tables, query_lens, seq_lens):
            n = -(-s // block_size)
            idx.extend(table[:n])
            qo.append(qo[-1] + q)
            kv.append(kv[-1] + n)
            last.append(s - (n - 1) * block_size)
        i32 = torch.int32
        return cls(torch.tensor(qo, dtype=i32), torch.tensor(kv, dtype=i32),
                   torch.tensor(idx, dtype=i32), torch.tensor(last, dtype=i32))


@dataclass
class _RowPages:
    """One sequence's block table as a growable int32 array (capacity doubles)."""

    array: np.ndarray
    count: int
    last_used: int

    def extend(self, tail: list[int]) -> None:
        end = self.count + len(tail)
        if end > len(self.array):
            grown = np.empty(max(end, 2 * len(self.array)), dtype=np.int32)
            grown[: self.count] = self.array[: self.count]
            self.array = grown
        self.array[self.count : end] = tail
        self.count = end


class DecodePageCache:
    """Builds a decode step's page lists from per-sequence int32 mirrors of the block
    tables, converting only blocks added since the last step.

    Rebuilding the CSR lists from Python lists cost ~1 ms of host time per step at batch
    64 x 2k context (8k Python ints into tensors), all of it exposed: the GPU waits for
    the host between decode steps. A table only grows while its sequence runs; the key
    names the sequence object (a process-wide serial, not the request id, which callers
    may reuse) and the table's epoch (bumped when the blocks are freed), so a sequence that
    was preempted and refilled, or a new one under an old request id, is mirrored afresh,
    never from stale blocks.
    """

    EVICT_EVERY = 256  # steps; rows not used for that long are dropped

    def __init__(self) -> None:
        self._rows: dict[str, _RowPages] = {}
        self._step = 0

    def __len__(self) -> int:
        return len(self._rows)

    def page_lists(self, keys: list[str], tables: list[list[int]], seq_lens: list[int],
                   block_size: int, pad_rows: int = 0, pad_block: int = 0,
                   out: PageLists | None = None) -> PageLists:
        """Like `PageLists.build` for one-token rows, plus `pad_rows` rows of one token in
        `pad_block` (CUDA-graph padding). With `out` (pinned host tensors, large enough),
        the lists are written into slices of its tensors, which are returned."""
        self._step += 1
        n = len(keys) + pad_rows
        lens = np.empty(n, dtype=np.int32)
        lens[: len(keys)] = seq_lens
        lens[len(keys):] = 1
        pages = (lens + (block_size - 1)) // block_size
        parts = []
        for key, table, count in zip(keys, tables, pages[: len(keys)].tolist()):
            row = self._rows.get(key)
            if row is None or row.count > len(table):
                row = _RowPages(np.array(table, dtype=np.int32), len(table), self._step)
                self._rows[key] = row
            elif row.count < len(table):
                row.extend(table[row.count:])
            row.last_used = self._step
            parts.append(row.array[:count])
        if pad_rows:
            parts.append(np.full(pad_rows, pad_block, dtype=np.int32))
        if self._step % self.EVICT_EVERY == 0:
            horizon = self._step - self.EVICT_EVERY
            self._rows = {k: r for k, r in self._rows.items() if r.last_used > horizon}
        if out is None:
            out = PageLists(torch.arange(n + 1, dtype=torch.int32),
                            torch.empty(n + 1, dtype=torch.int32),
                            torch.empty(int(pages.sum()), dtype=torch.int32),
                            torch.empty(n, dtype=torch.int32))
        indptr, last = out.kv_indptr[: n + 1], out.last_page_len[:n]
        indptr_np = indptr.numpy()
        indptr_np[0] = 0
        np.cumsum(pages, out=indptr_np[1:])
        np.subtract(lens, (pages - 1) * block_size, out=last.numpy())
        indices = out.kv_indices[: int(indptr_np[-1])]
        if parts:
            np.concatenate(parts, out=indices.numpy())
        return PageLists(out.qo_indptr[: n + 1], indptr, indices, last)


class FlashInferPlanner:
    """Owns the workspace and wrappers of one model runner; plans each step."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        import flashinfer

        self.fi = flashinfer
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        self.use_tensor_cores = num_heads // num_kv_heads >= 4
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # FA2 kernels for both: they JIT-compile in a fraction of FA3's time, and attention
        # is a small share of an 8B model's FLOPs at the context lengths served here.
        self.backend = "fa2"
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=self.backend)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.use_tensor_cores, backend=self.backend)

    def plan(self, pages: PageLists, decode_only: bool):
        """Plan this step; returns the wrapper every layer runs."""
        if decode_only:
            self.plan_decode(self.decode, pages)
            return self.decode
        self.prefill.plan(
            pages.qo_indptr, pages.kv_indptr, pages.kv_indices, pages.last_page_len,
            self.num_heads, self.num_kv_heads, self.head_dim, self.block_size,
            causal=True, q_data_type=self.dtype, kv_data_type=self.dtype,
        )
        return self.prefill

    def plan_decode(self, wrapper, pages: PageLists) -> None:
        wrapper.plan(
            pages.kv_indptr, pages.kv_indices, pages.last_page_len,
            self.num_heads, self.num_kv_heads, self.head_dim, self.block_size,
            q_data_type=self.dtype, kv_data_type=self.dtype,
        )

    def graph_decode_wrapper(self, batch_size: int, indptr: torch.Tensor,
                             indices: torch.Tensor, last_page_len: torch.Tensor):
        """A decode wrapper whose page lists live in caller-owned device buffers, so a
        CUDA graph captured over its `run` stays valid when it is re-planned."""
        return self.fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True,
            use_tensor_cores=self.use_tensor_cores, backend=self.backend,
            paged_kv_indptr_buffer=indptr[: batch_size + 1],
            paged_kv_indices_buffer=indices,
            paged_kv_last_page_len_buffer=last_page_len[:batch_size],
        )


class FlashInferAttention:
    """Per-layer attention: write this step's K/V, run the step's planned wrapper."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_layer: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        write_kv(kv_layer, k, v, meta)
        return meta.plan.run(q, kv_layer)

    def run(self, q: torch.Tensor, kv_layer: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        """Attention only: this step's K/V are already in the cache (written by the fused
        RoPE + KV-write kernel)."""
        return meta.plan.run(q, kv_layer)
