"""Feedback bookkeeping: ledgers, counters, settings put back, runs, limits on an action."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import numpy as np
import pytest
import useq

from livemask.feedback import (
    Burst,
    FeedbackConfig,
    FeedbackController,
    PlannedEvents,
    SetChannel,
    SetMode,
    SkipPosition,
    ZStack,
)
from livemask.feedback.actions import METADATA_KEY
from tests.conftest import ROOT
from tests.test_feedback_service import _Frame, _message

ALWAYS = {"values": [{"path": "summary.count", "ge": 0}]}
FRAME = _Frame(image=np.zeros((64, 64), np.uint16))


class _Returns:
    """A user rule that returns the given actions on every frame."""

    def __init__(self, *actions: Any) -> None:
        self.name = "user"
        self.actions = list(actions)

    def evaluate(self, ctx: Any) -> list[Any]:
        return list(self.actions)


def controller(
    rules: list[dict[str, Any]],
    limits: dict[str, Any] | None = None,
    *,
    inject: Any = None,
    **kwargs: Any,
) -> tuple[FeedbackController, list[list[useq.MDAEvent]], list[tuple[str, dict[str, Any]]]]:
    injected: list[list[useq.MDAEvent]] = []
    published: list[tuple[str, dict[str, Any]]] = []
    cfg = FeedbackConfig.model_validate({"rules": rules, "limits": limits or {}})
    ctl = FeedbackController(
        cfg, pixel_size_um=1.0,
        inject=inject or (lambda ev: injected.append(ev) or len(ev)),
        publish=lambda kind, detail: published.append((kind, detail)), **kwargs,
    )
    ctl.acquisition_started()
    return ctl, injected, published


def frame(ctl: FeedbackController, t: int, index: dict[str, int] | None = None) -> None:
    ctl.on_measurements(FRAME, _message(t, index or {"t": t, "p": 0}, 1000.0 + t))


# ------------------------------------------------------------------ 1: settings put back
async def test_an_action_changing_exposure_and_channel_is_followed_by_a_restore() -> None:
    rule = {"name": "gfp", "when": ALWAYS, "max_fires": 1,
            "action": {"channel": {"channel": "GFP", "exposure_ms": 80.0, "frames": 2}}}
    ctl, injected, _ = controller([rule], loop=asyncio.get_running_loop())
    planned = useq.MDAEvent(index={"t": 0, "p": 0}, channel={"config": "DAPI"}, exposure=10.0)
    ctl.on_event_started(planned)  # the runner set these up for the triggering frame
    frame(ctl, 0)
    (events,) = injected
    *frames, restore = events
    assert [(e.exposure, e.channel.config if e.channel else None) for e in frames] == [
        (80.0, "GFP"), (80.0, "GFP")]
    assert isinstance(restore.action, useq.CustomAction)  # takes no image
    assert restore.exposure == 10.0 and restore.channel is not None
    assert restore.channel.config == "DAPI"
    assert restore.metadata[METADATA_KEY]["restore"] is True
    assert ctl.guard.added_last_minute() == 2  # the restore is no frame
    # an action that changes nothing gets no restore
    ctl2, injected2, _ = controller([{"name": "b", "when": ALWAYS,
                                      "action": {"burst": {"frames": 2, "centre": False}}}])
    frame(ctl2, 0)
    assert [type(e.action) for e in injected2[0]] == [useq.AcquireImage] * 2


async def test_a_set_exposure_while_a_restore_is_queued_is_not_undone() -> None:
    """The restore event is made when the action is decided: a `set exposure_ms` while the
    action's frames still waited was undone by it (review)."""
    rule = {"name": "long", "when": ALWAYS, "max_fires": 1,
            "action": {"channel": {"exposure_ms": 80.0}}}
    ctl, injected, _ = controller([rule], loop=asyncio.get_running_loop())
    ctl.on_event_started(useq.MDAEvent(index={"t": 0, "p": 0}, exposure=10.0))
    frame(ctl, 0)
    assert injected[0][-1].exposure == 10.0  # the restore, queued
    ctl.exposure_set(20.0)
    (after,) = injected[1]  # queued after the restore: the set exposure wins
    assert after.exposure == 20.0 and isinstance(after.action, useq.CustomAction)
    restore = injected[0][-1]
    ctl.on_event_started(restore)  # the restore ran: nothing is queued for a later set
    await asyncio.sleep(0)
    ctl.exposure_set(30.0)
    assert len(injected) == 2


