"""What every benchmark result records: machine, versions, command, time, git commit."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

# Measured ceilings of one H200 (../shared/ENVIRONMENT.md; re-measured by gpu_ceilings()).
H200_HBM_BYTES_PER_S = 4.3e12
H200_BF16_FLOPS = 790e12


def pct(xs: list[float], q: float) -> float:
    """Percentile, no interpolation: sorted(xs)[int(q * n)], capped at the last; NaN if empty."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def environment() -> dict:
    import torch

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "command": " ".join(sys.argv),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip() or None
    except OSError:
        info["git_commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    for mod in ("flashinfer", "nixl"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "present")
        except Exception:  # absent or broken: recorded as such
            info[mod] = None
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def write_result(path: str | Path, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **result}, indent=2) + "\n")
    return path


def counter_by_label(metrics_text: str, name: str, label: str, **only: str
                     ) -> dict[str, float]:
    """A counter from Prometheus exposition text (the router's /metrics), its values keyed
    by `label`, over the samples whose other labels equal `only`."""
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels[label]: s.value for family in text_string_to_metric_families(metrics_text)
            for s in family.samples if s.name == f"{name}_total"
            and all(s.labels.get(k) == v for k, v in only.items())}
