"""Matrix-vector kernels for batch-1 decode, with the layer's small ops folded in.

At batch 1 a decode step of an 8B model is ~15 GB of weights streamed through four
projections per layer, plus ~8 small kernels per layer (two residual-add + RMSNorms,
SwiGLU, cuBLAS's split-K reductions) that each cost a few microseconds of launch and
tail inside a CUDA graph: ~0.9 ms of a 5.1 ms step on the H200 (docs/gpu_fast_path.md).
Each program here computes BLOCK_N outputs over the whole of K (no split-K, so no
reduction kernel), and two variants fold the neighbouring small ops into the product:

- `add_norm_gemv`: y = W @ rmsnorm(x + residual) and the new residual, in one kernel.
  Every program reads the whole input vector anyway (8 KB, from L2), so each computes
  the norm itself; program 0 also writes the new residual (to a separate buffer, since
  other programs still read the old one). With `swiglu`, W is the merged gate/up
  projection and the kernel writes silu(gate) * up directly.
- `gemv`: y = W @ x (the o and down projections, the LM head, whose float32 logits it
  writes directly).

With `rope` (a `RopeWrite`), the QKV product also does the fused RoPE + KV write's work
in its epilogue: its programs take rows in RoPE pairs (j and j + head_dim/2 of one head),
rotate q into the output and write rotated k and v into the token's cache slot. All
kernels launch with programmatic dependent launch on Hopper (kernels/pdl.py) and load
their first weight tile before waiting for the previous kernel.

Numerics follow the torch path's roundings (x + residual rounded to the activation dtype,
the normed vector rounded before and after the norm weight, gate and up rounded before
SwiGLU), with float32 accumulation in a different order than cuBLAS: results agree to
bf16 rounding, not bit for bit (tests/test_gemv.py).

Used for one-row products on CUDA. Under TP each rank multiplies by its weight shard: the
norm's input (hidden state and residual) is whole on every rank, and the row-parallel
products (o, down) are summed by the group's all-reduce after their GEMV, the LM head's
vocab shards gathered (DecoderLayer._forward_one_row).

Measured on the H200 with the 8B shape (benchmarks/results/*gemv*): a layer's four
products with their small ops take 120 us against cuBLAS + FlashInfer's 128 us, the LM
head 236 against 259 us; the batch-1 step 4.63 against 4.85 ms (MBU 76% against 73%),
one served stream's time per output token 4.88 against 5.06 ms. With PDL and the RoPE
fold since: 4.24-4.27 ms against 4.80 ms without this path (offline_h200_rope_fold.json).
A first tile set with more rows per program lost (5.15 ms): cuBLAS streams the gate/up
weights at ~99% of the measured HBM bandwidth, so the folded-in kernels only pay where
the GEMV matches it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from kernels import pdl
from kernels.attention.rope_kv_write import triton_unavailable_reason
from kernels.layers.fused import switch_modules
from kernels.layers.linear import LinearBase

# (BLOCK_N, BLOCK_K, num_warps) tried by the autotuner on the first call of each shape
# (during the decode-graph warm-up, before capture). Each won at least one of the 8B
# shape's projections on the H200 (gpu_gemv_kernels_h200_configs.json, nine configs
# timed): few rows and long K tiles, many programs in flight. Smaller tiles lost by up to
# 50% on the long-K down projection; every config tried costs start-up time.
CONFIGS = ((2, 2048, 4), (4, 2048, 8), (2, 4096, 4), (4, 1024, 4), (4, 2048, 4))


@functools.cache
def _kernels():
    """(plain kernel, autotuned kernel): built on first use, after TRITON_INTERPRET is
    read, so the CPU tests can run the same source in Triton's interpreter."""
    import triton
    import triton.language as tl

    @triton.jit
    def input_tile(x_ptr, res_ptr, kk, k_mask, HAS_RES: tl.constexpr):
        """x + residual over one K tile, rounded to the activation dtype as torch does."""
        xv = tl.load(x_ptr + kk, mask=k_mask, other=0.0)
        if HAS_RES:
            xv = (xv.to(tl.float32) + tl.load(res_ptr + kk, mask=k_mask, other=0.0)
                  .to(tl.float32)).to(x_ptr.dtype.element_ty)
        return xv

    @triton.jit
    def product_input(x_ptr, res_ptr, normw_ptr, kk, k_mask, rstd,
                      HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr):
        """One K tile of the product's input (float32), rounded where the torch path
        rounds: x + residual, then the normed vector before and after the norm weight."""
        xv = input_tile(x_ptr, res_ptr, kk, k_mask, HAS_RES)
        if HAS_NORM:
            nw = tl.load(normw_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
            xv = ((xv.to(tl.float32) * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
                  * nw).to(x_ptr.dtype.element_ty)
        return xv.to(tl.float32)

    @triton.jit
    def rope_epilogue(val, head, j0, out_ptr, pos_ptr, slot_ptr, cos_sin_ptr, cache_ptr,
                      c_block, c_kv, c_tok, c_head, NUM_Q_HEADS: tl.constexpr,
                      NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      PAGE: tl.constexpr, HALF_N: tl.constexpr):
        """What kernels/attention/rope_kv_write.py does, for this program's rows of the
        QKV product (`val`, float32 of the rounded output: HALF_N rows j, then their
        partners j + HEAD_DIM/2): q rotated into the output, k rotated and v as is into
        the token's paged-cache slot. Same float32 math, so the same bits."""
        x1, x2 = tl.split(tl.trans(tl.reshape(val, (2, HALF_N))))
        half: tl.constexpr = HEAD_DIM // 2
        j = j0 + tl.arange(0, HALF_N)
        pos = tl.load(pos_ptr)
        cos = tl.load(cos_sin_ptr + pos * HEAD_DIM + j)
        sin = tl.load(cos_sin_ptr + pos * HEAD_DIM + half + j)
        slot = tl.load(slot_ptr)
        token = cache_ptr + (slot // PAGE) * c_block + (slot % PAGE) * c_tok
        cdt = cache_ptr.dtype.element_ty
        # Each branch names its own pointers: Triton types a name once across branches.
        if head < NUM_Q_HEADS:
            q_dst = out_ptr + head * HEAD_DIM
            tl.store(q_dst + j, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty))
            tl.store(q_dst + half + j, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty))
        elif head < NUM_Q_HEADS + NUM_KV_HEADS:
            k_dst = token + (head - NUM_Q_HEADS) * c_head
            tl.store(k_dst + j, (x1 * cos - x2 * sin).to(cdt))
            tl.store(k_dst + half + j, (x2 * cos + x1 * sin).to(cdt))
        else:
            v_dst = token + c_kv + (head - NUM_Q_HEADS - NUM_KV_HEADS) * c_head
            tl.store(v_dst + j, x1.to(cdt))
            tl.store(v_dst + half + j, x2.to(cdt))

    # A jit function finds the jit functions it calls among its module's globals (Triton
    # reads no closures), so the helpers built here are published there.
    globals().update(input_tile=input_tile, product_input=product_input,
                     rope_epilogue=rope_epilogue)

    @triton.jit
    def gemv_kernel(x_ptr, res_ptr, normw_ptr, w_ptr, out_ptr, res_out_ptr,
                    N, K, w_row, up_offset, eps,
                    pos_ptr, slot_ptr, cos_sin_ptr, cache_ptr, c_block, c_kv, c_tok, c_head,
                    HAS_NORM: tl.constexpr, HAS_RES: tl.constexpr, SWIGLU: tl.constexpr,
                    ROPE: tl.constexpr, NUM_Q_HEADS: tl.constexpr,
                    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
        pid = tl.program_id(0)
        if ROPE:
            # Rows in RoPE pairs: BLOCK_N / 2 rows j of one head and their partners
            # j + HEAD_DIM / 2, so the epilogue can rotate them in registers.
            half_n: tl.constexpr = BLOCK_N // 2
            per_head: tl.constexpr = HEAD_DIM // BLOCK_N
            head = pid // per_head
            j0 = (pid % per_head) * half_n
            i = tl.arange(0, BLOCK_N)
            rows = head * HEAD_DIM + j0 + i % half_n + (i // half_n) * (HEAD_DIM // 2)
        else:
            rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        cols = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + rows[:, None].to(tl.int64) * w_row
        # The first weight tile does not depend on the previous kernel: under PDL it is
        # loaded while that kernel drains (kernels/pdl.py), the rest after the wait.
        m0 = row_mask[:, None] & (cols < K)[None, :]
        w_first = tl.load(w_rows + cols[None, :], mask=m0, other=0.0)
        wu_first = w_first
        if SWIGLU:
            wu_first = tl.load(w_rows + up_offset + cols[None, :], mask=m0, other=0.0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rstd = 1.0
        res_len = tl.where(pid == 0, K, 0)  # program 0 writes the new residual
        if HAS_NORM:
            sq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + cols
                k_mask = kk < K
                xv = input_tile(x_ptr, res_ptr, kk, k_mask, HAS_RES)
                if HAS_RES:
                    tl.store(res_out_ptr + kk, xv, mask=kk < res_len)
                xf = xv.to(tl.float32)
                sq += xf * xf
            rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
        # The first tile with the weights loaded above, then the rest of K.
        xv = product_input(x_ptr, res_ptr, normw_ptr, cols, cols < K, rstd,
                           HAS_RES, HAS_NORM)
        acc = tl.sum(w_first.to(tl.float32) * xv[None, :], axis=1)
        acc_up = acc
        if SWIGLU:
            acc_up = tl.sum(wu_first.to(tl.float32) * xv[None, :], axis=1)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            kk = k0 + cols
            k_mask = kk < K
            xv = product_input(x_ptr, res_ptr, normw_ptr, kk, k_mask, rstd,
                               HAS_RES, HAS_NORM)
            m = row_mask[:, None] & k_mask[None, :]
            w = tl.load(w_rows + kk[None, :], mask=m, other=0.0)
            acc += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
            if SWIGLU:
                wu = tl.load(w_rows + up_offset + kk[None, :], mask=m, other=0.0)
                acc_up += tl.sum(wu.to(tl.float32) * xv[None, :], axis=1)
        dt = x_ptr.dtype.element_ty
        if SWIGLU:
            g = acc.to(dt).to(tl.float32)
            u = acc_up.to(dt).to(tl.float32)
            acc = g / (1.0 + tl.exp(-g)) * u
        if ROPE:
            rope_epilogue(acc.to(dt).to(tl.float32), head, j0, out_ptr, pos_ptr, slot_ptr,
                          cos_sin_ptr, cache_ptr, c_block, c_kv, c_tok, c_head,
                          NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE, BLOCK_N // 2)
        else:
            # Rounded to the activation dtype first, as torch's product is, then stored
            # as the output's dtype (float32 logits straight from the LM head).
            tl.store(out_ptr + rows, acc.to(dt).to(out_ptr.dtype.element_ty), mask=row_mask)

    tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
                 for n, k, w in CONFIGS],
        key=["N", "K", "HAS_NORM", "SWIGLU", "ROPE"])(gemv_kernel)
    return gemv_kernel, tuned


@dataclass
class RopeWrite:
    """What the QKV product's epilogue needs to do the work of
    kernels/attention/rope_kv_write.py for its one token: rotate q (left in the output)
    and k, and write k and v into the token's slot of the layer's paged cache."""

    positions: torch.Tensor  # [1]
    slots: torch.Tensor  # [1] block * block_size + offset
    cos_sin: torch.Tensor  # [max_positions, head_dim] float32, cos | sin halves
    kv_layer: torch.Tensor  # [num_blocks, 2, block_size, kv_heads, head_dim], strided
    num_q_heads: int

    def args(self) -> tuple:
        cb, ckv, ctok, chead, _ = self.kv_layer.stride()
        return (self.positions, self.slots, self.cos_sin, self.kv_layer, cb, ckv, ctok, chead)

    def flags(self) -> dict:
        _, _, page, kv_heads, head_dim = self.kv_layer.shape
        return {"ROPE": True, "NUM_Q_HEADS": self.num_q_heads, "NUM_KV_HEADS": kv_heads,
                "HEAD_DIM": head_dim, "PAGE": page}


NO_ROPE = {"ROPE": False, "NUM_Q_HEADS": 1, "NUM_KV_HEADS": 1, "HEAD_DIM": 2, "PAGE": 1}


def _launch(x: torch.Tensor, weight: torch.Tensor, n: int, *, residual=None, norm_weight=None,
            eps: float = 0.0, swiglu: bool = False, res_out=None,
            config: tuple[int, int, int] | None = None,
            out_dtype: torch.dtype | None = None, rope: RopeWrite | None = None
            ) -> torch.Tensor:
    k = weight.shape[1]
    assert x.shape == (1, k) and x.is_contiguous() and weight.stride(1) == 1, \
        "gemv takes one contiguous row and a row-major weight"
    out = torch.empty(1, n, dtype=out_dtype or x.dtype, device=x.device)
    plain, tuned = _kernels()
    if config is None and not x.is_cuda:  # Triton's CPU interpreter: nothing to tune
        config = (2 if rope else 64, 128, 4)  # RoPE pairs rows within one head
    args = (x, x if residual is None else residual, x if norm_weight is None else norm_weight,
            weight, out, x if res_out is None else res_out,
            n, k, weight.stride(0), n * weight.stride(0), eps,
            *(rope.args() if rope else (x, x, x, x, 0, 0, 0, 0)))
    flags = {"HAS_NORM": norm_weight is not None, "HAS_RES": residual is not None,
             "SWIGLU": swiglu, **(rope.flags() if rope else NO_ROPE), **pdl.kernel_kwargs(x)}
    if config is None:
        tuned[lambda meta: (-(-n // meta["BLOCK_N"]),)](*args, **flags)
    else:
        block_n, block_k, warps = config
        plain[(-(-n // block_n),)](*args, **flags, BLOCK_N=block_n, BLOCK_K=block_k,
                                   num_warps=warps)
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor,
         config: tuple[int, int, int] | None = None,
         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [1, K] @ weight[N, K].T -> [1, N], rounded to x's dtype and stored as `out_dtype`
    (default x's). `config` (BLOCK_N, BLOCK_K, num_warps) skips the autotuner (tests,
    benchmarks)."""
    return _launch(x, weight, weight.shape[0], config=config, out_dtype=out_dtype)


def add_norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                  eps: float, weight: torch.Tensor, swiglu: bool = False,
                  config: tuple[int, int, int] | None = None, rope: RopeWrite | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight @ rmsnorm(x + residual), x + residual) for one row; with `swiglu`, weight
    is [2I, K] (gate rows, then up rows) and the first result is silu(gate) * up [1, I].
    Without a residual (the first layer) the input itself is the new residual. With
    `rope`, weight is the QKV projection and the first result holds rotated q (its k and
    v columns are left unwritten: they went to the cache)."""
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    res_out = None if residual is None else torch.empty_like(x)
    out = _launch(x, weight, n, residual=residual, norm_weight=norm_weight, eps=eps,
                  swiglu=swiglu, res_out=res_out, config=config, rope=rope)
    return out, x if res_out is None else res_out


def set_rope_fold(model: nn.Module, on: bool) -> bool:
    """Whether the one-row QKV product also rotates q and k and writes K/V (on) or leaves
    that to the fused RoPE + KV-write kernel (off); benchmarks compare both."""
    return switch_modules(model, "fold_rope_in_gemv", on, None, "RoPE + KV write in the QKV GEMV")


def set_decode_gemv(model: nn.Module, on: bool) -> bool:
    """Switches a built model's one-row decode path on or off (benchmarks compare both in
    one process); returns whether it is on. Off, with a log line, where Triton is missing
    or a projection has a bias (the kernels add none)."""
    reason = triton_unavailable_reason()
    if reason is None and any(isinstance(m, LinearBase) and m.bias is not None
                              for m in model.modules()):
        reason = "a projection has a bias"
    return switch_modules(model, "use_gemv", on, reason, "one-row GEMV decode path")
