"""Tensor parallelism across processes: one leader (the worker the router talks to) and
`tp - 1` follower processes, one per extra GPU (or CPU process in tests).

The leader owns the scheduler, the block pool and sampling; every rank owns a model
shard and its KV shard (KV heads split across ranks). Each step the leader broadcasts
the step's host-side inputs (`StepInputs`, msgpack) over a gloo group, then every rank
runs the same forward; the all-reduces inside the model (and the lm_head's all-gather)
go over the default group: NCCL on GPUs, gloo on CPU. Followers only ever run forwards,
so the engine above the model runner is unchanged.

Startup is collective too: memory profiling, the KV block count (every rank takes the
smallest any rank can afford) and CUDA-graph capture run in the same order on all ranks.
Followers die with the leader (PR_SET_PDEATHSIG) and leave on an empty broadcast.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import torch
import torch.distributed as dist

from engine.config import EngineConfig
from kernels import tp_comm
from kernels.parallel import ParallelContext
from kvtransfer.transfer.base import KV_HEAD_DIM

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
COLLECTIVE_TIMEOUT_S = 300
STEP_FIELDS = ("ids", "positions", "slots", "tables", "query_lens", "seq_lens", "logits_rows",
               "prompt_rows", "decode_only", "table_keys", "launch_ahead")


@dataclasses.dataclass(frozen=True)
class KVCommand:
    """Sent to followers instead of a step: `read` gathers their shards of `block_ids` to
    the leader, `write` scatters full-head blocks to them (KV transfer between a prefill
    and a decode worker, which only the leader talks to)."""

    op: str  # "read" | "write" | "tier" | "host_read" | "nixl_setup" | "nixl_post" | ...
    # "tier": [kind ("d2h"|"h2d"), host slot, block id] per copy; "host_read": host slots;
    # "nixl_setup": [agent
    # name prefix]; "nixl_post": [request id, peer ranks' agents, src ids, dst ids];
    # "nixl_poll": [request id]
    block_ids: list


def rank_device(cfg: EngineConfig, rank: int) -> str:
    """Rank r of a worker on cuda:k uses cuda:k+r; on CPU every rank is 'cpu'."""
    if cfg.device == "cpu":
        return "cpu"
    base = int(cfg.device.split(":")[1]) if ":" in cfg.device else 0
    return f"cuda:{base + rank}"


class TPComm:
    """What a rank's model runner needs from the group: its placement and agreement."""

    def __init__(self, rank: int, world: int, init_method: str, device: str) -> None:
        self.pc = ParallelContext(rank, world)
        self._tier_copies: list = []  # leader: host-tier copies not yet sent
        self.nixl = None  # this rank's NixlBackend over its KV shard (--kv-transfer nixl)
        self._reads: dict = {}  # request id -> this rank's NIXL read in flight (or None)
        self.host_kv: torch.Tensor | None = None  # follower: its shard of the host tier
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        # A bounded wait: a rank that never arrives (crashed at start-up) fails the others
        # instead of hanging them (NCCL aborts timed-out collectives).
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        # Step metadata is host data: a gloo group keeps it off the GPU stream.
        # Its timeout is how long a follower waits for the leader's next step: an idle
        # worker must not lose its ranks after torch's default 30 minutes.
        self.control = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=30)) \
            if backend == "nccl" else None
        if self.control is not None:
            self.pc = dataclasses.replace(self.pc, comm=self._gpu_comm(device))

    def _gpu_comm(self, device: str) -> tp_comm.NcclComm | None:
        """The group's own NCCL communicator, or None: torch.distributed's (see tp_comm)."""
        reason = tp_comm.unavailable_reason()
        # Every rank must take the same path, or their all-reduces would never meet.
        if self.agree_min(int(reason is None)) == 0:
            if self.pc.tp_rank == 0:
                log.warning("tensor parallel: all-reduces go through torch.distributed "
                            "(~80 us of host time each, no decode CUDA graphs under --tp): %s",
                            reason or "a follower rank cannot load CuPy's NCCL")
            return None
        return tp_comm.NcclComm(self.pc.tp_rank, self.pc.tp_size, torch.device(device),
                                self.control)

    def agree_min(self, n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64)
        if self.control is None and dist.get_backend() != "gloo":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def mirror_tier_copy(self, kind: str, slot: int, block_id: int) -> None:
        """Leader: a host-tier copy it just made on its shard, for the followers to repeat
        on theirs before the next forward or KV command (they share its host slots)."""
        self._tier_copies.append([kind, slot, block_id])

    def apply_tier_copies(self, kv_cache: torch.Tensor, copies: list) -> None:
        """Follower: repeat the leader's host-tier copies, in order, on this rank's stream
        (so they land before the forward that reuses those blocks)."""
        for kind, slot, block_id in copies:
            if kind == "d2h":
                self.host_kv[slot].copy_(kv_cache[block_id], non_blocking=True)
            else:
                kv_cache[block_id].copy_(self.host_kv[slot], non_blocking=True)

    def broadcast_step(self, step) -> object | None:
        """Leader: sends `step` (None = shut down). Followers: pass None, get the step."""
        if self.pc.tp_rank == 0 and step is not None and self._tier_copies:
            copies, self._tier_copies = self._tier_copies, []
            self.broadcast_step(KVCommand("tier", copies))
        if self.pc.tp_rank == 0:
            payload = b"" if step is None else msgpack.packb(
                {"kv": step.op, "ids": step.block_ids} if isinstance(step, KVCommand)
                else [getattr(step, f) for f in STEP_FIELDS])
            size = torch.tensor([len(payload)], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.control)
        n = int(size.item())
        if n == 0:
            return None
        buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self.pc.tp_rank == 0
               else torch.empty(n, dtype=torch.uint8))
        dist.broadcast(buf, src=0, group=self.control)
        if self.pc.tp_rank == 0:
            return step
        from engine.model_runner import StepInputs

        msg = msgpack.unpackb(buf.numpy().tobytes())
        if isinstance(msg, dict):
            return KVCommand(msg["kv"], msg["ids"])
        return StepInputs(**dict(zip(STEP_FIELDS, msg)))

    # KV shards of a block list, moved through the group (gloo on CPU, NCCL on GPUs). The
    # leader runs these between steps (under the engine lock); followers in their loop.
    def read_kv(self, kv_cache: torch.Tensor, block_ids: list[int]) -> torch.Tensor | None:
        """Leader: the blocks with every rank's heads, on the CPU; followers: None."""
        if self.pc.tp_rank == 0:
            self.broadcast_step(KVCommand("read", list(block_ids)))
        idx = torch.tensor(block_ids, dtype=torch.int64, device=kv_cache.device)
        full = self._gather_heads(kv_cache[idx].contiguous())
        return None if full is None else full.cpu()

    def _gather_heads(self, shard: torch.Tensor, group=None) -> torch.Tensor | None:
        """Leader: every rank's `shard` joined along the KV-head axis (rank order);
        followers send theirs and get None."""
        if self.pc.tp_rank != 0:
            dist.gather(shard, dst=0, group=group)
            return None
        parts = [torch.empty_like(shard) for _ in range(self.pc.tp_size)]
        dist.gather(shard, parts, dst=0, group=group)
        return torch.cat(parts, dim=KV_HEAD_DIM)

    def write_kv(self, kv_cache: torch.Tensor, block_ids: list[int],
                 full: torch.Tensor | None = None) -> None:
        """Leader: store full-head blocks `full` (each rank keeps its heads); followers:
        receive their part (full is None)."""
        if self.pc.tp_rank == 0:
            self.broadcast_step(KVCommand("write", list(block_ids)))
        idx = torch.tensor(block_ids, dtype=torch.int64, device=kv_cache.device)
        mine = torch.empty((len(block_ids), *kv_cache.shape[1:]), dtype=kv_cache.dtype,
                           device=kv_cache.device)
        parts = None
        if self.pc.tp_rank == 0:
            parts = [p.contiguous() for p in
                     full.to(kv_cache.device).chunk(self.pc.tp_size, dim=KV_HEAD_DIM)]
        dist.scatter(mine, parts, src=0)
        kv_cache[idx] = mine

    def read_host(self, host: torch.Tensor, slots: list[int]) -> torch.Tensor | None:
        """Leader: host-tier slots with every rank's heads (blocks bound for the disk
        tier, which holds whole blocks); followers: None. `host` is this rank's shard of
        the tier. Over the control group (gloo): the slots are in host memory."""
        if self.pc.tp_rank == 0:
            self.broadcast_step(KVCommand("host_read", list(slots)))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # this rank's copies into the slots have landed
        shard = host[torch.tensor(slots, dtype=torch.int64)].contiguous()
        return self._gather_heads(shard, group=self.control)

    def nixl_setup(self, kv_cache: torch.Tensor, agent_prefix: str) -> list | None:
        """Every rank starts a NIXL agent over its KV shard; the leader gets them all
        (RankAgent per rank, in rank order), followers None."""
        from kvtransfer.transfer.nixl import NixlBackend, RankAgent

        if self.pc.tp_rank == 0:
            self.broadcast_step(KVCommand("nixl_setup", [agent_prefix]))
        self.nixl = NixlBackend(kv_cache, f"{agent_prefix}-r{self.pc.tp_rank}",
                                fetch_metadata=None, dram_device_id=self.pc.tp_rank)
        mine = RankAgent(self.nixl.agent_name, self.nixl.agent_metadata(), self.nixl.base_address,
                         self.nixl.block_bytes, self.nixl.device_id).as_list()
        everyone = [None] * self.pc.tp_size if self.pc.tp_rank == 0 else None
        dist.gather_object(mine, everyone, dst=0, group=self.control)
        return [RankAgent(*r) for r in everyone] if self.pc.tp_rank == 0 else None

    def nixl_post(self, request_id: str, ranks: list, src: list[int], dst: list[int]) -> int:
        """Every rank posts a READ of its shard of `src` from the same rank of the peer into
        `dst` and returns at once (steps go on while the bytes move); `nixl_poll` reports
        when all have landed. Returns the bytes all ranks will move."""
        if self.pc.tp_rank == 0:  # followers get the ranks as RankAgent.as_list() lists
            if request_id in self._reads:  # refused before any rank posts anything
                raise RuntimeError(f"a NIXL read of {request_id} is already in flight: a "
                                   "second one would orphan its handle")
            ranks = [r.as_list() for r in ranks]
            self.broadcast_step(KVCommand("nixl_post", [request_id, ranks, src, dst]))
        agent, metadata, base, _, dev = ranks[self.pc.tp_rank]
        moved = 0
        if torch.cuda.is_available():
            # Nothing queued on this rank's device (a host-tier copy on its own stream)
            # may still touch the blocks the READ lands in; between steps this is cheap.
            torch.cuda.synchronize()
        try:
            handle, moved = self.nixl.start_read(self.nixl.add_peer(agent, metadata, dev),
                                                 base, dev, request_id, src, dst)
            self._reads[request_id] = handle
        except Exception:  # the next poll reports it through the group
            log.exception("tensor-parallel rank %d: NIXL read of %s could not be posted",
                          self.pc.tp_rank, request_id)
            self._reads[request_id] = None
        return moved * self.pc.tp_size

    def nixl_poll(self, request_id: str) -> int:
        """0 while any rank's read of `request_id` is in flight; once none is, 1 if every
        rank's landed and -1 if any failed, and every rank releases its own. Nothing is
        released in flight: NIXL aborts a read released early and raises, and the caller
        frees the destination blocks on -1. Collective, non-blocking."""
        if self.pc.tp_rank == 0:
            self.broadcast_step(KVCommand("nixl_poll", [request_id]))
        handle = self._reads.get(request_id)
        state = -1 if handle is None else self.nixl.read_state(handle)
        if self.agree_min(int(state != 0)) == 0:
            return 0
        everyone = self.agree_min(state)
        handle = self._reads.pop(request_id, None)
        if handle is not None:
            self.nixl.release_read(handle)
        return everyone

    def serve(self, runner) -> None:
        """A follower's life: run each step the leader sends, or move KV, until told to
        stop."""
        while (msg := self.broadcast_step(None)) is not None:
            if isinstance(msg, KVCommand):
                if msg.op == "tier":
                    self.apply_tier_copies(runner.kv_cache, msg.block_ids)
                elif msg.op == "read":
                    self.read_kv(runner.kv_cache, msg.block_ids)
                elif msg.op == "host_read":
                    self.read_host(self.host_kv, msg.block_ids)
                elif msg.op == "nixl_setup":
                    self.nixl_setup(runner.kv_cache, msg.block_ids[0])
                elif msg.op == "nixl_post":
                    rid, ranks, src, dst = msg.block_ids
                    self.nixl_post(rid, ranks, src, dst)
                elif msg.op == "nixl_poll":
                    self.nixl_poll(msg.block_ids[0])
                else:
                    self.write_kv(runner.kv_cache, msg.block_ids)
            else:
                runner.follow(msg)

    def close(self) -> None:
        if self.nixl is not None:
            self.nixl.close()
        if self.pc.comm is not None:
            self.pc.comm.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TPLeader(TPComm):
    """Rank 0: spawns the followers, then joins the group with them."""

    def __init__(self, cfg: EngineConfig) -> None:
        if cfg.device.startswith("cuda"):
            need = int(rank_device(cfg, cfg.tp - 1).split(":")[1]) + 1
            if torch.cuda.device_count() < need:
                raise RuntimeError(f"--tp {cfg.tp} on {cfg.device} needs GPUs up to "
                                   f"cuda:{need - 1}; this machine has "
                                   f"{torch.cuda.device_count()}")
        init = f"tcp://127.0.0.1:{_free_port()}"
        cfg_json = json.dumps(dataclasses.asdict(cfg))
        env = dict(os.environ)
        env.setdefault("NCCL_NVLS_ENABLE", "0")
        env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
        self.followers = [
            subprocess.Popen([sys.executable, "-m", "engine.tensor_parallel", "--rank", str(r),
                              "--init", init, "--config", cfg_json], cwd=REPO, env=env,
                             preexec_fn=_die_with_parent)
            for r in range(1, cfg.tp)]
        log.info("tensor parallel: rank 0 on %s, %d follower processes", cfg.device,
                 len(self.followers))
        self._closing = False
        threading.Thread(target=self._watch_followers, daemon=True).start()
        super().__init__(0, cfg.tp, init, rank_device(cfg, 0))

    def _watch_followers(self) -> None:
        """A rank that dies leaves the others blocked in a collective: the worker cannot
        serve any more, so it exits at once and the router retries its requests on
        another worker (clearer, and sooner, than a collective timeout)."""
        while not self._closing:
            for p in self.followers:
                if p.poll() is not None and not self._closing:
                    log.error("tensor-parallel rank (pid %d) exited with code %s; this worker "
                              "stops", p.pid, p.returncode)
                    os._exit(1)
            time.sleep(0.5)

    def close(self) -> None:
        self._closing = True
        if dist.is_initialized():
            self.broadcast_step(None)
        super().close()
        for p in self.followers:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def follower_main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="a tensor-parallel follower rank (internal)")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--init", required=True)
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s tp-rank{args.rank} %(name)s %(message)s")
    cfg = EngineConfig(**json.loads(args.config))
    device = rank_device(cfg, args.rank)
    comm = TPComm(args.rank, cfg.tp, args.init, device)
    from engine.llm_engine import resolve_model
    from engine.model_runner import ModelRunner

    mc, model_dir, _ = resolve_model(cfg)
    max_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    runner = ModelRunner(mc, dataclasses.replace(cfg, device=device), model_dir,
                         max_model_len=max_len, tp=comm)
    host = cfg.host_kv_block_count(runner.kv_spec.block_bytes)
    if host > 0:  # the same slots as the leader's tier (same shard size), for its copies
        comm.host_kv = torch.empty((host, *runner.kv_cache.shape[1:]),
                                   dtype=runner.kv_cache.dtype,
                                   pin_memory=runner.kv_cache.is_cuda)
    with torch.inference_mode():
        comm.serve(runner)
    runner.release_graphs()  # before the communicator they captured
    comm.close()


if __name__ == "__main__":
    follower_main()
