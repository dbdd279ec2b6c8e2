"""The gRPC worker service: the RPCs every role shares (Status, Release, ReadBlocks, and
the prefill side of the nccl transfer: NcclConnect, NcclSend) and the server lifecycle.
The roles' own RPCs live in prefill_worker/ and decode_worker/."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable

import grpc

from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.rpc import GRPC_OPTIONS
from engine.rpc import worker_pb2 as pb
from engine.rpc import worker_pb2_grpc as pb_grpc
from engine.rpc.convert import REFUSED_KEY
from engine.worker import EngineWorker
from kvtransfer.transfer import (
    KV_LAYOUT,
    KVTransferBackend,
    PeerInfo,
    PlanRejected,
    SendPlan,
    create_backend,
    split_runs,
    wait_out,
)
from kvtransfer.transfer.nccl import NcclBackend
from kvtransfer.transfer.nccl_link import LinkBroken
from kvtransfer.transfer.tcp import ShardedTcpBackend

log = logging.getLogger(__name__)
# Between polls of a tensor-parallel NIXL pull (each poll is a collective between steps).
NIXL_POLL_S = 0.0005



class PeerChannels:
    """One gRPC channel per peer worker, opened on first use; the transfer backends'
    `ControlPlane`."""

    def __init__(self) -> None:
        self._stubs: dict[str, pb_grpc.WorkerStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def stub(self, address: str) -> pb_grpc.WorkerStub:
        if address not in self._stubs:
            ch = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
            self._channels.append(ch)
            self._stubs[address] = pb_grpc.WorkerStub(ch)
        return self._stubs[address]

    async def fetch_metadata(self, address: str) -> bytes:
        status = await self.stub(address).Status(pb.StatusRequest())
        return status.agent_metadata

    async def read_blocks(self, address: str, request_id: str, block_ids: list[int]
                          ) -> list[bytes]:
        call = self.stub(address).ReadBlocks(
            pb.ReadBlocksRequest(request_id=request_id, block_ids=block_ids))
        return [chunk.data async for chunk in call]

    async def nccl_connect(self, address: str, peer: str, unique_id: bytes) -> None:
        await self.stub(address).NcclConnect(
            pb.NcclConnectRequest(peer=peer, unique_id=unique_id))

    async def nccl_send(self, address: str, plan: SendPlan) -> None:
        req = pb.NcclSendRequest(request_id=plan.request_id, peer=plan.peer, seq=plan.seq,
                                 block_ids=plan.block_ids, run_lengths=plan.run_lengths)
        try:
            await self.stub(address).NcclSend(req)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise PlanRejected(e.details()) from e
            raise

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()


class WorkerContext:
    """Everything a role's RPC handlers need: the engine thread, the transfer backend,
    channels to peers, and this worker's own address."""

    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop, role: str,
                 address: str, kv_transfer: str, stream_interval: int = 1) -> None:
        self.role = role
        self.address = address
        # Set at SIGTERM: new Generate/Prefill calls are turned away (UNAVAILABLE, which
        # routers retry elsewhere) while the requests already here finish.
        self.draining = False
        # Generate/Prefill calls under way, counted from their first line: one still
        # waiting for blocks or pulling its KV is not in the engine yet, and a drain must
        # wait for it too.
        self.calls_in_flight = 0
        # Set once a Status call has answered "draining": a router polling has seen it.
        self.drain_seen = asyncio.Event()
        self.worker = EngineWorker(engine, loop, stream_interval)
        self.peers = PeerChannels()
        engine.events.worker_id = address  # routers know workers by address
        agent = f"baton-{role}-{os.getpid()}-{address.rsplit(':', 1)[-1]}"
        self.transfer: KVTransferBackend = (
            self._sharded_backend(engine, kv_transfer, agent) if engine.tp is not None
            else create_backend(kv_transfer, engine.runner.kv_cache, agent, self.peers))

    def _sharded_backend(self, engine: LLMEngine, kv_transfer: str,
                         agent: str) -> KVTransferBackend:
        """A tensor-parallel worker's KV is split over its ranks. nixl: every rank has an
        agent over its shard and reads from the same rank of the peer (both workers at the
        same --tp). tcp (and auto): only the leader talks to other workers, gathering and
        scattering shards through the TP group, so any prefill TP pairs with any decode TP."""
        if kv_transfer not in ("auto", "tcp", "nixl"):
            raise ValueError(f"--kv-transfer {kv_transfer} with --tp {engine.cfg.tp}: a "
                             "tensor-parallel worker moves KV over nixl or tcp")
        tp, kv = engine.tp, engine.runner.kv_cache
        if kv_transfer == "nixl":
            return self._sharded_nixl(engine, agent)

        async def scatter(block_ids: list[int], blocks) -> None:
            await self.worker.call(lambda e: tp.write_kv(kv, block_ids, blocks))

        log.info("KV transfer: tcp through the %d tensor-parallel ranks", engine.cfg.tp)
        return ShardedTcpBackend(kv, self.peers.read_blocks, engine.cfg.tp,
                                 lambda ids: tp.read_kv(kv, ids), scatter)

    def _sharded_nixl(self, engine: LLMEngine, agent: str) -> KVTransferBackend:
        from kvtransfer.transfer.nixl import ShardedNixlBackend

        tp = engine.tp
        try:  # collective: every rank starts its agent (the engine thread is not running)
            ranks = tp.nixl_setup(engine.runner.kv_cache, agent)
        except Exception as e:  # ImportError, or a UCX/plugin failure at agent creation
            raise RuntimeError(f"--kv-transfer nixl: NIXL cannot start: {e}") from e

        async def pull_ranks(peer_ranks, request_id, src, dst) -> int:
            # Post every rank's read between two steps, then poll between later steps: the
            # engine keeps stepping while the bytes move (each poll is one small collective).
            moved = await self.worker.call(
                lambda e: tp.nixl_post(request_id, peer_ranks, src, dst))

            async def landed() -> int:
                while (state := await self.worker.call(lambda e: tp.nixl_poll(request_id))) \
                        == 0:
                    await asyncio.sleep(NIXL_POLL_S)
                return state

            state = await wait_out(landed)  # the caller frees the blocks if cancelled
            if state < 0:
                raise RuntimeError(f"NIXL read of {request_id} failed on a tensor-parallel "
                                   "rank (its log says why)")
            return moved

        log.info("KV transfer: nixl, one agent per tensor-parallel rank (%s-r0..r%d)", agent,
                 engine.cfg.tp - 1)
        return ShardedNixlBackend(tp.nixl, ranks, self.peers.fetch_metadata, pull_ranks)

    @property
    def engine(self) -> LLMEngine:
        return self.worker.engine

    def handle_for(self, request_id: str, block_ids: list[int], num_tokens: int
                   ) -> pb.KVHandle:
        e = self.engine
        return pb.KVHandle(
            request_id=request_id, worker_address=self.address, agent_name=self.transfer.agent_name,
            base_address=self.transfer.base_address, block_bytes=self.transfer.block_bytes,
            block_ids=block_ids, num_tokens=num_tokens, layout=KV_LAYOUT,
            dtype=str(e.runner.kv_spec.dtype).removeprefix("torch."),
            block_size=e.cfg.block_size, backend=self.transfer.name)

    @staticmethod
    def peer_of(handle: pb.KVHandle) -> PeerInfo:
        return PeerInfo(handle.worker_address, handle.agent_name, handle.base_address,
                        handle.block_bytes)


