"""Feedback fixes (s20): a read-only rule context, numpy numbers in actions, the light
charged to a planned frame whose exposure is set while it waits, and a user rule factory
that raises."""

from __future__ import annotations

import copy
import json
import sys
import types
from typing import Any

import numpy as np
import pytest
import useq

from livemask.errors import ConfigError
from livemask.feedback import (
    Burst,
    Centre,
    FrameContext,
    MoveTo,
    Revisit,
    SetChannel,
    SkipPosition,
    ZStack,
)
from tests.test_feedback_ledger import FRAME, controller
from tests.test_feedback_rules import SHAPE, engine, field


class _Writes:
    """A user rule that writes into what it is given (as a user might)."""

    def __init__(self, mode: str) -> None:
        self.name = f"writes-{mode}"
        self.mode = mode

    def evaluate(self, ctx: FrameContext) -> list[Any]:
        if self.mode == "scale":
            for o in ctx.objects:
                o["area_um2"] = -1.0  # type: ignore[index]
        elif self.mode == "del":
            for o in ctx.objects:
                o.pop("area_um2", None)  # type: ignore[attr-defined]
        elif self.mode == "add":
            ctx.objects[0]["my_score"] = 1.0  # type: ignore[index]
        elif self.mode == "summary":
            ctx.measurements["summary"]["count"] = -1
        elif self.mode == "centroid":
            ctx.objects[0]["centroid_yx"][0] = -5.0
        elif self.mode == "append":
            ctx.objects.append({"label": 99})  # type: ignore[attr-defined]
        elif self.mode == "index":
            ctx.index["t"] = 99  # type: ignore[index]
        return []


class _Sees:
    """A rule after the writer: what it is shown."""

    def __init__(self) -> None:
        self.name = "sees"
        self.seen: list[tuple[Any, ...]] = []

    def evaluate(self, ctx: FrameContext) -> list[Any]:
        o = ctx.objects[0]
        self.seen.append((o.get("area_um2"), "my_score" in o, tuple(o["centroid_yx"]),
                          ctx.summary["count"], len(ctx.objects), ctx.index["t"]))
        return []


def _message() -> dict[str, Any]:
    return {
        "frame_id": 7, "acquisition": 1, "index": {"t": 0, "p": 0},
        "t": {"acquired": 1000.0}, "position": {"x_um": 100.0, "y_um": 200.0, "z_um": 0.0},
        "settings": {"channel": "DAPI", "exposure_ms": 10.0}, "pixel_size_um": 0.65,
        "summary": {"count": 9, "background_mean": 100.0},
        "objects": field(),
    }


# ------------------------------------------------------------------ 1: read-only context
@pytest.mark.parametrize(
    "mode", ["scale", "del", "add", "summary", "centroid", "append", "index"])
def test_a_rule_writing_into_the_context_changes_nothing_and_is_counted(mode: str) -> None:
    """A user rule that wrote into ctx.objects / ctx.measurements changed the published
    message (and so measurements.csv, frames.jsonl, the snapshot) and what later rules saw
    (hunt t13)."""
    message = _message()
    before = copy.deepcopy(message)
    eng = engine([])
    writer = eng.add_rule(_Writes(mode))
    sees = _Sees()
    eng.add_rule(sees)
    eng.evaluate(FrameContext.from_measurements(message, SHAPE))
    assert message == before  # the pipeline's message: as published
    assert writer.errors == 1  # the write raised inside the rule
    first = before["objects"][0]
    assert sees.seen == [(first["area_um2"], False, tuple(first["centroid_yx"]), 9, 9, 0)]


def test_the_controller_hands_rules_a_view_of_the_published_message() -> None:
    ctl, _, _ = controller([])
    writer = ctl.engine.add_rule(_Writes("scale"))
    message = _message()
    before = copy.deepcopy(message)
    ctl.on_measurements(FRAME, message)
    assert message == before and writer.errors == 1


def test_declarative_rules_and_values_work_on_the_read_only_view() -> None:
    """Mappings and tuples of the view: ``reduce: length`` of a mapping, intervals, objects."""
    rules = [
        {"name": "len", "when": {"values": [{"path": "summary", "reduce": "length", "eq": 2}]},
         "action": {"burst": {"frames": 1, "centre": False}}},
        {"name": "width", "when": {"values": [
            {"path": "objects.1.centroid_yx", "reduce": "width", "eq": 150}]},
         "action": {"burst": {"frames": 1, "centre": False}}},
        {"name": "obj", "when": {"objects": {"where": {"area_px": {"gt": 0}}}},
         "action": {"centre": {}}},
    ]
    decisions = engine(rules).evaluate(FrameContext.from_measurements(_message(), SHAPE))
    assert [d.rule for d in decisions if d.accepted] == ["len", "width", "obj"]
    ctx = FrameContext.from_measurements(_message(), SHAPE)
    assert ctx.value("objects.0.centroid_yx.1") == 100.0
    assert dict(ctx.objects[0])["label"] == 1  # a copy to change: dict(o)


