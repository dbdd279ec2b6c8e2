"""`baton serve` restarts a worker that fails while it serves (a crash, the kernel's OOM
killer, a `kill -9`), on the same address. One that exits cleanly (status 0: it was told to
stop, drained and left, as at Ctrl-C, which reaches the workers too) stays down. The
router keeps its worker list: meanwhile it routes around the dead worker (retrying or
migrating what was on it), and its status poll finds the new one up at the old address,
whose KV events it then follows from a fresh snapshot. Without this, a one-worker pool
stayed down until someone restarted the server.

A worker that dies again soon after it started waits twice as long before each next start
(1 s up to a minute, as Kubernetes backs off a crash loop); one that ran a while is
restarted after the first delay again. Restarts of several workers run side by side."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.launcher import WorkerProcess, spawn_worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 1.0
    max_delay_s: float = 60.0
    # A worker that ran this long before it exited is not crash-looping: its next restart
    # waits first_delay_s again.
    stable_after_s: float = 60.0
    ready_timeout_s: float = 120.0


@dataclass
class Backoff:
    """Pauses before restarting one worker: `first_s`, doubling up to `cap_s` while it
    keeps failing; once it stayed up `stable_s`, its next failure starts over (shared by
    `baton serve`'s supervisor and the Ray job's)."""

    first_s: float
    cap_s: float
    stable_s: float
    _next_s: float = field(init=False)

    def __post_init__(self) -> None:
        self._next_s = self.first_s

    def next(self, lived_s: float) -> float:
        """The pause before the next start of a worker that ran `lived_s` seconds."""
        wait = self.first_s if lived_s >= self.stable_s else self._next_s
        self._next_s = min(wait * 2, self.cap_s)
        return wait


@dataclass
class _Restart:
    """One worker's restart in progress: due at `start_at`, then `new` until it is up."""

    dead: WorkerProcess
    start_at: float
    new: WorkerProcess | None = None
    deadline: float = 0.0


class WorkerSupervisor:
    """Watches `procs` (the launcher's list, updated in place as workers are replaced).
    Everything runs on one long-lived thread, restarts included: a worker dies with the
    thread that started it (PR_SET_PDEATHSIG follows the parent thread, not the process),
    so no short-lived thread may start one."""

    def __init__(self, procs: list[WorkerProcess], policy: RestartPolicy | None = None
                 ) -> None:
        self.procs = procs
        self.policy = policy or RestartPolicy()
        p = self.policy
        self._backoff = [Backoff(p.first_delay_s, p.max_delay_s, p.stable_after_s)
                         for _ in procs]
        # When each worker was last known up (ready): how long it lived is from then, not
        # from its spawn, so a model that loads for minutes is not taken for stable.
        self._up_at = [time.monotonic()] * len(procs)
        self._pending: dict[int, _Restart] = {}
        self._stopped: set[int] = set()  # exited cleanly: left down
        self._stop = threading.Event()
        # Called (on the supervisor's thread) with a worker's address once it is back.
        self.on_restart: Callable[[str], None] | None = None
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor",
                                        daemon=True)

    def start(self) -> WorkerSupervisor:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """No more restarts; a worker still starting is stopped."""
        self._stop.set()
        self._thread.join(timeout)

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for i, wp in enumerate(self.procs):
                if i in self._pending:
                    self._advance(i)
                elif i not in self._stopped and wp.proc.poll() is not None:
                    if wp.proc.returncode == 0:
                        log.info("%s worker %s stopped (status 0); not restarted", wp.role,
                                 wp.address)
                        self._stopped.add(i)
                    else:
                        self._schedule(i, wp)
        for r in self._pending.values():
            if r.new is not None:
                _kill(r.new)

    def _schedule(self, i: int, dead: WorkerProcess) -> None:
        lived = time.monotonic() - self._up_at[i]
        delay = self._backoff[i].next(lived)
        log.error("%s worker %s (pid %d) exited with code %s after %.0f s; restarting it in "
                  "%.2f s", dead.role, dead.address, dead.proc.pid, dead.proc.returncode,
                  lived, delay)
        self._pending[i] = _Restart(dead, time.monotonic() + delay)

    def _advance(self, i: int) -> None:
        r, now = self._pending[i], time.monotonic()
        if r.new is None:
            if now >= r.start_at:  # same role, flags and environment, on its port
                port = r.dead.address.rsplit(":", 1)[1] if r.dead.address else "0"
                r.new = spawn_worker(r.dead.role, [*r.dead.args, "--port", port],
                                     threading.Event(), [], r.dead.env)
                r.deadline = now + self.policy.ready_timeout_s
            return
        if r.new.address == r.dead.address:
            self.procs[i] = r.new
            self._up_at[i] = now
            log.info("%s worker %s is back (pid %d)", r.new.role, r.new.address, r.new.proc.pid)
            if self.on_restart is not None:
                self.on_restart(r.new.address)
            del self._pending[i]
        elif r.new.address is not None or r.new.proc.poll() is not None or now > r.deadline:
            why = (f"announced {r.new.address}" if r.new.address else
                   f"exited with code {r.new.proc.returncode}"
                   if r.new.proc.returncode is not None else "was not ready in time")
            _kill(r.new)
            delay = self._backoff[i].next(0.0)  # it never came up
            log.error("%s worker did not come back at %s (it %s); trying again in %.2f s",
                      r.dead.role, r.dead.address, why, delay)
            self._pending[i] = _Restart(r.dead, now + delay)
        # else: still starting


def _kill(wp: WorkerProcess) -> None:
    if wp.proc.poll() is None:
        wp.proc.kill()
        wp.proc.wait()
