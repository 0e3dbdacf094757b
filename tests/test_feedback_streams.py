"""Feedback per stream: change features per channel / plane / tile, skips of whole visits,
and the published ``target`` of an action."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import useq

from livemask.feedback import FeatureTracker, PlannedEvents, SkipPosition
from livemask.feedback.rules import DeclarativeRule
from livemask.feedback.spec import RuleSpec
from livemask.service.app import Service
from tests.conftest import ROOT, make_config
from tests.test_feedback_ledger import FRAME, _Returns, controller
from tests.test_feedback_rules import ctx, field, nucleus
from tests.test_feedback_service import _message, by_kind
from tests.test_service import collect_run, control

CHANGES = ("mean_intensity_change", "area_change", "integrated_change")
#: fires on any object that has a baseline (a change feature that is not null)
CHANGED = {
    "name": "changed",
    "when": {"objects": {"where": {"area_change": {"gt": 0}}, "match": "any"}},
    "action": {"mode": "synchronized"},
}


def changes(tracker: FeatureTracker, index: dict[str, int], **kw: Any) -> list[Any]:
    """The change features of a 3x3 field of nuclei seen with this index."""
    feats = tracker.compute(ctx(field(), index=index, **kw))
    return [f[name] for f in feats for name in CHANGES]


# ------------------------------------------------------------------ 1: streams
@pytest.mark.parametrize("axis", ["c", "z", "g"])
def test_a_channel_plane_or_tile_is_compared_only_with_itself(axis: str) -> None:
    """Every GFP frame was compared with the DAPI frame just before (likewise planes, tiles):
    the baseline was the previous frame at the same p, x, y whatever its c, z, g."""
    tracker = FeatureTracker()
    assert set(changes(tracker, {"t": 0, "p": 0, axis: 0})) == {None}  # first of its stream
    assert set(changes(tracker, {"t": 0, "p": 0, axis: 1})) == {None}  # (was: vs axis 0)
    assert set(changes(tracker, {"t": 1, "p": 0, axis: 0})) == {1.0}  # vs t=0, axis 0
    assert set(changes(tracker, {"t": 1, "p": 0, axis: 1})) == {1.0}


def test_feedback_frames_are_keyed_by_their_own_index() -> None:
    tracker = FeatureTracker()
    changes(tracker, {"t": 0, "p": 0, "c": 1})  # the trigger, in channel 1
    # a burst's frames at the trigger's place (index: its t, p and fb; no c) in which
    # nucleus 1 has half its area
    small = field()
    small[0] = nucleus(1, 100.0, 100.0, area=125)
    (burst,) = {f["area_change"] for f in tracker.compute(ctx(small, index={"t": 0, "p": 0,
                                                                                 "fb": 1}))}
    assert burst is None  # its own stream (was: 0.5, vs the trigger)
    (again, *_) = tracker.compute(ctx(small, index={"t": 0, "p": 0, "fb": 1}))
    assert again["area_change"] == pytest.approx(1.0)  # vs the burst's first frame
    # the next planned frame of channel 1 compares with that channel's last frame
    (first, *_) = tracker.compute(ctx(small, index={"t": 1, "p": 0, "c": 1}))
    assert first["area_change"] == pytest.approx(0.5)  # (was: 1.0, vs the burst)


def test_each_feedback_action_is_a_stream_of_its_own() -> None:
    """End-to-end hunt: without a channel index, the frames of different actions at one
    position (a DAPI 20 ms frame at z 0, then a GFP 50 ms burst at the next time point)
    were compared with each other, and with planned frames in a plan without channels."""
    tracker = FeatureTracker()
    small = field()
    small[0] = nucleus(1, 100.0, 100.0, area=125)
    changes(tracker, {"t": 0, "p": 0})  # a planned frame (no channels in the plan)
    (action1, *_) = tracker.compute(ctx(small, index={"t": 0, "p": 0, "fb": 1}))
    (action2, *_) = tracker.compute(ctx(field(), index={"t": 1, "p": 0, "fb": 2}))
    assert action1["area_change"] is None and action2["area_change"] is None  # (was 0.5, 2.0)
    (planned, *_) = tracker.compute(ctx(field(), index={"t": 1, "p": 0}))
    assert planned["area_change"] == pytest.approx(1.0)  # vs the planned t=0, not action 2


async def test_planes_and_channels_are_not_compared_with_each_other_in_the_service() -> None:
    """A z-stack of two channels fired a rule on `area_change` at its first time point:
    each plane and channel was compared with the frame before it."""
    seq = {"channels": [{"config": "DAPI", "exposure": 10.0}, {"config": "GFP", "exposure": 10.0}],
           "z_plan": {"range": 2.0, "step": 1.0}, "time_plan": {"interval": 0.0, "loops": 2}}
    config = make_config(acquisition={"sequence": seq}, feedback={"rules": [CHANGED]})
    async with Service(config) as svc:
        got = await collect_run(svc, ("measurements", "event"))
    assert len(got["measurements"]) == 2 * 2 * 3
    fired = [a["index"] for a in by_kind(got, "feedback_action")]
    assert fired and all(i["t"] == 1 for i in fired)  # only vs the same c and z at t=0


# ------------------------------------------------------------------ 2: skipped visits
SEQ_2P_2C_4T = useq.MDASequence(
    stage_positions=[(0, 0, 0), (400, 0, 0)],
    channels=["DAPI", "GFP"],
    time_plan={"interval": 0, "loops": 4},
)
EXPECTED_2P_2C_4T = [
    (t, p, c) for t in range(4) for p in range(2) for c in range(2) if (t, p) != (2, 1)
]


def visits(events: Any) -> list[tuple[int, int, int]]:
    return [(e.index["t"], e.index["p"], e.index["c"]) for e in events]


def test_a_skip_keeps_the_visit_under_way_and_drops_whole_next_visits() -> None:
    """skip visits=1 on (t1, p1, c0) dropped (t1, p1, c1), counted it as the skipped visit
    and imaged (t2, p1) in full."""
    planned = PlannedEvents(SEQ_2P_2C_4T)
    taken = [next(planned) for _ in range(7)]
    assert visits(taken)[-1] == (1, 1, 0)  # the trigger
    planned.skip(1, visits=1)
    taken += list(planned)
    assert visits(taken) == EXPECTED_2P_2C_4T
    assert planned.skipped == 2


def test_a_skip_does_not_bring_back_the_rest_of_a_visit_being_dropped() -> None:
    planned = PlannedEvents(SEQ_2P_2C_4T)
    taken = [next(planned) for _ in range(4)]  # t0 of both positions
    planned.skip(1, visits=1)  # (from p0's frame): drops p1's next visit, t1
    taken += [next(planned) for _ in range(3)]  # t1: p0 c0, p0 c1; p1 c0 dropped; t2 p0 c0
    planned.skip(1, visits=None)  # again, while p1 t1 is being dropped: all the rest
    taken += list(planned)
    assert [v for v in visits(taken) if v[1] == 1] == [(0, 1, 0), (0, 1, 1)]
    assert planned.skipped == 3 * 2


def test_a_skip_without_time_points_drops_nothing_of_the_visit_under_way() -> None:
    seq = useq.MDASequence(stage_positions=[(0, 0, 0), (400, 0, 0)], channels=["DAPI", "GFP"])
    planned = PlannedEvents(seq)
    next(planned)
    planned.skip(0, visits=None)  # the trigger's own position: no later visit
    planned.skip(1, visits=1)  # another position: its one visit, all channels
    assert [(e.index["p"], e.index["c"]) for e in planned] == [(0, 1)]


async def test_skip_in_a_two_channel_run_drops_the_next_visit() -> None:
    rule = {"name": "skipit", "max_fires": 1,
            "when": {"values": [{"path": "index.p", "eq": 1}, {"path": "index.t", "eq": 1},
                                {"path": "index.c", "eq": 0}]},
            "action": {"skip": {"visits": 1}}}
    seq = {"stage_positions": [{"x": 0.0, "y": 0.0, "z": 0.0}, {"x": 400.0, "y": 0.0, "z": 0.0}],
           "channels": [{"config": "DAPI", "exposure": 10.0}, {"config": "GFP", "exposure": 10.0}],
           "time_plan": {"interval": 0.0, "loops": 4}}
    config = make_config(acquisition={"sequence": seq}, feedback={"rules": [rule]})
    async with Service(config) as svc:
        got = await collect_run(svc, ("measurements", "event"))
        status = await control(svc, "status")
    meas = sorted((m.header for m in got["measurements"]), key=lambda h: h["frame_id"])
    assert [(h["index"]["t"], h["index"]["p"], h["index"]["c"]) for h in meas] == (
        EXPECTED_2P_2C_4T)
    assert status["feedback"]["planned_skipped"] == 2


# ------------------------------------------------------------------ 3: target
def test_the_target_keeps_integer_columns_and_the_track_id() -> None:
    objs = [dict(o, track_id=40 + o["label"]) for o in field()]
    frame = ctx(objs)
    FeatureTracker().compute(frame)
    rule = DeclarativeRule(RuleSpec.model_validate(
        {"name": "big", "when": {"objects": {"where": {"area_px": {"ge": 250}}}},
         "target": {"max": "centroid_x"}, "action": {"mode": "synchronized"}}))
    rule.evaluate(frame)
    (target,) = rule.targets
    assert target["row"] == target["index"] == 2  # (index: its v1 name, kept)
    assert (target["label"], target["area_px"], target["track_id"]) == (3, 250, 43)
    wire = json.loads(json.dumps(target))  # as published
    assert [type(wire[k]) for k in ("label", "area_px", "track_id")] == [int, int, int]
    assert isinstance(wire["area_um2"], float)
    del objs[2]["track_id"]  # tracking off: no track_id
    frame = ctx(objs)
    FeatureTracker().compute(frame)
    rule.evaluate(frame)
    assert "track_id" not in rule.targets[0]


async def test_a_published_target_matches_its_object_with_tracking_on() -> None:
    rule = {"name": "biggest", "max_fires": 1,
            "when": {"objects": {"where": {"area_px": {"gt": 40}}}},
            "target": {"max": "area_px"}, "action": {"mode": "synchronized"}}
    config = make_config(acquisition={"sequence": {"time_plan": {"interval": 0, "loops": 2}}},
                         feedback={"rules": [rule]}, tracking={"enabled": True})
    async with Service(config) as svc:
        got = await collect_run(svc, ("measurements", "event"))
    (action,) = by_kind(got, "feedback_action")
    target = action["target"]
    (meas,) = [m.header for m in got["measurements"] if m.header["frame_id"] == action["frame_id"]]
    obj = meas["objects"][target["row"]]
    for key in ("label", "area_px", "track_id"):
        assert type(target[key]) is int and target[key] == obj[key], key


# ------------------------------------------------------------------ 4: docs
def _doc_row(kind: str) -> str:
    text = (ROOT / "docs/protocol.md").read_text()
    (row,) = [line for line in text.splitlines() if line.startswith(f"| `{kind}` |")]
    return row


def test_the_protocol_names_every_field_of_the_feedback_events() -> None:
    ctl, _, published = controller([])
    ctl.wrap_planned(SEQ_2P_2C_4T, positions=range(2))
    ctl.engine.add_rule(_Returns(SkipPosition(position=99), SkipPosition()))
    ctl.on_measurements(FRAME, _message(0, {"t": 0, "p": 0}, 1000.0))
    (refused, refusal), (applied, action) = published
    assert (refused, applied) == ("feedback_refused", "feedback_action")
    # a refusal has the fields of feedback_action ("the fields of `feedback_action`"), less
    # those of its reaction, plus its own
    rows = {applied: _doc_row(applied), refused: _doc_row(applied) + _doc_row(refused)}
    for kind, detail in ((refused, refusal), (applied, action)):
        missing = [k for k in detail if f"`{k}`" not in rows[kind]]
        assert missing == [], f"{kind}: {missing}"
    row = _doc_row("feedback_refused")
    for absent in ("reaction_ms", "reaction_from", "started", "t_started"):
        assert absent not in refusal and f"`{absent}`" in row
    assert re.search(r"since it last got through", row)


async def test_a_rule_over_track_ids_without_tracking_is_warned_about(
    livemask_log: list[Any],
) -> None:
    """Objects have track ids only with tracking on: such a rule would never fire, silently
    (review)."""
    rule = {"name": "born", "when": {"objects": {"where": {"parent_track_id": {"ge": 1}}}},
            "action": {"mode": "synchronized"}}
    config = make_config(acquisition={"autostart": False}, feedback={"rules": [rule]})
    async with Service(config):
        pass
    text = "\n".join(r.getMessage() for r in livemask_log)
    assert "feedback.rules[0] ('born') uses parent_track_id, which objects have only with " \
           "tracking on" in text
    config = make_config(acquisition={"autostart": False}, feedback={"rules": [rule]},
                         tracking={"enabled": True})
    livemask_log.clear()
    async with Service(config):
        pass
    assert "only with tracking on" not in "\n".join(r.getMessage() for r in livemask_log)
