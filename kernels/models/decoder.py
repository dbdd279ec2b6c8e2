"""The pre-norm decoder shared by Llama, Mistral, Qwen2 and Qwen3.

These families differ only in switches that `ModelConfig` already carries (q/k/v
bias for Qwen2, per-head q/k RMSNorm for Qwen3, RoPE scaling for Llama 3), so one
implementation with Hugging Face parameter names serves all of them; the thin
classes in `registry.py` name the architectures.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from kernels.attention import AttentionMetadata
from kernels.attention.rope_kv_write import rope_and_write_kv_
from kernels.config import ModelConfig
from kernels.layers import fused, gemv
from kernels.layers.activation import silu_and_mul
from kernels.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kernels.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kernels.layers.norm import RMSNorm
from kernels.layers.rotary import RotaryEmbedding
from kernels.parallel import ParallelContext


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, pc: ParallelContext, rotary: RotaryEmbedding,
                 backend_cls) -> None:
        super().__init__()
        dt = cfg.dtype
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                          cfg.num_kv_heads, cfg.attention_bias, pc, dt)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size, False, pc, dt)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dt)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dt)
        self.qk_norm = cfg.qk_norm
        self.rotary = rotary
        self.attn = backend_cls(self.num_heads, self.num_kv_heads, cfg.head_dim)
        # kernels.layers.fused.enable() turns it on where Triton runs (CUDA, FlashInfer).
        self.fuse_rope_kv_write = False
        # With it, the one-row QKV product does that kernel's work in its epilogue
        # (kernels.layers.gemv.set_rope_fold() switches it, for comparisons).
        self.fold_rope_in_gemv = True

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_layer: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.o_proj(self.attend(positions, self.qkv_proj(x), kv_layer, meta))

    def one_row_rope(self, positions: torch.Tensor, kv_layer: torch.Tensor,
                     meta: AttentionMetadata) -> gemv.RopeWrite | None:
        """The fused RoPE + KV write's work for the one-row QKV product to do in its
        epilogue (then `attend(..., rope_done=True)`), where it can: q/k norms come
        between the product and RoPE, and the kernel pairs rows 4 at a time."""
        if (not (self.fuse_rope_kv_write and self.fold_rope_in_gemv) or self.qk_norm
                or self.head_dim % 8):
            return None
        return gemv.RopeWrite(positions, meta.slot_mapping, self.rotary.cos_sin_table(),
                              kv_layer, self.num_heads)

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, kv_layer: torch.Tensor,
               meta: AttentionMetadata, rope_done: bool = False) -> torch.Tensor:
        """From the QKV projection's output to attention's [T, q_size], before o_proj.
        `rope_done`: the product already rotated q and wrote this step's K/V."""
        t = qkv.shape[0]
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope_done:
            o = self.attn.run(q, kv_layer, meta)
        elif self.fuse_rope_kv_write:
            rope_and_write_kv_(q, k, v, positions, meta.slot_mapping,
                               self.rotary.cos_sin_table(), kv_layer)
            o = self.attn.run(q, kv_layer, meta)
        else:
            q, k = self.rotary(positions, q, k)
            o = self.attn.forward(q, k, v, kv_layer, meta)
        return o.reshape(t, q_size)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, pc: ParallelContext) -> None:
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [i, i], False, pc,
                                                       cfg.dtype)
        self.down_proj = RowParallelLinear(i, cfg.hidden_size, False, pc, cfg.dtype)

        self.use_fused_kernels = False  # kernels.layers.fused.enable() turns it on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        act = fused.silu_and_mul(gate_up) if self.use_fused_kernels else silu_and_mul(gate_up)
        return self.down_proj(act)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, pc: ParallelContext, rotary: RotaryEmbedding,
                 backend_cls) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.self_attn = Attention(cfg, pc, rotary, backend_cls)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)
        self.mlp = MLP(cfg, pc)
        # kernels.layers.gemv.set_decode_gemv() turns on the one-row path: four kernels
        # (norm + QKV, o, norm + gate/up + SwiGLU, down) around attention.
        self.use_gemv = False

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                kv_layer: torch.Tensor, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.use_gemv and x.shape[0] == 1:
            return self._forward_one_row(positions, x, residual, kv_layer, meta)
        h, residual = self.input_layernorm.forward_with_residual(x, residual)
        h = self.self_attn(positions, h, kv_layer, meta)
        h, residual = self.post_attention_layernorm.forward_with_residual(h, residual)
        return self.mlp(h), residual

    def _forward_one_row(self, positions: torch.Tensor, x: torch.Tensor,
                         residual: torch.Tensor | None, kv_layer: torch.Tensor,
                         meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        rope = attn.one_row_rope(positions, kv_layer, meta)
        qkv, residual = gemv.add_norm_gemv(x, residual, norm1.weight, norm1.eps,
                                           attn.qkv_proj.weight, rope=rope)
        o = attn.attend(positions, qkv, kv_layer, meta, rope_done=rope is not None)
        # Under TP the two row-parallel products sum over the ranks, as their layers do.
        h = attn.o_proj.pc.all_reduce(gemv.gemv(o, attn.o_proj.weight))
        act, residual = gemv.add_norm_gemv(h, residual, norm2.weight, norm2.eps,
                                           mlp.gate_up_proj.weight, swiglu=True)
        return mlp.down_proj.pc.all_reduce(gemv.gemv(act, mlp.down_proj.weight)), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, pc: ParallelContext, backend_cls) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, pc, cfg.dtype)
        # One RoPE table, shared by every layer.
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                 cfg.rope_scaling)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, pc, rotary, backend_cls) for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # Once per forward, not lazily in the first layer: a decode graph must capture it
        # (a split left over from a warm-up would replay stale slots).
        meta.split_slots()
        residual = None
        for layer, kv_layer in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_layer, meta)
        x, _ = self.norm.forward_with_residual(x, residual)
        return x


class DecoderForCausalLM(nn.Module):
    # HF checkpoint name -> (our fused parameter, part) for projections we fuse.
    packed_modules: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, pc: ParallelContext, backend_cls) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, pc, backend_cls)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, pc, cfg.dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.use_gemv = False  # kernels.layers.gemv.set_decode_gemv()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """Returns final hidden states [T, hidden]; logits only for the rows that sample."""
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.use_gemv and hidden.shape[0] == 1:
            logits = gemv.gemv(hidden, self.lm_head.weight, out_dtype=torch.float32)
            logits = self.lm_head.pc.all_gather_last_dim(logits)  # vocab shards under TP
            return logits[..., : self.lm_head.vocab_size]
        return self.lm_head(hidden).float()
