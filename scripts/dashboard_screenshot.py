"""Retake docs/dashboard.png: `baton serve` (tiny model on CPU, 1 prefill + 2 decode
workers, a prefill pool that overflows onto the decode workers when backed up) under a
few seconds of mixed traffic, then the dashboard in headless Chromium.

    .venv/bin/python scripts/dashboard_screenshot.py [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from cluster.local_server import baton_serve
from kernels.checkpoint_writer import write_checkpoint


def traffic(url: str, seconds: float, users: int) -> None:
    stop = time.monotonic() + seconds

    def user(i: int) -> None:
        rng = random.Random(i)
        shared = [rng.randrange(4, 1000) for _ in range(256)]  # a system prompt users share
        with httpx.Client(timeout=60) as client:
            while time.monotonic() < stop:
                prompt = shared + [rng.randrange(4, 1000) for _ in range(rng.randint(64, 600))]
                client.post(f"{url}/v1/completions", json={
                    "model": "tiny-llama", "prompt": prompt, "temperature": 0,
                    "max_tokens": rng.randint(8, 64), "ignore_eos": True})

    with ThreadPoolExecutor(users) as pool:
        list(pool.map(user, range(users)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/dashboard.png")
    ap.add_argument("--seconds", type=float, default=12.0)
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs chromium (make test installs it where apt can)")
    model = write_checkpoint("tiny-llama", tempfile.mkdtemp() + "/tiny-llama", progress=False)
    with baton_serve(str(model), "--prefill", "1", "--decode", "2", "--kv-blocks", "2048",
                     "--prefill-overflow-wait", "0.005", "--served-model-name",
                     "tiny-llama") as url:
        load = threading.Thread(target=traffic, args=(url, args.seconds, 8))
        load.start()
        time.sleep(args.seconds * 0.75)  # the chart fills; traffic still flows when shot
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                            f"--user-data-dir={profile}", "--hide-scrollbars",
                            "--window-size=1400,780", "--virtual-time-budget=3000",
                            f"--screenshot={args.out}", f"{url}/dashboard"],
                           check=True, capture_output=True, timeout=90)
        load.join()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