# ------------------------------------------------------------------ 2: numpy numbers
def test_actions_with_numpy_numbers_are_taken_as_python_numbers() -> None:
    """Burst(frames=np.int64(2)), Centre with np.float32, SetChannel(exposure_ms=
    np.float32(20)), SkipPosition(visits=np.int64(1)) were refused as invalid_action
    (hunt t14)."""
    f32, i64 = np.float32, np.int64
    actions = [
        Burst(frames=i64(2), interval_s=f32(0.5), centre_yx=np.array([100.0, 120.0], f32)),
        Centre(centre_yx=(f32(100.0), f32(120.0)), frames=np.uint8(1)),
        SetChannel(exposure_ms=f32(20.0), frames=i64(1)),
        SkipPosition(position=i64(0), visits=i64(1)),
        MoveTo(x_um=f32(10.0), y_um=i64(20), z_um=f32(1.0), frames=i64(1)),
        MoveTo(dx_um=f32(5.0), dy_um=i64(-5)),
        ZStack(range_um=f32(2.0), step_um=i64(1)),
        Revisit(position=i64(0), frames=i64(2), interval_s=f32(1.0)),
    ]

    class _Numpy:
        name = "numpy"

        def evaluate(self, ctx: FrameContext) -> list[Any]:
            return list(actions)

    eng = engine([])
    eng.planner.positions[0] = (100.0, 200.0, 0.0)
    eng.add_rule(_Numpy())
    decisions = eng.evaluate(FrameContext.from_measurements(_message(), SHAPE))
    assert [(d.action.kind, d.violation) for d in decisions] == [
        (a.kind, None) for a in actions]
    for d in decisions:
        described = d.describe()
        json.dumps(described)  # plain numbers throughout
        for value in described["action"].values():
            items = value if isinstance(value, tuple) else (value,)
            assert all(type(v) in (int, float, str, bool, type(None)) for v in items), value
        for e in d.events:
            assert e.exposure is None or type(e.exposure) is float
    burst = decisions[0]
    assert len(burst.events) == 2 and burst.action.frames == 2
    assert type(burst.action.frames) is int
    assert decisions[2].events[0].exposure == 20.0


@pytest.mark.parametrize(
    ("action", "limit"),
    [
        (Burst(frames=np.bool_(True)), "invalid_action"),  # a bool is no count
        (Burst(frames=np.float64(2.0)), "invalid_action"),  # nor a float
        (SkipPosition(visits=np.int64(0)), "invalid_action"),
        (SetChannel(exposure_ms=np.float32("nan")), "invalid_action"),
        (Burst(frames=np.int64(10**9)), "max_frames_per_action"),  # before building them
    ],
)
def test_bad_numpy_values_are_still_refused(action: Any, limit: str) -> None:
    class _One:
        name = "one"

        def evaluate(self, ctx: FrameContext) -> list[Any]:
            return [action]

    eng = engine([])
    eng.add_rule(_One())
    (d,) = eng.evaluate(FrameContext.from_measurements(_message(), SHAPE))
    assert d.violation is not None and d.violation.limit == limit
    assert not d.events


# ------------------------------------------------------------------ 3: planned frame light
def test_a_set_exposure_while_a_planned_frame_waits_recharges_it() -> None:
    """The ledger charged a planned frame without its own exposure with the exposure in
    effect when the runner took it, not the one a `set exposure_ms` during its wait for
    its start time gave it (hunt t18: 45 ms charged against a real 60 ms)."""
    ctl, _, _ = controller([], camera_settings=lambda: {"exposure_ms": 20.0})
    ctl.acquisition_started()
    planned = [useq.MDAEvent(index={"t": t, "p": 0}) for t in range(3)]
    own = useq.MDAEvent(index={"t": 3, "p": 0}, exposure=5.0)
    feed = ctl.wrap_planned([*planned, own], positions=[0])
    ctl.on_event_started(next(feed))  # taken and started: 20
    waiting = next(feed)  # taken: the runner waits for its min_start_time
    assert ctl.guard.dose_snapshot() == {"p0": 40.0}
    ctl.exposure_set(45.0)
    ctl.exposure_set(60.0)  # (two sets during the wait: the last one counts)
    assert ctl.guard.dose_snapshot() == {"p0": 80.0}
    ctl.on_event_started(waiting)  # imaged with 60
    ctl.exposure_set(25.0)  # after it started: it keeps its 60
    assert ctl.guard.dose_snapshot() == {"p0": 80.0}
    ctl.on_event_started(next(feed))  # the next one is charged the new exposure
    assert ctl.guard.dose_snapshot() == {"p0": 105.0}
    next(feed)  # an event with its own exposure is imaged with it, whatever is set
    ctl.exposure_set(30.0)
    assert ctl.guard.dose_snapshot() == {"p0": 110.0}


# ------------------------------------------------------------------ 4: a factory that raises
def test_a_user_rule_factory_that_raises_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A factory raising ValueError gave `internal` over the `rules` command and a raw
    traceback at `livemask serve` start-up (hunt bad1)."""
    mod = types.ModuleType("s20_lab_rules")

    class Validating:
        def __init__(self, n: int = 1) -> None:
            if n < 1:
                raise ValueError(f"n must be >= 1, got {n}")
            self.name = "validating"

        def evaluate(self, ctx: FrameContext) -> list[Any]:
            return []

    mod.Validating = Validating  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "s20_lab_rules", mod)
    rule = {"name": "v", "use": "s20_lab_rules:Validating", "params": {"n": 0}}
    with pytest.raises(ConfigError, match=(
            r"feedback rule 'v' \(use: s20_lab_rules:Validating\): calling it with params "
            r"\{'n': 0\} failed: ValueError: n must be >= 1, got 0")):
        engine([rule])
    eng = engine([{**rule, "params": {"n": 2}}])
    with pytest.raises(ConfigError, match=r"ValueError: n must be >= 1"):  # the `rules` path
        eng.set_rules([type(eng.config.rules[0]).model_validate(rule)])
    assert [s.name for s in eng.slots] == ["v"]  # nothing changed
