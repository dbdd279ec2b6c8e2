"""A whole Baton deployment as one Ray job:

    ray job submit --address http://HEAD:8265 -- python -m cluster.ray_job \\
        --model /models/llama-3.1-8b --device cuda --prefill 1 --decode 2 --tp 2

Every worker runs in a Ray actor that asks Ray for `--tp` GPUs (or a CPU), so Ray decides
the node and the GPUs (it sets CUDA_VISIBLE_DEVICES for the actor). The actor starts the
same `baton worker` process `baton serve` starts, bound to its node's IP (the address the
router dials and a prefill worker hands to the decode workers that pull its KV), and
returns the address the worker announces. The router then runs in the job's driver, as
in `baton serve`, and the job lasts until it is stopped (`ray job stop`): the actors die
with the driver, and each worker process with its actor (PR_SET_PDEATHSIG). Meanwhile a
supervisor thread restarts any worker that dies (a new process in its actor, or a new
actor if the actor died with its node) and swaps its new address into the router.

The flags are `baton serve`'s, but for the GPU lists (Ray places workers), plus
`--ray-address` (default: the cluster the job runs in, or a new local one).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import logging
import sys
import threading
import time

from cluster.launcher import (
    router_config,
    start_workers,
    stop_workers,
    worker_args_from,
    worker_roles,
)
from cluster.supervisor import Backoff
from cluster.worker_main import check_engine_flags
from kernels.errors import BatonError

log = logging.getLogger(__name__)

try:  # Ray >= 2.x: an actor briefly unreachable, not dead
    from ray.exceptions import ActorUnavailableError as ActorUnavailable
except ImportError:  # pragma: no cover - older Ray, or Ray not installed
    class ActorUnavailable(Exception):  # stands in for Ray's name
        pass


class WorkerActor:
    """One `baton worker` process on the node Ray placed this actor on."""

    def __init__(self) -> None:
        self.procs: list = []  # launcher.WorkerProcess, one
        self.stopped = False  # the job is ending: start nothing more

    def start(self, role: str, worker_args: list[str], timeout: float) -> str:
        """Starts the worker as `baton serve` does, bound to this node's IP; its address.
        Raises (saying why) if it exits or is not ready within `timeout`."""
        import ray

        if self.stopped:
            raise RuntimeError("the job is stopping")
        host = ray.util.get_node_ip_address()
        self.procs = start_workers([role], [*worker_args, "--host", host, "--port", "0"],
                                   timeout)
        return self.procs[0].address

    def address(self) -> str | None:
        """Its worker's address while the process runs; None once it has exited."""
        if self.procs and self.procs[0].proc.poll() is None:
            return self.procs[0].address
        return None

    def stop(self) -> None:
        self.stopped = True
        stop_workers(self.procs)


def supervise(router, actors: list, roles: list[str], addresses: list[str], make_actor,
              worker_args: list[str], ready_timeout: float, stop: threading.Event,
              period_s: float = 2.0) -> None:
    """Restart what dies: a worker process that exited gets a new one from its actor, an
    actor that died (its node went away) is replaced by a new one that Ray places; the
    router swaps the new address in for the old (requests on the dead one migrate). Each
    round also compares every actor's address with the router's, so a swap that failed, or
    a start that finished after its wait timed out, is made good. A worker that keeps
    dying is retried with a growing pause (2 s doubling to 5 min; after 10 min up, 2 s
    again: cluster/supervisor.py's Backoff). Workers are checked and
    restarted side by side (a node that went away takes several at once), each by one
    thread at a time."""
    retry_at = [0.0] * len(roles)
    # When each worker was last started here (up, or its start given up on), and when the
    # check that found it dead began: it lived from the one to the other.
    up_at = [time.monotonic()] * len(roles)
    checked_at = [0.0] * len(roles)
    backoff = [Backoff(period_s, 300.0, 600.0) for _ in roles]
    running: dict[int, concurrent.futures.Future] = {}

    def one(i: int) -> bool:
        try:
            return _restart_if_dead(router, actors, i, roles[i], addresses, make_actor,
                                    worker_args, ready_timeout, stop)
        except Exception:  # keep supervising (this one again later, the others)
            log.exception("could not restart the %s worker %s", roles[i], addresses[i])
            return True

    with concurrent.futures.ThreadPoolExecutor(max(len(roles), 1),
                                               thread_name_prefix="supervise") as pool:
        while not stop.wait(period_s):
            if router.loop is None:  # the router has not started yet
                continue
            for i, fut in list(running.items()):
                if not fut.done():
                    continue
                del running[i]
                if fut.result():  # it had to start a worker: back off before the next
                    now = time.monotonic()
                    retry_at[i] = now + backoff[i].next(checked_at[i] - up_at[i])
                    up_at[i] = now
            for i in range(len(roles)):
                if i not in running and not stop.is_set() and time.monotonic() >= retry_at[i]:
                    checked_at[i] = time.monotonic()
                    running[i] = pool.submit(one, i)


