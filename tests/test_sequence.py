"""Lazy, chunked iteration of useq sequences: the same events as useq, without its lists."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import pytest
import useq
from pydantic import BaseModel, ValidationError

from livemask.acquisition import sequence as lazy
from livemask.acquisition.plan_input import validate_model
from livemask.acquisition.sequence import (
    check_input,
    check_sequence,
    check_size,
    event_count,
    iter_events,
    with_field_of_view,
)
from livemask.errors import ConfigError
from tests.conftest import make_config

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
    # useq skips a channel by the time index within its iteration: chunks must start where
    # every acquire_every divides it (before: GFP at t 7, 14, 21 with chunks of 7)
    "a channel every third time point": {
        "time_plan": {"interval": 0.5, "loops": 25},
        "channels": ["DAPI", {"config": "GFP", "acquire_every": 3}],
    },
    "channels every 2nd and 3rd time point, and a position's every 4th": {
        "time_plan": {"interval": 0.5, "loops": 40},
        "stage_positions": [(0, 0, 0), {"x": 5, "y": 5, "sequence": {
            "grid_plan": {"rows": 1, "columns": 2},
            "channels": [{"config": "DAPI", "acquire_every": 4}]}}],
        "channels": [{"config": "DAPI", "acquire_every": 2}, {"config": "GFP", "acquire_every": 3}],
    },
    "a channel every 8th time point, more than a chunk": {
        "time_plan": {"interval": 0.5, "loops": 30},
        "channels": ["DAPI", {"config": "GFP", "acquire_every": 8}],
    },
    "grids sized by their edges and by their width, no fov (useq's 1 µm)": {
        "stage_positions": [{"sequence": {
            "grid_plan": {"top": 0, "left": 0, "bottom": -2.5, "right": 3}}}],
        "grid_plan": {"width": 3.5, "height": 2, "overlap": 10},
        "z_plan": {"above": 1, "below": 0.5, "step": 0.25},
    },
    "z positions listed": {"z_plan": {"relative": [0, 1, 5]}, "channels": ["DAPI"]},
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
    # the planned count, counted without walking the time plan: the events themselves,
    # positions' own sequences included, except where useq skips (acquire_every) or adds
    # (autofocus) events
    inexact = ("autofocus", "every")
    if not any(word in case for word in inexact):
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


@pytest.mark.usefixtures("short_time_walks")
def test_an_endless_time_lapse_with_a_channel_every_third_point_runs_in_chunks() -> None:
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 10**12},
                           channels=["DAPI", {"config": "GFP", "acquire_every": 3}])
    first = [(e.index["t"], e.channel.config) for e in itertools.islice(iter_events(seq), 7)
             if e.channel is not None]
    assert first == [(0, "DAPI"), (0, "GFP"), (1, "DAPI"), (2, "DAPI"), (3, "DAPI"),
                     (3, "GFP"), (4, "DAPI")]


def test_chunks_are_cut_where_every_channel_is_due() -> None:
    # seq3 of the review: 10,006 time points, the default chunk of 10,000 (not a multiple
    # of 3): GFP was imaged at t 10,000 and 10,003 instead of 10,002 and 10,005
    seq = useq.MDASequence(time_plan={"interval": 1, "loops": 10_006},
                           channels=["DAPI", {"config": "GFP", "acquire_every": 3}])
    gfp = [e.index["t"] for e in iter_events(seq)
           if e.channel is not None and e.channel.config == "GFP" and e.index["t"] >= 9995]
    assert gfp == [9996, 9999, 10002, 10005]


def test_the_events_of_a_time_point_are_counted_from_the_plans() -> None:
    # before: useq listed the 10**12 z positions to count them (MemoryError; 10**8: 9 s)
    seq = useq.MDASequence(z_plan={"range": 1, "step": 1e-12}, channels=["DAPI"])
    assert seq.z_plan is not None
    assert event_count(seq) == seq.z_plan.num_positions() > 10**12
    seq = useq.MDASequence(time_plan={"interval": 1, "loops": 3},
                           grid_plan={"rows": 10**6, "columns": 10**6})
    assert event_count(seq) == 3 * 10**12


@pytest.mark.parametrize(("data", "field"), [
    ({"z_plan": {"range": 1, "step": 1e-12}}, "sequence.z_plan (a larger step"),
    ({"grid_plan": {"rows": 10**6, "columns": 10**6}}, "sequence.grid_plan (fewer rows"),
    ({"grid_plan": {"top": 0, "left": 0, "bottom": -1e5, "right": 1e5, "fov_width": 0.1,
                    "fov_height": 0.1}}, "sequence.grid_plan"),
    ({"channels": ["DAPI", "GFP"], "stage_positions": [
        {"x": 0, "y": 0, "sequence": {"z_plan": {"above": 1, "below": 1, "step": 1e-6}}}]},
     "sequence.stage_positions[0].sequence.z_plan"),
    ({"z_plan": {"range": 99, "step": 1}, "grid_plan": {"rows": 100, "columns": 110}},
     "sequence.grid_plan"),
])
def test_check_sequence_refuses_too_many_events_per_time_point(data: dict, field: str) -> None:
    seq = useq.MDASequence.model_validate(data)
    with pytest.raises(ValueError, match=r"events per time point") as info:
        check_sequence(seq, data)
    assert f"at most {lazy.MAX_EVENTS_PER_TIME_POINT:,} are allowed: change {field}" in str(
        info.value)
    with pytest.raises(ValueError, match=r"events per time point"):  # and before useq lists
        next(iter_events(seq))


def test_a_grid_sized_by_the_cameras_field_is_counted_once_it_is_known() -> None:
    data = {"grid_plan": {"width": 10_000, "height": 10_000}}
    seq = useq.MDASequence.model_validate(data)
    check_sequence(seq, data)  # the camera's field decides the tiles: not known yet
    with pytest.raises(ValueError, match=r"change sequence\.grid_plan"):
        check_size(with_field_of_view(seq, (1.0, 1.0)))
    check_size(with_field_of_view(seq, (100.0, 100.0)))


def test_a_config_with_too_many_events_per_time_point_names_the_plan() -> None:
    with pytest.raises(ConfigError, match=r"acquisition\.sequence.*change sequence\.z_plan"):
        make_config(acquisition={"sequence": {"z_plan": {"range": 10, "step": 1e-6}}})


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


@pytest.mark.parametrize(("z_plan", "needle"), [
    # before: no planes, so the sequence ran without its z axis (one image), exit 0
    ({"top": 0, "bottom": 10, "step": 1},
     "sequence.z_plan: top (0 µm) is below bottom (10 µm), so it plans no planes; swap top "
     "and bottom"),
    ({"range": 10, "step": -1}, "sequence.z_plan: step must be > 0 µm, got -1, so it plans no "
                                "planes; give a step > 0"),
    ({"top": 10, "bottom": 0, "step": -1}, "step must be > 0 µm, got -1, so it plans no planes"),
    ({"range": -10, "step": 1}, "sequence.z_plan: range must be >= 0 µm, got -10"),
    ({"above": 1, "below": 2, "step": -1}, "sequence.z_plan: step must be > 0 µm, got -1"),
    # useq takes step 0 as a single plane at the bottom of the range
    ({"range": 10, "step": 0},
     "step must be > 0 µm, got 0 (useq takes it as one plane); give a step > 0 (for a single "
     "plane: range: 0, or no z_plan)"),
    ({"top": 5, "bottom": 3, "step": 0}, "(for a single plane: top equal to bottom"),
    # review: useq plans no events at all; they were accepted
    ({"relative": []}, "sequence.z_plan: relative is empty, so it plans no planes"),
    ({"absolute": []}, "sequence.z_plan: absolute is empty, so it plans no planes"),
])
def test_a_z_plan_that_plans_no_planes_is_refused(z_plan: dict, needle: str) -> None:
    data = {"z_plan": z_plan, "channels": ["DAPI"]}
    with pytest.raises(ValueError) as info:
        check_sequence(useq.MDASequence.model_validate(data), data)
    assert needle in str(info.value)


def test_a_positions_z_plan_that_plans_no_planes_is_refused() -> None:
    data = {"stage_positions": [{"x": 0, "y": 0}, {"x": 1, "y": 1, "sequence": {
        "z_plan": {"range": 4, "step": 0}}}]}
    with pytest.raises(ValueError, match=r"sequence\.stage_positions\[1\]\.sequence\.z_plan: "
                                         r"step must be > 0"):
        check_sequence(useq.MDASequence.model_validate(data), data)


@pytest.mark.parametrize(("z_plan", "planes"), [
    ({"top": 10, "bottom": 0, "step": 1}, 11),
    ({"top": 2, "bottom": 2, "step": 1}, 1),  # one plane
    ({"range": 0, "step": 0.5}, 1),
    ({"above": 1, "below": -2, "step": 0.5, "go_up": False}, 7),  # useq takes |below|
    ({"relative": [0, -1, 2]}, 3),
    # review: refused as "step must be > 0 ... (for a single plane: top equal to bottom ...)",
    # which they are: useq plans the one plane asked for
    ({"top": 2, "bottom": 2, "step": 0}, 1),
    ({"range": 0, "step": 0}, 1),
    ({"above": 0, "below": 0, "step": 0}, 1),
    # review: useq runs it from the bottom (4) down to the top (0); it was refused
    ({"top": 0, "bottom": 4, "step": -1}, 5),
])
def test_z_plans_that_plan_planes_are_accepted(z_plan: dict, planes: int) -> None:
    data = {"z_plan": z_plan}
    seq = useq.MDASequence.model_validate(data)
    check_sequence(seq, data)
    assert event_count(seq) == planes == len(list(seq))


def test_a_config_names_the_z_plan_that_plans_no_planes() -> None:
    with pytest.raises(ConfigError, match=r"acquisition\.sequence: .*sequence\.z_plan: top "
                                          r"\(0 µm\) is below bottom"):
        make_config(acquisition={"sequence": {"z_plan": {"top": 0, "bottom": 10, "step": 1}}})


@pytest.mark.parametrize(("grid_plan", "needles"), [
    # before: "rows: unknown field ... columns: unknown field" (useq fell back to an empty
    # RelativePosition, and its fields were the known ones)
    ({"rows": 0, "columns": 2}, ["sequence.grid_plan.rows: Input should be greater than or "
                                 "equal to 1"]),
    ({"rows": -1, "columns": 2}, ["sequence.grid_plan.rows: Input should be greater"]),
    ({"rows": 2, "columns": 2, "mode": "snake"}, ["sequence.grid_plan.mode: Input should be "
                                                  "'row_wise'"]),
    ({"rows": 2, "colums": 2}, ["sequence.grid_plan.columns: Field required",
                                "sequence.grid_plan.colums: unknown field (did you mean "
                                "'columns'?"]),
    ({"top": 0, "left": 0, "bottom": 5, "right": "far"},
     ["sequence.grid_plan.right: Input should be a valid number"]),
    ({"width": 10, "height": -1, "fov_width": 1}, ["sequence.grid_plan.height: Input should "
                                                   "be greater than 0"]),
])
def test_a_bad_grid_plan_reports_the_grids_own_errors(grid_plan: dict, needles: list[str]
                                                      ) -> None:
    data = {"grid_plan": grid_plan}
    with pytest.raises(ValueError) as info:
        check_sequence(useq.MDASequence.model_validate(data), data)
    message = str(info.value)
    for needle in needles:
        assert needle in message
    for key in ("rows", "columns", "mode", "top", "right", "width", "height"):
        assert f"grid_plan.{key}: unknown field" not in message


@pytest.mark.parametrize(("data", "errors"), [
    # before: five lines about MultiPhaseTimePlan, TIntervalDuration, ... and never `loop`
    ({"time_plan": {"interval": 0.1, "loop": 3}},
     [("time_plan", "loop"), "unknown field (did you mean 'loops'? known: duration, "
                             "interval, loops, phases, prioritize_duration)"]),
    ({"time_plan": {"interval": 0.1, "loops": 0}},
     [("time_plan", "loops"), "Input should be greater than 0"]),
    ({"time_plan": [{"interval": 0.1, "loops": 2}, {"interval": 0.1, "loops": 0}]},
     [("time_plan", "phases", 1, "loops"), "Input should be greater than 0"]),
    ({"time_plan": {"interval": 0.1}}, [("time_plan",), "Field required: add duration or loops"]),
    ({"z_plan": {"top": 1, "setp": 1}},
     [("z_plan", "setp"), "unknown field (did you mean 'step'?"]),
    ({"z_plan": {"top": 1, "step": 1}}, [("z_plan", "bottom"), "Field required"]),
    ({"grid_plan": 5}, [("grid_plan",), "Input should be a mapping of field names to values"]),
    # review: in a position's own sequence (useq validates the positions in a before-validator:
    # pydantic's location had no index, so the given keys were not found) these said "add
    # duration or loops or phases", "time_plan.phases: Field required", "add absolute or
    # relative or step", never naming the typo; and a list of time phases likewise
    ({"stage_positions": [{"x": 0, "y": 0}, {"x": 1, "y": 1, "sequence": {
        "time_plan": {"interval": 1, "loopz": 2}}}]},
     [("stage_positions", 1, "sequence", "time_plan", "loopz"),
      "unknown field (did you mean 'loops'?"]),
    ({"stage_positions": [{"x": 0, "sequence": {"time_plan": {"bogus": 3}}}]},
     [("stage_positions", 0, "sequence", "time_plan", "bogus"), "unknown field (known: "]),
    ({"stage_positions": [{"x": 0, "sequence": {"time_plan": {"interval": 1}}}]},
     [("stage_positions", 0, "sequence", "time_plan"), "Field required: add duration or loops"]),
    ({"stage_positions": [{"x": 0, "sequence": {"z_plan": {"range": 4, "stp": 1}}}]},
     [("stage_positions", 0, "sequence", "z_plan", "stp"), "unknown field (did you mean 'step'?"]),
    ({"stage_positions": [{"x": 0}, {"x": 3, "sequence": {"stage_positions": [
        {"x": 2, "sequence": {"z_plan": {"range": 4}}}]}}]},
     [("stage_positions", 1, "sequence", "stage_positions", 0, "sequence", "z_plan", "step"),
      "Field required"]),
    ({"time_plan": [{"interval": 0.1, "loops": 2}, {"interval": 0.1, "loopz": 2}]},
     [("time_plan", "phases", 1, "loopz"), "unknown field (did you mean 'loops'?"]),
])
def test_a_union_reports_the_member_the_keys_ask_for(data: dict, errors: list[Any]) -> None:
    with pytest.raises(ValidationError) as info:
        validate_model(useq.MDASequence, data)
    loc, message = errors
    got = info.value.errors()
    assert [(e["loc"], e["msg"][: len(message)]) for e in got] == [(loc, message)]
    if message.startswith("Field required"):  # (not "add duration or loops or phases")
        assert got[0]["msg"] == message


def test_every_bad_position_is_named_by_its_index() -> None:
    """useq stops at the first bad position and pydantic names none: each is validated on its
    own."""
    data = {"stage_positions": [
        {"x": 0, "sequence": {"z_plan": {"range": 1}}}, (0, 0, 0), (1, "up", 2),
        {"x": 1, "sequence": {"time_plan": {"interval": 1, "loopz": 2}}}]}
    with pytest.raises(ValidationError) as info:
        validate_model(useq.MDASequence, data)
    assert [e["loc"] for e in info.value.errors()] == [
        ("stage_positions", 0, "sequence", "z_plan", "step"), ("stage_positions", 2, "y"),
        ("stage_positions", 3, "sequence", "time_plan", "loopz")]


def test_validate_model_leaves_the_given_data_as_it_was() -> None:
    """useq renames a grid_plan's row/col to grid_row/grid_col in the dict it is given, so
    check_input saw keys the user never wrote."""
    data = {"grid_plan": {"x": 1, "row": 2, "col": 2}, "stage_positions": [{"x": 0, "row": 1}]}
    seq = validate_model(useq.MDASequence, data)
    assert data == {"grid_plan": {"x": 1, "row": 2, "col": 2},
                    "stage_positions": [{"x": 0, "row": 1}]}
    assert isinstance(seq.grid_plan, useq.RelativePosition) and seq.grid_plan.grid_row == 2


@pytest.mark.parametrize(("grid_plan", "needles"), [
    # review: accepted, as a RelativePosition named grid row 2, column 2: one tile, not 2 x 2
    ({"row": 2, "col": 2}, ["grid_plan.row: unknown field (did you mean 'rows'?",
                            "grid_plan.col: unknown field (did you mean 'columns'?"]),
    # review: "grid_plan.rows: unknown field (known: ... grid_col, grid_row ...)"
    ({"rows": 2, "col": 2}, ["grid_plan.col: unknown field (did you mean 'columns'?",
                             "grid_plan.columns: Field required"]),
    ({"row": 2, "columns": 2}, ["grid_plan.row: unknown field (did you mean 'rows'?"]),
    ({"grid_row": 1, "grid_col": 3}, ["grid_plan.grid_row: unknown field (did you mean 'rows'?",
                                      "grid_plan.grid_col: unknown field (did you mean "
                                      "'columns'?"]),
    ({"x": 5, "y": 5, "grid_row": 1}, ["grid_plan.grid_row: unknown field (did you mean "
                                       "'rows'? known: fov_height, fov_width, name"]),
    ({"rows": 2, "x": 1}, ["grid_plan.columns: Field required", "grid_plan.x: unknown field"]),
    ({"fov_width": 5, "fov_height": 5}, [
        "grid_plan: Field required: add num_points or rows and columns or top and left and "
        "bottom and right or vertices or width and height"]),
])
def test_a_grid_plans_row_and_col_are_typos_of_rows_and_columns(
    grid_plan: dict, needles: list[str]
) -> None:
    data = {"grid_plan": grid_plan}
    seq = validate_model(useq.MDASequence, data)
    with pytest.raises(ValueError) as info:
        check_sequence(seq, data)
    message = str(info.value)
    for needle in needles:
        assert needle in message
    assert "grid_plan.rows: unknown" not in message and "known: fov_height, fov_width, grid_col" \
        not in message


@pytest.mark.parametrize("data", [
    {"grid_plan": {"x": 5, "y": -5}},  # a single offset, as useq takes it
    {"grid_plan": {"rows": 2, "columns": 3}},
    {"grid_plan": {"num_points": 3, "max_width": 20, "fov_width": 2}},
    {"stage_positions": [{"x": 0, "y": 0, "row": 0, "col": 1}]},  # a position's own names
])
def test_grid_plans_and_positions_as_useq_takes_them_are_accepted(data: dict) -> None:
    check_sequence(validate_model(useq.MDASequence, data), data)


@pytest.mark.parametrize(("grid_plan", "tiles"), [
    # review: AttributeError: 'RandomPoints' object has no attribute '_step_size'
    ({"num_points": 4, "max_width": 50, "max_height": 50, "fov_width": 5, "fov_height": 5}, 4),
    ({"num_points": 4, "max_width": 50, "max_height": 50}, 4),
    ({"x": 5, "y": 5, "fov_width": 5}, 1),
])
def test_random_points_and_a_single_offset_are_counted(grid_plan: dict, tiles: int) -> None:
    data = {"grid_plan": grid_plan, "channels": ["DAPI", "GFP"]}
    seq = validate_model(useq.MDASequence, data)
    check_sequence(seq, data)
    check_size(seq)
    filled = with_field_of_view(seq, (10.0, 8.0))
    assert event_count(filled) == len(list(iter_events(filled))) == 2 * tiles
    unsized = with_field_of_view(seq, None)  # (no pixel size: these need no field)
    assert len(list(iter_events(unsized))) == 2 * tiles


async def test_the_service_runs_a_grid_of_random_points() -> None:
    """Review: `serve` with this grid_plan crashed with AttributeError (rc 1), and with a
    fov_width in it at config load."""
    from livemask.service.app import Service
    from tests.test_service import collect_run

    cfg = make_config(acquisition={"sequence": {
        "time_plan": {"interval": 0, "loops": 2},
        "grid_plan": {"num_points": 3, "max_width": 50, "max_height": 50, "random_seed": 1}}})
    async with Service(cfg) as svc:
        got = await collect_run(svc, ("measurements", "event"))
    started = [e.header for e in got["event"] if e.header["kind"] == "acquisition_started"]
    assert started[0]["events"] == 6
    assert len(got["measurements"]) == 6
    assert len({m.header["position"]["x_um"] for m in got["measurements"]}) == 3


class _A(BaseModel):
    a: int


class _B(BaseModel):
    b: int


class _Models(BaseModel):
    v: _A | _B


class _ModelOrList(BaseModel):
    v: _A | list[int]


def test_union_errors_of_any_models_are_cut_down() -> None:
    with pytest.raises(ValidationError) as info:
        validate_model(_Models, {"v": {"b": "x"}})
    assert [(e["loc"], e["type"]) for e in info.value.errors()] == [(("v", "b"), "int_parsing")]


def test_union_errors_are_kept_where_a_member_is_not_a_model() -> None:
    data = {"v": {"b": 1}}
    with pytest.raises(ValidationError) as info:
        validate_model(_ModelOrList, data)
    assert [(e["loc"], e["msg"]) for e in info.value.errors()] == [
        (("v", "_A", "a"), "Field required"), (("v", "list[int]"), "Input should be a valid list")]


@pytest.mark.parametrize(("data", "where"), [
    ({"time_plan": {"interval": 0, "duration": 10}}, "time_plan interval"),
    ({"stage_positions": [{"x": 0, "y": 0, "sequence": {
        "time_plan": {"interval": 0, "duration": 10}}}]},
     r"stage_positions\[0\]\.sequence\.time_plan interval"),
])
def test_a_duration_with_an_interval_of_0_is_refused(data: dict, where: str) -> None:
    """Review: useq divides the duration by the interval; a start with this plan answered
    `internal` (ZeroDivisionError) and serve --interval 0 crashed with a traceback."""
    seq = useq.MDASequence.model_validate(data)
    with pytest.raises(ValueError, match=rf"{where} must be > 0 s with a duration.*loops"):
        check_sequence(seq, data)
    fast = {"time_plan": {"interval": 0, "loops": 5}}  # as fast as the camera goes: fine
    check_sequence(useq.MDASequence.model_validate(fast), fast)


@pytest.mark.parametrize(("data", "where"), [
    ({"time_plan": {"duration": 60, "loops": 1}}, "time_plan loops"),
    ({"stage_positions": [{"x": 0, "y": 0, "sequence": {
        "time_plan": {"duration": 0, "loops": 1}}}]},
     r"stage_positions\[0\]\.sequence\.time_plan loops"),
])
def test_a_duration_with_one_time_point_is_refused(data: dict, where: str) -> None:
    """useq spaces the time points duration / (loops - 1): the acquisition failed with a
    ZeroDivisionError traceback (biologist hunt)."""
    seq = useq.MDASequence.model_validate(data)
    with pytest.raises(ValueError, match=rf"{where} must be >= 2 with a duration.*loops: 1 "
                       "without a duration"):
        check_sequence(seq, data)


@pytest.mark.parametrize("where", ["sequence", "position"])
def test_random_points_stay_the_same_across_chunks(where: str) -> None:
    """Review: useq draws random points on each pass over a sequence, and a long time plan is
    iterated in chunks: without a random_seed, every 10,000 time points imaged other
    points (here every 2)."""
    grid = {"num_points": 3, "max_width": 100, "max_height": 100, "fov_width": 10,
            "fov_height": 10}
    data: dict[str, Any] = {"time_plan": {"interval": 0, "loops": 7}}
    if where == "sequence":
        data["grid_plan"] = grid
    else:
        data["stage_positions"] = [{"x": 0, "y": 0, "sequence": {"grid_plan": grid}}]
    seq = useq.MDASequence.model_validate(data)
    places: dict[int, set[tuple[float, float]]] = {}
    for event in iter_events(seq, 2):
        places.setdefault(event.index["t"], set()).add((event.x_pos, event.y_pos))
    assert len(places) == 7 and all(len(p) == 3 for p in places.values())
    assert all(p == places[0] for p in places.values())  # (was: new points every chunk)
    plan = seq.grid_plan if where == "sequence" else seq.stage_positions[0].sequence.grid_plan
    assert plan.random_seed is None  # the caller's sequence is left as it was
