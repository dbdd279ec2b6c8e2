"""Prefill role: run the prompt, sample the first token, hold the KV for the decode side."""
