"""Rule engine fixes: atomic rule replacement, baselines with rules off, a failing reset(),
dose keys of action frames, user rule results, rules that can never succeed."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import useq
from pydantic import ValidationError

from livemask.errors import ConfigError
from livemask.feedback import (
    Burst,
    FeedbackConfig,
    MoveTo,
    PlannedEvents,
    RuleSpec,
    SetChannel,
)
from livemask.service.app import Service
from tests.conftest import make_config
from tests.test_feedback_rules import ALWAYS, _Returns, ctx, engine, field, nucleus
from tests.test_service import collect_run, control

STOP_ALWAYS = {"name": "A", "when": ALWAYS, "action": {"stop": True}}


# ------------------------------------------------------------------ 2: atomic replace
def test_a_failed_rules_replace_changes_no_rule() -> None:
    """A rule switched off was switched on again by a replace that failed on a later rule
    (an error reply means nothing applied)."""
    eng = engine([STOP_ALWAYS])
    before = eng.slot("A")
    before.enabled = False
    typo = {"name": "B", "when": {"objects": {"where": {"aera_px": {"gt": 1}}}},
            "action": {"stop": True}}
    with pytest.raises(ConfigError, match=r"rule 'B': unknown object feature 'aera_px'"):
        eng.set_rules(FeedbackConfig.model_validate({"rules": [STOP_ALWAYS, typo]}).rules)
    assert eng.slots == [before] and before.enabled is False
    assert eng.evaluate(ctx(field())) == []


# ------------------------------------------------------------------ 6: enabled in a list
def test_switching_a_rule_off_and_on_by_its_list_keeps_its_max_fires() -> None:
    once = {**STOP_ALWAYS, "max_fires": 1}
    eng = engine([once])
    assert len(eng.evaluate(ctx(field()))) == 1
    slot = eng.slot("A")
    off = FeedbackConfig.model_validate({"rules": [{**once, "enabled": False}]}).rules
    eng.set_rules(off)
    assert eng.slot("A") is slot and slot.enabled is False
    assert eng.evaluate(ctx(field())) == []
    eng.set_rules(FeedbackConfig.model_validate({"rules": [once]}).rules)
    assert eng.slot("A") is slot and slot.enabled is True and slot.fired == 1
    assert eng.evaluate(ctx(field())) == []  # before: it fired a second time


# ------------------------------------------------------------------ 3: baselines
BRIGHTER = {"name": "brighter", "when": {"objects": {"where": {
    "mean_intensity_change": {"gt": 1.5}}}}, "action": {"channel": {"frames": 1}}}


def _drifting(t: int) -> Any:
    """Nucleus 1 brightens 10 % a frame (never 1.5x from one frame to the next)."""
    objs = field(3)
    objs[0] = nucleus(1, 100.0, 100.0, intensity=100 + 500 * 1.1 ** t)
    return ctx(objs, t=t)


def test_change_features_compare_with_the_frame_before_while_every_rule_was_off() -> None:
    """All rules off from frame 3 to 8: on at frame 9 it compared with frame 2 (1.95x) and
    fired; the documented baseline is the frame before (1.1x)."""
    eng = engine([BRIGHTER])
    slot = eng.slot("brighter")
    for t in range(12):
        slot.enabled = not 3 <= t <= 8
        c = _drifting(t)
        assert eng.evaluate(c) == []
        if t > 0 and slot.enabled:
            assert c.features[0]["mean_intensity_change"] == pytest.approx(1.1, rel=0.02)


def test_rules_loaded_after_a_time_without_any_start_without_stale_baselines() -> None:
    eng = engine([BRIGHTER])
    rules = list(eng.config.rules)
    for t in range(3):
        eng.evaluate(_drifting(t))
    eng.set_rules([])
    for t in range(3, 9):
        assert eng.evaluate(_drifting(t)) == []
    eng.set_rules(rules)
    c = _drifting(9)
    assert eng.evaluate(c) == []  # before: 1.95x against frame 2, and it fired
    assert c.features[0]["mean_intensity_change"] is None  # no baseline: as a first frame


# ------------------------------------------------------------------ 4: a failing reset()
class _BadReset:
    name = "bad-reset"

    def reset(self) -> None:
        raise RuntimeError("reset failed")

    def evaluate(self, ctx: Any) -> list[Any]:
        return [SetChannel(frames=1)]


def test_a_rule_whose_reset_raises_is_counted_and_runs_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    eng = engine([STOP_ALWAYS])
    slot = eng.add_rule(_BadReset())
    with caplog.at_level(logging.ERROR, logger="livemask"):
        eng.reset()  # before: RuntimeError, and no acquisition could start
    assert slot.errors == 1 and eng.slot("A").errors == 0
    assert "feedback rule 'bad-reset': its reset() failed" in caplog.text
    assert [d.rule for d in eng.evaluate(ctx(field()))] == ["A", "bad-reset"]


async def test_a_service_starts_acquisitions_with_a_rule_whose_reset_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`start` answered `internal: RuntimeError: reset failed`, also with the rule off."""
    monkeypatch.setitem(sys.modules, "lab_bad_reset", SimpleNamespace(BadReset=_BadReset))
    cfg = make_config(
        acquisition={"sequence": {"time_plan": {"interval": 0.0, "loops": 2}}},
        feedback={"rules": [{"name": "br", "use": "lab_bad_reset:BadReset",
                             "enabled": False}]},
    )
    async with Service(cfg) as svc:
        got = await collect_run(svc, ("event",), timeout_s=30)
        kinds = [m.header["kind"] for m in got["event"]]
        assert "acquisition_finished" in kinds
        (rule,) = (await control(svc, "rules"))
        assert rule["name"] == "br" and rule["errors"] == 1


