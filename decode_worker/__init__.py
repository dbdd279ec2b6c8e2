"""Decode role: pull a prompt's KV from a prefill worker (or prefill locally) and decode."""
