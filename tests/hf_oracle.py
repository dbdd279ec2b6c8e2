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


@torch.inference_mode()
def hf_greedy_constrained(model, tok, prompt: list[int], grammar: str,
                          max_new_tokens: int) -> list[int]:
    """The same loop under an llguidance grammar (structured outputs): each step's argmax
    is taken over the tokens the grammar allows (llguidance's own bitmask, read bit by
    bit), until the grammar is complete. `tok`: the model's TokenizerBundle."""
    import llguidance

    vocab = model.config.vocab_size
    llt = llguidance.LLTokenizer(tok.tokenizer.to_str(), n_vocab=vocab,
                                 eos_token=list(tok.eos_token_ids))
    matcher = llguidance.LLMatcher(llt, grammar)
    device = next(model.parameters()).device
    out = model(torch.tensor([prompt], device=device), use_cache=True)
    tokens: list[int] = []
    while len(tokens) < max_new_tokens and not matcher.is_stopped():
        bits = matcher.compute_bitmask()
        allowed = [t for t in range(vocab) if bits[t // 8] >> (t % 8) & 1]
        logits = out.logits[0, -1].float()
        tok_id = max(allowed, key=lambda t: logits[t])
        tokens.append(tok_id)
        assert matcher.consume_token(tok_id), matcher.get_error()
        out = model(torch.tensor([[tok_id]], device=device),
                    past_key_values=out.past_key_values, use_cache=True)
    return tokens
