"""The just-in-time hold before inference (``livemask.service.pacing``)."""

from __future__ import annotations

import pytest

from livemask.service.pacing import MIN_SAMPLES, RecentDurations, hold_before_inference


def _durations(*seconds: float) -> RecentDurations:
    durations = RecentDurations()
    for s in seconds:
        durations.add(s)
    return durations


def test_no_hold_before_enough_durations_are_known() -> None:
    infer = _durations(*[0.004] * (MIN_SAMPLES - 1))
    analyse = _durations(*[0.013] * MIN_SAMPLES)
    assert hold_before_inference(100.0, 100.0, infer, analyse) == 0.0


def test_analysis_the_slower_stage_holds_until_one_model_time_before_it_is_free() -> None:
    infer, analyse = _durations(*[0.004] * 5), _durations(*[0.013] * 5)
    # analysis took its frame at 100.000 and is free at 100.013; the model needs 4 ms and
    # the margin is 2 ms: take the next frame at 100.007
    assert hold_before_inference(100.0, 100.0, infer, analyse) == pytest.approx(0.007)
    assert hold_before_inference(100.005, 100.0, infer, analyse) == pytest.approx(0.002)
    assert hold_before_inference(100.008, 100.0, infer, analyse) == 0.0


def test_varying_stage_times_are_predicted_on_the_early_side() -> None:
    # analysis 10..22 ms, model 3..7 ms: predicted as a short analysis (20th percentile,
    # 12 ms) and a long model run (80th percentile, 6 ms), so that a frame is rarely late
    infer = _durations(0.003, 0.004, 0.005, 0.006, 0.007)
    analyse = _durations(0.010, 0.012, 0.016, 0.020, 0.022)
    assert hold_before_inference(100.0, 100.0, infer, analyse) == pytest.approx(0.004)


def test_the_model_the_slower_stage_never_holds() -> None:
    infer, analyse = _durations(0.028, 0.03, 0.027), _durations(0.005, 0.005, 0.006)
    assert hold_before_inference(100.0, 100.0, infer, analyse) == 0.0


def test_only_the_recent_durations_count() -> None:
    durations = _durations(*[1.0] * 20, *[0.01] * 12)
    assert durations.quantile(0.8) == 0.01  # 12 of the last 15 are 10 ms
    assert durations.quantile(0.9) == 1.0
    assert durations.quantile(0.0) == 0.01


def test_analysis_times_that_vary_in_turn_never_leave_analysis_waiting() -> None:
    """Analysis 40, 60, 80 ms in turn, model 10 ms: each next frame comes out of the model
    before the analysis under way finishes. A median prediction (60 ms) would have it out
    18 ms after every 40 ms analysis, analysis idle meanwhile."""
    model_s, cycle = 0.010, [0.040, 0.060, 0.080]
    infer, analyse = _durations(*[model_s] * 5), RecentDurations()
    ready_early = []
    for n in range(30):
        actual = cycle[n % 3]
        started = 100.0 + n
        hold = hold_before_inference(started, started, infer, analyse)
        if n >= MIN_SAMPLES:
            ready_early.append(started + actual - (started + hold + model_s))
        analyse.add(actual)
    assert min(ready_early) >= 0.0  # never after analysis is free
    assert max(ready_early) <= 0.040 + 0.002 + 1e-9  # held: at most the spread of analysis times
