"""Attention backend choice and FlashInfer's host-side page lists (CPU), and the GPU fast
path against the torch reference (GPU only; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from cluster.launcher import worker_args_from
from cluster.worker_main import add_engine_args, engine_config
from engine.config import ConfigError, EngineConfig
from kernels.attention import resolve_attention_backend
from kernels.attention.flashinfer_backend import DecodePageCache, PageLists


def test_page_lists_are_flashinfer_csr() -> None:
    # Three sequences, block size 4: a fresh prefill, a cached prefix + chunk, a decode.
    pages = PageLists.build(tables=[[7, 3], [1, 2, 9, 5], [4]], query_lens=[6, 3, 1],
                            seq_lens=[6, 13, 4], block_size=4)
    assert pages.qo_indptr.tolist() == [0, 6, 9, 10]
    assert pages.kv_indptr.tolist() == [0, 2, 6, 7]
    # Only the blocks holding context are listed, even when the table has more.
    assert pages.kv_indices.tolist() == [7, 3, 1, 2, 9, 5, 4]
    assert pages.last_page_len.tolist() == [2, 1, 4]
    assert all(t.dtype == torch.int32 for t in (pages.qo_indptr, pages.kv_indptr,
                                                 pages.kv_indices, pages.last_page_len))


def test_decode_page_cache_matches_a_rebuild_as_tables_grow_and_refill() -> None:
    """The incremental mirror gives the same page lists as building from the lists, while
    tables grow, with graph padding, and after a table is freed and refilled (new epoch)."""
    cache = DecodePageCache()
    bs = 4
    tables = {"a": [7, 3], "b": [1, 2, 9]}
    lens = {"a": 6, "b": 9}
    epoch = {"a": 0, "b": 0}
    for step in range(12):
        rows = ["a", "b"]
        keys = [f"{r}#{epoch[r]}" for r in rows]
        got = cache.page_lists(keys, [tables[r] for r in rows], [lens[r] for r in rows], bs,
                               pad_rows=2, pad_block=99)
        want = PageLists.build([tables[r] for r in rows] + [[99]] * 2, [1] * 4,
                               [lens[r] for r in rows] + [1, 1], bs)
        for field in ("qo_indptr", "kv_indptr", "kv_indices", "last_page_len"):
            assert getattr(got, field).tolist() == getattr(want, field).tolist(), (step, field)
            assert getattr(got, field).dtype == torch.int32
        for r in rows:  # one token each; a new block when the last one is full
            lens[r] += 1
            if lens[r] > bs * len(tables[r]):
                tables[r].append(100 + 10 * step + len(r))
        if step == 5:  # "b" preempted: blocks freed, refilled with other blocks, longer
            tables["b"] = [40, 41, 42, 43, 44]
            epoch["b"] += 1
    assert len(cache) == 3  # a, b#0 (not yet evicted), b#1


def test_auto_backend_is_torch_on_cpu_and_explicit_flashinfer_says_why() -> None:
    cpu = torch.device("cpu")
    assert resolve_attention_backend("auto", 128, cpu, torch.bfloat16) == "torch"
    assert resolve_attention_backend("torch", 128, cpu, torch.bfloat16) == "torch"
    with pytest.raises(ValueError, match="--attention-backend flashinfer: FlashInfer needs a CUDA"):
        resolve_attention_backend("flashinfer", 128, cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown 'flash'"):
        resolve_attention_backend("flash", 128, cpu, torch.bfloat16)


def test_engine_config_rejects_unknown_backend_naming_the_flag() -> None:
    with pytest.raises(ConfigError, match="--attention-backend"):
        EngineConfig(model="x", attention_backend="xformers")


def test_fast_path_flags_reach_the_workers() -> None:
    import argparse

    p = argparse.ArgumentParser()
    add_engine_args(p)
    p.add_argument("--kv-transfer-dummy", default=None)
    args = p.parse_args(["--attention-backend", "torch", "--no-cuda-graphs",
                         "--gpu-memory-utilization", "0.45", "--stream-interval", "4",
                         "--no-gemv-decode", "--no-pdl", "--overlap-decode-max-rows", "0",
                         "--no-one-row-attention"])
    cfg = engine_config(args, "tiny-llama")
    assert (cfg.attention_backend, cfg.cuda_graphs, cfg.gpu_memory_utilization,
            cfg.gemv_decode, cfg.pdl, cfg.overlap_decode_max_rows, cfg.one_row_attention) == \
        ("torch", False, 0.45, False, False, 0, False)
    forwarded = worker_args_from(args, "tiny-llama")
    assert forwarded[forwarded.index("--attention-backend") + 1] == "torch"
    assert "--no-cuda-graphs" in forwarded and "--no-gemv-decode" in forwarded
    assert "--no-pdl" in forwarded and "--no-one-row-attention" in forwarded
    assert forwarded[forwarded.index("--overlap-decode-max-rows") + 1] == "0"
    assert forwarded[forwarded.index("--gpu-memory-utilization") + 1] == "0.45"
    assert forwarded[forwarded.index("--stream-interval") + 1] == "4"


@pytest.mark.gpu
def test_flashinfer_path_matches_torch_path_on_gpu() -> None:
    """Greedy tokens of the fast path (FlashInfer, fused kernels, decode graphs) equal the
    torch reference path's on a head_dim-128 model, mixed prompt lengths, one batch."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    prompts = [[(7 * i + j) % 4000 + 1 for j in range(n)] for i, n in
               enumerate([5, 17, 130, 300, 64, 1, 999])]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = {}
    for backend in ("flashinfer", "torch"):
        llm = LLM("mini-llama", load_format="dummy", device="cuda", dtype="bfloat16",
                  num_kv_blocks=512, attention_backend=backend)
        assert llm.engine.runner.attention_backend == backend
        outs[backend] = [o.token_ids for o in llm.generate(prompts, params)]
        del llm
    assert outs["flashinfer"] == outs["torch"]