async def test_the_camera_reading_gives_the_settings_and_the_light_charged() -> None:
    """Planned events without an exposure were charged 10 ms whatever the camera used."""
    camera = {"exposure_ms": 25.0, "channel": "DAPI"}
    rule = {"name": "long", "when": ALWAYS, "max_fires": 1,
            "action": {"channel": {"exposure_ms": 80.0}}}
    ctl, injected, _ = controller([rule], camera_settings=lambda: camera)
    planned = PlannedEvents([useq.MDAEvent(index={"t": 0, "p": 0})] * 2, guard=ctl.guard)
    next(planned)
    frame(ctl, 0)
    (events,) = injected
    assert events[-1].exposure == 25.0 and events[-1].channel is None
    next(planned)
    assert ctl.guard.dose_snapshot() == {"p0": 25.0 + 80.0 + 25.0}
    # a channel change puts back the rig's own preset, in the rig's channel group
    camera.update(channel_group="Filters")
    rule = {"name": "gfp", "when": ALWAYS, "max_fires": 1, "action": {"channel": {
        "channel": "GFP"}}}
    ctl, injected, _ = controller([rule], camera_settings=lambda: camera)
    frame(ctl, 0)
    (events,) = injected
    restore = events[-1].channel
    assert restore is not None and (restore.group, restore.config) == ("Filters", "DAPI")


# ------------------------------------------------------------------ 2: refusals charge nothing
def test_a_source_that_cannot_acquire_refuses_every_acquiring_action_with_its_reason() -> None:
    """End-to-end hunt: in a replay, a channel action was refused as
    `unknown_camera_settings` and a skip as `unknown_position` (positions: none), though the
    one reason was that a replay cannot acquire."""
    why = "a replay plays recorded frames and cannot acquire new events"
    rules = [
        {"name": "gfp", "when": ALWAYS, "max_fires": 1,
         "action": {"channel": {"channel": "GFP", "exposure_ms": 50.0}}},
        {"name": "skip", "when": ALWAYS, "max_fires": 1, "action": {"skip": {"visits": 1}}},
        {"name": "mode", "when": ALWAYS, "max_fires": 1, "action": {"mode": "synchronized"}},
    ]
    modes: list[str] = []
    ctl, injected, published = controller(rules, cannot_acquire=why, set_mode=modes.append)
    frame(ctl, 0)
    refused = {d["rule"]: (d["limit"], d["reason"]) for k, d in published
               if k == "feedback_refused"}
    assert refused == {"gfp": ("not_acquiring", why), "skip": ("not_acquiring", why)}
    assert injected == [] and modes == ["synchronized"]  # what needs no new events runs


def test_an_action_refused_at_injection_charges_no_ledger() -> None:
    def fail(events: list[useq.MDAEvent]) -> int:
        raise RuntimeError("no acquisition is running")

    rule = {"name": "b", "when": ALWAYS, "action": {"burst": {"frames": 4, "centre": False}}}
    ctl, _, published = controller([rule], {"max_added_frames_per_minute": 4}, inject=fail)
    frame(ctl, 0)
    assert [(k, d["limit"]) for k, d in published] == [("feedback_refused", "not_acquiring")]
    assert ctl.guard.added_last_minute() == 0 and ctl.guard.dose_snapshot() == {}
    ctl._inject = lambda ev: len(ev)  # injection works again: the limit is not used up
    frame(ctl, 1)
    assert len(published) == 1 and ctl.report()["actions"] == 1  # accepted
    assert ctl.guard.added_last_minute() == 4


# ------------------------------------------------------------------ 3: no run, no actions
def test_no_actions_once_the_acquisition_has_finished() -> None:
    modes: list[str] = []
    rule = {"name": "m", "when": ALWAYS, "action": {"mode": "free-run"}}
    ctl, _, published = controller([rule], set_mode=modes.append)
    ctl.acquisition_finished()
    frame(ctl, 0)  # a frame of the finished run, analysed late (free-run)
    assert modes == [] and published == []
    ctl.acquisition_started()
    frame(ctl, 1)
    assert modes == ["free-run"]


