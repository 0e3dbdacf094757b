"""Multi-position hunt (session 21): feedback actions take the trigger's channel and
exposure in every mode, a revisit images the revisited position itself, and the planned
event count counts positions' own grids."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import useq

from livemask.acquisition.sequence import event_count
from livemask.feedback import FeedbackConfig, FeedbackController, PlannedEvents
from livemask.feedback.actions import EventPlanner, Revisit, to_events
from livemask.feedback.context import FrameContext
from livemask.feedback.engine import RuleEngine
from livemask.service.app import Service
from tests.conftest import make_config
from tests.test_feedback_service import _Frame
from tests.test_service import collect_run

#: The hunt's plan: three positions, a fourth with a 2 x 2 grid of its own, two channels,
#: three planes (useq plans 6 x (3 x 2 x 3 + 4 x 6) = 252 events).
GRID_AT_P3: dict[str, Any] = {
    "axis_order": "tpgcz",
    "stage_positions": [
        {"x": -200.0, "y": -200.0, "z": 0.0},
        {"x": 200.0, "y": -200.0, "z": 0.0},
        {"x": -200.0, "y": 200.0, "z": 0.0},
        {"x": 200.0, "y": 200.0, "z": 0.0, "sequence": {"grid_plan": {"rows": 2, "columns": 2}}},
    ],
    "time_plan": {"interval": 0, "loops": 6},
    "channels": [{"config": "DAPI", "exposure": 10.0}, {"config": "GFP", "exposure": 20.0}],
    "z_plan": {"range": 4.0, "step": 2.0},
}
ALWAYS = {"values": [{"path": "summary.count", "ge": 0}]}


def _when(**index: int) -> dict[str, Any]:
    return {"values": [{"path": f"index.{k}", "eq": v} for k, v in index.items()]}


def _message(index: dict[str, int], xyz: tuple[float | None, ...],
             settings: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "frame_id": 1, "index": index, "t": {"acquired": 1000.0},
        "position": dict(zip(("x_um", "y_um", "z_um"), xyz, strict=True)),
        "settings": settings or {}, "pixel_size_um": 0.65,
        "summary": {"count": 1, "background_mean": 100.0},
        "objects": [{"label": 1, "area_px": 100, "centroid_yx": [10.0, 20.0]}],
    }


def _planned_until(planned: PlannedEvents, index: dict[str, int]) -> useq.MDAEvent:
    """Issue planned events (as the runner takes them) up to the one with ``index``."""
    for event in planned:
        if dict(event.index) == index:
            return event
    raise AssertionError(f"no planned event {index}")


def _planner_for(seq: useq.MDASequence) -> tuple[EventPlanner, PlannedEvents]:
    """A planner told the plan's positions and coordinates, as the service's start does."""
    planner = EventPlanner.for_pixel_size(0.65)
    planner.start_plan(range(len(seq.stage_positions)),
                       {i: (p.x, p.y, p.z) for i, p in enumerate(seq.stage_positions)})
    return planner, PlannedEvents(iter(seq), planner=planner)


# ------------------------------------------------------------------ 1: trigger's settings
async def test_an_action_without_settings_images_with_the_triggers_channel_and_exposure() -> None:
    """Pipelined hunt: a DAPI 10 ms trigger's z-stack came out GFP 20 ms (the planned GFP
    frame the runner took meanwhile left its settings on) and the dose ledger charged 20."""
    cfg = FeedbackConfig.model_validate({"rules": [
        {"name": "zs", "when": ALWAYS, "max_fires": 1,
         "action": {"zstack": {"range_um": 4.0, "step_um": 1.0, "centre": False}}}]})
    injected: list[list[useq.MDAEvent]] = []

    def inject(events: list[useq.MDAEvent]) -> int:
        injected.append(events)
        return len(events)

    ctl = FeedbackController(cfg, pixel_size_um=0.65, inject=inject,
                             publish=lambda kind, detail: None, loop=asyncio.get_running_loop())
    ctl.acquisition_started()
    dapi = useq.MDAEvent.model_validate({
        "index": {"t": 1, "p": 1, "c": 0, "z": 2}, "channel": {"config": "DAPI"},
        "exposure": 10.0, "x_pos": 200.0, "y_pos": -200.0, "z_pos": 2.0})
    gfp = dapi.model_copy(update={"index": {"t": 1, "p": 1, "c": 1, "z": 0},
                                  "channel": useq.EventChannel(config="GFP"), "exposure": 20.0})
    planned = PlannedEvents([dapi, gfp], guard=ctl.guard, planner=ctl.engine.planner)
    for event in planned:  # the runner took both; the GFP one ran before the action
        ctl.on_event_started(event)
    trigger = _message(dict(dapi.index), (200.0, -200.0, 2.0),
                       {"channel": "DAPI", "channel_group": "Channel", "exposure_ms": 10.0})
    ctl.on_measurements(_Frame(image=np.zeros((64, 64), np.uint16)), trigger)
    (events,) = injected
    *frames, restore = events
    assert len(frames) == 5
    assert {(e.channel.group, e.channel.config, e.exposure) for e in frames
            if e.channel is not None} == {("Channel", "DAPI", 10.0)}
    assert all(e.channel is not None for e in frames)
    # the planned settings are put back after it
    assert restore.channel is not None and restore.channel.config == "GFP"
    assert restore.exposure == 20.0
    assert ctl.guard.dose_snapshot() == {"p1": 10.0 + 20.0 + 5 * 10.0}


def test_an_action_that_names_a_channel_keeps_the_triggers_exposure() -> None:
    """The setting an action does not give is the trigger's too, not the one in effect;
    but not the trigger's exposure for another channel (review F: GFP taken at DAPI's 10 ms
    in every mode, where pipelined runs had taken it at GFP's 40)."""
    ctx = FrameContext.from_measurements(_message(
        {"t": 0, "p": 0}, (0.0, 0.0, 0.0),
        {"channel": "DAPI", "channel_group": "Filters", "exposure_ms": 10.0}), (64, 64))
    (ev,) = to_events(Revisit(channel="GFP"), ctx, EventPlanner(positions={0: (0, 0, 0)}))
    assert ev.channel is not None and ev.channel.config == "GFP" and ev.exposure is None
    (ev,) = to_events(Revisit(channel="DAPI"), ctx, EventPlanner(positions={0: (0, 0, 0)}))
    assert ev.exposure == 10.0  # its own channel: the trigger's exposure
    (ev,) = to_events(Revisit(exposure_ms=30.0), ctx, EventPlanner(positions={0: (0, 0, 0)}))
    assert ev.channel is not None and (ev.channel.group, ev.channel.config) == (
        "Filters", "DAPI")
    assert ev.exposure == 30.0


