"""Pick a transfer backend: `nixl` when asked for or available, `tcp` otherwise (with
the reason logged, so a silent slow path never hides a broken install); `nccl` only when
asked for, and then it must work."""

from __future__ import annotations

import logging

import torch

from kvtransfer.transfer.base import ControlPlane, KVTransferBackend
from kvtransfer.transfer.tcp import TcpBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nixl", "nccl", "tcp")


def create_backend(name: str, kv_cache: torch.Tensor, agent_name: str,
                   control: ControlPlane) -> KVTransferBackend:
    if name not in BACKENDS:
        raise ValueError(f"--kv-transfer must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "nccl":
        from kvtransfer.transfer.nccl import NcclBackend, unavailable_reason

        reason = unavailable_reason(kv_cache)
        if reason is not None:
            raise RuntimeError(f"--kv-transfer nccl: {reason}")
        backend = NcclBackend(kv_cache, agent_name, control.nccl_connect, control.nccl_send)
        log.info("KV transfer: nccl (name %s)", agent_name)
        return backend
    if name in ("auto", "nixl"):
        try:
            from kvtransfer.transfer.nixl import NixlBackend

            backend = NixlBackend(kv_cache, agent_name, control.fetch_metadata)
            log.info("KV transfer: nixl (agent %s)", agent_name)
            return backend
        except Exception as e:  # ImportError, or a UCX/plugin failure at agent creation
            if name == "nixl":
                raise RuntimeError(f"--kv-transfer nixl: NIXL cannot start: {e}") from e
            log.warning("KV transfer: falling back to tcp because NIXL cannot start: %s", e)
    log.info("KV transfer: tcp")
    return TcpBackend(kv_cache, control.read_blocks)