def test_nothing_is_applied_after_a_stop_action() -> None:
    stops: list[int] = []
    rules = [{"name": "stop", "when": ALWAYS, "action": {"stop": True}},
             {"name": "b", "when": ALWAYS, "action": {"burst": {"frames": 2, "centre": False}}}]
    ctl, injected, published = controller(rules, stop=lambda: stops.append(1))
    frame(ctl, 0)
    frame(ctl, 1)
    assert stops == [1] and injected == []
    assert [(k, d.get("limit")) for k, d in published] == [
        ("feedback_action", None), ("feedback_refused", "not_acquiring")]


# ------------------------------------------------------------------ 6: per-rule counters
def test_rule_counters_count_late_refusals_and_restart_per_acquisition() -> None:
    rule = {"name": "skipper", "when": ALWAYS, "action": {"skip": {}}}
    ctl, _, published = controller([rule])
    ctl.on_measurements(FRAME, _message(0, {"t": 0}, 1000.0))  # no `p` to skip
    assert published[0][1]["limit"] == "not_applicable"
    (counts,) = ctl.report()["rules"]
    assert (counts["fired"], counts["actions"], counts["refused"]) == (1, 0, 1)
    assert (ctl.report()["actions"], ctl.report()["refused"]) == (0, 1)
    ctl.acquisition_started()
    (counts,) = ctl.report()["rules"]
    assert (counts["fired"], counts["actions"], counts["refused"], counts["errors"]) == (
        0, 0, 0, 0)
    assert ctl.report()["refused"] == 1  # the totals count since the service started


# ------------------------------------------------------------------ 7: re-sending rules
def test_resending_the_same_rules_keeps_max_fires_and_cooldowns() -> None:
    once = {"name": "once", "when": ALWAYS, "max_fires": 1,
            "action": {"burst": {"frames": 1, "centre": False}}}
    cool = {"name": "cool", "when": ALWAYS, "cooldown_frames": 100,
            "action": {"burst": {"frames": 1, "centre": False}}}
    ctl, injected, _ = controller([once, cool])
    frame(ctl, 0)
    assert len(injected) == 2
    ctl.set_rules(list(ctl.config.rules))  # the same list again
    frame(ctl, 1)
    assert len(injected) == 2  # neither fires again
    assert [r["fired"] for r in ctl.report()["rules"]] == [1, 1]
    changed = ctl.config.rules[0].model_copy(update={"max_fires": 2})
    ctl.set_rules([changed, ctl.config.rules[1]])  # a changed rule starts afresh
    frame(ctl, 2)
    assert len(injected) == 3
    assert [r["fired"] for r in ctl.report()["rules"]] == [1, 1]


