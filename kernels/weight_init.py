"""The random-weight rule shared by `baton make-model` and the engine's dummy-weight mode.

A random model is only useful for testing if greedy decoding is stable: with the
usual tiny init (std 0.02) every logit is near zero, ties are broken by rounding
noise, and two correct implementations disagree on the argmax. This rule keeps
activations at unit scale through every layer and gives logits a std of about 2.5
(untied head), so the top token usually wins by a wide margin:

- norms (`*norm.weight`, incl. q_norm/k_norm): 1 + 0.1 N(0, 1), near identity;
- `embed_tokens.weight`: N(0, 1), unit-scale hidden states from the start;
- `lm_head.weight`: N(0, 2.5 / sqrt(hidden)), so logits = h . w has std ~2.5;
- other 2-D linear weights [out, in]: N(0, 1 / sqrt(in)), variance-preserving;
- biases: N(0, 0.1).

A tied head reuses the embedding, so its logits have std ~sqrt(hidden): peakier still.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

NORM = "norm"
"""Kind of init: `1 + std * N(0, 1)`."""
NORMAL = "normal"
"""Kind of init: `std * N(0, 1)`."""

LOGIT_STD = 2.5


def init_std(hf_param_name: str, shape: Sequence[int], hidden_size: int) -> tuple[str, float]:
    """Return `(kind, std)` for a parameter given its Hugging Face name and shape.

    `kind` is `NORM` (value = 1 + std * N(0, 1)) or `NORMAL` (value = std * N(0, 1)).
    For a tensor-parallel shard pass the full (unsharded) shape, so every rank draws
    from the same distribution as a single-GPU model.
    """
    name = hf_param_name
    if name.endswith("norm.weight"):
        return NORM, 0.1
    if name.endswith(".bias"):
        return NORMAL, 0.1
    if name.endswith("embed_tokens.weight"):
        return NORMAL, 1.0
    if name.endswith("lm_head.weight"):
        return NORMAL, LOGIT_STD / math.sqrt(hidden_size)
    if len(shape) == 2:
        return NORMAL, 1.0 / math.sqrt(shape[1])
    raise ValueError(f"no init rule for parameter {name!r} with shape {tuple(shape)}")


def fill_random_(
    tensor: torch.Tensor,
    name: str,
    hidden_size: int,
    generator: torch.Generator,
    full_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Fill `tensor` in place by the rule for `name`; returns it.

    Samples are drawn in float32 on the generator's device, then cast and copied, so a
    bf16 tensor gets the same values as a float32 one rounded, and a CPU generator can
    fill a CUDA tensor (reproducible across machines) or a CUDA generator a CUDA tensor
    (fast). `full_shape` is the unsharded shape when `tensor` is a TP shard.
    """
    kind, std = init_std(name, full_shape or tensor.shape, hidden_size)
    values = torch.randn(
        tensor.shape, generator=generator, dtype=torch.float32, device=generator.device
    )
    values.mul_(std)
    if kind == NORM:
        values.add_(1.0)
    with torch.no_grad():
        tensor.copy_(values)
    return tensor


def tensor_generator(seed: int, name: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from `(seed, name)`, so each tensor's values depend on nothing
    else: not the order tensors are written in, nor which other tensors exist. The seed
    comes from SHA-256, stable across processes (unlike Python's `hash`)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return gen
