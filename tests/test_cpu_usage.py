"""Per-thread CPU accounting used by livemask bench."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from livemask.cpu_usage import NATIVE, CpuSnapshot, cpu_report


def test_report_divides_cpu_per_thread_name_by_frames() -> None:
    start = CpuSnapshot(t=10.0, threads={1: ("infer", 1.0), 2: ("loop", 0.5), 3: (NATIVE, 0.2)},
                        machine_busy_s=100.0)
    end = CpuSnapshot(t=12.0, threads={1: ("infer", 2.0), 2: ("loop", 0.6), 3: (NATIVE, 0.7),
                                       4: (NATIVE, 0.1)},  # thread 4 started in between
                      machine_busy_s=103.5)
    r = cpu_report(start, end, frames=50)
    assert r is not None
    assert r["cpu_ms_per_frame"] == {"infer": 20.0, NATIVE: 12.0, "loop": 2.0}
    assert list(r["cpu_ms_per_frame"]) == ["infer", NATIVE, "loop"]  # largest first
    assert r["process_cores"] == pytest.approx(0.85)  # 1.7 s of CPU in 2 s
    assert r["machine_busy_cores"] == pytest.approx(1.75)
    assert r["wall_s"] == 2.0 and r["frames"] == 50


def test_report_is_none_without_data() -> None:
    snap = CpuSnapshot(t=1.0, threads={1: ("a", 1.0)})
    assert cpu_report(CpuSnapshot(t=0.0), snap, 10) is None  # no /proc
    assert cpu_report(CpuSnapshot(t=0.0, threads={1: ("a", 0.0)}), snap, 0) is None
    later = CpuSnapshot(t=2.0, threads={1: ("a", 2.0)})
    r = cpu_report(snap, later, 1)
    assert r is not None and r["machine_busy_cores"] is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux /proc")
def test_snapshot_attributes_cpu_to_the_thread_that_spent_it() -> None:
    stop, spun = threading.Event(), threading.Event()

    def spin() -> None:  # 200 ms of its own CPU, however loaded the machine is
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.2:
            sum(range(1000))
        spun.set()
        stop.wait(30)

    start = CpuSnapshot.take()
    worker = threading.Thread(target=spin, name="spinner")
    worker.start()
    try:
        assert spun.wait(30)
        end = CpuSnapshot.take()  # while the spinner is alive
    finally:
        stop.set()
        worker.join()
    r = cpu_report(start, end, frames=1)
    assert r is not None and r["machine_busy_cores"] is not None
    assert r["cpu_ms_per_frame"].get("spinner", 0.0) >= 150  # 200 ms, in 10 ms ticks
