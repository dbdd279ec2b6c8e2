"""`baton worker`: one model replica serving one role over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Coroutine

import grpc

from decode_worker.service import DecodeService
from engine.config import ConfigError, EngineConfig
from engine.llm_engine import LLMEngine
from engine.rpc import GRPC_OPTIONS
from engine.rpc import worker_pb2_grpc as pb_grpc
from engine.rpc_server import WorkerContext, serve
from kvtransfer.transfer import BACKENDS
from prefill_worker.service import PrefillService

READY_PREFIX = "BATON_WORKER_READY"


class AggregatedService(PrefillService, DecodeService):
    """Role `both`: prefills for others and decodes (with or without a handle)."""


SERVICES = {"prefill": PrefillService, "decode": DecodeService, "both": AggregatedService}


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint dir, or a preset name")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--kv-blocks", type=int, default=None, help="device KV blocks per worker")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--prefill-saturation-tokens", type=int, default=0, metavar="N",
                   help="a step already holding N prompt tokens admits no new request: "
                        "past the size that keeps the GPU busy, batching another long "
                        "prompt only delays the first one's first token (0: off)")
    p.add_argument("--prefill-tokens-while-decoding", type=int, default=0, metavar="N",
                   help="a step with decode rows takes at most N prompt tokens, so a long "
                        "prompt prefilled beside running streams (an overflowed or local "
                        "prefill on a decode worker, a new prompt on a replica) stalls "
                        "them for N tokens' compute at a time instead of the whole step "
                        "budget's (0: off)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--kv-transfer", default="auto", choices=BACKENDS,
                   help="auto: nixl where it loads, else tcp; nccl (GPUs, CuPy) only when "
                        "asked for")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention-backend", default="auto", choices=["auto", "flashinfer", "torch"],
                   help="auto: FlashInfer on CUDA where it runs, else the torch reference")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run decode steps eagerly (for comparison and debugging)")
    p.add_argument("--no-gemv-decode", action="store_true",
                   help="batch-1 decode through cuBLAS and FlashInfer's norm/SwiGLU kernels "
                        "instead of Baton's fused GEMV kernels (for comparison and debugging)")
    p.add_argument("--no-one-row-attention", action="store_true",
                   help="batch-1 decode attention through FlashInfer instead of Baton's "
                        "one-kernel attention (for comparison and debugging)")
    p.add_argument("--no-pdl", action="store_true",
                   help="launch Baton's Triton kernels without programmatic dependent launch "
                        "(Hopper; for comparison and debugging)")
    p.add_argument("--overlap-decode-max-rows", type=int, metavar="N",
                   default=EngineConfig.overlap_decode_max_rows,
                   help="decode steps of at most N rows queue the next step before the host "
                        "reads their tokens (CUDA graphs); 0 turns it off")
    p.add_argument("--tp-cuda-graphs", action=argparse.BooleanOptionalAction,
                   default=EngineConfig.tp_cuda_graphs,
                   help="with --tp: capture decode graphs with their all-reduces (needs "
                        "CuPy's NCCL; docs/multi_gpu.md)")
    p.add_argument("--host-kv-gb", type=float, default=0.0,
                   help="host DRAM tier for KV blocks evicted from the device (GiB)")
    p.add_argument("--disk-kv-dir", default=None,
                   help="directory for the disk KV tier (kept across restarts)")
    p.add_argument("--disk-kv-gb", type=float, default=0.0, help="disk KV tier size (GiB)")
    p.add_argument("--disk-kv-policy", default="all", choices=["all", "reused"],
                   help="reused: write to disk only blocks seen more than once")
    p.add_argument("--no-disk-kv-prefetch", action="store_true",
                   help="read disk KV hits when a request is admitted, not ahead of it")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks per worker (GPUs device..device+tp-1)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of the GPU this worker may use; KV gets what is left")
    p.add_argument("--stream-interval", type=_at_least_one, default=1,
                   help="tokens per streamed chunk after the first, at least (default 1; "
                        "more when a stream lags); more cuts per-token gRPC and HTTP work at "
                        "hundreds of concurrent streams, at the cost of burstier streams")


def engine_config(args: argparse.Namespace, model: str) -> EngineConfig:
    return EngineConfig(
        model=model, load_format=args.load_format, device=args.device, dtype=args.dtype,
        block_size=args.block_size, num_kv_blocks=args.kv_blocks,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        prefill_saturation_tokens=args.prefill_saturation_tokens,
        prefill_tokens_while_decoding=args.prefill_tokens_while_decoding,
        max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
        seed=args.seed, attention_backend=args.attention_backend,
        cuda_graphs=not args.no_cuda_graphs, tp_cuda_graphs=args.tp_cuda_graphs,
        gemv_decode=not args.no_gemv_decode, pdl=not args.no_pdl,
        one_row_attention=not args.no_one_row_attention,
        overlap_decode_max_rows=args.overlap_decode_max_rows,
        gpu_memory_utilization=args.gpu_memory_utilization, tp=args.tp,
        host_kv_gb=args.host_kv_gb, disk_kv_dir=args.disk_kv_dir, disk_kv_gb=args.disk_kv_gb,
        disk_kv_policy=args.disk_kv_policy, disk_kv_prefetch=not args.no_disk_kv_prefetch,
        transfer_reserve_bytes=transfer_reserve_bytes(args.kv_transfer, args.device))


def check_engine_flags(args: argparse.Namespace, model: str) -> None:
    """Every check a worker makes of its engine flags, made before any worker starts
    (`baton serve`, the Ray job): a bad flag fails once, named, not in each worker."""
    check_tp_transfer(engine_config(args, model).tp, args.kv_transfer)


def check_tp_transfer(tp: int, kv_transfer: str) -> None:
    """A tensor-parallel worker moves KV over nixl or tcp only (`baton serve` checks this
    before it starts any worker, a worker again when it starts)."""
    if tp > 1 and kv_transfer not in ("auto", "tcp", "nixl"):
        raise ConfigError(f"--kv-transfer {kv_transfer} with --tp {tp}: a tensor-parallel "
                          "worker moves KV over nixl (rank to rank, both workers at the "
                          "same --tp) or tcp (through the leaders, any --tp)")


def transfer_reserve_bytes(kv_transfer: str, device: str) -> int:
    """GPU memory the KV transfer backend allocates beside the KV cache: the nccl links'
    staging buffers. NIXL and tcp move blocks in place."""
    if kv_transfer != "nccl" or not device.startswith("cuda"):
        return 0
    from kvtransfer.transfer.staging import staging_reserve_bytes

    return staging_reserve_bytes()


async def run_worker(args: argparse.Namespace) -> None:
    cfg = engine_config(args, args.model)
    try:
        check_tp_transfer(cfg.tp, args.kv_transfer)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    engine = LLMEngine(cfg, detokenize=False, kv_lease_seconds=args.kv_lease_seconds)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    if port == 0:
        raise RuntimeError(f"--port {args.port}: cannot bind on {args.host}")
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") \
        else args.host  # an IPv6 address (a pod IP) needs brackets before the port
    address = f"{host}:{port}"
    ctx = WorkerContext(engine, asyncio.get_running_loop(), args.role, address,
                        args.kv_transfer, args.stream_interval)
    service = SERVICES[args.role](ctx)
    pb_grpc.add_WorkerServicer_to_server(service, server)
    registrar = None
    if args.register:
        from cluster.discovery import Registrar, Registration

        registrar = Registrar(args.register,
                              Registration(address, args.role, args.lease_seconds))
    await serve(service, server, f"{READY_PREFIX} {address} role={args.role} "
                                 f"kv={ctx.transfer.name}",
                on_ready=registrar and registrar.register,
                on_stop=registrar and registrar.deregister, drain_s=args.drain_seconds)


def add_worker_parser(sub) -> None:
    p = sub.add_parser("worker", help="run one worker (prefill, decode or both)")
    p.add_argument("--role", required=True, choices=sorted(SERVICES))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    p.add_argument("--kv-lease-seconds", type=float, default=30.0,
                   help="prefill: free held KV if no decode worker collects it by then")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="at SIGTERM, turn new requests away and finish the ones here for up "
                        "to this long before exiting (what is left, routers migrate)")
    p.add_argument("--register", metavar="redis://HOST:PORT",
                   help="announce this worker in Redis for routers started with --discover "
                        "(--host must be an address they can dial)")
    p.add_argument("--lease-seconds", type=float, default=10.0,
                   help="with --register: routers drop this worker this long after it "
                        "stops renewing (it renews three times a lease)")
    add_engine_args(p)


def main_worker(args: argparse.Namespace) -> int:
    if args.register:
        if args.host in ("0.0.0.0", "::", ""):
            raise ValueError(f"--register with --host {args.host or '(empty)'}: routers "
                             "would be told to dial that; bind an address they can reach")
        if args.lease_seconds < 1:
            raise ValueError(f"--lease-seconds {args.lease_seconds}: at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.model:
        from cluster.embedded import default_model_dir

        args.model = str(default_model_dir())
    run_event_loop(run_worker(args))
    return 0


def run_event_loop(main: Coroutine[object, object, None]) -> None:
    """Runs a worker's gRPC service on uvloop where it is installed (a Linux dependency):
    every token a worker streams costs its event loop a hand-off from the engine thread
    and a gRPC message, paid under the GIL the engine thread needs for its steps."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
