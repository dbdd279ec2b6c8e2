"""EngineWorker.stream: outputs that queue up while the consumer is busy come out merged,
with nothing lost, and the stream ends with the finished output."""

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
