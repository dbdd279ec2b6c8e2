"""One kernel for what each attention layer does between its QKV projection and attention:
rotate q and k (neox RoPE from a float32 cos/sin table) and write k and v into their
paged-cache slots.

In a batch-1 decode step of an 8B model these were three kernels per layer (FlashInfer's
RoPE, then two `index_put`s for K and V, plus two per step to split slots into block and
offset): about 9 us of a 170 us layer, for a few kilobytes of data. Fused, k is rotated in
registers and stored straight into the cache (it is never read again from anywhere else);
only q is written back, in place.

Numerics match the torch path bit for bit where it matters: each element is rotated in
float32 and rounded once to the cache/activation dtype, as HF's `apply_rotary_pos_emb` does.

Written in Triton: it ships with PyTorch on CUDA machines, compiles in about a second,
and the same source runs on CPU under `TRITON_INTERPRET=1` (the unit test's oracle check).
"""

from __future__ import annotations

import functools

import torch

from kernels import pdl


@functools.cache
def triton_unavailable_reason() -> str | None:
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything
        return f"triton does not import: {e}"
    return None


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rope_kv_write(q_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, cos_sin_ptr, cache_ptr,
                      q_row, q_head, k_row, k_head, v_row, v_head,
                      c_block, c_kv, c_tok, c_head,
                      num_q_heads: tl.constexpr, num_kv_heads: tl.constexpr,
                      block_size: tl.constexpr, half: tl.constexpr, USE_PDL: tl.constexpr):
        # One program per (token, head) over q heads, then k heads, then v heads.
        if USE_PDL:  # kernels/pdl.py: everything here reads the previous kernel's output
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        t = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, half)
        pos = tl.load(pos_ptr + t)
        cos = tl.load(cos_sin_ptr + pos * (2 * half) + d)
        sin = tl.load(cos_sin_ptr + pos * (2 * half) + half + d)
        slot = tl.load(slot_ptr + t)
        block = slot // block_size
        offset = slot % block_size
        # Each branch names its own values: Triton types a name once across branches.
        if h < num_q_heads:
            src = q_ptr + t * q_row + h * q_head
            q1 = tl.load(src + d).to(tl.float32)
            q2 = tl.load(src + half + d).to(tl.float32)
            tl.store(src + d, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty))
            tl.store(src + half + d, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty))
        elif h < num_q_heads + num_kv_heads:
            hk = h - num_q_heads
            src = k_ptr + t * k_row + hk * k_head
            dst = cache_ptr + block * c_block + offset * c_tok + hk * c_head
            k1 = tl.load(src + d).to(tl.float32)
            k2 = tl.load(src + half + d).to(tl.float32)
            tl.store(dst + d, (k1 * cos - k2 * sin).to(cache_ptr.dtype.element_ty))
            tl.store(dst + half + d, (k2 * cos + k1 * sin).to(cache_ptr.dtype.element_ty))
        else:
            hv = h - num_q_heads - num_kv_heads
            src = v_ptr + t * v_row + hv * v_head
            dst = cache_ptr + block * c_block + c_kv + offset * c_tok + hv * c_head
            v1 = tl.load(src + d)
            v2 = tl.load(src + half + d)
            tl.store(dst + d, v1.to(cache_ptr.dtype.element_ty))
            tl.store(dst + half + d, v2.to(cache_ptr.dtype.element_ty))

    return rope_kv_write


def rope_and_write_kv_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       positions: torch.Tensor, slots: torch.Tensor, cos_sin: torch.Tensor,
                       kv_layer: torch.Tensor) -> None:
    """q [T, Hq, D] rotated in place; k [T, Hk, D] rotated and v [T, Hk, D] copied into
    `kv_layer` [num_blocks, 2, block_size, Hk, D] (strided over blocks) at `slots` [T]
    (block * block_size + offset). cos_sin: [max_positions, D] float32, cos | sin halves.
    q, k, v may be strided views (e.g. of one QKV output); each head must be contiguous."""
    t, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if t == 0:
        return
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"rope_and_write_kv_: {name} heads must be contiguous")
    if kv_layer.stride(-1) != 1 or kv_layer.stride(-2) != head_dim:
        raise ValueError("rope_and_write_kv_: cache tokens must be [kv_heads, head_dim] packed")
    cb, ckv, ctok, chead, _ = kv_layer.stride()
    _kernel()[(t, num_q_heads + 2 * num_kv_heads)](
        q, k, v, positions, slots, cos_sin, kv_layer,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cb, ckv, ctok, chead,
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        block_size=kv_layer.shape[2], half=head_dim // 2, **pdl.kernel_kwargs(q),
    )
