"""Packaging hazards: our top-level `kernels` package shares its import name with Hugging
Face's `kernels` library, and the router-side modules must stay torch-free."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def run(code: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_transformers_does_not_take_baton_for_hf_kernels(where: str, tmp_path: Path) -> None:
    """transformers 5 probes `find_spec("kernels")` and, for a version in [0.18.2, 0.19.0),
    imports Hugging Face's kernel hub API from it, which Baton's package lacks."""
    out = run(
        "import kernels\n"
        "from transformers.utils import import_utils as iu\n"
        "print(iu.is_kernels_available())\n"
        "print(iu._is_package_available('kernels', return_version=True)[1])\n"
        "print(iu.KERNELS_MIN_VERSION, iu.KERNELS_MAX_VERSION)",
        cwd=ROOT if where == "checkout" else tmp_path)
    available, version, bounds = out.splitlines()
    assert available == "False"
    lo, hi = (Version(v) for v in bounds.split())
    assert version == "N/A" or not lo <= Version(version) < hi


def test_baton_version_outside_the_hf_kernels_range() -> None:
    version = Version(importlib.metadata.version("baton-serve"))
    assert not Version("0.18.2") <= version < Version("0.19.0")


def test_router_side_modules_are_torch_free() -> None:
    out = run(
        "import sys\n"
        "import engine.sampling_params, engine.tokenizer, kvtransfer.hashing\n"
        "import engine.errors, engine.config, router.app, cluster.cli\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    assert out == "[]"


def test_torch_free_tokenizer_still_works(checkpoint_dir) -> None:
    path = checkpoint_dir("tiny-llama")
    out = run(
        "import sys\n"
        "from engine.tokenizer import IncrementalDetokenizer, TokenizerBundle\n"
        f"tok = TokenizerBundle.from_dir({str(path)!r})\n"
        "ids = tok.encode('héllo 🚀', add_special_tokens=False)\n"
        "d = IncrementalDetokenizer(tok, [], True)\n"
        "text = ''.join(d.add_token(i) for i in ids) + d.flush()\n"
        "print(text == 'héllo 🚀', 'torch' in sys.modules)")
    assert out == "True False"