def check_held(e: LLMEngine, request_id: str, block_ids) -> None:
    """A peer may read only blocks this worker holds for that request."""
    held = e.held.get(request_id)
    owned = set(held[0].block_table) if held else set()
    if not set(block_ids) <= owned:
        raise InvalidRequestError(f"blocks not held for {request_id!r}")


async def prepare_grammar(ctx: WorkerContext, params) -> None:
    """Compile a request's output grammar off the engine thread before it is admitted
    (engine/structured.py Grammars.prepare): the engine then finds it compiled, and a
    large schema stalls no step. Raises InvalidRequestError for a bad one."""
    grammars = ctx.worker.engine.scheduler.grammars
    if params.grammar and grammars is not None:
        await asyncio.to_thread(grammars.prepare, params.grammar)


async def abort_invalid(context: grpc.aio.ServicerContext, e: InvalidRequestError) -> None:
    # The param name travels in the details so the router can fill OpenAI's `param`.
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{e.param or ''}|{e}")


@contextlib.asynccontextmanager
async def request_call(ctx: WorkerContext, context: grpc.aio.ServicerContext):
    """A Generate/Prefill call: at a worker that is shutting down it is refused with
    UNAVAILABLE, which the router retries on another worker at once; otherwise it is
    counted for the drain while it runs. A refusal carries REFUSED_KEY in its trailing
    metadata: the call touched nothing, so a KV handle it carried is still the prefill
    worker's to serve, and the retry pulls it instead of prefilling again."""
    if ctx.draining:
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            f"worker {ctx.address} is draining (shutting down)",
                            trailing_metadata=((REFUSED_KEY, "draining"),))
    ctx.calls_in_flight += 1
    try:
        yield
    finally:
        ctx.calls_in_flight -= 1


