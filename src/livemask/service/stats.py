"""Counters and latency percentiles of the running pipeline."""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

import numpy as np

from livemask.service.frames import Frame

#: (name, from-timestamp, to-timestamp) of each reported latency.
LATENCY_SPANS = (
    ("infer", "acquired", "inferred"),
    ("analyse", "inferred", "analysed"),
    ("publish", "analysed", "published"),
    ("end_to_end", "acquired", "published"),
)


class LatencyWindow:
    """The most recent ``size`` latencies (ms) of each span."""

    def __init__(self, size: int = 2000) -> None:
        self._values: dict[str, deque[float]] = {
            name: deque(maxlen=size) for name, _, _ in LATENCY_SPANS
        }

    def add(self, frame: Frame) -> None:
        """Record the spans of an analysed, published frame."""
        for name, start, end in LATENCY_SPANS:
            if start in frame.t and end in frame.t:
                self._values[name].append((frame.t[end] - frame.t[start]) * 1e3)

    def percentiles(self) -> dict[str, dict[str, float | None]]:
        """p50/p95/p99 in ms per span (None before any sample)."""
        out: dict[str, dict[str, float | None]] = {}
        for name, values in self._values.items():
            if values:
                p = np.percentile(np.fromiter(values, float), [50, 95, 99])
                out[name] = {"p50": round(p[0], 2), "p95": round(p[1], 2), "p99": round(p[2], 2)}
            else:
                out[name] = {"p50": None, "p95": None, "p99": None}
        return out

    def values(self, name: str) -> list[float]:
        """All retained latencies of one span, in ms."""
        return list(self._values[name])


class PipelineCounters:
    """Monotonic frame counters."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def incr(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        self.counts[name] += n

    def snapshot(self) -> dict[str, Any]:
        """The counters as a plain dict (frames_acquired, frames_analysed, ...).

        ``missing`` counts image events that delivered no frame (failed snaps)."""
        keys = ("acquired", "analysed", "skipped", "published", "failed", "missing")
        return {f"frames_{k}": int(self.counts[k]) for k in keys}
