"""Events added to a run (``enqueue``, feedback actions) are followed by one that puts back
the settings from before them: one tracker of the settings in effect serves both, so the
restore of one never puts back the other's added exposure (before: for the rest of the run)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import useq

from livemask.feedback.actions import METADATA_KEY
from livemask.feedback.controller import RESTORE_TAG_KEY, SettingsInEffect
from livemask.service.app import Service
from tests.conftest import make_config
from tests.test_acquisition_end import control

#: A time-lapse that sets no exposure: its frames take the one in effect (set to 12 ms).
PLAIN = {"sequence": {"time_plan": {"interval": 0.15, "loops": 8}}}
CAMERA_MS = 12.0


def exposures_per_frame(svc: Service) -> list[tuple[dict[str, int], float]]:
    """(event index, the camera's exposure) as each frame came (runner thread)."""
    core = svc.source.core  # type: ignore[union-attr]
    seen: list[tuple[dict[str, int], float]] = []
    core.mda.events.frameReady.connect(
        lambda image, event, meta=None: seen.append((dict(event.index), core.getExposure())))
    return seen


def config(rule: dict[str, Any]) -> Any:
    return make_config(acquisition=PLAIN, feedback={"rules": [rule]})


async def until(condition: Any, svc: Service, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def start(svc: Service) -> None:
    await control(svc, "set", exposure_ms=CAMERA_MS)  # the camera's own, set while idle
    assert (await control(svc, "start"))["started"] is True
    await until(lambda: svc.pipeline.counters.counts["acquired"] >= 1, svc)


def burst_at_first_frame(frames: int) -> dict[str, Any]:
    """A rule that fires once, at t = 0: ``frames`` 50 ms frames 1 s apart, not centred."""
    return {"name": "burst50", "max_fires": 1,
            "when": {"values": [{"path": "index.t", "eq": 0}]},
            "action": {"burst": {"frames": frames, "interval_s": 1.0, "centre": False,
                                 "exposure_ms": 50.0}}}


def planned(seen: list[tuple[dict[str, int], float]]) -> list[float]:
    return [ms for index, ms in seen if not {"fb", "ext"} & set(index)]


async def test_an_action_on_an_enqueued_frame_puts_back_the_plans_exposure() -> None:
    """Hunt: a rule fired on an enqueued 50 ms frame and took a 30 ms one; its restore put
    back 50 ms (the enqueued event's, its own restore still queued) after the enqueue's,
    and every later planned frame was taken at 50 ms."""
    rule = {"name": "on-ext", "max_fires": 1,
            "when": {"values": [{"path": "index.ext", "ge": 0}]},
            "action": {"channel": {"frames": 1, "exposure_ms": 30.0}}}
    async with Service(config(rule)) as svc:
        seen = exposures_per_frame(svc)
        await start(svc)
        reply = await control(svc, "enqueue", events=[{"exposure": 50.0, "index": {"ext": 1}}])
        assert reply == {"enqueued": 1, "started": False}
        await until(lambda: not svc.acquiring, svc)
        status = await control(svc, "status")
    assert [ms for index, ms in seen if "ext" in index] == [50.0]
    assert [ms for index, ms in seen if "fb" in index] == [30.0]
    assert planned(seen) == [CAMERA_MS] * 8, seen
    # the ledger charged the planned frames the exposure they were taken with
    assert sum(status["feedback"]["dose_ms"].values()) == 8 * CAMERA_MS + 30.0
    assert svc._settings.pending == {}  # every restore event queued has run


async def test_an_enqueue_during_a_burst_puts_back_the_plans_exposure() -> None:
    """Hunt: an enqueue while a 50 ms burst still ran took the burst's exposure as the one
    in effect (the burst's restore was not known to it) and put 50 ms back after it."""
    rule = burst_at_first_frame(3)
    async with Service(config(rule)) as svc:
        seen = exposures_per_frame(svc)
        await start(svc)
        # the burst's first frame came: its next frames, 1 s apart, and its restore wait
        await until(lambda: any("fb" in index for index, _ in seen), svc)
        reply = await control(svc, "enqueue", events=[{"exposure": 30.0, "index": {"ext": 1}}])
        assert reply == {"enqueued": 1, "started": False}
        await until(lambda: not svc.acquiring, svc)
    assert [ms for index, ms in seen if "fb" in index] == [50.0] * 3
    assert [ms for index, ms in seen if "ext" in index] == [30.0]
    assert planned(seen) == [CAMERA_MS] * 8, seen


@pytest.mark.parametrize("rule", [
    burst_at_first_frame(2),
    {"name": "burst", "max_fires": 1, "when": {"values": [{"path": "index.t", "eq": 0}]},
     "action": {"burst": {"frames": 3, "interval_s": 0.5, "centre": False}}},
], ids=["burst-50ms", "burst-at-the-triggers-exposure"])
async def test_a_set_exposure_during_a_burst_holds_after_it(rule: dict[str, Any]) -> None:
    """The service queues the set exposure after the feedback action's restore event (it
    knows it from the shared tracker): the planned frames after the burst take it. Also
    for a burst at its trigger's own exposure (an action's default): an attempt to drop
    that burst's restore event (its settings are the ones in effect) left the service
    nothing to queue the set exposure behind, and every later frame ran at the old
    exposure (review of 68df493, reverted)."""
    async with Service(config(rule)) as svc:
        seen = exposures_per_frame(svc)
        await start(svc)
        await until(lambda: any("fb" in index for index, _ in seen), svc)
        burst_at = len(seen)
        await control(svc, "set", exposure_ms=15.0)
        await until(lambda: not svc.acquiring, svc)
    after = planned(seen[burst_at:])
    assert after and all(ms == 15.0 for ms in after), seen


def test_a_tag_keeps_the_feedback_metadata_and_the_restores_apply_in_order() -> None:
    """A feedback action's restore event keeps its action id when tagged; the settings
    expected are the last queued restore's."""
    settings = SettingsInEffect()
    settings.reset(exposure=10.0, channel=None)
    ours = useq.MDAEvent(exposure=10.0, metadata={METADATA_KEY: {"action_id": 3}})
    first = settings.tag(ours)
    assert first.metadata[METADATA_KEY] == {"action_id": 3}
    settings.event_started(useq.MDAEvent(exposure=50.0))  # an added event runs
    settings.queued(first)
    assert settings.expected()["exposure"] == 10.0  # not the added event's
    second = settings.tag(useq.MDAEvent(exposure=20.0))
    settings.queued(second)
    assert settings.expected()["exposure"] == 20.0
    assert settings.event_started(first) == first.metadata[RESTORE_TAG_KEY]
    settings.started(first.metadata[RESTORE_TAG_KEY])
    assert settings.expected()["exposure"] == 20.0
