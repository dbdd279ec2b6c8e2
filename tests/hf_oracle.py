"""The correctness oracle: Hugging Face `transformers`, float32 on CPU, greedy decoding by a
plain loop (no generate() logic in between), returning token ids and their logprobs."""

from __future__ import annotations

from pathlib import Path

import torch


def load_hf(model_dir: Path | str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    return model.to(device).eval()


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    out = model(ids, use_cache=True)
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1].float()
        tok = int(logits.argmax())
        tokens.append(tok)
        logprobs.append(float(torch.log_softmax(logits, -1)[tok]))
        out = model(torch.tensor([[tok]], device=device), past_key_values=out.past_key_values,
                    use_cache=True)
    return tokens, logprobs