async def test_a_pipelined_zstack_is_taken_in_the_triggers_channel() -> None:
    """End to end, pipelined: the z-stack on the last DAPI plane at p1 was taken in GFP
    (the next planned frame's channel, run before the action)."""
    seq = {**GRID_AT_P3, "stage_positions": GRID_AT_P3["stage_positions"][:2],
           "time_plan": {"interval": 0, "loops": 2}}
    rule = {"name": "zs", "when": _when(t=0, p=1, c=0, z=2), "max_fires": 1,
            "action": {"zstack": {"range_um": 2.0, "step_um": 1.0, "centre": False}}}
    cfg = make_config(
        simulation={"sensor_shape_px": [256, 256]},
        acquisition={"sequence": seq, "mode": "pipelined"},
        feedback={"rules": [rule], "limits": {"stage_x_range_um": [-800, 800],
                                              "stage_y_range_um": [-800, 800]}})
    async with Service(cfg) as svc:
        got = await collect_run(svc, ("measurements", "event"))
    meas = [m.header for m in got["measurements"]]
    stack = [h for h in meas if "fb" in h["index"]]
    assert len(stack) == 3
    assert {(h["settings"]["channel"], h["settings"]["exposure_ms"]) for h in stack} == {
        ("DAPI", 10.0)}
    planned = [h for h in meas if "fb" not in h["index"]]
    assert len(planned) == 2 * 2 * 2 * 3  # every planned frame ran, with its own settings
    assert all((h["settings"]["channel"], h["settings"]["exposure_ms"])
               == (("DAPI", 10.0) if h["index"]["c"] == 0 else ("GFP", 20.0)) for h in planned)