# ------------------------------------------------------------------ 4, 8: size of an action
def test_a_huge_user_burst_is_refused_before_its_events_are_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: 5 s on the event loop building 300,000 events, then the refusal."""
    from livemask.feedback import engine

    def no_events(*args: Any, **kwargs: Any) -> list[useq.MDAEvent]:
        raise AssertionError("the events of a refused action were built")

    monkeypatch.setattr(engine, "to_events", no_events)
    ctl, injected, published = controller([])
    ctl.engine.add_rule(_Returns(Burst(frames=300_000)))
    frame(ctl, 0)
    ((kind, detail),) = published
    assert kind == "feedback_refused" and detail["limit"] == "max_frames_per_action"
    assert injected == [] and detail["events"] == []


@pytest.mark.parametrize(
    ("action", "limit", "needle"),
    [
        (Burst(frames=0), "invalid_action", r"frames=0: give frames as an integer >= 1"),
        (Burst(frames=2, interval_s=-1.0), "invalid_action", r"interval_s >= 0"),
        (ZStack(range_um=10.0, step_um=0.0), "invalid_action", r"step_um > 0"),
        (Burst(frames=2, interval_s=3600.0), "max_action_duration_s",
         r"feedback\.limits\.max_action_duration_s"),
    ],
)
def test_a_user_action_of_no_frames_or_too_long_is_refused(
    action: Any, limit: str, needle: str
) -> None:
    ctl, injected, published = controller([])
    ctl.engine.add_rule(_Returns(action))
    frame(ctl, 0)
    ((kind, detail),) = published
    assert kind == "feedback_refused" and detail["limit"] == limit
    assert re.search(needle, detail["reason"])
    assert injected == [] and ctl.report()["actions"] == 0


def test_a_set_mode_action_is_still_applied() -> None:
    modes: list[str] = []
    ctl, _, published = controller([], set_mode=modes.append)
    ctl.engine.add_rule(_Returns(SetMode("pipelined")))
    frame(ctl, 0)
    assert modes == ["pipelined"] and published[0][0] == "feedback_action"


# ------------------------------------------------------------------ 9: docs list every code
def test_the_docs_list_every_refusal_reason_code() -> None:
    source = "".join(p.read_text() for p in (ROOT / "src/livemask/feedback").glob("*.py"))
    codes = set(re.findall(r"(?:Violation|ActionError)\(\s*\"([a-z_]+)\"", source))
    assert {"no_pixel_size", "not_acquiring", "unknown_camera_settings"} <= codes
    docs = (ROOT / "docs/feedback.md").read_text()
    assert sorted(c for c in codes if f"`{c}`" not in docs) == []


# ------------------------------------------------------------------ 10: checked on the rig
def test_a_user_action_the_microscope_cannot_run_as_given_is_refused() -> None:
    """A user rule's channel preset the rig lacks was checked only for declarative rules at
    load: the frames were taken in the channel in effect and reported as carried out."""
    checked: list[list[useq.MDAEvent]] = []

    def check(events: Any) -> None:
        checked.append(list(events))
        for e in events:
            if e.channel is not None and e.channel.config != "DAPI":
                raise ValueError(f"channel {e.channel.config!r} is not a preset")

    ctl, injected, published = controller(
        [], check_events=check, set_mode=lambda mode: None,
        camera_settings=lambda: {"channel": "DAPI", "exposure_ms": 10.0})
    ctl.engine.add_rule(_Returns(SetChannel(channel="Bogus", frames=2),
                                 SetChannel(channel="DAPI", frames=1), SetMode("pipelined")))
    frame(ctl, 0)
    # (the DAPI frame's feedback_action is published when it starts)
    assert [(k, d["action"]["kind"]) for k, d in published] == [
        ("feedback_refused", "channel"), ("feedback_action", "mode")]
    detail = published[0][1]
    assert detail["limit"] == "invalid_action"
    assert detail["reason"] == "channel 'Bogus' is not a preset"
    ((dapi, _restore),) = injected
    assert dapi.channel is not None and dapi.channel.config == "DAPI"
    assert [len(c) for c in checked] == [2, 1]  # only actions with events are checked


def test_a_mode_the_service_does_not_have_is_refused_not_set() -> None:
    """SetMode('bogus') from a user rule set the service's mode to 'bogus'."""
    modes: list[str] = []
    ctl, _, published = controller([], set_mode=modes.append)
    ctl.engine.add_rule(_Returns(SetMode("bogus")))  # type: ignore[arg-type]
    frame(ctl, 0)
    ((kind, detail),) = published
    assert kind == "feedback_refused" and detail["limit"] == "invalid_action"
    assert "give one of free-run, pipelined, synchronized" in detail["reason"]
    assert modes == []


def test_a_skip_of_a_position_the_plan_lacks_is_refused() -> None:
    """SkipPosition(position=99) was reported as done, and skipped nothing."""
    seq = useq.MDASequence(stage_positions=[(0, 0, 0), (500, 0, 0)],
                           time_plan={"interval": 0, "loops": 3})
    ctl, _, published = controller([])
    planned = ctl.wrap_planned(seq, positions=range(2))
    ctl.engine.add_rule(_Returns(SkipPosition(position=99), SkipPosition(position=1)))
    next(planned)
    frame(ctl, 0)
    kind, detail = published[0]
    assert kind == "feedback_refused" and detail["limit"] == "unknown_position"
    assert "cannot skip position 99" in detail["reason"]
    assert published[1][0] == "feedback_action"  # p1 exists: skipped, though not seen yet
    assert [e.index["p"] for e in planned] == [0, 0]
