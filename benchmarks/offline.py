"""Offline engine benchmark in a real model shape: decode step time at several batch sizes
and prefill time for one long prompt, each beside its roofline.

    python -m benchmarks.offline --preset llama-3.1-8b --device cuda \
        --out benchmarks/results/offline_h200_baseline.json

Decode roofline = (weight bytes + KV bytes read) / HBM bandwidth; its ratio to the
measured step is the MBU. Prefill roofline = FLOPs / bf16 peak; the ratio is the MFU.
The step time is the whole engine step (schedule, prepare, forward, sample, update),
with the CPU part reported separately.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import random
import statistics
import time

import torch

from benchmarks.common import H200_BF16_FLOPS, H200_HBM_BYTES_PER_S, write_result
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kernels.attention import one_row


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def param_bytes(engine: LLMEngine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())


def weight_bytes_read(engine: LLMEngine, batch: int) -> int:
    """Weight bytes a decode step must read: every matrix once, but of an untied input
    embedding only the batch's rows (the table itself is never streamed)."""
    model = engine.runner.model
    embed = model.model.embed_tokens.weight
    if model.lm_head.weight is embed:  # tied: the lm_head reads the whole table
        return param_bytes(engine)
    row = embed.shape[1] * embed.element_size()
    return param_bytes(engine) - embed.numel() * embed.element_size() + batch * row


def graph_replay_ms(graphs, reps: int = 20) -> float:
    """GPU milliseconds per replay of the graph the last step replayed, with its inputs
    (it rewrites those steps' KV slots with the same values: nothing reads them after)."""
    graph = graphs.last_replayed
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


# --compare-grammar: every row decodes under a JSON grammar (structured outputs, token
# masks on the host each step) that cannot complete within the run: an array of at least
# 2000 integers.
LONG_JSON_ARRAY = {"type": "json_schema", "json_schema": {"name": "numbers", "schema": {
    "type": "array", "items": {"type": "integer"}, "minItems": 2000}}}


