"""Baton's model code in bf16 against Hugging Face transformers in bf16 on the same GPU.

    python -m benchmarks.gpu_correctness --out benchmarks/results/gpu_correctness.json

Both sides hold the very same weights: a transformers model is built from the preset's
config.json on the GPU and filled with the make-model random rule, then Baton's engine
loads those tensors through its normal weight loaders (fusing q/k/v and gate/up).
Greedy agreement in bf16 is reported, not asserted exact: the two sides round in a
different order (fused GEMMs, float32 RoPE), and a random model has near-ties.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile

import torch

from benchmarks.common import write_result
from engine.config import EngineConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from kernels.attention import resolve_attention_backend
from kernels.checkpoint_writer import write_config_and_tokenizer
from kernels.loader import load_named_tensors
from kernels.weight_init import fill_random_
from tests.hf_oracle import hf_greedy  # the same oracle the CPU tests use


def build_hf(preset: str, device: str, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        write_config_and_tokenizer(preset, d)
        config = AutoConfig.from_pretrained(d)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fill_random_(p.data, name, config.hidden_size, gen)
    return model.eval()


def agreement(a: list[tuple[list[int], list[float]]], b: list[tuple[list[int], list[float]]],
              new_tokens: int) -> dict:
    """Greedy agreement of two runs over the same prompts: prompts identical throughout,
    length of the agreeing prefix, and logprob differences on that prefix."""
    prefixes, lp_diffs = [], []
    for (ta, la), (tb, lb) in zip(a, b):
        k = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), new_tokens)
        prefixes.append(k)
        lp_diffs.extend(abs(x - y) for x, y in zip(la[:k], lb[:k]))
    full = sum(k == new_tokens for k in prefixes)
    return {"prompts_fully_agreeing": full, "agreement": full / len(prefixes),
            "mean_agreeing_prefix": statistics.mean(prefixes),
            "min_agreeing_prefix": min(prefixes),
            "logprob_abs_diff_max": max(lp_diffs, default=0.0),
            "logprob_abs_diff_mean": statistics.mean(lp_diffs) if lp_diffs else 0.0}


def compare(preset: str, num_prompts: int, new_tokens: int, device: str,
            backends: tuple[str, ...] = ("auto", "torch"), batch1: bool = False) -> dict:
    """With `batch1`, the fast path also runs the prompts one at a time: its batch-1
    kernels (GEMV, one-row attention) never run when all prompts decode together."""
    hf = build_hf(preset, device, seed=0)
    vocab = hf.config.vocab_size
    rng = random.Random(1)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(16, 512))]
               for _ in range(num_prompts)]
    blocks = num_prompts * (512 + new_tokens) // 16 + num_prompts  # room for every prompt
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    runs = {}
    head_dim = getattr(hf.config, "head_dim", None) or (
        hf.config.hidden_size // hf.config.num_attention_heads)
    modes = [(b, False) for b in backends] + ([("auto", True)] if batch1 else [])
    for backend, one_at_a_time in modes:
        resolved = resolve_attention_backend(backend, head_dim, torch.device(device),
                                             torch.bfloat16)
        key = resolved + ("_batch1" if one_at_a_time else "")
        if key in runs or (one_at_a_time and resolved == "torch"):
            continue  # 'auto' fell back to torch for this shape: one run is enough
        llm = LLM(preset, load_format="dummy", device=device, dtype="bfloat16",
                  max_num_batched_tokens=8192, num_kv_blocks=blocks, attention_backend=backend)
        load_named_tensors(llm.engine.runner.model, hf.named_parameters(),
                           f"transformers {preset}")
        outs = ([llm.generate([p], params)[0] for p in prompts] if one_at_a_time
                else llm.generate(prompts, params))
        runs[key] = [(o.token_ids, o.logprobs) for o in outs]
        del llm
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    ref_bf16 = [hf_greedy(hf, p, new_tokens) for p in prompts]
    hf.float()  # the same weights in float32: who is closer to the exact answer?
    ref_fp32 = [hf_greedy(hf, p, new_tokens) for p in prompts]
    del hf
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    res = {"preset": preset, "prompts": num_prompts, "new_tokens": new_tokens,
           "hf_bf16_vs_hf_fp32": agreement(ref_bf16, ref_fp32, new_tokens)}
    for backend, pairs in runs.items():
        res[f"baton_{backend}_bf16_vs_hf_bf16"] = agreement(pairs, ref_bf16, new_tokens)
        res[f"baton_{backend}_bf16_vs_hf_fp32"] = agreement(pairs, ref_fp32, new_tokens)
    for name, pairs in runs.items():
        if name != "torch" and "torch" in runs:
            res[f"baton_{name}_vs_baton_torch"] = agreement(pairs, runs["torch"], new_tokens)
    print(res, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="mini-llama,tiny-llama,tiny-qwen2,tiny-qwen3")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--big", default="llama-3.1-8b", help="real-shape preset, fewer prompts")
    ap.add_argument("--big-prompts", type=int, default=16)
    ap.add_argument("--big-new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-1", action="store_true",
                    help="also run the fast path with the prompts one at a time (batch-1 "
                         "kernels)")
    ap.add_argument("--out", default="benchmarks/results/gpu_correctness.json")
    args = ap.parse_args()
    EngineConfig(model="x", device=args.device)  # validates flags early
    runs = [(p, args.prompts, args.new_tokens) for p in args.presets.split(",") if p]
    if args.big:
        runs.append((args.big, args.big_prompts, args.big_new_tokens))
    results = []
    for preset, n, new in runs:
        results.append(compare(preset, n, new, args.device, batch1=args.batch_1))
        write_result(args.out, {"benchmark": "gpu_correctness", "dtype": "bfloat16",
                                "results": results})  # after each: a crash keeps the rest


if __name__ == "__main__":
    main()
