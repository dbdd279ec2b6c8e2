"""Tensor parallelism on GPUs: TP=2 against TP=1 in one run.

    source scripts/gpu_env.sh && python -m benchmarks.gpu_tp --out $OUT/gpu_tp.json

1. Greedy agreement of `mini-llama` (bf16, FlashInfer, CUDA graphs) at TP=2 vs TP=1 on the
   same random weights (dummy weights are drawn per full tensor, then sharded).
2. Decode step time of the `llama-3.1-8b` shape at each TP size, same cases as
   benchmarks/offline.py.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from benchmarks.common import write_result
from benchmarks.gpu_correctness import agreement
from benchmarks.offline import decode_case
from engine.config import EngineConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


def tp_agreement(tp_sizes: list[int], prompts: int, new_tokens: int,
                 tp_graphs: bool = False, model: str = "mini-llama") -> dict:
    rng = random.Random(1)
    batch = [[rng.randrange(4096) for _ in range(rng.randint(16, 512))] for _ in range(prompts)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    runs = {}
    for tp in tp_sizes:
        with LLM(model, load_format="dummy", device="cuda", dtype="bfloat16", tp=tp,
                 num_kv_blocks=4096, tp_cuda_graphs=tp_graphs) as llm:
            runs[tp] = [(o.token_ids, o.logprobs) for o in llm.generate(batch, params)]
    base = runs[tp_sizes[0]]
    return {f"tp{tp}_vs_tp{tp_sizes[0]}": agreement(runs[tp], base, new_tokens)
            for tp in tp_sizes[1:]}


def decode_times(preset: str, tp: int, cases: list[tuple[int, int]], steps: int,
                 tp_graphs: bool = False) -> list[dict]:
    blocks = max(b * (c + 3 * steps + 64) for b, c in cases) // 16 + 64
    engine = LLMEngine(EngineConfig(model=preset, load_format="dummy", device="cuda", tp=tp,
                                    num_kv_blocks=blocks, max_num_batched_tokens=8192,
                                    max_num_seqs=max(b for b, _ in cases),
                                    enable_prefix_caching=False, tp_cuda_graphs=tp_graphs))
    try:
        out = []
        for b, c in cases:
            d = decode_case(engine, b, c, steps, "cuda")
            d["tp"] = tp
            d["cuda_graphs"] = engine.runner.graphs is not None  # what ran, not what was asked
            d["tp_comm"] = ("cupy-nccl" if engine.runner.pc.comm is not None
                            else "torch.distributed" if tp > 1 else None)
            out.append(d)
            print(f"tp={tp} graphs={d['cuda_graphs']} b={b} ctx={c}: "
                  f"{d['step_ms_median']:.2f} ms", flush=True)
        return out
    finally:
        engine.close()


def profile_tp(preset: str, tp: int, steps: int = 8, graphs: bool = False,
               trace: str = "") -> dict:
    """Rank 0's view of batch-1 decode steps: GPU kernel time by name and CPU time by op,
    to say where a TP step's time goes (kernels, collectives waiting, or the host). With
    `graphs`, the steps replay CUDA graphs (all-reduces captured inside under TP); with
    `trace`, a Chrome trace of the steps goes into that folder."""
    from torch.profiler import ProfilerActivity, profile

    engine = LLMEngine(EngineConfig(model=preset, load_format="dummy", device="cuda", tp=tp,
                                    num_kv_blocks=2048, max_num_seqs=8, cuda_graphs=graphs,
                                    tp_cuda_graphs=graphs, enable_prefix_caching=False))
    try:
        engine.add_request("prof", list(range(1, 1025)), SamplingParams(
            max_tokens=2 * steps + 64, temperature=0.0, ignore_eos=True))
        while engine.scheduler.waiting or engine.scheduler.running[0].num_output_tokens < 4:
            engine.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        bare = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        rows = prof.key_averages()
        if trace:
            prof.export_chrome_trace(f"{trace}/tp{tp}{'_graphs' if graphs else ''}.json")
        gpu = sorted(rows, key=lambda e: -e.self_device_time_total)
        cpu = sorted(rows, key=lambda e: -e.self_cpu_time_total)
        return {"tp": tp, "cuda_graphs": engine.runner.graphs is not None,
                "step_ms": wall / steps * 1e3, "step_ms_unprofiled": bare / steps * 1e3,
                "kernel_busy_ms": sum(e.self_device_time_total for e in rows) / steps / 1e3,
                "top_kernels": [{"name": e.key[:100], "calls_per_step": e.count / steps,
                                 "us_per_step": e.self_device_time_total / steps}
                                for e in gpu[:15]],
                "top_cpu_ops": [{"name": e.key[:100], "calls_per_step": e.count / steps,
                                 "self_cpu_us_per_step": e.self_cpu_time_total / steps}
                                for e in cpu[:15]]}
    finally:
        engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--batches", default="1:1024,64:2048")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tp-graphs", default="0,1",
                    help="for TP > 1: eager (0) and/or CUDA graphs with captured all-reduces (1)")
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--agreement-model", default="mini-llama",
                    help="preset of the agreement check; mini-llama-wide has the 8 kv heads "
                         "that TP=4 and TP=8 need")
    ap.add_argument("--profile-only", action="store_true",
                    help="only the rank-0 profile of batch-1 decode at each TP size")
    ap.add_argument("--profile-graphs", action="store_true",
                    help="with --profile-only: profile CUDA-graph steps, not eager ones")
    ap.add_argument("--trace-dir", default="", help="with --profile-only: Chrome traces here")
    ap.add_argument("--out", default="benchmarks/results/gpu_tp.json")
    args = ap.parse_args()
    sizes = [int(x) for x in args.tp.split(",")]
    cases = [tuple(int(x) for x in c.split(":")) for c in args.batches.split(",") if c]
    graph_modes = [bool(int(x)) for x in args.tp_graphs.split(",")]
    result: dict = {"benchmark": "gpu_tp", "preset": args.preset, "tp_sizes": sizes}
    if args.profile_only:
        result["profiles"] = []
        for tp in sizes:
            result["profiles"].append(profile_tp(args.preset, tp, graphs=args.profile_graphs,
                                                  trace=args.trace_dir))
            prof = result["profiles"][-1]
            print(f"tp={tp} graphs={prof['cuda_graphs']}: step {prof['step_ms']:.2f} ms, "
                  f"kernels busy {prof['kernel_busy_ms']:.2f} ms", flush=True)
            for row in prof["top_kernels"][:10]:
                print("   gpu", row, flush=True)
            for row in prof["top_cpu_ops"][:8]:
                print("   cpu", row, flush=True)
            write_result(args.out, result)
        return
    if not args.skip_agreement:
        for g in graph_modes:
            key = (args.agreement_model.replace("-", "_") + "_agreement"
                   + ("_tp_graphs" if g else ""))
            result[key] = tp_agreement(sizes, args.prompts, args.new_tokens, g,
                                       args.agreement_model)
            print(key, result[key], flush=True)
            write_result(args.out, result)
    result["decode"] = []
    for tp in sizes if cases else []:
        for g in graph_modes if tp > 1 else [False]:
            result["decode"] += decode_times(args.preset, tp, cases, args.steps, g)
            write_result(args.out, result)


if __name__ == "__main__":
    main()
