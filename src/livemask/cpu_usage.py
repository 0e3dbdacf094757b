"""CPU time per thread of this process, and of the whole machine, from Linux ``/proc``.

``livemask bench`` takes a :class:`CpuSnapshot` when the pipeline run starts acquiring and
the last one while it still acquires, and reports the difference per analysed frame: which
thread (camera, event loop, inference, analysis, the model runtime's own native threads)
spent how much CPU, and how busy the machine was. Elsewhere than Linux the snapshots are
empty and the report is ``None``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CpuSnapshot", "cpu_report"]

_PROC = Path("/proc")
#: Name for threads Python did not start (the model runtime's workers, ZeroMQ's I/O thread).
NATIVE = "native threads"


@dataclass
class CpuSnapshot:
    """CPU seconds per thread of this process and busy seconds of the machine, at ``t``."""

    t: float = field(default_factory=time.monotonic)
    threads: dict[int, tuple[str, float]] = field(default_factory=dict)
    machine_busy_s: float | None = None

    @classmethod
    def take(cls) -> CpuSnapshot:
        """Read ``/proc`` now (an empty snapshot where there is none)."""
        snap = cls()
        names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        with contextlib.suppress(OSError):
            for task in (_PROC / "self" / "task").iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    tid = int(task.name)
                    cpu_s = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
                    snap.threads[tid] = (names.get(tid, NATIVE), cpu_s)
        with contextlib.suppress(OSError, ValueError, IndexError):
            ticks = [int(v) for v in (_PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
            snap.machine_busy_s = (sum(ticks) - ticks[3] - ticks[4]) / tick  # all but idle, iowait
        return snap


def cpu_report(start: CpuSnapshot, end: CpuSnapshot, frames: int) -> dict[str, Any] | None:
    """CPU ms per frame by thread name (threads of one name summed; threads that ended
    between the snapshots are not counted), this process's and the machine's busy cores."""
    wall = end.t - start.t
    if not start.threads or not end.threads or frames <= 0 or wall <= 0:
        return None
    by_name: dict[str, float] = {}
    for tid, (name, cpu_s) in end.threads.items():
        before = start.threads.get(tid, (name, 0.0))[1]
        by_name[name] = by_name.get(name, 0.0) + max(0.0, cpu_s - before)
    process_s = sum(by_name.values())
    machine = None
    if start.machine_busy_s is not None and end.machine_busy_s is not None:
        machine = round((end.machine_busy_s - start.machine_busy_s) / wall, 2)
    return {
        "frames": frames,
        "wall_s": round(wall, 3),
        "process_cores": round(process_s / wall, 2),
        "machine_busy_cores": machine,
        "cpu_ms_per_frame": {
            name: round(s / frames * 1e3, 2)
            for name, s in sorted(by_name.items(), key=lambda kv: -kv[1])
            if s > 0
        },
    }
