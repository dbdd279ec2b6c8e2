"""`baton make-model`: write a Hugging Face checkpoint with random weights in a preset's shape.

The folder is what `transformers` and our loader expect from a real download:
config.json, generation_config.json, tokenizer.json, tokenizer_config.json (with a chat
template) and safetensors weights under HF parameter names, sharded with an index when
large. Tensors are generated one at a time, each from its own seeded generator, and
streamed into shards, so writing the 70B shape needs about one shard of memory and the
same seed always gives byte-identical files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from kernels.errors import BatonError
from kernels.presets import get_preset
from kernels.tokenizer_builder import build_tokenizer
from kernels.weight_init import fill_random_, tensor_generator

DEFAULT_SHARD_BYTES = 2 * 1024**3
MARKER_KEY = "baton_make_model"
"""config.json key recording preset and seed; only folders carrying it are overwritten."""

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class OutputDirError(BatonError):
    """`--out` names something make-model must not overwrite."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]


def checkpoint_params(hf: dict[str, Any]) -> list[ParamSpec]:
    """Every tensor of the checkpoint, in file order, with HF names and full shapes."""
    arch = hf["architectures"][0]
    h, inter, vocab = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    qkv_bias = arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias"))
    qk_norm = arch == "Qwen3ForCausalLM"

    specs = [ParamSpec("model.embed_tokens.weight", (vocab, h))]
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs.append(ParamSpec(p + "input_layernorm.weight", (h,)))
        for proj, out in (("q", q), ("k", kv), ("v", kv)):
            specs.append(ParamSpec(f"{p}self_attn.{proj}_proj.weight", (out, h)))
            if qkv_bias:
                specs.append(ParamSpec(f"{p}self_attn.{proj}_proj.bias", (out,)))
        specs.append(ParamSpec(p + "self_attn.o_proj.weight", (h, q)))
        if qk_norm:
            specs.append(ParamSpec(p + "self_attn.q_norm.weight", (head_dim,)))
            specs.append(ParamSpec(p + "self_attn.k_norm.weight", (head_dim,)))
        specs.append(ParamSpec(p + "post_attention_layernorm.weight", (h,)))
        specs.append(ParamSpec(p + "mlp.gate_proj.weight", (inter, h)))
        specs.append(ParamSpec(p + "mlp.up_proj.weight", (inter, h)))
        specs.append(ParamSpec(p + "mlp.down_proj.weight", (h, inter)))
    specs.append(ParamSpec("model.norm.weight", (h,)))
    if not hf.get("tie_word_embeddings", False):
        specs.append(ParamSpec("lm_head.weight", (vocab, h)))
    return specs


def _nbytes(spec: ParamSpec, dtype: torch.dtype) -> int:
    return torch.Size(spec.shape).numel() * dtype.itemsize


def plan_shards(
    specs: list[ParamSpec], dtype: torch.dtype, shard_size_bytes: int
) -> list[list[ParamSpec]]:
    """Greedy packing in file order; a tensor larger than a shard gets a shard of its own."""
    shards: list[list[ParamSpec]] = [[]]
    used = 0
    for spec in specs:
        size = _nbytes(spec, dtype)
        if shards[-1] and used + size > shard_size_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += size
    return shards


def _prepare_out_dir(out: Path) -> None:
    """Refuse to write over anything that is not a previous make-model output (a real
    checkpoint downloaded there, a home directory); clear stale weights when it is."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        config = out / "config.json"
        try:
            ours = MARKER_KEY in json.loads(config.read_text())
        except (OSError, json.JSONDecodeError):
            ours = False
        if not ours:
            raise OutputDirError(
                f"--out {out} is a non-empty directory that make-model did not write; "
                "choose a new or empty directory"
            )
        for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
            stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_config_and_tokenizer(
    preset_name: str, out_dir: str | Path, seed: int = 0
) -> dict[str, Any]:
    """Write everything but the weights; returns the config.json dict.

    Cheap even for real shapes (about a second, for the padded tokenizer), so tests can
    check big configs without writing gigabytes.
    """
    preset = get_preset(preset_name)
    out = Path(out_dir)
    _prepare_out_dir(out)
    hf = preset.config_dict()
    tok, ids = build_tokenizer(preset.family, hf["vocab_size"], hf["max_position_embeddings"])
    eos = ids["eos_token_ids"]
    hf["bos_token_id"] = ids["bos_token_id"]
    hf["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    hf[MARKER_KEY] = {"preset": preset.name, "seed": seed}

    generation = {"eos_token_id": eos, "pad_token_id": ids["pad_token_id"], "do_sample": False}
    if ids["bos_token_id"] is not None:
        generation = {"bos_token_id": ids["bos_token_id"], **generation}

    _write_json(out / "config.json", hf)
    _write_json(out / "generation_config.json", generation)
    _write_json(out / "tokenizer_config.json", ids["tokenizer_config"])
    tok.save(str(out / "tokenizer.json"))
    return hf


def _random_tensors(
    specs: list[ParamSpec], dtype: torch.dtype, hidden: int, seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    for spec in specs:
        tensor = torch.empty(spec.shape, dtype=dtype)
        yield spec.name, fill_random_(tensor, spec.name, hidden, tensor_generator(seed, spec.name))


def write_checkpoint(
    preset_name: str,
    out_dir: str | Path,
    seed: int = 0,
    shard_size_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Write a complete random-weight checkpoint of `preset_name` into `out_dir`.

    One `model.safetensors` when the weights total under `shard_size_bytes`, else
    `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`. Returns the
    folder. Raises `UnknownPresetError` or `OutputDirError` before writing anything.
    """
    out = Path(out_dir)
    hf = write_config_and_tokenizer(preset_name, out, seed)
    dtype = _DTYPES[hf["torch_dtype"]]
    specs = checkpoint_params(hf)
    total = sum(_nbytes(s, dtype) for s in specs)
    shards = plan_shards(specs, dtype, shard_size_bytes)
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map: dict[str, str] = {}
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"make-model {preset_name}",
        disable=not progress,
    ) as bar:
        for shard, fname in zip(shards, names):
            tensors: dict[str, torch.Tensor] = {}
            for name, tensor in _random_tensors(shard, dtype, hf["hidden_size"], seed):
                tensors[name] = tensor
                weight_map[name] = fname
                bar.update(tensor.nbytes)
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            # safetensors creates files 0600; match the JSON files (umask) so a server
            # running as another user, or a shared model volume, can read the weights.
            shutil.copymode(out / "config.json", out / fname)
            del tensors  # peak memory stays near one shard
    if n > 1:
        _write_json(
            out / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    return out
