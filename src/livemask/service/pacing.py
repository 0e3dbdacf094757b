"""When to take the next frame for inference, so that it reaches analysis just in time.

With two stage threads and analysis the slower stage (the GPU path at 2048²: model ≈ 4 ms,
analysis ≈ 13 ms), a frame inferred as soon as the model is free waits behind the busy
analysis for most of an analysis period, holding an older frame than the camera has by
then. Taking it for inference one model time (plus a margin) before analysis is predicted
to be free removes that wait from its latency without leaving analysis idle. The
predictions are the medians of each stage's recent durations; when the model is the slower
stage (the CPU path) analysis is always free within one model time, so nothing waits.
"""

from __future__ import annotations

import statistics
from collections import deque

#: Stage durations remembered per stage (the median of these predicts the next one).
RECENT = 15
#: Durations needed before predicting at all (before that, no frame is held back).
MIN_SAMPLES = 3
#: Taken this much early, plus ``MARGIN_FRACTION`` of an analysis time, against jitter: a
#: frame a little early waits that long for analysis; one late leaves analysis idle.
MARGIN_S = 0.002
MARGIN_FRACTION = 0.1


class RecentDurations:
    """The last ``RECENT`` durations of one stage, in seconds."""

    def __init__(self) -> None:
        self._values: deque[float] = deque(maxlen=RECENT)

    def add(self, seconds: float) -> None:
        """Record one duration."""
        self._values.append(seconds)

    def median(self) -> float | None:
        """The typical duration, or None before ``MIN_SAMPLES`` are known."""
        if len(self._values) < MIN_SAMPLES:
            return None
        return statistics.median(self._values)


def hold_before_inference(
    now: float, analysis_started: float, infer: RecentDurations, analyse: RecentDurations
) -> float:
    """Seconds to wait before taking the next frame for inference (0: take it now).

    ``analysis_started`` is when the busy analysis stage took its frame (same clock as
    ``now``). The next frame should come out of the model just as analysis is free: at
    ``analysis_started + analyse - infer``, less the margin."""
    infer_s, analyse_s = infer.median(), analyse.median()
    if infer_s is None or analyse_s is None:
        return 0.0
    free_at = analysis_started + analyse_s
    margin = MARGIN_S + MARGIN_FRACTION * analyse_s
    return max(0.0, free_at - infer_s - margin - now)