# ------------------------------------------------------------------ 2: revisit
def test_a_revisit_images_the_position_itself_not_its_last_tile_or_plane() -> None:
    """Hunt: revisit {position: 3} went to a corner tile at the top plane (the last event
    issued there), and one from {p: 3, g: 2} to position 0 kept g 2 and z 2."""
    seq = useq.MDASequence(**GRID_AT_P3)
    planner, planned = _planner_for(seq)
    _planned_until(planned, {"t": 1, "p": 3, "g": 3, "c": 1, "z": 2})  # p3's visit is over
    trigger = FrameContext.from_measurements(
        _message({"t": 1, "p": 1, "c": 1, "z": 2}, (200.0, -200.0, 2.0)), (256, 256))
    (ev,) = to_events(Revisit(position=3), trigger, planner, action_id=1)
    assert (ev.x_pos, ev.y_pos, ev.z_pos) == (200.0, 200.0, 0.0)
    assert dict(ev.index) == {"t": 1, "p": 3, "fb": 1}
    tile = FrameContext.from_measurements(
        _message({"t": 1, "p": 3, "g": 2, "c": 0, "z": 0}, (116.8, 283.2, -2.0)), (256, 256))
    (ev,) = to_events(Revisit(position=0), tile, planner, action_id=2)
    assert (ev.x_pos, ev.y_pos, ev.z_pos) == (-200.0, -200.0, 0.0)
    assert dict(ev.index) == {"t": 1, "p": 0, "fb": 2}


def test_a_revisit_of_its_own_position_images_the_triggers_place_in_every_mode() -> None:
    """Pipelined: the runner has taken the next planes and tiles of the position; a revisit
    of the trigger's own position went to the last of them."""
    seq = useq.MDASequence(**GRID_AT_P3)
    planner, planned = _planner_for(seq)
    trigger_event = _planned_until(planned, {"t": 0, "p": 3, "g": 1, "c": 0, "z": 1})
    next(planned), next(planned)  # two more planned frames taken before the action
    where = (trigger_event.x_pos, trigger_event.y_pos, trigger_event.z_pos)
    ctx = FrameContext.from_measurements(_message(dict(trigger_event.index), where), (256, 256))
    (ev,) = to_events(Revisit(), ctx, planner, action_id=5)
    assert (ev.x_pos, ev.y_pos, ev.z_pos) == where
    assert dict(ev.index) == {"t": 0, "p": 3, "g": 1, "fb": 5}


async def test_a_synchronized_revisit_of_another_position_goes_there() -> None:
    """End to end: the revisit frame of position 0 from a grid tile of p3 is at position
    0 (z 0), indexed p 0 without the trigger's g."""
    seq = {**GRID_AT_P3, "time_plan": {"interval": 0, "loops": 1}, "channels": ["DAPI"],
           "z_plan": {"range": 2.0, "step": 2.0}}
    rule = {"name": "rv", "when": _when(p=3, g=2, c=0, z=1), "max_fires": 1,
            "action": {"revisit": {"position": 0}}}
    cfg = make_config(
        simulation={"sensor_shape_px": [256, 256]}, acquisition={"sequence": seq},
        feedback={"rules": [rule], "limits": {"stage_x_range_um": [-800, 800],
                                              "stage_y_range_um": [-800, 800]}})
    async with Service(cfg) as svc:
        got = await collect_run(svc, ("measurements", "event"))
    (frame,) = [m.header for m in got["measurements"] if "fb" in m.header["index"]]
    assert frame["position"] == {"x_um": -200.0, "y_um": -200.0, "z_um": 0.0}
    assert {k: v for k, v in frame["index"].items() if k != "fb"} == {"t": 0, "p": 0}


