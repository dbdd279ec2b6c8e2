"""The worker core shared by prefill and decode roles: request state, scheduler,
model runner and the offline `LLM` API. Importing the package itself pulls no torch,
so the router can share `engine.sampling_params` and `engine.detokenize`."""
