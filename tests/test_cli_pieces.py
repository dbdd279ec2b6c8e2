"""The pieces one at a time, as Helm and Ray start them: `baton worker` announces its
address, `baton router` serves against it; bad flags give one line naming the flag."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import httpx
import pytest

from cluster.local_server import REPO, free_port, wait_healthy
from cluster.worker_main import READY_PREFIX

pytestmark = pytest.mark.slow


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def drain(p: subprocess.Popen) -> None:
    """Keep reading a child's output so a full pipe never blocks its logging."""
    threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()


def test_worker_then_router(checkpoint_dir):
    model = str(checkpoint_dir("tiny-llama"))
    worker = cli("worker", "--role", "both", "--model", model, "--kv-blocks", "256")
    router = None
    try:
        address = None
        for line in worker.stdout:
            if line.startswith(READY_PREFIX):
                address = line.split()[1]
                break
        drain(worker)
        assert address and address.startswith("127.0.0.1:")
        port = free_port()
        router = cli("router", "--model", model, "--decode-workers", address,
                     "--port", str(port))
        drain(router)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        r = httpx.post(f"{url}/v1/completions", json={
            "model": "tiny-llama", "prompt": "Hi", "max_tokens": 5, "temperature": 0},
            timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    finally:
        for p in (router, worker):
            if p is not None:
                p.send_signal(signal.SIGTERM)
                assert p.wait(timeout=30) is not None
                p.stdout.close()


@pytest.mark.parametrize("args,flag", [
    (["serve", "--prefill", "-1"], "--prefill"),
    (["worker", "--role", "bogus"], "--role"),
    (["serve", "--route-weights", "devce=1"], "--route-weights"),
    (["router", "--route-weights", "host=-1"], "--route-weights"),
    (["make-model", "--preset", "nope", "--out", "/tmp/x"], "preset"),
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "--model"),
])
def test_bad_flags_name_the_flag(args, flag):
    p = subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert flag in last and "Traceback" not in p.stderr
