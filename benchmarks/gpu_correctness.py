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
from kernels.checkpoint_writer import write_config_and_tokenizer
from kernels.loader import load_named_tensors
from kernels.weight_init import fill_random_


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


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    dev = next(model.parameters()).device
    out = model(torch.tensor([prompt], device=dev), use_cache=True)
    toks, lps = [], []
    for _ in range(n):
        logits = out.logits[0, -1].float()
        t = int(logits.argmax())
        toks.append(t)
        lps.append(float(torch.log_softmax(logits, -1)[t]))
        out = model(torch.tensor([[t]], device=dev), past_key_values=out.past_key_values,
                    use_cache=True)
    return toks, lps


def compare(preset: str, num_prompts: int, new_tokens: int, device: str) -> dict:
    hf = build_hf(preset, device, seed=0)
    vocab = hf.config.vocab_size
    rng = random.Random(1)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(16, 512))]
               for _ in range(num_prompts)]
    llm = LLM(preset, load_format="dummy", device=device, dtype="bfloat16",
              max_num_batched_tokens=8192)
    load_named_tensors(llm.engine.runner.model, hf.named_parameters(), f"transformers {preset}")
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    ours = llm.generate(prompts, params)
    agree_prefix, lp_diffs, full = [], [], 0
    for prompt, out in zip(prompts, ours):
        ref_toks, ref_lps = hf_greedy(hf, prompt, new_tokens)
        k = next((i for i, (a, b) in enumerate(zip(out.token_ids, ref_toks)) if a != b),
                 new_tokens)
        agree_prefix.append(k)
        full += k == new_tokens
        lp_diffs.extend(abs(a - b) for a, b in zip(out.logprobs[:k], ref_lps[:k]))
    del hf, llm
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    res = {
        "preset": preset, "prompts": num_prompts, "new_tokens": new_tokens,
        "prompts_fully_agreeing": full, "agreement": full / num_prompts,
        "mean_agreeing_prefix": statistics.mean(agree_prefix),
        "min_agreeing_prefix": min(agree_prefix),
        "logprob_abs_diff_max": max(lp_diffs, default=0.0),
        "logprob_abs_diff_mean": statistics.mean(lp_diffs) if lp_diffs else 0.0,
    }
    print(res, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny-llama,tiny-qwen2,tiny-qwen3,tiny-mistral")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--big", default="llama-3.1-8b", help="real-shape preset, fewer prompts")
    ap.add_argument("--big-prompts", type=int, default=16)
    ap.add_argument("--big-new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="benchmarks/results/gpu_correctness.json")
    args = ap.parse_args()
    EngineConfig(model="x", device=args.device)  # validates flags early
    results = [compare(p, args.prompts, args.new_tokens, args.device)
               for p in args.presets.split(",") if p]
    if args.big:
        results.append(compare(args.big, args.big_prompts, args.big_new_tokens, args.device))
    write_result(args.out, {"benchmark": "gpu_correctness", "dtype": "bfloat16",
                            "results": results})


if __name__ == "__main__":
    main()
