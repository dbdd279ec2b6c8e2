"""Per-layer decode kernels of the 8B shape on one GPU, timed as CUDA graphs (no launch
gaps of eager mode, caches larger than L2 like in a real step), to choose what the
decode step runs:

- attention: FlashInfer's tensor-core decode (prefill kernel, GQA group as rows) and
  CUDA-core decode kernel, each with and without split-KV, at batch 1 x 1k and
  16/64/256 x 2k context (at batch 1 also with fixed KV chunks of SPLIT_PAGES pages);
  time per layer and fraction of HBM bandwidth for its KV bytes;
  outputs checked against the tensor-core split-KV variant (FlashInfer's best); at batch 1
  also Baton's one-row kernel (kernels/attention/one_row.py) for ONE_ROW_CONFIGS. Timed
  here as a chain of attention kernels only: its early KV loads overlap the previous
  attention, not a QKV product as in a decode step (benchmarks.offline measures that).
- RoPE + KV write: FlashInfer's RoPE plus two `index_put`s (the old path) against
  Baton's fused Triton kernel, per layer at 1 and 64 tokens.
- Greedy sampling (`--parts sampler`): torch's argmax + logsumexp against Baton's one
  kernel, at 1 and 64 rows of a 128k vocabulary.
- Batch-1 projections (`--parts gemv`): cuBLAS (with FlashInfer's add + RMSNorm before
  and SwiGLU after, as the decode step runs them) against Baton's GEMV kernels with those
  folded in, for every tile config the autotuner may pick and for its pick; time and
  fraction of HBM bandwidth for the weight bytes.

    python -m benchmarks.gpu_decode_kernels --out benchmarks/results/gpu_decode_kernels_h200.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time

import torch

from benchmarks.common import H200_HBM_BYTES_PER_S, write_result
from kernels.attention.flashinfer_backend import WORKSPACE_BYTES, PageLists
from kernels.attention.one_row import OneRowAttention, OneRowConfig

HQ, HKV, D, BS = 32, 8, 128, 16
DT = torch.bfloat16
LAYER_BYTES_MIN = 512 * 2**20  # enough layers' caches that the replay never hits in L2
SPLIT_PAGES = (2, 4, 16)  # fixed KV chunks tried at batch 1, in pages of BS tokens
# (block_t, max_splits, num_warps) of the one-row kernel tried at batch 1.
ONE_ROW_CONFIGS = ((64, 32, 4), (64, 32, 8), (64, 16, 4), (32, 32, 4), (128, 32, 8),
                   (64, 64, 8))


def graph_ms(fn, reps: int = 20) -> float:
    """Milliseconds per call of `fn` captured once in a CUDA graph and replayed."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def attention_case(batch: int, ctx: int, gen) -> dict:
    pages_per_seq = -(-ctx // BS)
    pages = batch * pages_per_seq
    layer_bytes = pages * 2 * BS * HKV * D * 2
    layers = max(4, min(32, -(-LAYER_BYTES_MIN // layer_bytes)))
    caches = [torch.randn(pages, 2, BS, HKV, D, generator=gen, device="cuda", dtype=DT)
              for _ in range(layers)]
    q = torch.randn(batch, HQ, D, generator=gen, device="cuda", dtype=DT)
    order = torch.randperm(pages, generator=gen, device="cuda").tolist()
    tables = [order[i * pages_per_seq:(i + 1) * pages_per_seq] for i in range(batch)]
    lists = PageLists.build(tables, [1] * batch, [ctx] * batch, BS)
    kv_bytes = batch * ctx * 2 * HKV * D * 2
    out = {"batch": batch, "context": ctx, "layers_timed": layers, "kv_bytes_per_layer":
           kv_bytes, "variants": []}
    ref = None
    # (name, builder of the runner): FlashInfer's variants (tensor cores, split-KV, fixed
    # chunk pages), then Baton's one-row kernel's tiles.
    fi = functools.partial(flashinfer_runner, lists)
    variants = [("tensor-cores", functools.partial(fi, True, True)),
                ("tensor-cores/no-split", functools.partial(fi, True, False)),
                ("cuda-cores", functools.partial(fi, False, True)),
                ("cuda-cores/no-split", functools.partial(fi, False, False))]
    if batch == 1:
        # FlashInfer's own split at one row is 128-token chunks (its smallest); other
        # fixed chunk sizes, in pages, for the tensor-core kernel.
        variants += [(f"tensor-cores/split-{p}-pages", functools.partial(fi, True, True, p))
                     for p in SPLIT_PAGES]
        variants += [("baton-one-row/{}/{}/{}".format(*c),
                      functools.partial(one_row_runner, lists, OneRowConfig(*c)))
                     for c in ONE_ROW_CONFIGS]
    for name, build in variants:
        row = {"variant": name}
        try:
            t0 = time.perf_counter()
            run = build()
            first = run(q, caches[0])
            torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            ms = graph_ms(lambda run=run: [run(q, c) for c in caches]) / layers
            row.update(us_per_layer=ms * 1e3,
                       fraction_of_hbm=kv_bytes / (ms * 1e-3) / H200_HBM_BYTES_PER_S)
            if ref is None:
                ref = first
            row["rel_err_vs_first"] = ((first.float() - ref.float()).norm()
                                       / ref.float().norm()).item()
        except Exception as e:  # a variant FlashInfer cannot build or run here
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        print(batch, ctx, row, flush=True)
        out["variants"].append(row)
    caches.clear()
    torch.cuda.empty_cache()
    return out


def flashinfer_runner(lists: PageLists, tensor_cores: bool, split: bool,
                      pages_per_chunk: int | None = None):
    import flashinfer

    ws = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        ws, "NHD", use_tensor_cores=tensor_cores, backend="fa2")
    w.plan(lists.kv_indptr, lists.kv_indices, lists.last_page_len, HQ, HKV, D, BS,
           q_data_type=DT, kv_data_type=DT, disable_split_kv=not split,
           fixed_split_size=pages_per_chunk)
    return w.run


def one_row_runner(lists: PageLists, config: OneRowConfig):
    attention = OneRowAttention(HQ, HKV, D, torch.device("cuda"), config)
    pages = [t.cuda() for t in (lists.kv_indptr, lists.kv_indices, lists.last_page_len)]
    return lambda q, cache: attention(q, cache, *pages)


def rope_kv_case(tokens: int, gen) -> dict:
    from kernels.attention.metadata import AttentionMetadata
    from kernels.attention.rope_kv_write import rope_and_write_kv_
    from kernels.attention.torch_paged import write_kv
    from kernels.layers import fused
    from kernels.layers.rotary import RotaryEmbedding

    layers, blocks = 32, 4096
    cache = torch.zeros(blocks, layers, 2, BS, HKV, D, device="cuda", dtype=DT)
    views = [cache[:, i] for i in range(layers)]
    rot = RotaryEmbedding(D, 8192, 500000.0, None).cuda()
    cos_sin = rot.cos_sin_table()
    qkv = torch.randn(tokens, (HQ + 2 * HKV) * D, generator=gen, device="cuda", dtype=DT)
    q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
    q, k, v = q.view(tokens, HQ, D), k.view(tokens, HKV, D), v.view(tokens, HKV, D)
    pos = torch.randint(0, 8192, (tokens,), generator=gen, device="cuda")
    slots = torch.randperm(blocks * BS, generator=gen, device="cuda")[:tokens]
    meta = AttentionMetadata(slots, None, None, [1] * tokens, [1] * tokens, BS)

    def old_path():
        meta.slot_blocks = None  # the old model split slots once per forward: count it
        for kv in views:
            qf, kf = q.reshape(tokens, -1), k.reshape(tokens, -1)
            fused.rope_(pos, qf, kf, D, cos_sin)
            write_kv(kv, k, v, meta)

    def fused_path():
        for kv in views:
            rope_and_write_kv_(q, k, v, pos, slots, cos_sin, kv)

    row = {"tokens": tokens, "old_us_per_layer": graph_ms(old_path) * 1e3 / layers,
           "fused_us_per_layer": graph_ms(fused_path) * 1e3 / layers}
    print(row, flush=True)
    return row


@contextlib.contextmanager
def pdl_off():
    from kernels import pdl

    pdl.set_enabled(False)
    try:
        yield
    finally:
        pdl.set_enabled(True)


def gemv_case(name: str, n: int, k: int, gen, norm: bool = False, swiglu: bool = False
              ) -> dict:
    import torch.nn.functional as F

    from kernels.layers import fused, gemv

    copies = max(2, -(-LAYER_BYTES_MIN // (n * k * 2)))  # never served from L2
    ws = [torch.randn(n, k, generator=gen, device="cuda", dtype=DT) * k ** -0.5
          for _ in range(copies)]
    x = torch.randn(1, k, generator=gen, device="cuda", dtype=DT)
    res = torch.randn(1, k, generator=gen, device="cuda", dtype=DT)
    nw = torch.ones(k, device="cuda", dtype=DT)
    x_in, res_in = x.clone(), res.clone()  # the in-place norm's own buffers

    def cublas():
        for w in ws:
            h = x
            if norm:
                h, _ = fused.add_rmsnorm_(x_in, res_in, nw, 1e-5)
            y = F.linear(h, w)
            if swiglu:
                y = fused.silu_and_mul(y)

    def baton(config):
        def run():
            for w in ws:
                if norm:
                    gemv.add_norm_gemv(x, res, nw, 1e-5, w, swiglu=swiglu, config=config)
                else:
                    gemv.gemv(x, w, config=config)
        return run

    bytes_per_call = n * k * 2
    row = {"name": name, "n": n, "k": k, "norm": norm, "swiglu": swiglu,
           "weight_mib": bytes_per_call / 2**20}
    times = {"cublas": graph_ms(cublas) / copies}
    for cfg in gemv.CONFIGS:
        times["gemv_{}_{}_{}".format(*cfg)] = graph_ms(baton(cfg)) / copies
    times["gemv_autotuned"] = graph_ms(baton(None)) / copies
    with pdl_off():  # the same kernels, each waiting for the previous one to finish
        times["gemv_autotuned_no_pdl"] = graph_ms(baton(None)) / copies
    row["us"] = {key: ms * 1e3 for key, ms in times.items()}
    row["hbm_fraction"] = {key: bytes_per_call / (ms * 1e-3) / H200_HBM_BYTES_PER_S
                           for key, ms in times.items()}
    best = min((key for key in times if key.startswith("gemv_") and "no_pdl" not in key),
               key=times.get)
    row["best_gemv"], row["best_over_cublas"] = best, times["cublas"] / times[best]
    print(name, {key: round(v, 1) for key, v in row["us"].items()}, flush=True)
    return row


def sampler_case(rows: int, vocab: int, gen) -> dict:
    """A greedy step's sampling: torch's argmax + the chosen token's logprob (logsumexp)
    against Baton's one kernel (kernels/greedy.py)."""
    from kernels import greedy

    x = torch.randn(rows, vocab, generator=gen, device="cuda") * 3

    def torch_path():
        ids = x.argmax(dim=-1)
        return x.gather(1, ids[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1)

    row = {"rows": rows, "vocab": vocab, "torch_us": graph_ms(torch_path) * 1e3,
           "baton_us": graph_ms(lambda: greedy.argmax_with_logprob(x)) * 1e3}
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_decode_kernels.json")
    ap.add_argument("--shapes", default="1:1024,16:2048,64:2048,256:2048",
                    help="decode attention cases, BATCH:CONTEXT,...")
    ap.add_argument("--parts", default="rope,attention,gemv",
                    help="which groups of kernels to time")
    args = ap.parse_args()
    parts = args.parts.split(",")
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")]
    rope = [rope_kv_case(t, gen) for t in (1, 64)] if "rope" in parts else []
    attention = [attention_case(b, c, gen) for b, c in shapes] if "attention" in parts else []
    # The 8B shape's four projections per layer and its LM head, at one row.
    gemvs = [gemv_case("qkv + input norm", 6144, 4096, gen, norm=True),
             gemv_case("o_proj", 4096, 4096, gen),
             gemv_case("gate_up + norm + swiglu", 28672, 4096, gen, norm=True, swiglu=True),
             gemv_case("down_proj", 4096, 14336, gen),
             gemv_case("lm_head", 128256, 4096, gen)] if "gemv" in parts else []
    sampler = [sampler_case(r, 128256, gen) for r in (1, 64)] if "sampler" in parts else []
    write_result(args.out, {"benchmark": "gpu_decode_kernels",
                            "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D,
                                      "block_size": BS, "dtype": "bfloat16"},
                            "rope_kv_write": rope, "decode_attention": attention,
                            "batch1_projections": gemvs, "greedy_sampling": sampler})


if __name__ == "__main__":
    main()
