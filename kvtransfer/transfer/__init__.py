"""KV block transfer backends behind one interface (`KVTransferBackend`): `nixl` (one-sided
READ by the decode worker from the prefill worker's registered KV memory), `nccl` (NCCL
send/recv between the two GPUs, one communicator per worker pair) and `tcp` (blocks
streamed over the prefill worker's gRPC channel). `create_backend("auto")` takes NIXL when
it loads and says why when it falls back."""

from kvtransfer.transfer.base import (
    KV_LAYOUT,
    BlockRun,
    ControlPlane,
    KVTransferBackend,
    PeerInfo,
    PlanRejected,
    SendPlan,
    coalesce,
    split_runs,
    wait_out,
)
from kvtransfer.transfer.registry import BACKENDS, create_backend

__all__ = ["BACKENDS", "KV_LAYOUT", "BlockRun", "ControlPlane", "KVTransferBackend", "PeerInfo",
           "PlanRejected", "SendPlan", "coalesce", "create_backend", "split_runs", "wait_out"]
