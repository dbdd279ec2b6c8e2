"""Routing policy: a pure function of an index snapshot and worker loads, so it can be
table-tested and replayed from traces.

score(w) = credit(w) - load(w), in units of "blocks of prefill work":
- credit: the request's leading blocks w already holds, device blocks at full weight,
  host and disk blocks lower (they must be brought back up first);
- load: blocks of prompt waiting to be prefilled on w, plus a fraction of its active
  decode blocks, plus a term for how full its cache already is, so that a new prefix
  goes to the emptiest cache instead of piling onto one worker.
Ties never fall to a fixed worker: equal scores are broken at random.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields, replace

from router.prefix_index import Overlap


@dataclass(frozen=True)
class PolicyWeights:
    device: float = 1.0
    host: float = 0.6
    disk: float = 0.3
    queued_prefill: float = 1.0  # per block of prompt waiting on the worker
    active_decode: float = 0.1  # per block held by running sequences
    occupancy: float = 2.0  # times the fraction of the cache in use
    temperature: float = 0.0  # 0: argmax; > 0: softmax sampling over scores

    @classmethod
    def parse(cls, spec: str) -> PolicyWeights:
        """`"active_decode=0.05,host=0.5"`: the defaults with those fields changed
        (`--route-weights`); ValueError naming a bad field or value."""
        names = {f.name for f in fields(cls)}
        changes: dict[str, float] = {}
        for item in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = item.partition("=")
            if not sep or name.strip() not in names:
                raise ValueError(f"{item!r}: expected NAME=NUMBER with NAME one of "
                                 f"{', '.join(sorted(names))}")
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"{item!r}: {value!r} is not a number") from None
            if number < 0 or not math.isfinite(number):
                raise ValueError(f"{item!r}: weights are finite and >= 0")
            changes[name.strip()] = number
        return replace(cls(), **changes)


@dataclass(frozen=True)
class WorkerLoad:
    queued_prefill_tokens: int = 0
    active_blocks: int = 0
    cached_blocks: int = 0
    total_blocks: int = 1


def score(overlap: Overlap, load: WorkerLoad, block_size: int, w: PolicyWeights) -> float:
    credit = w.device * overlap.device + w.host * overlap.host + w.disk * overlap.disk
    penalty = (w.queued_prefill * load.queued_prefill_tokens / block_size
               + w.active_decode * load.active_blocks
               + w.occupancy * load.cached_blocks / max(load.total_blocks, 1))
    return credit - penalty


def choose(candidates: list[str], overlaps: dict[str, Overlap], loads: dict[str, WorkerLoad],
           block_size: int, weights: PolicyWeights, rng: random.Random) -> tuple[str, float]:
    """Pick a worker among `candidates`; returns it with its score."""
    if not candidates:
        raise ValueError("no candidate workers")
    scores = {c: score(overlaps.get(c, Overlap()), loads.get(c, WorkerLoad()), block_size,
                       weights) for c in candidates}
    if weights.temperature > 0:
        top = max(scores.values())
        probs = [math.exp((scores[c] - top) / weights.temperature) for c in candidates]
        return (picked := rng.choices(candidates, probs)[0]), scores[picked]
    best = max(scores.values())
    tied = [c for c in candidates if scores[c] >= best - 1e-9]
    picked = rng.choice(tied)
    return picked, scores[picked]


def prefill_placement(uncached_tokens: int, local_threshold: int, overflow_wait_s: float,
                      prefill_wait_s: float | None, decode_wait_s: float | None) -> str:
    """Where a disaggregated deployment prefills one request: "local" (on its decode
    worker: what that worker lacks of the prompt is at most `local_threshold` tokens),
    "overflow" (on its decode worker because every prefill worker is backed up) or
    "disaggregated" (on a prefill worker, KV shipped after).

    Overflow trades the decode pool's inter-token latency for time to first token, and
    only when that trade is lopsided: the least-backed-up prefill worker would keep the
    prompt waiting longer than `overflow_wait_s` (0: never overflow) and the decode
    worker's own queue of prefill is shorter. A prefill pool sized for the average load
    then rides out bursts instead of queueing them (Dynamo's conditional
    disaggregation does the same on the prefill queue's length). `None` waits are not
    known yet (no speed measured): they never trigger an overflow."""
    if uncached_tokens <= local_threshold:
        return "local"
    if overflow_wait_s > 0 and prefill_wait_s is not None and prefill_wait_s > overflow_wait_s \
            and (decode_wait_s is None or decode_wait_s < prefill_wait_s):
        return "overflow"
    return "disaggregated"
