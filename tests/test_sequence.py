"""Lazy, chunked iteration of useq sequences: the same events as useq, without its lists."""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import pytest
import useq

from livemask.acquisition import sequence as lazy
from livemask.acquisition.sequence import check_input, event_count, iter_events

CASES: dict[str, dict[str, Any]] = {
    "time, channels, z": {
        "time_plan": {"interval": 0.5, "loops": 25},
        "channels": ["DAPI", "GFP"],
        "z_plan": {"range": 2, "step": 1},
    },
    "shutter kept open across every axis": {
        "time_plan": {"interval": 0.5, "loops": 25},
        "channels": ["DAPI", "GFP"],
        "z_plan": {"range": 2, "step": 1},
        "keep_shutter_open_across": ("z", "c", "t"),
    },
    "interval and duration, two positions": {
        "time_plan": {"interval": 0.1, "duration": 2.4},
        "stage_positions": [(0, 0, 0), (10, 10, 0)],
        "channels": ["DAPI"],
    },
    "duration and loops": {"time_plan": {"duration": 3, "loops": 16}},
    "a position with a grid of its own": {
        "time_plan": {"interval": 0.2, "loops": 9},
        "stage_positions": [
            {"x": 0, "y": 0, "sequence": {"grid_plan": {"rows": 2, "columns": 1}}},
            {"x": 5, "y": 5},
        ],
        "channels": ["DAPI"],
    },
    "hardware autofocus every time point": {
        "time_plan": {"interval": 0.2, "loops": 9},
        "channels": ["DAPI", "GFP"],
        "autofocus_plan": {
            "autofocus_device_name": "Z", "autofocus_motor_offset": 0, "axes": ["t"]
        },
    },
    "free-running time-lapse": {"time_plan": {"interval": 0, "loops": 23}},
    "time not outermost": {
        "time_plan": {"interval": 0.5, "loops": 25},
        "stage_positions": [(0, 0, 0), (10, 10, 0)],
        "axis_order": "ptc",
    },
    "two time phases": {"time_plan": [{"interval": 0.5, "loops": 5}, {"interval": 1, "loops": 8}]},
    "no time plan": {"channels": ["DAPI", "GFP"]},
    "empty": {},
}


def _dump(events: Any) -> list[dict[str, Any]]:
    return [e.model_dump(exclude={"sequence"}) for e in events]


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_events_equal_useqs(case: str) -> None:
    seq = useq.MDASequence(**CASES[case])
    expected = _dump(seq)
    assert _dump(iter_events(seq, chunk=7)) == expected
    assert _dump(iter_events(seq)) == expected
    # the planned count: useq's axis sizes multiplied (what the service reported before),
    # counted without walking the time plan; the events themselves where nothing is nested
    sizes = [n for n in seq.sizes.values() if n]
    assert event_count(seq) == (math.prod(sizes) if sizes else 0)
    if "grid of its own" not in case and "autofocus" not in case:
        assert event_count(seq) == len(expected)


def test_events_across_a_chunk_boundary_keep_the_runs_clock() -> None:
    seq = useq.MDASequence(time_plan={"interval": 0.5, "loops": 8}, channels=["DAPI"])
    events = list(iter_events(seq, chunk=3))
    assert [e.index["t"] for e in events] == list(range(8))
    assert [e.min_start_time for e in events] == [0.5 * t for t in range(8)]
    # only the very first event restarts the runner's timer; chunk starts must not
    assert [e.reset_event_timer for e in events] == [True] + [False] * 7
    assert all(e.sequence is seq for e in events)


@pytest.mark.usefixtures("short_time_walks")
def test_a_practically_endless_time_lapse_starts_at_once() -> None:
    # useq alone would list 10**12 time points before the first event (hours, terabytes)
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 10**12})
    assert event_count(seq) == 10**12
    first = list(itertools.islice(iter_events(seq), 3))
    assert [e.index["t"] for e in first] == [0, 1, 2]


@pytest.mark.usefixtures("short_time_walks")
def test_the_walk_limit_catches_useqs_own_iteration() -> None:
    # the guard the endless-time-lapse tests rely on does trip on a plain useq iteration
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 10**12})
    with pytest.raises(AssertionError, match="walked more than"):
        next(iter(seq))


def test_a_long_sequence_that_cannot_be_chunked_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(lazy, "LARGE_TIMEPOINTS", 10)
    seq = useq.MDASequence(**CASES["time not outermost"])
    with caplog.at_level(logging.WARNING, logger="livemask"):
        assert len(list(iter_events(seq, chunk=7))) == 50
    assert "put 't' first in axis_order" in caplog.text


def test_chunk_must_be_positive() -> None:
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 3})
    with pytest.raises(ValueError, match="at least 1 time point"):
        next(iter_events(seq, chunk=0))


@pytest.mark.parametrize("data", [
    {"stage_positions": [{"x": 0, "y": 0, "row": 0, "col": 1}]},  # useq renames row/col
    {"time_plan": [{"interval": 1, "loops": 2}, {"interval": 0.5, "duration": 3}]},
    {"channels": ["DAPI", {"config": "GFP", "exposure": 20}], "z_plan": {"range": 4, "step": 1}},
    {"stage_positions": [(1, 2, 3), {"x": 1, "y": 2, "sequence": {"grid_plan": {
        "rows": 1, "columns": 2}}}], "metadata": {"anything": {"goes": 1}}},
])
def test_check_input_accepts_what_useq_takes(data: dict) -> None:
    check_input(useq.MDASequence.model_validate(data), data, "sequence")


@pytest.mark.parametrize(("data", "needle"), [
    ({"time_pan": {"interval": 1, "loops": 2}}, "sequence.time_pan: unknown field"),
    ({"time_plan": [{"interval": 1, "loops": 2}, {"interval": 1, "loops": 3, "prioritise": 1}]},
     "sequence.time_plan[1].prioritise: unknown field"),
    ({"channels": [{"config": "GFP", "exposre": 3}]}, "sequence.channels[0].exposre"),
    ({"stage_positions": [{"x": float("inf"), "y": 0}]}, "x: inf is not a finite number"),
    # before: strings pydantic turns into floats passed, and the run died in feedback
    ({"stage_positions": [{"x": "Infinity", "y": 0}]},
     "sequence.stage_positions[0].x: inf is not a finite number"),
    ({"stage_positions": [{"x": 0, "y": "-inf", "z": 1}]}, "y: -inf is not a finite number"),
    ({"stage_positions": [{"x": 0, "y": 0, "z": "NaN"}]}, "z: nan is not a finite number"),
])
def test_check_input_names_what_useq_would_ignore(data: dict, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        check_input(useq.MDASequence.model_validate(data), data, "sequence")
    assert needle in str(info.value)


def test_check_input_refuses_what_is_too_deep_to_check() -> None:
    data: dict = {"metadata": {}}
    inner = data["metadata"]
    for _ in range(900):
        inner["a"] = {}
        inner = inner["a"]
    with pytest.raises(ValueError, match="nests too deeply"):
        check_input(useq.MDASequence.model_validate(data), data, "sequence")
