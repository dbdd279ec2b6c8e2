"""Engine configuration: one frozen dataclass, validated in one place, errors naming the flag."""

from __future__ import annotations

from dataclasses import dataclass

from kernels.errors import BatonError


class ConfigError(BatonError, ValueError):
    pass


@dataclass(frozen=True)
class EngineConfig:
    model: str
    load_format: str = "auto"  # "auto": safetensors from the model dir; "dummy": random
    device: str = "cpu"
    dtype: str | None = None  # None: the checkpoint's dtype on CPU, bfloat16 on CUDA
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from memory
    gpu_memory_utilization: float = 0.9
    # Held back from a GPU KV cache for the KV transfer backend's own device buffers (the
    # nccl links' staging: cluster/worker_main.py sets it), inside the worker's share.
    transfer_reserve_bytes: int = 0
    cpu_kv_cache_gb: float = 1.0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    # A step holding this many prompt tokens admits no new request (0: off): see
    # SchedulerConfig.prefill_saturation_tokens.
    prefill_saturation_tokens: int = 0
    # A step with decode rows takes at most this many prompt tokens (0: off): see
    # SchedulerConfig.prefill_tokens_while_decoding.
    prefill_tokens_while_decoding: int = 0
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto: FlashInfer where it runs, else torch
    cuda_graphs: bool = True  # decode CUDA graphs (FlashInfer backend only)
    # RoPE + paged KV write in one Triton kernel per layer (FlashInfer backend; off, with
    # a log line, where Triton is missing). Off: FlashInfer's RoPE and two index_puts.
    fused_rope_kv_write: bool = True
    # Batch-1 decode through Baton's GEMV kernels with the norms and SwiGLU folded in
    # (kernels/layers/gemv.py; FlashInfer backend, one process, no projection biases):
    # 4.63 vs 4.85 ms per 8B step on the H200 (offline_h200_gemv_configs.json).
    gemv_decode: bool = True
    # Batch-1 decode attention in Baton's one kernel that reads the KV cache while the
    # QKV product still runs (kernels/attention/one_row.py; decode graphs, one process)
    # instead of FlashInfer's split-KV decode and merge kernels.
    one_row_attention: bool = True
    # Decode steps of at most this many rows launch the next step (staged, graphed)
    # before the host reads their tokens, when every row surely continues unless it
    # samples a stop token: the GPU does not wait for the host between steps (a batch-1
    # 8B step spends ~0.1 ms of its 4.3 ms between graph replays). A row that does stop
    # wastes one step, so larger batches, where some row stops more often and the gap
    # matters less, do not. 0: never.
    overlap_decode_max_rows: int = 8
    # Programmatic dependent launch for Baton's Triton kernels on Hopper (kernels/pdl.py):
    # each kernel launches while the previous one drains. Process-wide.
    pdl: bool = True
    seed: int = 0
    tp: int = 1
    # Decode graphs under --tp, with the all-reduces of the group's CuPy NCCL communicator
    # inside (kernels/tp_comm.py; without CuPy they stay off, with a reason logged).
    # Measured on two H200s: the 8B shape at TP=2 and batch 1 3.0 ms a step against 14.5
    # eager (docs/multi_gpu.md).
    tp_cuda_graphs: bool = True
    # Tiered KV cache below the device: host DRAM (G2) and disk files (G3). Sizes in GiB,
    # or in blocks (the *_blocks fields win; tests use them for tiny tiers).
    host_kv_gb: float = 0.0
    host_kv_blocks: int | None = None
    disk_kv_dir: str | None = None
    disk_kv_gb: float = 0.0
    disk_kv_blocks: int | None = None
    # Bounded: when the disk writer falls behind, blocks leave the host tier without a
    # disk copy rather than stall the engine. Lossless: the engine waits for the writer.
    # None picks by device: bounded on GPUs (a step is a few ms, it must not wait on a
    # disk), lossless on CPU (a step takes far longer than writing a block).
    disk_kv_lossless: bool | None = None
    disk_kv_policy: str = "all"  # "reused": write to disk only blocks seen more than once
    # Read disk hits ahead of admission on a background thread, into a staging area of one
    # step's worth of blocks (max_num_batched_tokens / block_size) of host memory.
    disk_kv_prefetch: bool = True

    def host_kv_block_count(self, block_bytes: int) -> int:
        """G2 slots for blocks of `block_bytes` (a rank's shard under tensor parallelism:
        every rank gets the same count)."""
        return _tier_blocks(self.host_kv_blocks, self.host_kv_gb, block_bytes)

    def disk_kv_block_count(self, block_bytes: int) -> int:
        """G3 files for blocks of `block_bytes`."""
        return _tier_blocks(self.disk_kv_blocks, self.disk_kv_gb, block_bytes)

    def __post_init__(self) -> None:
        def check(ok: bool, flag: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"--{flag}: {msg}")

        check(self.load_format in ("auto", "dummy"), "load-format",
              f"must be 'auto' or 'dummy', got {self.load_format!r}")
        check(self.device in ("cpu", "cuda") or self.device.startswith("cuda:"), "device",
              f"must be cpu or cuda, got {self.device!r}")
        check(self.dtype in (None, "float32", "bfloat16", "float16"), "dtype",
              f"must be float32, bfloat16 or float16, got {self.dtype!r}")
        check(self.disk_kv_policy in ("all", "reused"), "disk-kv-policy",
              f"must be 'all' or 'reused', got {self.disk_kv_policy!r}")
        check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block-size",
              f"must be a power of two up to 128, got {self.block_size}")
        check(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "kv-blocks",
              f"must be >= 1, got {self.num_kv_blocks}")
        check(self.cpu_kv_cache_gb > 0, "cpu-kv-cache-gb",
              f"must be > 0, got {self.cpu_kv_cache_gb}")
        check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu-memory-utilization",
              f"must be in (0, 1], got {self.gpu_memory_utilization}")
        check(self.max_num_seqs >= 1, "max-num-seqs", f"must be >= 1, got {self.max_num_seqs}")
        check(self.max_num_batched_tokens >= 1, "max-num-batched-tokens",
              f"must be >= 1, got {self.max_num_batched_tokens}")
        check(self.prefill_saturation_tokens >= 0, "prefill-saturation-tokens",
              f"must be >= 0, got {self.prefill_saturation_tokens}")
        check(self.prefill_tokens_while_decoding >= 0, "prefill-tokens-while-decoding",
              f"must be >= 0, got {self.prefill_tokens_while_decoding}")
        check(self.max_model_len is None or self.max_model_len >= 2, "max-model-len",
              f"must be >= 2, got {self.max_model_len}")
        check(self.attention_backend in ("auto", "torch", "flashinfer"), "attention-backend",
              f"must be auto, torch or flashinfer, got {self.attention_backend!r}")
        for flag, v in (("host-kv-gb", self.host_kv_gb), ("disk-kv-gb", self.disk_kv_gb),
                        ("host-kv-blocks", self.host_kv_blocks or 0),
                        ("disk-kv-blocks", self.disk_kv_blocks or 0)):
            check(v >= 0, flag, f"must be >= 0, got {v}")
        check(not ((self.disk_kv_gb or self.disk_kv_blocks) and not self.disk_kv_dir),
              "disk-kv-dir", "is needed with --disk-kv-gb/--disk-kv-blocks")
        check(self.tp >= 1, "tp", f"must be >= 1, got {self.tp}")


def _tier_blocks(blocks: int | None, gib: float, block_bytes: int) -> int:
    """A KV tier's size in blocks: given as such (tests), or as GiB."""
    return blocks if blocks is not None else int(gib * 2**30 // block_bytes)
