"""Load a Hugging Face safetensors checkpoint (single file or sharded) into a Baton model.

Each checkpoint tensor goes to its parameter's `weight_loader`, which takes this
rank's slice; fused projections (qkv, gate_up) are filled part by part. Every
failure names the file or tensor at fault.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from kernels.errors import CheckpointError
from kernels.models.decoder import DecoderForCausalLM
from kernels.models.registry import hf_param_names
from kernels.weight_init import fill_random_, tensor_generator

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def default_weight_loader(param: torch.nn.Parameter, loaded: torch.Tensor,
                          shard_id: str | int | None = None) -> None:
    """For replicated parameters (norms): the checkpoint tensor is the parameter."""
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: checkpoint {tuple(loaded.shape)}, "
                         f"model expects {tuple(param.shape)}")
    param.data.copy_(loaded)


def _loader(param: torch.nn.Parameter):
    return getattr(param, "weight_loader", default_weight_loader)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    elif (model_dir / SINGLE_FILE).is_file():
        files = [model_dir / SINGLE_FILE]
    else:
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {model_dir} is missing shard file(s): "
                              f"{', '.join(missing)}")
    return files


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is corrupt or unreadable: {e}") from None


def _route(model: DecoderForCausalLM, hf_name: str) -> tuple[str, str | int | None]:
    """HF tensor name -> (our parameter name, shard id of a fused parameter)."""
    parts = hf_name.split(".")
    for i, part in enumerate(parts):
        if part in model.packed_modules:
            fused, shard = model.packed_modules[part]
            return ".".join([*parts[:i], fused, *parts[i + 1 :]]), shard
    return hf_name, None


def load_weights(model: DecoderForCausalLM, model_dir: str | Path,
                 progress: bool = False) -> None:
    load_named_tensors(model, _iter_tensors(checkpoint_files(model_dir)), str(model_dir),
                       progress)


def load_named_tensors(model: DecoderForCausalLM,
                       tensors: Iterable[tuple[str, torch.Tensor]], source: str,
                       progress: bool = False) -> None:
    """Load HF-named tensors from any source (files, or an in-memory HF model in tests)."""
    cfg = model.config
    expected = hf_param_names(cfg)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    bar = tqdm(total=len(expected), desc="loading weights", unit="tensor", disable=not progress)
    for hf_name, tensor in tensors:
        if hf_name not in expected:
            if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some tied checkpoints store it anyway
            if "rotary_emb" in hf_name:
                continue
            raise CheckpointError(f"unexpected tensor {hf_name!r} in {source} for "
                                  f"{cfg.architecture}")
        if tuple(tensor.shape) != tuple(expected[hf_name]):
            raise CheckpointError(f"{hf_name} in {source} has shape {tuple(tensor.shape)}, but "
                                  f"config.json implies {tuple(expected[hf_name])}")
        name, shard = _route(model, hf_name)
        param = params[name]
        try:
            _loader(param)(param, tensor.to(param.dtype), shard)
        except ValueError as e:
            raise CheckpointError(f"{hf_name} in {source}: {e}") from None
        seen.add(hf_name)
        bar.update(1)
    bar.close()
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {source} lacks tensors: "
                              f"{', '.join(missing[:5])}{more}")


def init_dummy_weights(model: DecoderForCausalLM, seed: int = 0, progress: bool = False) -> None:
    """Random weights built straight on the model's device (no files): the same rule and
    per-tensor seeds as `baton make-model` (on CPU the very same values; CUDA's generator
    draws other numbers), for benchmarks in real shapes without a disk round trip."""
    cfg = model.config
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    shapes = hf_param_names(cfg)
    for hf_name, shape in tqdm(shapes.items(), desc="random weights", unit="tensor",
                               disable=not progress):
        full = torch.empty(shape, dtype=cfg.dtype, device=device)
        fill_random_(full, hf_name, cfg.hidden_size, tensor_generator(seed, hf_name, device))
        name, shard = _route(model, hf_name)
        _loader(params[name])(params[name], full, shard)
