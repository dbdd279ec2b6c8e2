"""Where an nccl link's transfer spends its time, when asked (`NcclLink(trace=True)`): on
the host, from submit to the link thread taking the job, to all its work being queued, to
the host seeing it done; on the GPU, timing events around each chunk's gather or scatter
and each NCCL operation. Meant for the transfer benchmark (benchmarks/gpu_transfer.py),
where a 1k-token transfer took 0.5-1.6 ms against 0.43 for one contiguous send, and the
GPU work alone did not explain the difference. Off, it costs nothing: no events are made.
"""

from __future__ import annotations

import time


class TransferTrace:
    """Marks of one transfer. Host marks are perf_counter seconds; GPU marks are timing
    events recorded on a stream, read once the transfer has completed."""

    def __init__(self, submitted_at: float, events: list) -> None:
        self.submitted_at = submitted_at
        self.host: dict[str, float] = {"taken": time.perf_counter()}
        self._gpu: list[tuple[str, object]] = []
        # The link's pool of timing events, grown here and reused transfer after
        # transfer (the link runs one at a time): making an event per mark cost more host
        # time than the marks were meant to see.
        self._events = events

    def host_mark(self, name: str) -> None:
        self.host[name] = time.perf_counter()

    def gpu_mark(self, name: str, stream) -> None:
        import cupy

        if len(self._gpu) == len(self._events):
            self._events.append(cupy.cuda.Event(disable_timing=False))
        event = self._events[len(self._gpu)]
        event.record(stream)
        self._gpu.append((name, event))

    def summary(self) -> dict:
        """ms since submit for host marks, ms since the first GPU mark for GPU marks
        (call after the transfer's last event has completed)."""
        import cupy

        out = {f"host_{k}_ms": (v - self.submitted_at) * 1e3 for k, v in self.host.items()}
        if self._gpu:
            first = self._gpu[0][1]
            out["gpu"] = {name: cupy.cuda.get_elapsed_time(first, event)
                          for name, event in self._gpu}
        return out


class NoTrace:
    """The trace of an untraced link: every mark is a no-op."""

    def host_mark(self, name: str) -> None:
        pass

    def gpu_mark(self, name: str, stream) -> None:
        pass

    def summary(self) -> dict:
        return {}


NO_TRACE = NoTrace()
