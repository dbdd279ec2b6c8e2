"""Trim an unpacked nixl-cu13 wheel to what Baton's GPU machines use, so it fits one
device call beside FlashInfer (the wheel is 56 MiB, one call carries 64 MiB).

Kept: the Python bindings, libnixl, the UCX, POSIX and GDS plugins, UCX's shared-memory and
CUDA transports (cuda_copy, cuda_ipc: NVLink inside a host), and every library those need
(followed through ELF NEEDED entries). Dropped: the expert-parallel extension (nixl_ep,
three torch builds of ~30 MiB each), cloud-storage plugins (S3, Azure) and their SDKs,
InfiniBand/EFA transports, perftest modules, example scripts and headers.

    python scripts/trim_nixl.py SITE_DIR      (SITE_DIR: the unpacked wheel)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PLUGINS = ("UCX", "POSIX", "GDS", "GDS_MT")
UCX_DROP = ("libuct_ib", "libuct_rdmacm", "libucx_perftest")  # name prefixes


def needed(lib: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    return [line.split("[")[1].split("]")[0] for line in out.splitlines() if "(NEEDED)" in line]


def main(site: Path) -> None:
    for d in ("nixl_ep_cu13", "nixl_cu13.scripts"):
        subprocess.run(["rm", "-rf", str(site / d)], check=True)
    for d in site.glob("nixl_cu13-*.data"):
        subprocess.run(["rm", "-rf", str(d)], check=True)
    for plugdir in (site / ".nixl_cu13.mesonpy.libs/plugins", site / "nixl_cu13.libs/nixl"):
        for p in plugdir.glob("*.so"):
            if p.stem.removeprefix("libplugin_") not in PLUGINS:
                p.unlink()
    for p in (site / "nixl_cu13.libs/ucx").iterdir():
        if p.name.startswith(UCX_DROP) or p.suffix == ".la":
            p.unlink()
    # Keep every bundled library reachable from what is left; drop the rest.
    bundled = {p.name: p for p in (site / "nixl_cu13.libs").glob("*.so*")}
    bundled |= {p.name: p for p in (site / ".nixl_cu13.mesonpy.libs").glob("*.so*")}
    roots = [p for p in site.rglob("*.so*") if p.is_file() and p.name not in bundled]
    roots += [site / ".nixl_cu13.mesonpy.libs" / n for n in ("libnixl.so", "libnixl_common.so")]
    keep: set[str] = set()
    todo = list(roots)
    while todo:
        for name in needed(todo.pop()):
            if name in bundled and name not in keep:
                keep.add(name)
                todo.append(bundled[name])
    for name, p in bundled.items():
        if name not in keep and not name.startswith("libnixl"):
            p.unlink()
    size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    print(f"kept {len(keep)} bundled libraries, {size / 2**20:.0f} MiB unpacked")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
