"""FlashInfer attention against the torch reference on Baton's own cache layout, on GPU.

    python -m benchmarks.gpu_attention --out benchmarks/results/gpu_attention_h200.json

Checks, on random data in the 8B model's head shape (32 query / 8 KV heads, head_dim
128, bf16) and a cache whose per-layer view is strided over blocks like the engine's:
prefill with cached prefixes, a mixed prefill+decode batch, decode, and decode replayed
from a CUDA graph after re-planning. Reports relative errors against the torch path
(float32 math over the same bf16 inputs), JIT/first-call time, and the decode kernel's
bandwidth at batch 64 x 2k context.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import H200_HBM_BYTES_PER_S, write_result
from kernels.attention import AttentionMetadata, FlashInferAttention, TorchPagedAttention
from kernels.attention.flashinfer_backend import FlashInferPlanner, PageLists

HQ, HKV, D, BS, LAYERS = 32, 8, 128, 16, 4


def make_case(query_lens: list[int], seq_lens: list[int], num_blocks: int, gen):
    """Random cache contents and block tables (shuffled blocks, per-layer strided view)."""
    dev = "cuda"
    cache = torch.randn(num_blocks + 1, LAYERS, 2, BS, HKV, D, generator=gen, device=dev,
                        dtype=torch.bfloat16)
    perm = torch.randperm(num_blocks, generator=gen, device=dev).tolist()
    tables, used = [], 0
    for s in seq_lens:
        n = -(-s // BS)
        tables.append(perm[used : used + n])
        used += n
    assert used <= num_blocks
    slots = [t[p // BS] * BS + p % BS for t, q, s in zip(tables, query_lens, seq_lens)
             for p in range(s - q, s)]
    t = sum(query_lens)
    q = torch.randn(t, HQ, D, generator=gen, device=dev, dtype=torch.bfloat16)
    k = torch.randn(t, HKV, D, generator=gen, device=dev, dtype=torch.bfloat16)
    v = torch.randn(t, HKV, D, generator=gen, device=dev, dtype=torch.bfloat16)
    return cache, tables, slots, q, k, v


def torch_meta(tables, query_lens, seq_lens, slots) -> AttentionMetadata:
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, device="cuda"),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device="cuda"),
        seq_lens=torch.tensor(seq_lens, device="cuda"), query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens, block_size=BS)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(planner: FlashInferPlanner, name: str, query_lens, seq_lens, gen) -> dict:
    cache, tables, slots, q, k, v = make_case(query_lens, seq_lens, 4096, gen)
    layer = 2
    ref_cache = cache.float()
    ref = TorchPagedAttention(HQ, HKV, D).forward(
        q.float(), k, v, ref_cache[:, layer], torch_meta(tables, query_lens, seq_lens, slots))
    meta = torch_meta(tables, query_lens, seq_lens, slots)
    decode_only = all(n == 1 for n in query_lens)
    t0 = time.perf_counter()
    meta.plan = planner.plan(PageLists.build(tables, query_lens, seq_lens, BS), decode_only)
    out = FlashInferAttention(HQ, HKV, D).forward(q, k, v, cache[:, layer], meta)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    kv_err = rel_err(cache.float(), ref_cache)
    res = {"case": name, "query_lens": query_lens, "seq_lens": seq_lens,
           "rel_err_vs_torch": rel_err(out, ref), "cache_write_rel_err": kv_err,
           "first_call_seconds": first}
    print(res, flush=True)
    return res


def graph_check(planner: FlashInferPlanner, gen) -> dict:
    """Capture decode once, re-plan with other lengths, replay: output must follow."""
    b = 8
    indptr = torch.zeros(b + 1, dtype=torch.int32, device="cuda")
    indices = torch.zeros(b * 256, dtype=torch.int32, device="cuda")
    last = torch.zeros(b, dtype=torch.int32, device="cuda")
    wrapper = planner.graph_decode_wrapper(b, indptr, indices, last)
    cache, tables, _, q, _, _ = make_case([1] * b, [100] * b, 4096, gen)
    kv = cache[:, 1]
    planner.plan_decode(wrapper, PageLists.build(tables, [1] * b, [100] * b, BS))
    wrapper.run(q, kv)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = wrapper.run(q, kv)
    errs = []
    for lens in ([100] * b, [1, 17, 300, 2000, 5, 64, 65, 999]):
        tabs = [list(range(i * 200, i * 200 + -(-s // BS))) for i, s in enumerate(lens)]
        planner.plan_decode(wrapper, PageLists.build(tabs, [1] * b, lens, BS))
        graph.replay()
        meta = AttentionMetadata(torch.zeros(0, dtype=torch.int64, device="cuda"), None, None,
                                 [1] * b, lens, BS)
        w = max(len(t) for t in tabs)
        meta.block_tables = torch.tensor([t + [0] * (w - len(t)) for t in tabs], device="cuda")
        meta.seq_lens = torch.tensor(lens, device="cuda")
        ref = TorchPagedAttention(HQ, HKV, D)._decode(q.float(), kv.float(), meta)
        errs.append(rel_err(out, ref))
    res = {"case": "cuda_graph_decode_replanned", "rel_err_vs_torch": errs}
    print(res, flush=True)
    return res


def decode_bandwidth(planner: FlashInferPlanner, batch: int, ctx: int, gen) -> dict:
    cache, tables, _, q, _, _ = make_case([1] * batch, [ctx] * batch, batch * ctx // BS + 8, gen)
    kv = cache[:, 0]
    wrapper = planner.plan(PageLists.build(tables, [1] * batch, [ctx] * batch, BS), True)
    for _ in range(3):
        wrapper.run(q, kv)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    iters = 50
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        wrapper.run(q, kv)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / iters
    kv_bytes = batch * ctx * 2 * HKV * D * 2
    res = {"case": "decode_kernel_bandwidth", "batch": batch, "context": ctx,
           "ms": ms, "kv_bytes": kv_bytes,
           "fraction_of_hbm": kv_bytes / (ms * 1e-3) / H200_HBM_BYTES_PER_S}
    print(res, flush=True)
    return res


def fused_ops_check(gen) -> dict:
    """FlashInfer's norm/RoPE/SwiGLU against the torch layers, with q/k as strided
    views of a fused qkv output like the model passes them."""
    from kernels.layers import fused
    from kernels.layers.activation import silu_and_mul
    from kernels.layers.norm import RMSNorm
    from kernels.layers.rotary import RotaryEmbedding

    t, hidden = 300, 4096
    bf = torch.bfloat16
    x = torch.randn(t, hidden, generator=gen, device="cuda", dtype=bf)
    res = torch.randn(t, hidden, generator=gen, device="cuda", dtype=bf)
    norm = RMSNorm(hidden, 1e-5, bf).cuda()
    norm.weight.data = torch.rand(hidden, generator=gen, device="cuda").to(bf) + 0.5
    ref_n, ref_r = norm.forward_with_residual(x.clone(), res.clone())
    ref_plain = norm(x.clone())
    norm.use_fused_kernels = True
    out_n, out_r = norm.forward_with_residual(x.clone(), res.clone())
    out_plain = norm(x.clone())
    gu = torch.randn(t, 2 * 14336, generator=gen, device="cuda", dtype=bf)
    rot = RotaryEmbedding(D, 8192, 500000.0, None).cuda()
    qkv = torch.randn(t, (HQ + 2 * HKV) * D, generator=gen, device="cuda", dtype=bf)
    pos = torch.randint(0, 8192, (t,), generator=gen, device="cuda")
    q, k, _ = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
    q, k = q.view(t, HQ, D), k.view(t, HKV, D)
    ref_q, ref_k = rot(pos, q.clone(), k.clone())
    rot.use_fused_kernels = True
    out_q, out_k = rot(pos, q, k)
    res = {"case": "fused_ops", "add_rmsnorm": rel_err(out_n, ref_n),
           "residual": rel_err(out_r, ref_r), "rmsnorm": rel_err(out_plain, ref_plain),
           "silu_and_mul": rel_err(fused.silu_and_mul(gu), silu_and_mul(gu)),
           "rope_q": rel_err(out_q, ref_q), "rope_k": rel_err(out_k, ref_k),
           "rope_in_place_of_strided_qkv": rel_err(qkv[:, : HQ * D].view(t, HQ, D), ref_q)}
    print(res, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_attention.json")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    t0 = time.perf_counter()
    import flashinfer  # noqa: F401

    import_s = time.perf_counter() - t0
    planner = FlashInferPlanner(HQ, HKV, D, BS, torch.bfloat16, torch.device("cuda"))
    cases = [
        check(planner, "prefill_fresh", [50, 200, 7], [50, 200, 7], gen),
        check(planner, "prefill_cached_prefix", [50, 1, 200], [50 + 37, 100, 200 + 480], gen),
        check(planner, "mixed_prefill_decode", [1, 64, 1], [33, 64 + 16, 1000], gen),
        check(planner, "decode", [1] * 5, [1, 16, 17, 500, 2048], gen),
        graph_check(planner, gen),
        decode_bandwidth(planner, 64, 2048, gen),
        fused_ops_check(gen),
    ]
    write_result(args.out, {"benchmark": "gpu_attention", "import_seconds": import_s,
                            "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D,
                                      "block_size": BS, "layers_in_cache": LAYERS},
                            "cases": cases})


if __name__ == "__main__":
    main()
