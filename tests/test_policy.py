"""Routing policy, table-driven: overlap credit by tier minus load; new prefixes spread to
the emptier cache; ties are broken at random, never by position."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from router.policy import PolicyWeights, WorkerLoad, choose, prefill_placement, score
from router.prefix_index import Overlap

W = PolicyWeights()
EMPTY = WorkerLoad(total_blocks=100)

CASES = [
    # name, overlaps, loads, expected winner
    ("more device blocks wins", {"a": Overlap(device=8), "b": Overlap(device=2)},
     {"a": EMPTY, "b": EMPTY}, "a"),
    ("device beats the same count on disk", {"a": Overlap(disk=8), "b": Overlap(device=8)},
     {"a": EMPTY, "b": EMPTY}, "b"),
    ("host beats disk", {"a": Overlap(host=5), "b": Overlap(disk=5)},
     {"a": EMPTY, "b": EMPTY}, "a"),
    ("a long prefill queue outweighs a small hit",
     {"a": Overlap(device=2), "b": Overlap()},
     {"a": WorkerLoad(queued_prefill_tokens=4096, total_blocks=100), "b": EMPTY}, "b"),
    ("a big hit outweighs a short queue",
     {"a": Overlap(device=40), "b": Overlap()},
     {"a": WorkerLoad(queued_prefill_tokens=160, total_blocks=100), "b": EMPTY}, "a"),
    ("a miss goes to the emptier cache", {},
     {"a": WorkerLoad(cached_blocks=90, total_blocks=100),
      "b": WorkerLoad(cached_blocks=10, total_blocks=100)}, "b"),
    ("busy decode worker loses a tie", {},
     {"a": WorkerLoad(active_blocks=50, total_blocks=100), "b": EMPTY}, "b"),
]


@pytest.mark.parametrize("name,overlaps,loads,winner", CASES, ids=[c[0] for c in CASES])
def test_policy_table(name, overlaps, loads, winner):
    picked, _ = choose(["a", "b"], overlaps, loads, 16, W, random.Random(0))
    assert picked == winner


def test_ties_are_spread_not_fixed():
    picks = Counter(choose(["a", "b", "c"], {}, {}, 16, W, random.Random(s))[0]
                    for s in range(300))
    assert set(picks) == {"a", "b", "c"} and min(picks.values()) > 60


def test_temperature_samples_by_score():
    w = PolicyWeights(temperature=1.0)
    overlaps = {"a": Overlap(device=3)}
    picks = Counter(choose(["a", "b"], overlaps, {}, 16, w, random.Random(s))[0]
                    for s in range(400))
    assert picks["a"] > picks["b"] > 0  # e^3 : 1, but b still gets some


def test_score_units():
    assert score(Overlap(device=4, host=2, disk=2), EMPTY, 16, W) == pytest.approx(
        4 + 2 * W.host + 2 * W.disk)
    assert score(Overlap(), WorkerLoad(queued_prefill_tokens=32, total_blocks=10), 16,
                 W) == pytest.approx(-2.0)


@pytest.mark.parametrize(("picked", "overlaps", "outcome"), [
    ("a", {}, "new_prefix"),
    ("a", {"a": Overlap(device=3), "b": Overlap(device=1)}, "best_prefix"),
    ("b", {"a": Overlap(device=3), "b": Overlap(device=1)}, "diverted"),
    ("b", {"a": Overlap(device=2), "b": Overlap(host=2)}, "best_prefix"),  # ties count
    ("a", {"c": Overlap(device=5)}, "new_prefix"),  # c is not a candidate (failed)
])
def test_pick_outcome(picked, overlaps, outcome):
    from router.kv_routing import KVRouter

    assert KVRouter.outcome(picked, ["a", "b"], overlaps) == outcome


def test_weights_parse():
    w = PolicyWeights.parse("active_decode=0.05, host=0.5,")
    assert (w.active_decode, w.host, w.device) == (0.05, 0.5, PolicyWeights().device)
    assert PolicyWeights.parse("") == PolicyWeights()
    for bad, says in [("devce=1", "devce"), ("host", "NAME=NUMBER"), ("host=x", "'x'"),
                      ("disk=-1", ">= 0"), ("disk=inf", ">= 0")]:
        with pytest.raises(ValueError, match=says):
            PolicyWeights.parse(bad)


# (uncached tokens, --local-prefill-threshold, --prefill-overflow-wait, least prefill wait,
#  the decode worker's own prefill wait) -> where the prompt is prefilled.
PLACEMENTS = [
    ("short remainder stays local", (20, 32, 0.0, None, None), "local"),
    ("at the threshold still local", (32, 32, 0.0, 0.0, 0.0), "local"),
    ("long prompt, overflow off", (4000, 32, 0.0, 9.0, 0.0), "disaggregated"),
    ("prefill pool keeps up", (4000, 0, 1.0, 0.4, 0.0), "disaggregated"),
    ("prefill pool backed up", (4000, 0, 1.0, 2.5, 0.3), "overflow"),
    ("decode worker as backed up", (4000, 0, 1.0, 2.5, 2.5), "disaggregated"),
    ("decode worker's speed unknown", (4000, 0, 1.0, 2.5, None), "overflow"),
    ("no prefill speed measured yet", (4000, 0, 1.0, None, 0.0), "disaggregated"),
    ("wait equal to the limit", (4000, 0, 1.0, 1.0, 0.0), "disaggregated"),
]


@pytest.mark.parametrize("args,where", [c[1:] for c in PLACEMENTS],
                         ids=[c[0] for c in PLACEMENTS])
def test_prefill_placement(args, where):
    assert prefill_placement(*args) == where


def _prefill_worker(address: str, speed: float, pending: int = 0, reported: int = 0):
    from engine.rpc import worker_pb2 as pb
    from router.workers import WorkerHandle

    w = WorkerHandle(address, "prefill", stub=None, channel=None, healthy=True,
                     pending_prefill_tokens=pending)
    w.status = pb.WorkerStatus(prefill_tokens_per_s=speed, queued_prefill_tokens=reported)
    return w


def test_shortest_prefill_wait_counts_idle_and_unmeasured_workers():
    """The overflow rule's "least-backed-up prefill worker": an idle worker waits 0 even
    before it has measured a speed; an unmeasured busy one is timed at the fastest
    measured speed; a queue other routers filled (the worker's own report) counts."""
    from router.workers import WorkerPool

    busy = _prefill_worker("a", speed=1000.0, pending=3000)
    pool = WorkerPool(prefill=[busy, _prefill_worker("b", speed=0.0)])
    assert pool.shortest_prefill_wait() == (0.0, 1000.0)  # b is idle, just restarted
    pool = WorkerPool(prefill=[busy, _prefill_worker("b", speed=0.0, pending=500)])
    assert pool.shortest_prefill_wait() == (0.5, 1000.0)
    pool = WorkerPool(prefill=[busy, _prefill_worker("b", speed=2000.0, reported=8000)])
    assert pool.shortest_prefill_wait() == (3.0, 2000.0)  # b: 8000 / 2000 = 4 s
    pool = WorkerPool(prefill=[_prefill_worker("a", speed=0.0, pending=10)])
    assert pool.shortest_prefill_wait() == (None, None)  # nothing to time it with


def test_blocks_of_requests_ended_since_the_status_poll_do_not_count_as_load():
    """A status up to 0.5 s old still counts the blocks of a request that has finished
    since: the router subtracts the blocks of its own requests that ended after the poll
    (having started before it), so a worker that just finished a long prompt is not
    passed over for the next request whose prefix it holds."""
    from engine.rpc import worker_pb2 as pb
    from router.kv_routing import _load
    from router.workers import WorkerHandle

    w = WorkerHandle("a", "decode", stub=None, channel=None, healthy=True,
                     status=pb.WorkerStatus(used_blocks=188, total_blocks=1000))
    assert _load(w).active_blocks == 188
    w.blocks_freed_since_status = 188
    assert _load(w).active_blocks == 0
    w.blocks_freed_since_status, w.in_flight = 500, 1  # never below what is in flight
    assert _load(w).active_blocks == 4
