"""CUDA graphs of staged nccl transfers. Queued from Python, a staged transfer's chunk
costs ~0.1 ms of host time (a Triton launch, an NCCL call, event records), as long as
the 32 MiB send it feeds takes on NVLink: below ~4k tokens the GPU waited on the host
(nccl_trace). Captured once per chunk layout and replayed, a whole transfer is one graph
launch.

A graph holds its NCCL operations' plans, and NCCL's communicator destroy (abort too)
waits until every graph that captured it is gone (NCCL >= 2.26 polls for them): the
link destroys its graphs before it aborts its communicator (`close`). A graph still
running when destroyed is freed by CUDA once it completes, and an abort ends its NCCL
kernels, so that order cannot hang.

Capture uses CUDA's thread-local mode: the engine's own threads keep allocating and
launching meanwhile, and nothing they do can invalidate the capture or fail because of
it. A capture that fails (an unsafe call on this thread, a runtime without graph
support) raises, and that transfer fails like any other link error; later links of the
process queue eagerly (`GRAPHS_BROKEN`)."""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)

# Set, with the reason, once a capture failed in this process: later transfers queue
# their chunks one by one as before graphs.
GRAPHS_BROKEN: list[str] = []


def graphs_unavailable() -> str | None:
    """Why staged transfers cannot be captured here, or None."""
    if GRAPHS_BROKEN:
        return GRAPHS_BROKEN[0]
    try:
        from cupy.cuda import runtime
    except ImportError as e:  # pragma: no cover - the nccl backend needs CuPy anyway
        return f"CuPy is missing: {e}"
    missing = [name for name in ("streamBeginCapture", "streamEndCapture", "graphInstantiate",
                                 "graphLaunch", "graphDestroy", "graphExecDestroy",
                                 "streamCaptureModeThreadLocal")
               if not hasattr(runtime, name)]
    return f"CuPy's runtime lacks {', '.join(missing)}" if missing else None


class TransferGraphs:
    """The executable graphs of one side of one link, by chunk layout, least recently
    used dropped past `limit`. Used on the link thread; `close` may come from any
    thread (an abort), so the table is locked."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._execs: collections.OrderedDict[Hashable, int] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        self.captures = 0
        self.capture_seconds = 0.0

    def launch(self, key: Hashable, stream, record: Callable[[], None]) -> bool:
        """Launch the graph for `key` on `stream` (a CuPy stream), capturing it first
        from `record` (which queues the transfer's work on `stream` and on streams that
        fork from it and join it again). False if the link was closed meanwhile: nothing
        was launched."""
        from cupy.cuda import runtime

        with self._lock:
            if self._closed:
                return False
            graph_exec = self._execs.get(key)
            if graph_exec is None:
                graph_exec = self._capture(stream, record)
                self._execs[key] = graph_exec
                while len(self._execs) > self.limit:
                    _, old = self._execs.popitem(last=False)
                    runtime.graphExecDestroy(old)
            else:
                self._execs.move_to_end(key)
            runtime.graphLaunch(graph_exec, stream.ptr)
            return True

    def _capture(self, stream, record: Callable[[], None]) -> int:
        from cupy.cuda import runtime

        started = time.perf_counter()
        runtime.streamBeginCapture(stream.ptr, runtime.streamCaptureModeThreadLocal)
        try:
            record()
        except BaseException as e:
            # leave the stream usable and drop the partial graph; the first error is
            # the one to report
            with contextlib.suppress(Exception):
                runtime.graphDestroy(runtime.streamEndCapture(stream.ptr))
            self._broken(f"capturing a staged transfer failed: {e!r}")
            raise
        try:
            graph = runtime.streamEndCapture(stream.ptr)
        except Exception as e:
            self._broken(f"ending a staged transfer's capture failed: {e!r}")
            raise
        try:
            graph_exec = runtime.graphInstantiate(graph)
        except Exception as e:
            self._broken(f"instantiating a staged transfer's graph failed: {e!r}")
            raise
        finally:
            runtime.graphDestroy(graph)
        self.captures += 1
        self.capture_seconds += time.perf_counter() - started
        return graph_exec

    @staticmethod
    def _broken(reason: str) -> None:
        if not GRAPHS_BROKEN:
            GRAPHS_BROKEN.append(reason)
            log.warning("nccl links: %s; later links queue staged transfers without "
                        "CUDA graphs", reason)

    def close(self) -> None:
        """Destroy every graph (before the communicator is aborted or destroyed) and
        capture no more."""
        from cupy.cuda import runtime

        with self._lock:
            self._closed = True
            execs, self._execs = list(self._execs.values()), collections.OrderedDict()
        for graph_exec in execs:
            try:
                runtime.graphExecDestroy(graph_exec)
            except Exception as e:  # a dead context: nothing left to free
                log.warning("nccl link: destroying a transfer graph failed: %s", e)
