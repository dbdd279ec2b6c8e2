"""The embedded default model: a tiny checkpoint written once under the user's cache dir,
so `baton serve` with no arguments has something real to serve."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_PRESET = "tiny-llama"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "baton" / "models"


def default_model_dir(preset: str = DEFAULT_PRESET) -> Path:
    path = cache_dir() / preset
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        from kernels.checkpoint_writer import write_checkpoint

        write_checkpoint(preset, path, seed=0, progress=False)
    return path
