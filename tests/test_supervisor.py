"""`baton serve`'s worker supervisor (cluster/supervisor.py) on real processes: a worker
that exits cleanly stays down; one that fails is started again, with a longer wait after
each failed start. (Restarting a real worker on its address, end to end:
tests/test_serving_errors.py.)"""

from __future__ import annotations

import logging
import subprocess
import sys
import time

from cluster.launcher import WorkerProcess
from cluster.supervisor import Backoff, RestartPolicy, WorkerSupervisor


def exited(code: int, address: str) -> WorkerProcess:
    proc = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
    proc.wait()
    # Started again, these flags make `baton worker` exit at once (argparse rejects them).
    return WorkerProcess("decode", proc, address, args=["--no-such-flag"])


def test_clean_exits_stay_down_and_failures_restart_with_backoff(caplog) -> None:
    caplog.set_level(logging.INFO, logger="cluster.supervisor")
    procs = [exited(0, "127.0.0.1:1"), exited(3, "127.0.0.1:2")]
    sup = WorkerSupervisor(procs, RestartPolicy(first_delay_s=0.05, max_delay_s=0.2,
                                                ready_timeout_s=60)).start()
    try:
        deadline = time.monotonic() + 60
        while caplog.text.count("did not come back at 127.0.0.1:2") < 3:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.1)
    finally:
        sup.stop()
    text = caplog.text
    assert text.count("worker 127.0.0.1:1 stopped (status 0); not restarted") == 1
    assert "127.0.0.1:1 (pid" not in text  # never scheduled
    assert text.count("127.0.0.1:2 (pid") == 1  # scheduled once, then retried
    waits = [line.rsplit(" in ", 1)[1] for line in text.splitlines()
             if "restarting it in" in line or "trying again in" in line]
    assert waits[:4] == ["0.05 s", "0.10 s", "0.20 s", "0.20 s"], waits  # up to the max
    assert "(it exited with code 2)" in text  # why each start failed
    assert procs[1].proc.returncode == 3  # still the failed one: no start succeeded


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_stable_run() -> None:
    b = Backoff(first_s=1.0, cap_s=5.0, stable_s=60.0)
    assert [b.next(lived_s=3.0) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert b.next(lived_s=60.0) == 1.0  # it ran long enough: not a crash loop
    assert b.next(lived_s=0.5) == 2.0
