"""`baton serve`: start worker processes, wait until each announces its address, then run
the router in this process. Ctrl-C or SIGTERM stops everything: children get SIGTERM
(and die with us even if we are killed, through PR_SET_PDEATHSIG)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from cluster.placement import (
    Placement,
    check_kv_transfer,
    check_memory_shares,
    place_workers,
    shared_gpus,
)
from cluster.worker_main import (
    READY_PREFIX,
    add_engine_args,
    check_engine_flags,
)
from kernels.errors import BatonError

log = logging.getLogger(__name__)


class WorkerStartError(BatonError, RuntimeError):
    """A worker `baton serve` started exited or hung before it was ready; its own log
    (printed above) says why."""


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class WorkerProcess:
    role: str
    proc: subprocess.Popen
    address: str | None = None
    # How it was started, so cluster/supervisor.py can start it again alike.
    args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    started_at: float = field(default_factory=time.monotonic)


def spawn_worker(role: str, worker_args: list[str], ready: threading.Event,
                 out: list[WorkerProcess], env: dict[str, str] | None = None) -> WorkerProcess:
    cmd = [sys.executable, "-m", "cluster.cli", "worker", "--role", role, *worker_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True,
                            preexec_fn=_die_with_parent, env=env)
    wp = WorkerProcess(role, proc, args=list(worker_args), env=env)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(READY_PREFIX) and wp.address is None:
                wp.address = line.split()[1]
                ready.set()
            else:
                sys.stderr.write(f"[{role} {proc.pid}] {line}")
        ready.set()  # exited: let the waiter see it

    threading.Thread(target=pump, daemon=True).start()
    out.append(wp)
    return wp


def worker_env() -> dict[str, str]:
    """This process's environment with NVLink multicast off for NCCL, torch's symmetric
    memory and NVSHMEM, unless set otherwise (the GPU hosts are shared)."""
    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    return env


def start_workers(roles: list[str], worker_args: list[str], timeout: float,
                  placements: list[Placement] | None = None) -> list[WorkerProcess]:
    procs: list[WorkerProcess] = []
    events = []
    env = worker_env()
    if "--device" not in worker_args or worker_args[worker_args.index("--device") + 1] == "cpu":
        # CPU workers share the cores: without this each would spawn one torch thread per
        # core and they would thrash each other (decode steps doubled on 2 cores).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(roles))))
    for i, role in enumerate(roles):
        ev = threading.Event()
        args, wenv = worker_args, env
        if "--disk-kv-dir" in worker_args:  # each worker its own G3 directory, kept
            args = list(worker_args)        # across restarts of the same layout
            j = args.index("--disk-kv-dir") + 1
            args[j] = os.path.join(args[j], f"{role}-{i}")
        if placements and placements[i].gpus:  # the worker sees its GPUs as cuda:0..tp-1
            args = list(args)
            args[args.index("--device") + 1] = "cuda:0"
            visible = physical_gpus(placements[i].gpus, env.get("CUDA_VISIBLE_DEVICES"))
            wenv = {**env, "CUDA_VISIBLE_DEVICES": visible}
            log.info("%s worker %d on GPU(s) %s", role, i, visible)
        spawn_worker(role, args, ev, procs, wenv)
        events.append(ev)
    deadline = time.monotonic() + timeout
    for wp, ev in zip(procs, events):
        while wp.address is None:
            if wp.proc.poll() is not None:
                stop_workers(procs)
                raise WorkerStartError(f"{wp.role} worker exited with code "
                                       f"{wp.proc.returncode} before it was ready (see its "
                                       "log above)")
            if time.monotonic() > deadline:
                stop_workers(procs)
                raise WorkerStartError(f"{wp.role} worker not ready after {timeout:.0f}s "
                                       "(--ready-timeout)")
            ev.wait(0.1)
    return procs


def physical_gpus(gpus: tuple[int, ...], launcher_visible: str | None) -> str:
    """GPU indices are the launcher's own view: under CUDA_VISIBLE_DEVICES=2,3, GPU 0 of
    `--decode-gpus 0` is physical GPU 2, so a restricted `baton serve` stays inside its set."""
    if not launcher_visible:
        return ",".join(map(str, gpus))
    seen = [d.strip() for d in launcher_visible.split(",") if d.strip()]
    return ",".join(seen[g] for g in gpus)


def stop_workers(procs: list[WorkerProcess], grace: float = 5.0) -> None:
    for wp in procs:
        if wp.proc.poll() is None:
            wp.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for wp in procs:
        try:
            wp.proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            wp.proc.kill()
            wp.proc.wait()


def worker_args_from(args: argparse.Namespace, model: str) -> list[str]:
    """`baton worker` flags for the engine flags of `args` (`baton serve`, the Ray job):
    every flag of `add_engine_args` whose value differs from its default, so a flag added
    there reaches the workers without a line here. `--device` always (placement rewrites
    it per worker)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_engine_args(parser)
    out = ["--model", model, "--device", args.device]
    for action in parser._actions:
        flag = action.option_strings[0] if action.option_strings else None
        if flag in (None, "--model", "--device") or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            out.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs == 0:  # store_true
            out.append(flag)
        else:
            out += [flag, str(value)]
    return out


