"""Programmatic dependent launch (PDL) for Baton's Triton kernels on Hopper.

Inside a batch-1 decode graph of an 8B model ~200 kernels run back to back, each a few
to ~100 microseconds. Between two of them the GPU drains the first (its last wave leaves
SMs idle), then launches the second, which ramps up from nothing. With PDL the second
kernel is launched while the first still runs: its programs become resident as the
first one's last wave frees SMs, and they wait at `gdc_wait` (PTX griddepcontrol.wait:
the whole previous grid has finished and its writes are visible) before touching
anything the previous kernel writes or reads. What may run before that wait: loads of
weights (never written during a step). Stores and activation loads come after it, so
the overlap cannot race with either neighbour; the wait is transitive, so a kernel two
launches back has always finished too.

A kernel takes a `USE_PDL: tl.constexpr` that guards its `gdc_wait` /
`gdc_launch_dependents`, and its launch passes `**kernel_kwargs(tensor)`, which sets it
and Triton's `launch_pdl` together. Both stay off on CPU (Triton's interpreter knows neither
the launch attribute nor griddepcontrol), below compute capability 9.0, and when
switched off (`set_enabled`, for benchmarks comparing both in one process). CUDA graph
capture keeps the programmatic edges (CUDA 12.3 and later).
"""

from __future__ import annotations

import functools

import torch

_enabled = True


def set_enabled(on: bool) -> bool:
    """Switches PDL for launches from now on (captured graphs keep what they captured);
    returns whether it is on where it can be."""
    global _enabled
    _enabled = on
    return on and unavailable_reason() is None


@functools.cache
def unavailable_reason() -> str | None:
    """Why PDL cannot be used on this machine's CUDA device 0 (None when it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability() < (9, 0):
        return "needs compute capability 9.0 (Hopper) or later"
    try:
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except Exception as e:  # ImportError, or a Triton without grid dependency control
        return f"this Triton has no grid dependency control: {e}"
    return None


def active(t: torch.Tensor) -> bool:
    return _enabled and t.is_cuda and unavailable_reason() is None


def kernel_kwargs(t: torch.Tensor) -> dict:
    """Launch arguments for a Triton kernel whose inputs live with `t`: its USE_PDL and,
    where on, Triton's launch attribute (never passed off-GPU: the interpreter rejects
    it)."""
    return {"USE_PDL": True, "launch_pdl": True} if active(t) else {"USE_PDL": False}
