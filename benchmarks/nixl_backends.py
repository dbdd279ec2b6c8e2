"""Which NIXL backends load on this machine, and what they move: UCX VRAM -> VRAM between
two GPUs of one process's view, and the POSIX / GDS file backends (device or host memory
to a file and back), each with a bandwidth for one 256 MiB buffer.

    source scripts/gpu_env.sh
    python -m benchmarks.nixl_backends --out $OUT/nixl_backends.json

Baton's disk tier writes plain files today; this tells whether NIXL's file backends could
take over on the GPU machines (issue 8 asks to report which one is used).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import traceback

import torch

from benchmarks.common import write_result

SIZE = 256 << 20


def _wait(agent, handle, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    state = agent.transfer(handle)
    while state not in ("DONE", "ERR") and time.monotonic() < deadline:
        state = agent.check_xfer_state(handle)
    return state


def probe_file_backend(backend: str, mem: str, directory: str) -> dict:
    """WRITE a buffer to a file through `backend`, READ it back, compare."""
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(f"probe-{backend}-{mem}", nixl_agent_config(backends=[backend]))
    dev = "cuda:0" if mem == "VRAM" else "cpu"
    src = torch.randint(0, 255, (SIZE,), dtype=torch.uint8, device=dev)
    back = torch.zeros_like(src)
    path = os.path.join(directory, f"{backend}-{mem}.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, SIZE)
    try:
        dev_id = 0
        agent.register_memory([(src.data_ptr(), SIZE, dev_id, ""),
                               (back.data_ptr(), SIZE, dev_id, "")], mem)
        agent.register_memory([(0, SIZE, fd, "")], "FILE")
        files = agent.get_xfer_descs([(0, SIZE, fd)], "FILE")
        out: dict = {"ok": True}
        for op, buf in (("WRITE", src), ("READ", back)):
            local = agent.get_xfer_descs([(buf.data_ptr(), SIZE, dev_id)], mem)
            if dev == "cuda:0":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            handle = agent.initialize_xfer(op, local, files, agent.name)
            state = _wait(agent, handle)
            dt = time.perf_counter() - t0
            agent.release_xfer_handle(handle)
            out[op.lower()] = {"state": state, "gb_per_s": SIZE / dt / 1e9}
        out["data_matches"] = bool(torch.equal(src, back))
        return out
    finally:
        os.close(fd)
        os.unlink(path)


def probe_ucx_vram() -> dict:
    """One agent on GPU0 READs a buffer registered on GPU1 (two agents, one process)."""
    from nixl._api import nixl_agent, nixl_agent_config

    if torch.cuda.device_count() < 2:
        return {"skipped": "needs 2 GPUs"}
    a = nixl_agent("probe-ucx-a", nixl_agent_config(backends=["UCX"]))
    b = nixl_agent("probe-ucx-b", nixl_agent_config(backends=["UCX"]))
    src = torch.randint(0, 255, (SIZE,), dtype=torch.uint8, device="cuda:1")
    dst = torch.zeros(SIZE, dtype=torch.uint8, device="cuda:0")
    a.register_memory([(dst.data_ptr(), SIZE, 0, "")], "VRAM")
    b.register_memory([(src.data_ptr(), SIZE, 1, "")], "VRAM")
    name = a.add_remote_agent(b.get_agent_metadata())
    local = a.get_xfer_descs([(dst.data_ptr(), SIZE, 0)], "VRAM")
    remote = a.get_xfer_descs([(src.data_ptr(), SIZE, 1)], "VRAM")
    torch.cuda.synchronize()
    rates = []
    for _ in range(3):
        handle = a.initialize_xfer("READ", local, remote, name, b"probe")
        t0 = time.perf_counter()
        state = _wait(a, handle)
        rates.append(SIZE / (time.perf_counter() - t0) / 1e9)
        a.release_xfer_handle(handle)
    return {"state": state, "gb_per_s_best": max(rates), "data_matches":
            bool(torch.equal(src.to("cuda:0"), dst))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--out", default="benchmarks/results/nixl_backends.json")
    args = ap.parse_args()
    result: dict = {"benchmark": "nixl_backends", "bytes": SIZE, "probes": {}}
    cases = [("UCX VRAM GPU1->GPU0", probe_ucx_vram)]
    for backend in ("POSIX", "GDS", "GDS_MT"):
        for mem in ("DRAM", "VRAM"):
            cases.append((f"{backend} {mem}<->file",
                          lambda b=backend, m=mem: probe_file_backend(b, m, args.dir)))
    for name, fn in cases:
        try:
            result["probes"][name] = fn()
        except Exception as e:  # a backend that does not load is the answer, not a failure
            result["probes"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                      "where": traceback.format_exc().splitlines()[-3:]}
        print(name, result["probes"][name], flush=True)
        write_result(args.out, result)


if __name__ == "__main__":
    main()