def test_a_revisit_of_a_large_grid_position_is_charged_to_that_position() -> None:
    """Its frames image the position's own x, y, a field and more from its last tile: the
    light-dose ledger still counts them at that position, not at a place of their own."""
    data = {**GRID_AT_P3, "time_plan": None, "channels": ["DAPI"], "z_plan": None,
            "stage_positions": [GRID_AT_P3["stage_positions"][0], {
                "x": 200.0, "y": 200.0, "z": 0.0, "sequence": {"grid_plan": {
                    "rows": 3, "columns": 3, "fov_width": 400.0, "fov_height": 400.0}}}]}
    seq = useq.MDASequence(**data)
    cfg = FeedbackConfig.model_validate({"rules": [
        {"name": "rv", "when": ALWAYS, "action": {"revisit": {"position": 1}}}]})
    planner, planned = _planner_for(seq)
    engine = RuleEngine(cfg, planner=planner)
    last = _planned_until(planned, {"p": 1, "g": 8, "c": 0})  # the far corner tile
    assert (last.x_pos, last.y_pos) == (600.0, -200.0)
    trigger = FrameContext.from_measurements(
        _message({"p": 0, "c": 0}, (-200.0, -200.0, 0.0)), (256, 256))
    (d,) = engine.evaluate(trigger)
    assert d.accepted and [(e.x_pos, e.y_pos) for e in d.events] == [(200.0, 200.0)]
    assert d.dose_keys == ["p1"]


# ------------------------------------------------------------------ 3: event count
@pytest.mark.parametrize("sub", [
    {"grid_plan": {"rows": 2, "columns": 2}},  # the hunt's: parent channels and planes kept
    {"grid_plan": {"rows": 1, "columns": 3}, "channels": ["DAPI"]},  # its own channels
    {"z_plan": {"range": 1.0, "step": 1.0}},  # its own planes
    {"channels": ["GFP"]},  # no plan: one event per parent plane
    {"time_plan": {"interval": 0, "loops": 2}, "grid_plan": {"rows": 1, "columns": 3}},
])
def test_the_planned_count_counts_positions_own_sequences(sub: dict[str, Any]) -> None:
    """`start` returned 144 events where useq plans (and the service ran) 252."""
    data = {**GRID_AT_P3, "stage_positions": [*GRID_AT_P3["stage_positions"][:3],
                                              {"x": 200.0, "y": 200.0, "sequence": sub}]}
    seq = useq.MDASequence(**data)
    assert event_count(seq) == len(list(seq))
    if sub == GRID_AT_P3["stage_positions"][3]["sequence"]:
        assert event_count(seq) == 252


async def test_start_reports_the_events_the_run_takes() -> None:
    """End to end: `start`'s `events` and `acquisition_started` said 8 for 12 frames run."""
    seq = {"stage_positions": [{"x": 0.0, "y": 0.0}, {"x": 500.0, "y": 0.0, "sequence": {
        "grid_plan": {"rows": 1, "columns": 3, "fov_width": 100.0, "fov_height": 100.0}}}],
        "time_plan": {"interval": 0, "loops": 2}, "channels": ["DAPI", "GFP"]}
    cfg = make_config(simulation={"sensor_shape_px": [128, 128]},
                      acquisition={"sequence": seq})
    async with Service(cfg) as svc:
        got = await collect_run(svc, ("frame", "event"))
    (started,) = [m.header for m in got["event"] if m.header["kind"] == "acquisition_started"]
    assert started["events"] == len(got["frame"]) == 2 * (2 + 3 * 2)


@pytest.mark.parametrize("mode", ["synchronized", "pipelined"])
async def test_an_action_naming_another_channel_takes_that_channels_planned_exposure(
    mode: str,
) -> None:
    """Review H: a rule on the DAPI frame (10 ms) whose action names GFP (planned at
    40 ms) without exposure_ms took GFP at whatever the last event left: DAPI's 10 ms."""
    seq = {"axis_order": "tpc", "stage_positions": [{"x": 0.0, "y": 0.0, "z": 0.0}],
           "time_plan": {"interval": 0, "loops": 3},
           "channels": [{"config": "DAPI", "exposure": 10.0},
                        {"config": "GFP", "exposure": 40.0}]}
    rule = {"name": "g", "max_fires": 1,
            "when": {"values": [{"path": "index.t", "eq": 0}, {"path": "index.c", "eq": 0}]},
            "action": {"channel": {"channel": "GFP", "frames": 2}}}
    cfg = make_config(simulation={"sensor_shape_px": [256, 256]},
                      acquisition={"sequence": seq, "mode": mode}, feedback={"rules": [rule]})
    async with Service(cfg) as svc:
        got = await collect_run(svc, ("measurements", "event"))
    fb = [(h["settings"].get("channel"), h["settings"].get("exposure_ms"))
          for h in (m.header for m in got["measurements"]) if "fb" in h["index"]]
    assert fb == [("GFP", 40.0), ("GFP", 40.0)]
