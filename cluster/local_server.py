"""Start a real `baton serve` in a subprocess (end-to-end tests, benchmarks) and stop it
cleanly, checking that no worker process outlives it."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent  # repository root: `python -m cluster.cli`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it holds no resources and its parent reaps it.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def is_healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(url: str, timeout: float = 60.0, alive=lambda: True) -> None:
    """Poll the router's /health until it is green; `alive()` false means give up early."""
    deadline = time.monotonic() + timeout
    while not is_healthy(url):
        if not alive():
            raise RuntimeError(f"the process behind {url} exited before it was healthy")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become healthy in {timeout:.0f}s")
        time.sleep(0.2)


PORT_ATTEMPTS = 3


def _start(model: str | Path, args: tuple[str, ...], log_lines: list[str] | None):
    """`baton serve` on a free port: (process, URL, its last output lines, kept read)."""
    port = free_port()
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--model", str(model),
           "--port", str(port), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log: collections.deque[str] = collections.deque(maxlen=200)

    def pump() -> None:  # keep reading: a full pipe would block the server's logging
        for line in proc.stdout:
            log.append(line)
            if log_lines is not None:
                log_lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc, f"http://127.0.0.1:{port}", log


@contextlib.contextmanager
def baton_serve(model: str | Path, *args: str, timeout: float = 120.0,
                log_lines: list[str] | None = None) -> Iterator[str]:
    """Yields the router's base URL once /health is green; on exit sends SIGTERM and
    asserts that the server and every worker process it started are gone. Pass
    `log_lines` to receive everything the server and its workers print. The router's
    port is picked free just before the start, so another process can take it meanwhile
    (its workers' own ports, say): then it starts again on another one."""
    for attempt in range(PORT_ATTEMPTS):
        proc, url, log = _start(model, args, log_lines)
        try:
            wait_healthy(url, timeout, alive=lambda p=proc: p.poll() is None)
            break
        except (RuntimeError, TimeoutError) as e:
            time.sleep(0.2)
            lost_port = any("address already in use" in line for line in log)
            if proc.poll() is None:  # not up in time: stop it before saying so
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            if lost_port and attempt + 1 < PORT_ATTEMPTS:
                continue
            if isinstance(e, TimeoutError):
                raise
            raise RuntimeError("baton serve exited early:\n" + "".join(log)) from None
    try:
        yield url
    finally:
        workers = _children(proc.pid) if proc.poll() is None else []
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans = [p for p in workers if _alive(p)]
        assert not orphans, f"worker processes left running after shutdown: {orphans}"


def wait_pools_empty(url: str, timeout: float = 15.0) -> list[dict]:
    """Poll /health until every worker has all blocks free and nothing running or held."""
    deadline = time.monotonic() + timeout
    while True:
        workers = httpx.get(f"{url}/health", timeout=5).json()["workers"]
        if all(w["free_blocks"] == w["total_blocks"] and w["running"] == 0 and w["held"] == 0
               and w["waiting"] == 0 for w in workers):
            return workers
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks still in use: {workers}")
        time.sleep(0.25)
