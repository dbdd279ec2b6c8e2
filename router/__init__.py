"""The HTTP front door: OpenAI-compatible API, tokenization, worker selection, streaming,
metrics. Never imports torch (a router pod starts in well under a second)."""
