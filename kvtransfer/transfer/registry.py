"""Pick a transfer backend: `nixl` when asked for or available, `tcp` otherwise (with
the reason logged, so a silent slow path never hides a broken install)."""

from __future__ import annotations

import logging

import torch

from kvtransfer.transfer.base import BlockReader, KVTransferBackend, MetadataFetcher
from kvtransfer.transfer.tcp import TcpBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nixl", "tcp")


def create_backend(name: str, kv_cache: torch.Tensor, agent_name: str,
                   fetch_metadata: MetadataFetcher, reader: BlockReader) -> KVTransferBackend:
    if name not in BACKENDS:
        raise ValueError(f"--kv-transfer must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name in ("auto", "nixl"):
        try:
            from kvtransfer.transfer.nixl import NixlBackend

            backend = NixlBackend(kv_cache, agent_name, fetch_metadata)
            log.info("KV transfer: nixl (agent %s)", agent_name)
            return backend
        except Exception as e:  # ImportError, or a UCX/plugin failure at agent creation
            if name == "nixl":
                raise RuntimeError(f"--kv-transfer nixl: NIXL cannot start: {e}") from e
            log.warning("KV transfer: falling back to tcp because NIXL cannot start: %s", e)
    log.info("KV transfer: tcp")
    return TcpBackend(kv_cache, reader)
