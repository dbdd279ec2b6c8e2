"""How big a worker's KV cache is: what its share of the GPU leaves after the weights,
the activations of its largest step (measured by running one) and a reserve for decode
graphs and transfer staging; and the memory report it logs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels.attention import AttentionMetadata
from kernels.attention.flashinfer_backend import PageLists

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner

# Held back from the KV cache for decode graphs (they share one pool; the largest
# bucket's activations dominate). Measured use is logged after capture.
GRAPH_RESERVE_BYTES = 1 * 2**30


@dataclass
class MemoryReport:
    weights_bytes: int = 0
    activation_peak_bytes: int = 0
    graph_bytes: int = 0
    kv_cache_bytes: int = 0

    def summary(self) -> str:
        g = 2**30
        return (f"weights {self.weights_bytes / g:.2f} GiB, activation peak "
                f"{self.activation_peak_bytes / g:.2f} GiB, CUDA graphs {self.graph_bytes / g:.2f}"
                f" GiB, KV cache {self.kv_cache_bytes / g:.2f} GiB")


@dataclass(frozen=True)
class KVCacheSpec:
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def block_bytes(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize


# Left free beside the KV cache for the CUDA context and the allocator's slack.
FREE_MARGIN_BYTES = 512 * 2**20


def kv_budget_bytes(utilization: float, total: int, free: int, own_bytes: int,
                    reserve_bytes: int) -> int:
    """Bytes for a worker's KV cache. `utilization` is this worker's share of the card:
    less what it holds (`own_bytes`, its weights) and will need (`reserve_bytes`:
    activations, graphs). A share of the card, not a ceiling on its total use, so workers
    sharing a GPU each get theirs in whatever order they start (with the old ceiling the
    second to size its cache found the first's memory used and got none). Never more than
    is free now, less that reserve and FREE_MARGIN_BYTES."""
    share = utilization * total - own_bytes - reserve_bytes
    available = free - reserve_bytes - FREE_MARGIN_BYTES
    return int(max(min(share, available), 0))


def size_kv_cache(runner: ModelRunner) -> KVCacheSpec:
    """The KV cache's shape: --kv-blocks as asked, or sized from this worker's share of
    its GPU (or --cpu-kv-cache-gb on CPU)."""
    m = runner.model_cfg
    heads = runner.pc.shard(m.num_kv_heads, "num_key_value_heads")
    probe = KVCacheSpec(1, m.num_layers, runner.cfg.block_size, heads, m.head_dim, m.dtype)
    if runner.cfg.num_kv_blocks is not None:
        n = runner.cfg.num_kv_blocks
    elif runner.device.type == "cuda":
        n = _blocks_from_gpu_memory(runner, probe)
    else:
        n = int(runner.cfg.cpu_kv_cache_gb * 2**30 // probe.block_bytes)
        n = min(n, -(-runner.cfg.max_num_seqs * runner.max_model_len // probe.block_size))
    if n < 1:
        raise MemoryError("no memory left for the KV cache after loading the weights "
                          f"({runner.memory.summary()}); lower --max-num-batched-tokens or "
                          "raise --gpu-memory-utilization")
    return KVCacheSpec(n, m.num_layers, runner.cfg.block_size, heads, m.head_dim, m.dtype)


def _blocks_from_gpu_memory(runner: ModelRunner, probe: KVCacheSpec) -> int:
    """KV gets what is left of this worker's share of the card after its weights, the
    peak activations of its largest step (measured by running one) and reserves for CUDA
    graphs and transfer staging; never more than is actually free (`kv_budget_bytes`)."""
    dev = runner.device
    torch.cuda.synchronize(dev)
    runner.memory.weights_bytes = torch.cuda.memory_allocated(dev)
    runner.memory.activation_peak_bytes = _profile_activations(runner, probe)
    free, total = torch.cuda.mem_get_info(dev)
    graphs = GRAPH_RESERVE_BYTES if runner.graphs_off_reason is None else 0
    budget = kv_budget_bytes(runner.cfg.gpu_memory_utilization, total, free,
                             runner.memory.weights_bytes,
                             runner.memory.activation_peak_bytes + graphs
                             + runner.cfg.transfer_reserve_bytes)
    return budget // probe.block_bytes


@torch.inference_mode()
def _profile_activations(runner: ModelRunner, probe: KVCacheSpec) -> int:
    """Runs the largest prefill the scheduler can issue (one sequence of
    max_num_batched_tokens, logits for max_num_seqs rows) on a throwaway cache."""
    dev = runner.device
    n = max(1, min(runner.cfg.max_num_batched_tokens, runner.max_model_len))
    bs = probe.block_size
    blocks = -(-n // bs)
    kv = torch.zeros(blocks + 1, probe.num_layers, 2, bs, probe.num_kv_heads,
                     probe.head_dim, dtype=probe.dtype, device=dev)
    layers = [kv[:, i] for i in range(probe.num_layers)]
    table = list(range(blocks))
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=dev), block_tables=torch.tensor([table],
                                                                            device=dev),
        seq_lens=torch.tensor([n], device=dev), query_lens_cpu=[n], seq_lens_cpu=[n],
        block_size=bs)
    if runner.planner is not None:
        meta.plan = runner.planner.plan(PageLists.build([table], [n], [n], bs), False)
    ids = torch.zeros(n, dtype=torch.int64, device=dev)
    hidden = runner.model(ids, torch.arange(n, device=dev), layers, meta)
    rows = min(n, runner.cfg.max_num_seqs)
    runner.model.compute_logits(hidden[:rows]).log_softmax(-1)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del kv, layers, hidden, meta
    torch.cuda.empty_cache()
    return peak
