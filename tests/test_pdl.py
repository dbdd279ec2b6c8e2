"""Programmatic dependent launch switches (kernels/pdl.py): never on for CPU tensors (the
Triton interpreter knows neither the launch attribute nor griddepcontrol), on for CUDA
tensors only where the device and Triton support it, and off when switched off."""

from __future__ import annotations

import pytest
import torch

from kernels import pdl


def test_cpu_tensors_never_launch_with_pdl() -> None:
    assert pdl.kernel_kwargs(torch.zeros(1)) == {"USE_PDL": False}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_no_cuda_no_pdl() -> None:
    assert pdl.unavailable_reason() == "no CUDA device"
    assert pdl.set_enabled(True) is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_switch_on_a_gpu() -> None:
    x = torch.zeros(1, device="cuda")
    try:
        on = pdl.set_enabled(True)
        assert on == (pdl.unavailable_reason() is None)
        assert pdl.kernel_kwargs(x) == ({"USE_PDL": True, "launch_pdl": True} if on
                                        else {"USE_PDL": False})
        assert pdl.set_enabled(False) is False
        assert pdl.kernel_kwargs(x) == {"USE_PDL": False}
    finally:
        pdl.set_enabled(True)
