"""EngineWorker: outputs that queue up while a stream's consumer is busy come out merged,
with nothing lost; with --stream-interval N the engine thread hands a request's tokens to
its stream N at a time after the first, and always the last."""

from __future__ import annotations

import asyncio

from engine.llm_engine import RequestOutput
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
