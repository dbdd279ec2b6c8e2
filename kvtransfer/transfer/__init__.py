"""KV block transfer backends behind one interface (`KVTransferBackend`): `nixl` (one-sided
READ by the decode worker from the prefill worker's registered KV memory) and `tcp`
(blocks streamed over the prefill worker's gRPC channel). `create_backend("auto")` takes
NIXL when it loads and says why when it falls back."""

from kvtransfer.transfer.base import BlockRun, KVTransferBackend, PeerInfo, coalesce
from kvtransfer.transfer.registry import create_backend

__all__ = ["BlockRun", "KVTransferBackend", "PeerInfo", "coalesce", "create_backend"]
