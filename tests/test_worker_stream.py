"""EngineWorker: outputs that queue up while a stream's consumer is busy come out merged,
with nothing lost; with --stream-interval N the engine thread hands a request's tokens to
its stream N at a time after the first, and always the last."""

from __future__ import annotations

import asyncio
import contextlib

from engine.llm_engine import RequestOutput
from engine.sampling_params import SamplingParams
from engine.worker import EngineWorker, merge_outputs


def _out(tokens: list[int], finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id="r", prompt_token_ids=[1, 2], token_ids=list(tokens),
                         new_token_ids=tokens[-1:], text="".join(f"<{t}>" for t in tokens),
                         new_text=f"<{tokens[-1]}>", finished=finished,
                         finish_reason="length" if finished else None, num_cached_tokens=0,
                         logprobs=[-0.5] * len(tokens))


def test_merge_keeps_the_later_state_and_both_deltas() -> None:
    m = merge_outputs(_out([5, 6]), _out([5, 6, 7]))
    assert m.token_ids == [5, 6, 7] and m.new_token_ids == [6, 7]
    assert m.text == "<5><6><7>" and m.new_text == "<6><7>"


def test_merge_keeps_the_first_outputs_timing() -> None:
    import dataclasses

    first = dataclasses.replace(_out([5]), queue_seconds=0.25, first_token_seconds=0.5)
    m = merge_outputs(merge_outputs(first, _out([5, 6])), _out([5, 6, 7]))
    assert (m.queue_seconds, m.first_token_seconds) == (0.25, 0.5)
    assert merge_outputs(_out([5, 6]), _out([5, 6, 7])).queue_seconds is None


def test_engine_reports_each_requests_wait_and_first_token_time_once() -> None:
    """One running sequence at a time: the second request waits in the queue for the
    whole of the first one; only each request's first output carries its timing."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model="tiny-llama", load_format="dummy", device="cpu",
                                    num_kv_blocks=64, max_num_seqs=1))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine.add_request("a", list(range(1, 40)), params)
    engine.add_request("b", list(range(1, 30)), params)
    outs: dict[str, list[RequestOutput]] = {"a": [], "b": []}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id].append(o)
    for rid in "ab":
        first, *rest = outs[rid]
        assert first.queue_seconds >= 0 and first.first_token_seconds > 0
        assert all(o.queue_seconds is None and o.first_token_seconds is None for o in rest)
    a, b = outs["a"][0], outs["b"][0]
    assert b.queue_seconds > a.queue_seconds + a.first_token_seconds


def test_stream_merges_a_backlog_and_stops_at_the_finished_output() -> None:
    async def run() -> list[RequestOutput]:
        worker = EngineWorker(engine=None, loop=asyncio.get_running_loop())
        q: asyncio.Queue = asyncio.Queue()
        worker._streams["r"] = q
        q.put_nowait(_out([5]))
        got = []
        async for out in worker.stream("r", q):
            got.append(out)
            if len(got) == 1:  # the consumer was busy while three more steps finished
                for tokens in ([5, 6], [5, 6, 7], [5, 6, 7, 8]):
                    q.put_nowait(_out(tokens))
                q.put_nowait(_out([5, 6, 7, 8, 9], finished=True))
        return got

    got = asyncio.run(run())
    assert [o.new_token_ids for o in got] == [[5], [6, 7, 8, 9]]
    assert "".join(o.new_text for o in got) == "<5><6><7><8><9>"
    assert got[-1].finished and got[-1].token_ids == [5, 6, 7, 8, 9]


def test_stream_interval_hands_off_the_first_then_every_n_and_the_last() -> None:
    worker = EngineWorker(engine=None, loop=None, stream_interval=3)
    worker._streams["r"] = object()  # a live stream (only its key matters here)
    handed = []
    for n in range(1, 9):
        handed += worker._to_hand_off([_out(list(range(1, n + 1)), finished=n == 8)])
    assert [o.new_token_ids for o in handed] == [[1], [2, 3, 4], [5, 6, 7], [8]]
    assert [o.new_text for o in handed] == ["<1>", "<2><3><4>", "<5><6><7>", "<8>"]
    assert handed[-1].finished and handed[-1].token_ids == list(range(1, 9))
    assert worker._held == {}  # nothing kept for a finished request


def test_stream_interval_one_hands_off_every_output() -> None:
    worker = EngineWorker(engine=None, loop=None)
    outs = [_out([1]), _out([1, 2])]
    assert worker._to_hand_off(outs) is outs


BUSY = SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True)


@contextlib.asynccontextmanager
async def _busy_worker():
    """A started worker over tiny-llama on CPU, decoding one long request ("busy")."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model="tiny-llama", load_format="dummy", device="cpu",
                                    num_kv_blocks=256))
    worker = EngineWorker(engine, asyncio.get_running_loop())
    worker.start()
    try:
        await worker.admit("busy", lambda e: e.add_request("busy", [1, 2, 3], BUSY))
        yield worker
    finally:
        worker.stop()


def test_calls_run_at_the_next_step_boundary_while_the_engine_is_busy() -> None:
    """A call (an admission, an abort) made while the engine decodes runs before the step
    after the one in flight: the engine thread runs what was handed to it between steps.
    (When callers took the engine's lock from executor threads, the engine thread won it
    back for a second step 40% of the time here, mean 1.4 steps.)"""
    async def run() -> list[int]:
        async with _busy_worker() as worker:
            waits = []
            for _ in range(20):
                before = worker.num_steps
                waits.append(await worker.call(lambda e: worker.num_steps) - before)
                await asyncio.sleep(0.002)
            return waits

    waits = asyncio.run(run())
    # 0 or 1 step; 2 only if this thread lost the GIL for a whole step in between.
    assert max(waits) <= 2 and sum(waits) / len(waits) <= 1.1, waits


def test_a_cancelled_admission_leaves_nothing_running_or_holding_blocks() -> None:
    """The caller of a decode-side remote admission goes away while the commit waits for
    the engine thread: the commit still runs (it was handed over), and the abort posted
    behind it frees the blocks prepare_remote took."""
    async def run() -> tuple[int, int, list[str]]:
        async with _busy_worker() as worker:
            p = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
            adm = await worker.call(
                lambda e: e.prepare_remote("r", list(range(1, 100)), [5], [0.0], p))
            task = asyncio.ensure_future(worker.admit("r", lambda e: e.commit_remote(adm)))
            await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await worker.call(lambda e: e.abort_request("busy"))
            free = await worker.call(lambda e: e.block_pool.num_free)
            return free, worker.engine.block_pool.num_blocks, list(worker.engine.seqs)

    free, total, left = asyncio.run(run())
    assert (free, left) == (total, [])


def test_steady_calls_do_not_starve_the_steps() -> None:
    """Eight callers each handing over work every half millisecond (as a KV pull polls):
    the engine thread runs what was there when a step ended, then steps again."""
    import time

    async def run() -> int:
        async with _busy_worker() as worker:
            stop = asyncio.Event()

            async def poll() -> None:
                while not stop.is_set():
                    await worker.call(lambda e: time.sleep(0.0002))
                    await asyncio.sleep(0.0005)

            pollers = [asyncio.ensure_future(poll()) for _ in range(8)]
            start = worker.num_steps
            await asyncio.sleep(1.0)
            steps = worker.num_steps - start
            stop.set()
            await asyncio.gather(*pollers)
            return steps

    assert asyncio.run(run()) >= 20  # the old drain-until-empty loop made ~1