def _gpu_count(device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    import torch

    return torch.cuda.device_count()


def worker_roles(args: argparse.Namespace) -> list[str]:
    """One role per worker from `--prefill` / `--decode` (no prefill pool: aggregated)."""
    if args.prefill < 0 or args.decode < 1:
        raise ValueError("--prefill must be >= 0 and --decode >= 1")
    return ["prefill"] * args.prefill + (["decode"] if args.prefill else ["both"]) * args.decode


def router_config(args: argparse.Namespace, model: str, prefill: list[str],
                  decode: list[str], **extra):
    """The router's config from the routing flags (`baton serve`, `baton router`, the Ray
    job) and its workers' addresses; `extra`: more RouterConfig fields."""
    from router.app import RouterConfig

    return RouterConfig(
        model=model, served_model_name=args.served_model_name or os.path.basename(
            model.rstrip("/")),
        prefill=prefill, decode=decode, routing=args.routing,
        local_prefill_threshold=args.local_prefill_threshold,
        prefill_overflow_wait_s=args.prefill_overflow_wait, index=args.index,
        route_weights=args.route_weights,
        tool_call_parser=getattr(args, "tool_call_parser", None), **extra)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from router.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    roles = worker_roles(args)
    model = args.model
    if model is None:
        from cluster.embedded import default_model_dir

        model = str(default_model_dir())
        log.info("no --model: serving the embedded tiny model at %s", model)
    check_engine_flags(args, model)
    placements = place_workers(roles, args.device, args.tp, _gpu_count(args.device),
                               args.prefill_gpus, args.decode_gpus)
    check_kv_transfer(placements, args.kv_transfer)
    check_memory_shares(placements, args.gpu_memory_utilization, args.kv_blocks)
    if shared := shared_gpus(placements):
        log.info("GPU(s) %s serve more than one worker, each with --gpu-memory-utilization "
                 "%.2f of the card", sorted(shared), args.gpu_memory_utilization)
    procs = start_workers(roles, worker_args_from(args, model), args.ready_timeout, placements)
    supervisor = None
    if args.restart_workers:
        from cluster.supervisor import RestartPolicy, WorkerSupervisor

        supervisor = WorkerSupervisor(procs, RestartPolicy(
            ready_timeout_s=args.ready_timeout)).start()
    try:
        cfg = router_config(args, model,
                            prefill=[w.address for w in procs if w.role == "prefill"],
                            decode=[w.address for w in procs if w.role != "prefill"])
        app = create_app(cfg)
        if supervisor is not None:  # /health and the dashboard count each worker's restarts
            router = app.state.router  # its workers join when the app starts, below
            router.pool.supervised = {w.address for w in procs}
            supervisor.on_restart = router.count_restart_threadsafe
        mode = f"{args.prefill}P{args.decode}D" if args.prefill else f"aggregated x{args.decode}"
        url = f"http://{args.host}:{args.port}"
        print(f"Baton serving {cfg.served_model_name} ({mode}) at {url}\n"
              f"  curl {url}/v1/completions -H 'Content-Type: application/json' -d "
              f"'{{\"model\": \"{cfg.served_model_name}\", \"prompt\": \"Hello\", "
              f"\"max_tokens\": 16}}'\n"
              f"  dashboard {url}/dashboard   metrics {url}/metrics", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        if supervisor is not None:
            supervisor.stop()
        stop_workers(procs)
    return 0
