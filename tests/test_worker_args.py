"""`baton serve` (and the Ray job) hand their engine flags to the workers they start
(cluster/launcher.py worker_args_from): every flag must arrive, and a bad one must fail
in `baton serve` itself, naming the flag, before any worker starts."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from cluster.cli import build_parser
from cluster.launcher import worker_args_from
from cluster.worker_main import add_engine_args, engine_config

# Two `baton serve` command lines that between them set every engine flag to something
# other than its default (the disk tier and --tp > 1 do not go together).
CASES = [
    ["--load-format", "dummy", "--dtype", "bfloat16", "--kv-blocks", "300",
     "--block-size", "64", "--max-num-seqs", "17", "--max-num-batched-tokens", "8192",
     "--prefill-saturation-tokens", "2048", "--prefill-tokens-while-decoding", "512",
     "--max-model-len", "1000",
     "--no-prefix-caching", "--kv-transfer", "tcp", "--seed", "5",
     "--attention-backend", "torch", "--no-cuda-graphs", "--no-gemv-decode",
     "--no-one-row-attention", "--no-pdl", "--overlap-decode-max-rows", "0",
     "--no-tp-cuda-graphs", "--host-kv-gb", "0.5", "--disk-kv-dir", "/tmp/kv",
     "--disk-kv-gb", "1.5", "--disk-kv-policy", "reused", "--no-disk-kv-prefetch",
     "--gpu-memory-utilization", "0.45", "--stream-interval", "4"],
    ["--device", "cuda", "--tp", "2", "--kv-transfer", "nixl"],
]


@pytest.mark.parametrize("flags", CASES, ids=["most", "tp"])
def test_every_engine_flag_reaches_the_workers(flags: list[str]) -> None:
    parser, _ = build_parser()
    serve = parser.parse_args(["serve", *flags])
    forwarded = worker_args_from(serve, "tiny-llama")
    worker = parser.parse_args(["worker", "--role", "decode", *forwarded])
    assert engine_config(worker, "tiny-llama") == engine_config(serve, "tiny-llama")


def test_the_cases_cover_every_engine_flag() -> None:
    """A flag added to add_engine_args must be added above, so its forwarding is tested."""
    p = argparse.ArgumentParser(add_help=False)
    add_engine_args(p)
    flags = {a.option_strings[-1] for a in p._actions} - {"--model"}  # --no-x of a pair
    covered = {f for case in CASES for f in case if f.startswith("--")}
    assert flags <= covered, sorted(flags - covered)


def test_defaults_forward_nothing_but_model_and_device() -> None:
    parser, _ = build_parser()
    assert worker_args_from(parser.parse_args(["serve"]), "m") == ["--model", "m",
                                                                  "--device", "cpu"]


@pytest.mark.parametrize("flags,named", [
    (["--prefill-saturation-tokens", "-1"], "--prefill-saturation-tokens"),
    (["--prefill-tokens-while-decoding", "-5"], "--prefill-tokens-while-decoding"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens"),
    (["--block-size", "3"], "--block-size"),
    (["--tp", "2", "--kv-transfer", "nccl"], "--kv-transfer")])
def test_bad_engine_flag_fails_in_serve_naming_it(flags: list[str], named: str) -> None:
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", *flags],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"baton serve: error: {named}" in done.stderr
    assert "Traceback" not in done.stderr and "baton worker" not in done.stderr