# ------------------------------------------------------------------ 5: dose keys
def test_an_action_frame_at_a_planned_position_not_visited_yet_counts_there() -> None:
    """A move from p0 to p1's coordinates before p1's first visit was charged to
    'xy300,10'."""
    eng = engine([])  # a field of 332.8 µm
    eng.planner.start_plan(range(2), {0: (-300.0, 0.0, 0.0), 1: (300.0, 0.0)})
    eng.add_rule(_Returns(MoveTo(x_um=300.0, y_um=10.0), MoveTo(x_um=-290.0, y_um=0.0)))
    decisions = eng.evaluate(ctx([], p=0, xy=(-300.0, 0.0)))
    assert [d.dose_keys for d in decisions] == [["p1"], ["p0"]]
    assert eng.planner.positions == {}  # (a revisit still needs a visit first)
    assert eng.planner.plan_positions == frozenset({0, 1})


def test_an_action_frame_from_a_trigger_without_p_counts_at_the_planned_position() -> None:
    """A rule firing on an enqueued frame (no `p`) at p0's coordinates charged 'xy0,0'
    while p0's planned frames were charged 'p0'."""
    seq = useq.MDASequence(stage_positions=[(0, 0, 0), (2000, 0, 0)],
                           channels=[{"config": "DAPI", "exposure": 10.0}])
    eng = engine([])
    assert len(list(PlannedEvents(seq, guard=eng.guard, planner=eng.planner))) == 2
    eng.add_rule(_Returns(SetChannel(exposure_ms=30.0), MoveTo(dx_um=5000.0)))
    decisions = eng.evaluate(ctx([], p=None, xy=(0.0, 0.0), index={"ext": 1}))
    assert [d.dose_keys for d in decisions] == [["p0"], ["xy5000,0"]]
    assert eng.guard.dose_snapshot() == {"p0": 40.0, "p1": 10.0, "xy5000,0": 10.0}
    # far from every planned field, a trigger without `p` keeps its own place's key
    (d, _) = eng.evaluate(ctx([], p=None, xy=(9000.4, 0.0), index={"ext": 2}))
    assert d.dose_keys == ["xy9000,0"]


# ------------------------------------------------------------------ 7: user rule results
class _Gives:
    def __init__(self, result: Any) -> None:
        self.name = "gives"
        self.result = result

    def evaluate(self, ctx: Any) -> Any:
        return self.result


@pytest.mark.parametrize("result", ["burst", b"burst", {"burst": {"frames": 2}}, 5])
def test_a_user_rule_result_that_is_no_list_is_refused_once(result: Any) -> None:
    """A string was refused once per character, a dict as its key, an int counted as the
    rule's error."""
    eng = engine([])
    slot = eng.add_rule(_Gives(result))
    (d,) = eng.evaluate(ctx(field()))
    assert d.violation is not None and d.violation.limit == "unknown_action"
    assert d.violation.message.startswith(
        f"evaluate() must return a list of actions (e.g. [Burst(frames=3)]), not "
        f"{type(result).__name__}")
    assert (slot.refused, slot.errors) == (1, 0)


@pytest.mark.parametrize("result", [None, False, 0, [], ()])
def test_a_user_rule_result_that_is_false_is_no_action(result: Any) -> None:
    """Review: ``return cond and [Burst(...)]`` gives False, which was refused as
    unknown_action on every such frame, spending max_fires and starting cooldowns."""
    eng = engine([])
    slot = eng.add_rule(_Gives(result))
    assert eng.evaluate(ctx(field())) == []
    assert (slot.refused, slot.errors, slot.fired) == (0, 0, 0)


def test_a_user_rule_may_return_a_single_action() -> None:
    eng = engine([])
    slot = eng.add_rule(_Gives(Burst(frames=2)))
    (d,) = eng.evaluate(ctx(field()))
    assert d.accepted and len(d.events) == 2 and slot.errors == 0


