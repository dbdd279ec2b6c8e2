"""Model architectures. `build_model(config, ...)` picks the class by the HF architecture name."""

from kernels.models.registry import build_model, hf_param_names

__all__ = ["build_model", "hf_param_names"]
