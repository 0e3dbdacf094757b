"""Feedback fixes (s25): a ``stop`` after acquiring actions of the same fire lets their frames
run first; ``persist_frames`` streaks restart when a rule is switched back on (and its
cooldown counts the frames it missed); a refusal of a whole fire publishes the action (or
null), not ``"None"``; an action over ``max_added_frames_per_minute`` is a config error; a
rule on ``replayed_from`` gets no "check the spelling" warning."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
import useq
from pydantic import ValidationError

from livemask.acquisition.feed import EventFeed
from livemask.errors import AcquisitionEnding, ConfigError
from livemask.feedback import FeedbackConfig
from livemask.feedback.rules import DeclarativeRule, value_path_problem
from livemask.feedback.spec import RuleSpec, ValueTest
from livemask.service.app import Service
from tests.test_feedback_ledger import ALWAYS, FRAME, controller, frame
from tests.test_feedback_service import _message, by_kind, feedback_config
from tests.test_service import collect_run

LAST_LOOK = {"name": "last-look", "when": ALWAYS, "max_fires": 1,
             "actions": [{"burst": {"frames": 3, "centre": False}}, {"stop": True}]}


# ------------------------------------------------------------------ 1: burst, then stop
def _stopping(rules: list[dict[str, Any]]) -> tuple[Any, ...]:
    stops: list[Any] = []  # True: stopped; a list: to end once those events have run
    ctl, injected, published = controller(
        rules, {"stage_x_range_um": [-100, 100]}, stop=lambda: stops.append(True),
        finish_with=stops.append, loop=asyncio.get_running_loop())
    planned = ctl.wrap_planned(iter([useq.MDAEvent(index={"t": t, "p": 0}) for t in range(5)]))
    assert next(planned).index == {"t": 0, "p": 0}  # the triggering frame's event
    return ctl, injected, published, stops, planned


async def test_a_stop_after_a_burst_in_one_fire_lets_the_burst_run() -> None:
    ctl, injected, published, stops, planned = _stopping([LAST_LOOK])
    frame(ctl, 0)
    (events,) = injected  # the burst's 3 frames are queued ...
    assert [e.index.get("fb") for e in events] == [1, 1, 1]
    # ... and not cancelled: the run ends once they (and nothing else queued) have run
    assert len(stops) == 1 and [id(e) for e in stops[0]] == [id(e) for e in events]
    with pytest.raises(StopIteration):  # and the plan has ended
        next(planned)
    ((kind, stop),) = published
    assert kind == "feedback_action" and stop["action"] == {"kind": "stop"}
    # the burst's frames come (no core here: the reaction clock is their first frame)
    ctl.on_measurements(FRAME, _message(1, dict(events[0].index), 1000.5))
    kind, burst = published[-1]
    assert kind == "feedback_action" and burst["action"]["kind"] == "burst"
    assert burst["started"] is True and burst["reaction_from"] == "frameReady"
    frame(ctl, 2)  # no rule runs after the stop
    ctl.acquisition_finished()
    assert len(published) == 2 and ctl.report()["actions"] == 2


async def test_a_stop_without_acquiring_actions_before_it_still_cancels_the_run() -> None:
    rules = [{"name": "s", "when": ALWAYS, "actions": [{"mode": "free-run"}, {"stop": True}]}]
    ctl, injected, _, stops, _ = _stopping(rules)
    frame(ctl, 0)
    assert stops == [True] and injected == []
    # an acquiring action refused before the stop: nothing of it is queued, the run stops
    rules = [{"name": "s", "when": ALWAYS,
              "actions": [{"move": {"dx_um": 5000.0}}, {"stop": True}]}]
    ctl, injected, published, stops, _ = _stopping(rules)
    frame(ctl, 0)
    assert stops == [True] and injected == []
    assert [k for k, _ in published] == ["feedback_refused", "feedback_action"]


async def test_a_stop_of_another_rule_still_cancels_the_queued_actions() -> None:
    burst = {"name": "b", "when": ALWAYS, "max_fires": 1,
             "action": {"burst": {"frames": 2, "centre": False}}}
    stop = {"name": "s", "when": ALWAYS, "action": {"stop": True}}
    ctl, injected, _, stops, _ = _stopping([burst, stop])
    frame(ctl, 0)
    assert len(injected) == 1 and stops == [True]


async def test_a_stop_after_a_channel_burst_puts_the_settings_back_first() -> None:
    """Review: finish_with was given the restore event the controller made, not the tagged
    copy it queued, so the copy was dropped: the camera stayed at GFP 80 ms after the run."""
    feed = EventFeed(iter([useq.MDAEvent(index={"t": t, "p": 0}, channel={"config": "DAPI"},
                                         exposure=10.0) for t in range(5)]))
    rule = {"name": "gfp", "when": ALWAYS, "max_fires": 1,
            "actions": [{"channel": {"channel": "GFP", "exposure_ms": 80.0, "frames": 2}},
                        {"stop": True}]}
    stops: list[bool] = []
    ctl, _, _ = controller(
        [rule], inject=lambda ev: feed.inject(ev, timed_from_first=True),
        stop=lambda: stops.append(True), finish_with=feed.finish_with,
        loop=asyncio.get_running_loop())
    feed._planned = ctl.wrap_planned(feed._planned)  # as the service wraps its plan
    ctl.on_event_started(next(feed))  # the triggering frame's event
    frame(ctl, 0)
    rest = list(feed)  # what runs after the stop
    assert stops == []
    assert [(e.exposure, e.channel.config if e.channel else None) for e in rest] == [
        (80.0, "GFP"), (80.0, "GFP"), (10.0, "DAPI")]  # the burst, then its restore
    assert isinstance(rest[-1].action, useq.CustomAction)
    assert feed.not_run == 0


def test_the_feed_ends_once_the_kept_events_have_run() -> None:
    """Review: the stop only ended the plan, so everything queued ran first (a client's
    enqueue backlog of up to 100,000 events, other rules' bursts, events enqueued
    later), and a queue that never drained never stopped."""
    feed = EventFeed(iter([useq.MDAEvent(index={"t": t}) for t in range(5)]))
    backlog = [useq.MDAEvent(index={"ext": i}) for i in range(3)]
    burst = [useq.MDAEvent(index={"fb": 1, "t": 0}) for _ in range(2)]
    feed.inject(backlog)
    feed.inject(burst)
    feed.finish_with(burst)
    assert list(feed) == burst  # the backlog dropped, no planned event after
    assert feed.not_run == 3 and feed.pending == 0
    with pytest.raises(AcquisitionEnding):
        feed.inject([useq.MDAEvent()])


async def test_the_service_takes_the_last_look_before_it_stops() -> None:
    async with Service(feedback_config([LAST_LOOK], mode="synchronized")) as svc:
        got = await collect_run(svc, ("measurements", "event"))
    meas = sorted((m.header for m in got["measurements"]), key=lambda h: h["frame_id"])
    actions = {a["action"]["kind"]: a for a in by_kind(got, "feedback_action")}
    assert set(actions) == {"burst", "stop"}
    assert actions["burst"]["started"] is True
    assert [h["index"].get("fb") for h in meas] == [None] + [actions["burst"]["action_id"]] * 3
    (finished,) = by_kind(got, "acquisition_finished")
    assert finished["events_not_run"] == 0 and finished["error"] is None


# ------------------------------------------------------------------ 2: switched off and on
PERSIST = {"name": "r", "persist_frames": 3,
           "when": {"values": [{"path": "summary.count", "ge": 5}]},
           "action": {"burst": {"frames": 1, "centre": False}}}


def _count(ctl: Any, t: int, count: int) -> None:
    msg = _message(t, {"t": t, "p": 0}, 1000.0 + t)
    msg["summary"]["count"] = count
    ctl.on_measurements(FRAME, msg)


def test_a_persist_streak_restarts_when_the_rule_is_switched_back_on() -> None:
    ctl, _, _ = controller([PERSIST])
    _count(ctl, 0, 9)
    _count(ctl, 1, 9)  # a streak of 2
    ctl.set_enabled("r", False)
    for t in range(2, 10):
        _count(ctl, t, 0)
    ctl.set_enabled("r", True)
    _count(ctl, 10, 9)
    assert ctl.report()["rules"][0]["fired"] == 0  # 1 frame since it is on again, not 3
    _count(ctl, 11, 9)
    _count(ctl, 12, 9)
    assert ctl.report()["rules"][0]["fired"] == 1
    # the same when it is switched by re-sending the rules (its slot and state are kept)
    _count(ctl, 13, 9)
    _count(ctl, 14, 9)
    ctl.set_rules([RuleSpec.model_validate({**PERSIST, "enabled": False})])
    _count(ctl, 15, 9)
    ctl.set_rules([RuleSpec.model_validate(PERSIST)])
    _count(ctl, 16, 9)
    assert ctl.report()["rules"][0]["fired"] == 1


def test_frames_missed_while_off_count_toward_cooldown_frames() -> None:
    rule = {**PERSIST, "persist_frames": 1, "cooldown_frames": 5}
    ctl, _, _ = controller([rule])
    _count(ctl, 0, 9)
    assert ctl.report()["rules"][0]["fired"] == 1
    ctl.set_enabled("r", False)
    for t in range(1, 9):  # 8 frames since the fire: its cooldown (5) is over
        _count(ctl, t, 9)
    ctl.set_enabled("r", True)
    _count(ctl, 9, 9)
    assert ctl.report()["rules"][0]["fired"] == 2


# ------------------------------------------------------------------ 3: what a refusal names
def test_a_fire_refused_as_a_whole_publishes_the_rules_action() -> None:
    rule = {"name": "few", "when": {"objects": {"where": {"area_px": {"gt": 1000}},
                                                "match": {"lt": 3}}},
            "action": {"burst": {"frames": 2}}}
    ctl, injected, published = controller([rule])
    frame(ctl, 0)  # its one object is small: none to centre on
    ((kind, refused),) = published
    assert kind == "feedback_refused" and refused["limit"] == "no_target" and injected == []
    action = json.loads(json.dumps(refused))["action"]
    assert action["kind"] == "burst" and action["frames"] == 2 and action["centre"] is True


class _Says:
    """A user rule that returns no list of actions: a string."""

    name = "says"

    def evaluate(self, ctx: Any) -> Any:
        return "stop"


def test_a_fire_with_no_action_at_all_publishes_null() -> None:
    ctl, _, published = controller([])
    ctl.engine.add_rule(_Says())
    frame(ctl, 0)
    ((kind, refused),) = published
    assert kind == "feedback_refused" and refused["limit"] == "unknown_action"
    assert refused["action"] is None


# ------------------------------------------------------------------ 4: frames per minute
def test_an_action_over_the_frames_per_minute_limit_is_a_config_error() -> None:
    burst = {"name": "big", "when": ALWAYS,
             "action": {"burst": {"frames": 20, "interval_s": 0.1, "centre": False}}}
    limits = {"max_added_frames_per_minute": 10}
    with pytest.raises(ValidationError, match=r"feedback\.rules\[0\] \('big'\): burst of 20 "
                       r"frames, more than feedback\.limits\.max_added_frames_per_minute "
                       r"\(10\): every fire would be refused"):
        FeedbackConfig.model_validate({"rules": [burst], "limits": limits})
    ok = {**burst, "action": {"burst": {"frames": 10, "centre": False}}}
    ctl, _, _ = controller([ok], limits)  # as many as the limit: fine
    with pytest.raises(ConfigError, match=r"rules\[0\] \('big'\).*max_added_frames_per_minute"):
        ctl.set_rules([RuleSpec.model_validate(burst)])  # the `rules` command
    zstack = {**burst, "action": {"zstack": {"range_um": 20, "step_um": 1}}}
    with pytest.raises(ValidationError, match="zstack of 21 frames"):
        FeedbackConfig.model_validate({"rules": [zstack], "limits": limits})


# ------------------------------------------------------------------ 5: replayed_from
def test_a_rule_on_replayed_from_gets_no_spelling_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert value_path_problem(ValueTest(path="replayed_from.time_s", ge=1.0)) is None
    problem = value_path_problem(ValueTest(path="replayed_from.time_s", ge=1.0, reduce="width"))
    assert problem is not None and "holds no [low, high]" in problem
    with caplog.at_level(logging.WARNING, logger="livemask"):
        DeclarativeRule(RuleSpec.model_validate(
            {"name": "late", "when": {"values": [{"path": "replayed_from.time_s", "ge": 60}]},
             "action": {"stop": True}}))
    assert not [r for r in caplog.records if "spelling" in r.getMessage()]