class WorkerService(pb_grpc.WorkerServicer):
    """Shared RPCs; role classes subclass this and add Prefill and/or Generate."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    async def Status(self, request, context):
        if self.ctx.draining:
            self.ctx.drain_seen.set()

        def read(e: LLMEngine) -> pb.WorkerStatus:
            pool, sched = e.block_pool, e.scheduler
            queued = sum(s.num_uncomputed_tokens for s in sched.waiting) + sum(
                s.num_uncomputed_tokens for s in sched.running if s.num_uncomputed_tokens > 1)
            return pb.WorkerStatus(
                role=self.ctx.role, model=e.cfg.model, num_running=len(sched.running),
                num_waiting=len(sched.waiting), num_held=len(e.held),
                total_blocks=pool.num_blocks, free_blocks=pool.num_free, used_blocks=pool.num_used,
                cached_blocks=pool.num_cached, block_size=e.cfg.block_size,
                agent_name=self.ctx.transfer.agent_name,
                agent_metadata=self.ctx.transfer.metadata(),
                kv_backend=self.ctx.transfer.name, queued_prefill_tokens=queued,
                num_preemptions=sched.num_preemptions, max_model_len=e.max_model_len,
                pid=os.getpid(), draining=self.ctx.draining,
                prefill_tokens_per_s=e.prefill_tokens_per_s or 0.0)

        return await self.ctx.worker.call(read)

    async def Release(self, request, context):
        released = await self.ctx.worker.call(lambda e: e.release(request.request_id))
        return pb.ReleaseResponse(released=released)

    async def ReadBlocks(self, request, context):
        def read(e: LLMEngine) -> list[bytes]:
            check_held(e, request.request_id, request.block_ids)
            return self.ctx.transfer.read_blocks(list(request.block_ids))

        try:
            chunks = await self.ctx.worker.call(read)
        except InvalidRequestError as e:
            await abort_invalid(context, e)
            return
        for chunk in chunks:
            yield pb.BlockData(data=chunk)

    async def NcclConnect(self, request, context):
        backend = await self._nccl(context)
        try:
            await backend.accept(request.peer, request.unique_id)
        except Exception as e:  # a join that failed or timed out: the caller retries later
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"NCCL join with {request.peer} failed: {e}")
        return pb.NcclConnectResponse()

    async def NcclSend(self, request, context):
        backend = await self._nccl(context)
        ids = list(request.block_ids)

        def check(e: LLMEngine):
            check_held(e, request.request_id, ids)
            return backend.compute_marker()  # between steps: the KV is written by now

        try:
            runs = split_runs(ids, list(request.run_lengths))
            after = await self.ctx.worker.call(check)
        except ValueError as e:  # InvalidRequestError too: nothing is queued
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            backend.queue_send(request.peer, request.seq, runs, after)
        except LinkBroken as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return pb.NcclSendResponse()

    async def _nccl(self, context: grpc.aio.ServicerContext) -> NcclBackend:
        backend = self.ctx.transfer
        if not isinstance(backend, NcclBackend):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this worker moves KV with {backend.name}, not nccl: start "
                                "both sides with the same --kv-transfer")
        return backend

    async def KVEvents(self, request, context):
        w = self.ctx.worker
        blocks, last, instance, q = await w.subscribe_events()
        try:
            yield pb.KVEventsMessage(snapshot=True, worker_id=self.ctx.address,
                                     instance_id=instance, last_event_id=last,
                                     block_hashes=[h for h, _ in blocks])
            while True:
                yield pb.KVEventsMessage(batch=await q.get())
        finally:
            w.unsubscribe_events(q)


# Routers poll each worker's Status every 0.5 s.
DRAIN_SEEN_WAIT_S = 1.5


async def drain(ctx: WorkerContext, timeout_s: float) -> None:
    """Wait until nothing runs, waits or is held for a decode worker's pull here (or
    `timeout_s`); what is left then is cut off and routers migrate it."""
    if timeout_s <= 0:
        return
    def pending(e: LLMEngine) -> int:
        return len(e.scheduler.running) + len(e.scheduler.waiting) + len(e.held)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    left = max(await ctx.worker.call(pending), ctx.calls_in_flight)
    if left:
        log.info("draining: %d request(s) to finish (up to %.0fs)", left, timeout_s)
    while left and loop.time() < deadline:
        await asyncio.sleep(0.1)
        left = max(await ctx.worker.call(pending), ctx.calls_in_flight)
    if left:
        log.warning("drain timed out with %d request(s) left: routers will migrate them",
                    left)


async def serve(service: WorkerService, server: grpc.aio.Server, ready_line: str,
                on_ready: Callable[[], Awaitable[None]] | None = None,
                on_stop: Callable[[], Awaitable[None]] | None = None,
                drain_s: float = 0.0) -> None:
    """Start the engine thread, announce readiness on stdout, run until SIGTERM/SIGINT,
    then drain: turn new requests away, run `on_stop` (leaving discovery), and finish the
    requests already here for up to `drain_s` before stopping (a rolling update then loses
    nothing and migrates nothing). `on_ready` runs once the server answers (registering
    for discovery)."""
    ctx = service.ctx
    # Everything alive now (torch, the model, the engine) lives as long as the process:
    # move it out of the collector's reach, or every full collection walks it while
    # holding the GIL (100+ ms on a small CPU), stalling steps and token streams.
    gc.collect()
    gc.freeze()
    ctx.worker.start()
    await server.start()
    print(ready_line, flush=True)
    if on_ready is not None:
        await on_ready()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("worker shutting down")
    ctx.draining = True
    if on_stop is not None:
        await on_stop()
    await drain(ctx, drain_s)
    if drain_s > 0:  # linger until a router has polled the drain, so it sees a worker
        # that stopped, not one that failed (a short drain can end between two polls)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.drain_seen.wait(), DRAIN_SEEN_WAIT_S)
    await server.stop(grace=2)
    ctx.worker.stop()
    ctx.engine.close()  # tensor-parallel followers leave with the leader
    ctx.transfer.close()
    await ctx.peers.close()