def _restart_if_dead(router, actors: list, i: int, role: str, addresses: list[str],
                     make_actor, worker_args: list[str], ready_timeout: float,
                     stop: threading.Event) -> bool:
    """True if it had to start a worker (successfully or not: the caller backs off)."""
    import ray

    try:
        current = ray.get(actors[i].address.remote(), timeout=30)
    except (ray.exceptions.GetTimeoutError, ActorUnavailable):  # busy or a blip: later
        return False
    except ray.exceptions.RayActorError:
        log.warning("the actor of %s worker %s died: placing a new one", role, addresses[i])
        with contextlib.suppress(Exception):
            ray.kill(actors[i])
        actors[i] = make_actor()
        current = None
    restarted = current is None
    if restarted:
        log.warning("%s worker %s is gone: starting another", role, addresses[i])
        current = ray.get(actors[i].start.remote(role, worker_args, ready_timeout),
                          timeout=ready_timeout + 120)
    if current != addresses[i] and not stop.is_set():
        asyncio.run_coroutine_threadsafe(
            router.replace_worker(addresses[i], role, current), router.loop).result(30)
        log.info("%s worker %s replaced by %s", role, addresses[i], current)
        addresses[i] = current
    return restarted


def build_parser() -> argparse.ArgumentParser:
    from cluster.cli import add_serve_args

    parser = argparse.ArgumentParser(
        prog="python -m cluster.ray_job",
        description="Baton as one Ray job: flags as `baton serve`, without the GPU lists")
    add_serve_args(parser, gpu_lists=False)
    parser.add_argument("--ray-address", default=None,
                        help="the Ray cluster (default: the one this job runs in, else a "
                             "new local one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    import ray
    import uvicorn

    from router.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        roles = worker_roles(args)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.model is None:
        raise SystemExit("--model is required: a checkpoint dir every node can read, or a "
                         "preset with --load-format dummy")
    try:  # before any actor starts
        check_engine_flags(args, args.model)
    except BatonError as e:
        raise SystemExit(str(e)) from None
    ray.init(address=args.ray_address, log_to_driver=True)
    gpu = args.device.startswith("cuda")
    actor_cls = ray.remote(num_gpus=args.tp, num_cpus=0)(WorkerActor) if gpu \
        else ray.remote(num_cpus=1)(WorkerActor)
    worker_args = worker_args_from(args, args.model)
    if gpu:  # Ray's CUDA_VISIBLE_DEVICES holds the actor's GPUs: cuda:0..tp-1
        worker_args[worker_args.index("--device") + 1] = "cuda:0"
    actors = [actor_cls.remote() for _ in roles]
    stopping = threading.Event()
    supervisor: threading.Thread | None = None
    try:
        try:  # an actor Ray cannot place waits for resources forever: bound it
            addresses = ray.get([a.start.remote(role, worker_args, args.ready_timeout)
                                 for a, role in zip(actors, roles)],
                                timeout=args.ready_timeout + 120)
        except ray.exceptions.GetTimeoutError:
            need = f"{args.tp} GPU(s)" if gpu else "1 CPU"
            raise SystemExit(f"workers not up after {args.ready_timeout + 120:.0f}s: each "
                             f"of the {len(roles)} needs {need} on one node (see `ray "
                             "status`), then its model loaded within --ready-timeout") from None
        for role, address in zip(roles, addresses):
            log.info("%s worker at %s", role, address)
        cfg = router_config(args, args.model,
                            prefill=[a for r, a in zip(roles, addresses) if r == "prefill"],
                            decode=[a for r, a in zip(roles, addresses) if r != "prefill"],
                            ready_timeout_s=args.ready_timeout)
        app = create_app(cfg)
        host = ray.util.get_node_ip_address() if args.host == "0.0.0.0" else args.host
        print(f"Baton serving {cfg.served_model_name} on Ray at http://{host}:{args.port}",
              flush=True)
        supervisor = threading.Thread(target=supervise, daemon=True, name="supervisor", args=(
            app.state.router, actors, roles, list(addresses), actor_cls.remote, worker_args,
            args.ready_timeout, stopping))
        supervisor.start()
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        stopping.set()
        if supervisor is not None:  # a restart under way finishes (or fails) first
            supervisor.join(timeout=60)
        with contextlib.suppress(Exception):  # an actor that died has nothing to stop
            ray.get([a.stop.remote() for a in actors], timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
