"""`baton serve --device cuda` end to end on one GPU: 1P1D with NIXL over VRAM (both
workers on GPU 0) and aggregated, float32 so greedy tokens must equal transformers exactly.

    source scripts/gpu_env.sh && python -m benchmarks.gpu_serve_smoke --out $OUT/smoke.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import httpx

from benchmarks.common import write_result
from cluster.local_server import baton_serve
from engine.tokenizer import TokenizerBundle
from kernels.checkpoint_writer import write_checkpoint
from tests.hf_oracle import hf_greedy, load_hf

TEXTS = ["Hello there, how are you?", "The quick brown fox " * 30, "1, 2, 3,"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_serve_smoke.json")
    args = ap.parse_args()
    model = write_checkpoint("tiny-llama", Path(tempfile.mkdtemp()) / "tl", progress=False)
    tok = TokenizerBundle.from_dir(model)
    hf = load_hf(model)
    expected = [hf_greedy(hf, tok.encode(t), 16)[0] for t in TEXTS]
    runs = {}
    for mode, flags in {"1p1d-nixl": ["--prefill", "1", "--kv-transfer", "nixl"],
                        "1p1d-tcp": ["--prefill", "1", "--kv-transfer", "tcp"],
                        "aggregated": ["--prefill", "0"]}.items():
        try:
            with baton_serve(model, *flags, "--decode", "1", "--device", "cuda", "--dtype",
                             "float32", "--kv-blocks", "256", timeout=240) as url:
                backends = {w["kv_backend"] for w in httpx.get(f"{url}/health").json()["workers"]}
                got = []
                for t in TEXTS:
                    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
                        "model": "tl", "prompt": t, "max_tokens": 16, "temperature": 0,
                        "ignore_eos": True, "return_token_ids": True}).json()
                    got.append(r["choices"][0]["token_ids"])
                runs[mode] = {"backends": sorted(backends), "equal_to_transformers":
                              [g == e for g, e in zip(got, expected)]}
        except Exception as e:  # record and go on: the point is to learn what works
            runs[mode] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
        print(mode, runs[mode], flush=True)
    write_result(args.out, {"benchmark": "gpu_serve_smoke", "runs": runs})


if __name__ == "__main__":
    main()