@pytest.mark.gpu
def test_staged_decode_steps_match_unstaged_and_torch_as_rows_finish_and_join() -> None:
    """Decode steps staged while the previous one runs (CUDA graphs), and launched before
    the host has seen the previous step's tokens (overlap), give exactly the tokens and
    logprobs of unstaged steps (same kernels), and the torch path's tokens, while rows
    finish at different steps (staging misses), a request joins mid-decode (a mixed step in
    between; a step launched ahead is wasted), one is aborted (likewise) and tables grow
    across block boundaries."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    prompts = [[(11 * i + j) % 4000 + 1 for j in range(n)] for i, n in
               enumerate([5, 40, 130, 16, 77])]
    max_tokens = [40, 9, 33, 17, 25]
    outs, hits = {}, {}
    for mode in ("overlap", "staged", "unstaged", "torch"):
        engine = LLMEngine(EngineConfig(
            model="mini-llama", load_format="dummy", device="cuda", dtype="bfloat16",
            num_kv_blocks=512, attention_backend="torch" if mode == "torch" else "flashinfer"))
        graphs = engine.runner.graphs
        if mode == "unstaged":
            engine.runner.stage_decode = engine.scheduler.decode_lookahead = False
        assert engine.runner.set_overlap_decode(mode == "overlap") == (mode == "overlap")
        if graphs is not None:
            graphs.host_timer = {}
        done: dict[str, tuple[list[int], list[float]]] = {}
        for i in range(4):
            engine.add_request(str(i), prompts[i], SamplingParams(
                max_tokens=max_tokens[i], temperature=0.0, ignore_eos=True))
        steps = 0
        while engine.has_unfinished():
            if steps == 12:
                engine.add_request("4", prompts[4], SamplingParams(
                    max_tokens=max_tokens[4], temperature=0.0, ignore_eos=True))
            if steps == 20:
                engine.abort_request("0")
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = (o.token_ids, o.logprobs)
            steps += 1
        outs[mode] = done
        hits[mode] = None if graphs is None else graphs.host_timer
        done.pop("0", None)  # aborted: its last output depends on when the abort lands
        del engine
    assert outs["overlap"] == outs["staged"] == outs["unstaged"]  # bit for bit
    assert {k: v[0] for k, v in outs["staged"].items()} == \
        {k: v[0] for k, v in outs["torch"].items()}
    assert hits["staged"].get("staged_hits", 0) > 20
    assert hits["unstaged"].get("staged_hits", 0) == 0
    launched, used = hits["overlap"].get("launched", 0), hits["overlap"].get("launched_used", 0)
    assert used > 20 and launched > used  # the join and the abort wasted one each
    assert hits["staged"].get("launched", 0) == 0


def test_decode_table_keys_name_the_sequence_not_the_request_id() -> None:
    """The offline API reuses request ids ("0", "1", ... per generate call): the key that
    decode graphs mirror block tables under must still differ for a new sequence, or a
    new request would read pages of an old one's table."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from engine.scheduler import ScheduledSeq, SchedulerOutput
    from engine.sequence import Sequence

    llm = LLM("tiny-llama", load_format="dummy", num_kv_blocks=64)
    keys = []
    for _ in range(2):
        seq = Sequence("0", [5, 6, 7], SamplingParams(max_tokens=4))
        seq.block_table = [3]
        step = llm.engine.runner._prepare(SchedulerOutput(scheduled=[ScheduledSeq(seq, 3, True)]))
        keys += step.table_keys
    assert keys[0] != keys[1]
    llm.close()
