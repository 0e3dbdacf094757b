"""When to take the next frame for inference, so that it reaches analysis just in time.

With two stage threads and analysis the slower stage (the GPU path at 2048²: model ≈ 4 ms,
analysis ≈ 13 ms), a frame inferred as soon as the model is free waits behind the busy
analysis for most of an analysis period, holding an older frame than the camera has by
then. Taking it for inference one model time (plus a margin) before analysis is predicted
to be free removes that wait from its latency without leaving analysis idle. Stage times
vary (analysis with the number of objects), so the prediction errs on the early side: a
short analysis time (the 20th percentile of the last 15) against a long model time (the
80th percentile): a frame a little early waits for analysis briefly, one late would leave
analysis idle. When the model is the slower stage (the CPU path) analysis is always free
within one model time, so nothing waits.
"""

from __future__ import annotations

from collections import deque

#: Stage durations remembered per stage (their quantiles predict the next one).
RECENT = 15
#: Durations needed before predicting at all (before that, no frame is held back).
MIN_SAMPLES = 3
#: The quantiles predicting each stage's next duration, early-side (see above).
ANALYSE_QUANTILE = 0.2
INFER_QUANTILE = 0.8
#: Taken this much earlier still: the event loop's wake-up and hand-over delays.
MARGIN_S = 0.002


class RecentDurations:
    """The last ``RECENT`` durations of one stage, in seconds."""

    def __init__(self) -> None:
        self._values: deque[float] = deque(maxlen=RECENT)

    def add(self, seconds: float) -> None:
        """Record one duration."""
        self._values.append(seconds)

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1, nearest rank), or None before ``MIN_SAMPLES`` are known."""
        if len(self._values) < MIN_SAMPLES:
            return None
        ordered = sorted(self._values)
        return ordered[round(q * (len(ordered) - 1))]


def hold_before_inference(
    now: float, analysis_started: float, infer: RecentDurations, analyse: RecentDurations
) -> float:
    """Seconds to wait before taking the next frame for inference (0: take it now).

    ``analysis_started`` is when the busy analysis stage took its frame (same clock as
    ``now``). The next frame should come out of the model just as analysis is free: at
    ``analysis_started + analyse - infer``, less the margin, with the early-side
    predictions above."""
    infer_s = infer.quantile(INFER_QUANTILE)
    analyse_s = analyse.quantile(ANALYSE_QUANTILE)
    if infer_s is None or analyse_s is None:
        return 0.0
    return max(0.0, analysis_started + analyse_s - infer_s - MARGIN_S - now)