def decode_case(engine: LLMEngine, batch: int, context: int, steps: int, device: str,
                grammar: str = "") -> dict:
    mc = engine.model_config
    rng = random.Random(batch * 7919 + context)
    # Early requests decode while later ones prefill: leave them room to keep going.
    params = SamplingParams(max_tokens=4 * steps + 1024, temperature=0.0, ignore_eos=True,
                            grammar=grammar)
    ids = [f"d{batch}-{context}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, [rng.randrange(mc.vocab_size) for _ in range(context)], params)
    # Run prefill until every request is decoding.
    while any(s.num_output_tokens == 0 for s in engine.scheduler.running) or \
            engine.scheduler.waiting:
        engine.step()
    step_times, cpu_times = [], []
    sched = engine.scheduler
    graphs = engine.runner.graphs if engine.runner.use_graphs else None
    if graphs is not None:
        graphs.host_timer = {}
        graphs.drop_staged()  # a step launched ahead before the clock starts: redo it
    # No device sync between steps: a step may be queued behind the previous one
    # (overlap_decode), so a step's time is the interval between two steps' tokens
    # reaching the host, as a serving loop sees them; the first from an idle GPU.
    _sync(device)
    t_prev = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        t_sched = time.perf_counter()
        result = engine.runner.execute(out, sched)  # inputs, forward, sampling, host sync
        t_exec = time.perf_counter()
        sched.update(out, result)
        t1 = time.perf_counter()
        step_times.append(t1 - t_prev)
        t_prev = t1
        cpu_times.append((t_sched - t0) + engine.runner.prepare_seconds + (t1 - t_exec))
        assert len(out.scheduled) == batch
    # Under TP a replay on the leader alone would wait forever for its peers' collectives.
    replay_ms = graph_replay_ms(graphs) \
        if graphs is not None and engine.tp is None else None
    for rid in ids:
        engine.abort_request(rid)
    host = None
    if graphs is not None and graphs.host_timer.get("steps"):
        timer, graphs.host_timer = graphs.host_timer, None
        steps_ = timer.pop("steps")
        counts = ("staged_hits", "launched", "launched_used")
        host = {k: v / steps_ * 1e3 for k, v in timer.items() if k not in counts}
        # Shares of steps: staged ahead, launched ahead, launched ahead and used.
        host.update({k: timer.get(k, 0.0) / steps_ for k in counts})
    step = statistics.median(step_times)
    # This rank's share: under TP each reads its KV heads, as its weight shard.
    kv_read = batch * (context + steps // 2) * mc.kv_bytes_per_token() // engine.cfg.tp
    weights = weight_bytes_read(engine, batch)
    roof = (weights + kv_read) / H200_HBM_BYTES_PER_S
    # Until 2026-11-29 the roofline counted every parameter byte, the untied embedding
    # table (1 GiB for the 8B shape, never read in decode) included: kept for comparison.
    roof_all = (param_bytes(engine) + kv_read) / H200_HBM_BYTES_PER_S
    return {
        "batch": batch, "context": context, "steps": steps,
        "step_ms_median": step * 1e3,
        "step_ms_p90": sorted(step_times)[int(0.9 * len(step_times))] * 1e3,
        "cpu_ms_median": statistics.median(cpu_times) * 1e3,
        "cpu_share": statistics.median(cpu_times) / step,
        # Host ms per step inside the graph runner: exposed (inputs, page lists, FlashInfer
        # plan when the step was not staged, replay launch) and "staging" (the next step's,
        # overlapped with this one's GPU work); staged_hits: share of steps staged ahead.
        # cpu_ms is the scheduler and its update around them.
        "graph_host_ms": host,
        "weight_bytes_read": weights, "kv_bytes_read": kv_read,
        "roofline_ms": roof * 1e3, "mbu": roof / step,
        # The decode graph alone, replayed back to back (the forward and the LM head; no
        # sampling, no host in between): what the kernels reach, against what a step does.
        "graph_replay_ms": replay_ms,
        "mbu_graph_replay": None if replay_ms is None else roof * 1e3 / replay_ms,
        "mbu_counting_all_params": roof_all / step,
        "tokens_per_s": batch / step,
    }


def prefill_flops(engine: LLMEngine, tokens: int) -> float:
    mc = engine.model_config
    dense = mc.num_params() - mc.vocab_size * mc.hidden_size * (
        1 if mc.tie_word_embeddings else 2)
    linear = 2 * dense * tokens + 2 * mc.vocab_size * mc.hidden_size  # lm_head: last row only
    # QK^T and PV over a causal mask: half of a full T x T each.
    attn = 2 * 2 * mc.num_layers * mc.num_heads * mc.head_dim * tokens * tokens / 2
    return linear + attn


def prefill_case(engine: LLMEngine, tokens: int, repeats: int, device: str) -> dict:
    mc = engine.model_config
    rng = random.Random(tokens)
    times = []
    for r in range(repeats + 1):
        rid = f"p{tokens}-{r}"
        engine.add_request(rid, [rng.randrange(mc.vocab_size) for _ in range(tokens)],
                           SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        _sync(device)
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        _sync(device)
        if r > 0:  # the first run warms up kernels and the allocator
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    flops = prefill_flops(engine, tokens)
    roof = flops / H200_BF16_FLOPS
    return {"tokens": tokens, "ms_median": t * 1e3, "flops": flops, "roofline_ms": roof * 1e3,
            "mfu": roof / t, "tokens_per_s": tokens / t}


def profile_decode(engine: LLMEngine, device: str, batch: int, context: int,
                   steps: int = 8) -> dict:
    """Where a decode step's GPU time goes: kernel totals by name, and the share of the
    step they fill (the rest is launch gaps and the host's part of the step)."""
    from torch.profiler import ProfilerActivity, profile

    mc = engine.model_config
    rng = random.Random(batch + context)
    ids = [f"prof{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, [rng.randrange(mc.vocab_size) for _ in range(context)],
                           SamplingParams(max_tokens=steps + 64, temperature=0.0,
                                          ignore_eos=True))
    while engine.scheduler.waiting or any(s.num_output_tokens < 2
                                          for s in engine.scheduler.running):
        engine.step()
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        _sync(device)
        wall = time.perf_counter() - t0
    for rid in ids:
        engine.abort_request(rid)
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    kernels = [{"name": e.key[:120], "calls_per_step": e.count / steps,
                "us_per_step": e.device_time_total / steps} for e in rows[:25]]
    busy = sum(e.device_time_total for e in rows) / steps
    gemm = sum(e.device_time_total for e in rows if any(
        k in e.key.lower() for k in ("gemm", "gemv", "cutlass", "nvjet", "sm90_xmma"))) / steps
    return {"batch": batch, "context": context, "step_ms": wall / steps * 1e3,
            "kernel_busy_ms": busy / 1e3,
            "gemm_ms": gemm / 1e3, "weight_bytes": param_bytes(engine),
            "vocab": mc.vocab_size, "top_kernels": kernels}


def report(label: str, d: dict) -> None:
    replay = (f"graph replay {d['graph_replay_ms']:.2f} ms (MBU {d['mbu_graph_replay']:.1%}), "
              if d.get("graph_replay_ms") else "")
    host = {k: round(v, 3) for k, v in (d.get("graph_host_ms") or {}).items()}
    print(f"{label} b={d['batch']:4d} ctx={d['context']:5d}: {d['step_ms_median']:8.2f} ms/step,"
          f" roofline {d['roofline_ms']:6.2f} ms, MBU {d['mbu']:.1%}, {replay}"
          f"CPU share {d['cpu_share']:.1%}, graph host {host}", flush=True)


# Kernel switches of the model runner a batch-1 case can flip: attribute -> setter.
SWITCHES = {"gemv_decode": "set_gemv_decode", "pdl": "set_pdl",
            "overlap_decode": "set_overlap_decode", "rope_fold": "set_rope_fold",
            "one_row_attention": "set_one_row_attention"}


def switched(set_switch, given: bool, case, label: str) -> tuple[dict, float] | None:
    """Times `case()` with a kernel switch of the runner flipped from `given` (the graphs
    recaptured), then flips it back and times the step again, so a comparison alternates
    in one process; None, and nothing timed, when the switch cannot flip here."""
    if set_switch(not given) == given:
        return None
    flipped = case()
    report(label, flipped)
    set_switch(given)
    again = case()
    report("decode", again)
    return flipped, again["step_ms_median"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--model", help="checkpoint dir instead of --preset with dummy weights")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--compare-eager", action="store_true",
                    help="also time every decode case with CUDA graphs off, same process")
    ap.add_argument("--profile", nargs="?", const="1:1024,64:2048", default=None,
                    metavar="BATCH:CONTEXT,...",
                    help="kernel-time breakdown of decode steps (torch profiler); "
                         "default cases 1:1024,64:2048")
    ap.add_argument("--no-fused-rope-kv", action="store_true",
                    help="FlashInfer RoPE + index_put KV writes instead of the fused kernel")
    ap.add_argument("--compare-unstaged", action="store_true",
                    help="also time every decode case without staging the next decode step "
                         "during the current one, same process")
    ap.add_argument("--compare-unfused-rope-kv", action="store_true",
                    help="also time every decode case without the fused RoPE + KV write "
                         "(graphs recaptured), alternating with the fused one, same process")
    ap.add_argument("--no-gemv", action="store_true",
                    help="batch-1 decode through cuBLAS and FlashInfer's small kernels "
                         "instead of Baton's GEMV kernels (norms and SwiGLU folded in)")
    ap.add_argument("--no-pdl", action="store_true",
                    help="launch Baton's Triton kernels without programmatic dependent launch")
    ap.add_argument("--compare", action="append", default=[], choices=sorted(SWITCHES),
                    help="also time each decode case with this runner switch flipped (graphs "
                         "recaptured), then again as given, same process; repeatable")
    ap.add_argument("--compare-gemv", action="append_const", const="gemv_decode",
                    dest="compare", help="the same as --compare gemv_decode")
    ap.add_argument("--one-row-config", metavar="BLOCK_T,MAX_SPLITS,WARPS[,MAX_CONTEXT]",
                    help="tiles of the batch-1 attention kernel (kernels/attention/one_row.py) "
                         "and the longest context it serves")
    ap.add_argument("--batches", default="1:1024,16:2048,64:2048,256:2048",
                    help="batch:context pairs")
    ap.add_argument("--compare-grammar", action="store_true",
                    help="also decode each batch under a JSON grammar (structured outputs)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=4096)
    ap.add_argument("--out", default="benchmarks/results/offline.json")
    args = ap.parse_args()

    cases = [tuple(int(x) for x in c.split(":")) for c in args.batches.split(",")]
    if args.one_row_config:
        one_row.DEFAULT_CONFIG = one_row.OneRowConfig(
            *(int(x) for x in args.one_row_config.split(",")))
    max_tokens = max(b * (c + 3 * args.steps + 64) for b, c in cases)
    blocks = max_tokens // 16 + args.prefill_tokens // 16 + 64
    cfg = EngineConfig(model=args.model or args.preset,
                       load_format="auto" if args.model else "dummy", device=args.device,
                       num_kv_blocks=blocks, max_num_batched_tokens=max(8192, args.prefill_tokens),
                       max_num_seqs=max(b for b, _ in cases), enable_prefix_caching=False,
                       attention_backend=args.attention_backend,
                       cuda_graphs=not args.no_cuda_graphs,
                       fused_rope_kv_write=not args.no_fused_rope_kv,
                       gemv_decode=not args.no_gemv,
                       pdl=not args.no_pdl)
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    _sync(args.device)
    load_s = time.perf_counter() - t0
    decode, eager, unfused, unstaged, flipped, constrained = [], [], [], [], [], []
    runner = engine.runner
    for batch, context in cases:
        case = functools.partial(decode_case, engine, batch, context, args.steps, args.device)
        decode.append(case())
        report("decode", decode[-1])
        if args.compare_unstaged and runner.stages_next_decode:
            runner.stage_decode = engine.scheduler.decode_lookahead = False
            unstaged.append(case())
            report("unstaged", unstaged[-1])
            runner.stage_decode = engine.scheduler.decode_lookahead = True
        if args.compare_unfused_rope_kv and runner.fused_rope_kv_write and (
                got := switched(runner.set_fused_rope_kv_write, True, case, "unfused")):
            unfused.append(got[0])
            decode[-1]["step_ms_repeat"] = got[1]
        for name in dict.fromkeys(args.compare):
            if name in ("gemv_decode", "rope_fold", "one_row_attention") and batch != 1:
                continue
            given = getattr(runner, name)
            setter = getattr(runner, SWITCHES[name])
            label = f"{name} {'off' if given else 'on'}"
            if got := switched(setter, given, case, label):
                flipped.append(got[0] | {"switch": name, "on": not given})
                decode[-1][f"step_ms_after_{name}_switch"] = got[1]
        if args.compare_grammar:
            from engine.structured import grammar_for

            constrained.append(decode_case(engine, batch, context, args.steps, args.device,
                                           grammar_for(LONG_JSON_ARRAY)))
            constrained[-1]["step_ms_ratio_to_unconstrained"] = \
                constrained[-1]["step_ms_median"] / decode[-1]["step_ms_median"]
            report("grammar", constrained[-1])
        if args.compare_eager and engine.runner.graphs is not None:
            engine.runner.use_graphs = False
            eager.append(case())
            engine.runner.use_graphs = True
            report("eager ", eager[-1])
    profiles = [profile_decode(engine, args.device, *(int(x) for x in c.split(":")))
                for c in args.profile.split(",")] if args.profile else []
    prefill = prefill_case(engine, args.prefill_tokens, 3, args.device)
    print(f"prefill {args.prefill_tokens} tokens: {prefill['ms_median']:.1f} ms, roofline "
          f"{prefill['roofline_ms']:.1f} ms, MFU {prefill['mfu']:.1%}", flush=True)
    path = write_result(args.out, {
        "benchmark": "offline",
        "model": args.model or args.preset, "load_format": cfg.load_format,
        "attention_backend": engine.runner.attention_backend,
        "dtype": str(engine.model_config.dtype),
        "load_seconds": load_s, "kv_blocks": blocks,
        "cuda_graphs": None if engine.runner.graph_report is None else
        vars(engine.runner.graph_report),
        "memory": vars(engine.runner.memory),
        "fused_rope_kv_write": engine.runner.fused_rope_kv_write,
        "switches": {name: getattr(runner, name) for name in SWITCHES},
        "one_row_config": dataclasses.asdict(one_row.DEFAULT_CONFIG),
        "decode_switched": flipped,
        "decode_eager": eager, "decode_unfused_rope_kv": unfused, "decode_unstaged": unstaged,
        "decode_kernel_profiles": profiles,
        "decode_under_grammar": constrained,
        "ceilings": {"hbm_bytes_per_s": H200_HBM_BYTES_PER_S, "bf16_flops": H200_BF16_FLOPS},
        "decode": decode, "prefill": prefill,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
