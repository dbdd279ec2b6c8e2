"""`ray job submit -- python -m cluster.ray_job` on a real single-node Ray cluster (started
here on loopback, CPU only): the job places a prefill and a decode worker in Ray actors,
serves transformers' greedy tokens through its router, restarts workers killed under it
(same greedy tokens after), and `ray job stop` takes every process down with it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cluster.local_server import free_port, wait_healthy
from tests.hf_oracle import hf_greedy, load_hf

pytest.importorskip("ray", reason="ray[default] (test extras)")
pytestmark = pytest.mark.slow
PRESET = "tiny-llama-untied"
RAY = str(Path(sys.executable).with_name("ray"))
TEXTS = ["Hello there, how are you today?", "The quick brown fox"]


def _ray(*args: str, env: dict, timeout: float = 120) -> str:
    done = subprocess.run([RAY, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head node on loopback: its GCS off Redis's default port, its dashboard (the job
    API) on a free one; stopped, with everything it started, at the end."""
    # Without this Ray rewrites 127.0.0.1 to the machine's interface address.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    temp = tmp_path_factory.mktemp("ray")
    _ray("start", "--head", f"--port={free_port()}", "--num-cpus=2",
         "--object-store-memory=200000000",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--disable-usage-stats", f"--temp-dir={temp}",
         env=env)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _ray("stop", "--force", env=env)


def _descendants_of_job(log: str) -> list[int]:
    """PIDs of the worker processes the job's log names ([prefill 123] ...)."""
    return sorted({int(p) for p in re.findall(r"\[(?:prefill|decode|both) (\d+)\]", log)})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(
        f"/proc/{pid}/status").read_text().lower()


def test_job_serves_transformers_greedy_tokens_and_stops_clean(ray_cluster, checkpoint_dir):
    from engine.tokenizer import TokenizerBundle

    address, env = ray_cluster
    model = checkpoint_dir(PRESET)
    port = free_port()
    out = _ray("job", "submit", "--address", address, "--no-wait", "--",
               sys.executable, "-m", "cluster.ray_job", "--model", str(model),
               "--prefill", "1", "--decode", "1", "--port", str(port), "--kv-blocks", "256",
               env=env)
    job = re.search(r"raysubmit_\w+", out).group(0)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=120)
        health = httpx.get(f"{url}/health").json()
        assert health["mode"] == "disaggregated"
        assert sorted(w["role"] for w in health["workers"]) == ["decode", "prefill"]
        tok = TokenizerBundle.from_dir(model)
        hf = load_hf(model)

        def served_greedy(text: str) -> None:
            r = httpx.post(f"{url}/v1/completions", timeout=60, json={
                "model": PRESET, "prompt": text, "max_tokens": 8, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}).json()
            choice = r["choices"][0]
            assert choice["prompt_token_ids"] == tok.encode(text)
            assert choice["token_ids"] == hf_greedy(hf, tok.encode(text), 8)[0], text
            assert r["baton_route"][0].keys() == {"prefill", "decode"}

        for text in TEXTS:
            served_greedy(text)
        # Both workers die at once under the job: its supervisor starts another of each
        # (side by side) and the router serves from the new ones.
        dead = {w["address"] for w in health["workers"]}
        for w in health["workers"]:
            os.kill(w["pid"], signal.SIGKILL)

        def replaced() -> bool:
            workers = httpx.get(f"{url}/health", timeout=5).json()["workers"]
            return {w["role"] for w in workers if w["healthy"] and w["address"] not in dead} \
                == {"prefill", "decode"}
        deadline = time.monotonic() + 120
        while not replaced():
            assert time.monotonic() < deadline, "the killed workers were not replaced"
            time.sleep(0.5)
        served_greedy(TEXTS[0])
    finally:
        log = _ray("job", "logs", "--address", address, job, env=env)
        _ray("job", "stop", "--address", address, job, env=env)
    workers = _descendants_of_job(log)
    assert len(workers) == 4, log[-3000:]  # prefill and decode, each started twice
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in workers if _alive(p)], "worker processes outlived the job"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)