def test_refusals_say_what_is_wrong() -> None:
    eng = engine([])
    eng.add_rule(_Gives([Burst(frames=2.0)]))  # type: ignore[arg-type]
    (d,) = eng.evaluate(ctx(field()))
    assert d.violation is not None
    assert d.violation.message.endswith("frames=2.0: give frames as an integer >= 1")
    empty = engine([{"name": "empty", "when": {"objects": {"where": {"area_px": {"gt": 10}},
                                                           "match": {"lt": 3}}},
                     "action": {"burst": {"frames": 2, "centre": True}}}])
    (d,) = empty.evaluate(ctx([]))
    assert d.violation is not None and d.violation.limit == "no_target"
    assert d.violation.message.startswith(
        "burst with centre: true: no object on this frame to centre on")


# ------------------------------------------------------------------ 8: checked at load
def _rule(action: dict[str, Any], **when: Any) -> dict[str, Any]:
    return {"name": "a", "when": when or ALWAYS, "action": action}


@pytest.mark.parametrize(
    ("action", "limits", "needle"),
    [
        ({"burst": {"frames": 5, "centre": False}}, {"max_frames_per_action": 3},
         r"\('a'\): burst of 5 frames, more than feedback.limits.max_frames_per_action \(3\)"),
        ({"zstack": {"range_um": 10, "step_um": 1}}, {"max_frames_per_action": 3},
         r"\('a'\): zstack of 11 frames, more than feedback.limits.max_frames_per_action"),
        ({"zstack": {"range_um": 100, "step_um": 1}}, {},
         r"\('a'\): zstack spanning 100 µm, more than feedback.limits.max_z_range_um \(50"),
    ],
)
def test_a_rule_every_fire_of_which_would_be_refused_is_a_config_error(
    action: dict[str, Any], limits: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ValidationError, match=needle):
        FeedbackConfig.model_validate({"rules": [_rule(action)], "limits": limits})
    eng = engine([], limits)  # the `rules` command: refused, nothing changed
    with pytest.raises(ConfigError, match=needle):
        eng.set_rules([RuleSpec.model_validate(_rule(action))])
    assert eng.slots == []


def test_rules_at_their_limits_load() -> None:
    FeedbackConfig.model_validate({"rules": [
        _rule({"zstack": {"range_um": 50, "step_um": 1}}),
        {**_rule({"burst": {"frames": 3, "centre": False}}), "name": "b"}],
        "limits": {"max_frames_per_action": 51}})
    FeedbackConfig.model_validate({"rules": [_rule(
        {"stop": True}, values=[{"path": "summary.count", "ge": 5, "le": 5}])]})


@pytest.mark.parametrize("test", [{"gt": 10, "lt": 5}, {"gt": 5, "le": 5},
                                  {"eq": 3, "ne": 3}, {"eq": 3, "ge": 4},
                                  {"ge": 3, "le": 3, "ne": 3}])
def test_a_test_no_number_passes_is_a_config_error(test: dict[str, float]) -> None:
    with pytest.raises(ValidationError, match=r"no number is .*: the test can never pass"):
        FeedbackConfig.model_validate({"rules": [
            _rule({"stop": True}, values=[{"path": "summary.count", **test}])]})


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ({"path": "sumary.count", "ge": 1}, "the measurements message has no field 'sumary'"),
        ({"path": "summary.count", "reduce": "width", "lt": 1},
         "'summary' holds no [low, high] intervals"),
    ],
)
def test_a_values_path_that_cannot_pass_is_warned_at_load(
    caplog: pytest.LogCaptureFixture, value: dict[str, Any], needle: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="livemask"):
        engine([_rule({"stop": True}, values=[value])])
    assert f"feedback rule 'a': when.values[0]: path {value['path']!r}" in caplog.text
    assert needle in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="livemask"):
        engine([_rule({"stop": True}, values=[
            {"path": "grains.cumulative.mean_equivalent_diameter_ci95_um",
             "reduce": "relative_width", "lt": 0.05}])])
    assert caplog.text == ""



async def test_the_service_gives_the_planner_its_positions_coordinates() -> None:
    """The dose ledger needs the plan's coordinates before a position's first visit (a
    move there at t=0 was charged to its rounded x, y): the service passes them on."""
    seq = {"stage_positions": [{"x": -300.0, "y": 0.0, "z": 0.0}, {"x": 300.0, "y": 10.0}],
           "time_plan": {"interval": 0, "loops": 1}}
    rule = {"name": "r", "enabled": False, "when": ALWAYS, "action": {"stop": True}}
    async with Service(make_config(simulation={"truth": False},
                                   acquisition={"sequence": seq, "mode": "synchronized"},
                                   feedback={"rules": [rule]})) as svc:
        await control(svc, "start")
        assert svc.feedback is not None
        assert svc.feedback.engine.planner.plan_coordinates == {
            0: (-300.0, 0.0, 0.0), 1: (300.0, 10.0, None)}
        await control(svc, "stop")
