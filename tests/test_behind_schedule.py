"""behind_schedule: a time plan the rig cannot keep is reported (hardware hunt: a 0.1 s
plan with 0.5 s snaps ran about 4x slower than planned without a word), on the real
pymmcore-plus runner with the simulated devices, its snaps lasting their exposure."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
import useq

from livemask.acquisition.simulated.world import get_world
from livemask.client import AsyncSubscriber
from livemask.service.app import Service
from tests.conftest import make_config
from tests.test_service import collect_run, control


async def _events_of(sequence: dict[str, Any]) -> list[dict[str, Any]]:
    cfg = make_config(acquisition={"mode": "free-run", "sequence": sequence},
                      simulation={"truth": False})
    async with Service(cfg) as svc:
        get_world().realtime = True  # each snap takes its exposure
        got = await collect_run(svc, ("event",))
    return [m.header for m in got["event"]]


async def test_a_plan_faster_than_the_camera_is_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """40 time points 0.01 s apart, each a 50 ms snap: the run falls 0.04 s a time point
    behind, more than 1 s by the last ones."""
    caplog.set_level(logging.WARNING, logger="livemask")
    events = await _events_of({"time_plan": {"interval": 0.01, "loops": 40},
                               "channels": [{"config": "DAPI", "exposure": 50.0}]})
    late = [e for e in events if e["kind"] == "behind_schedule"]
    assert len(late) == 1, late  # once per acquisition
    report = late[0]
    assert report["late_s"] > 1.0
    assert report["started_s"] - report["planned_s"] == pytest.approx(report["late_s"], abs=2e-3)
    assert report["planned_s"] == pytest.approx(report["index"]["t"] * 0.01)
    assert "Lengthen time_plan.interval" in report["detail"]
    assert "started" in caplog.text and "after its planned time" in caplog.text


async def test_positions_of_one_time_point_are_not_late() -> None:
    """Three positions of 0.6 s snaps in a 2 s interval: the third starts over 1.2 s after
    the time point's planned time, by design; the plan itself is kept."""
    events = await _events_of({
        "time_plan": {"interval": 2.0, "loops": 2},
        "stage_positions": [{"x": 0.0, "y": 0.0}, {"x": 100.0, "y": 0.0},
                            {"x": 200.0, "y": 0.0}],
        "channels": [{"config": "DAPI", "exposure": 600.0}]})
    kinds = [e["kind"] for e in events]
    assert "acquisition_finished" in kinds and "behind_schedule" not in kinds


async def test_a_plan_delayed_by_enqueued_events_is_not_late() -> None:
    """12 enqueued 200 ms frames delay the next time point of a 1 s plan by about 2 s:
    that is theirs, not the plan's (review: a feedback burst was reported as a plan the
    camera could not keep, with advice to lengthen its interval)."""
    cfg = make_config(acquisition={"mode": "free-run", "sequence": {
        "time_plan": {"interval": 1.0, "loops": 4},
        "channels": [{"config": "DAPI", "exposure": 20.0}]}}, simulation={"truth": False})
    async with Service(cfg) as svc:
        get_world().realtime = True
        async with AsyncSubscriber(svc.publisher.bound_address, ("event",)) as sub:
            await asyncio.sleep(0.3)
            await control(svc, "start")
            await asyncio.sleep(0.2)
            await control(svc, "enqueue", events=[{"exposure": 200.0}] * 12)
            kinds = []
            while "acquisition_finished" not in kinds:
                msg = await sub.recv(timeout_s=20)
                assert msg is not None, kinds
                kinds.append(msg.header["kind"])
    assert "behind_schedule" not in kinds


class _Clocked:
    """A MicroscopeSource's schedule check alone, on a clock of our own (review cases)."""

    def __init__(self) -> None:
        from livemask.acquisition.source import MicroscopeSource

        self.now = 0.0
        self.reports: list[int] = []
        self.injected: list[useq.MDAEvent] = []
        src = MicroscopeSource.__new__(MicroscopeSource)
        src._feed = SimpleNamespace(was_injected=lambda e: any(e is i for i in self.injected))
        src.core = SimpleNamespace(mda=SimpleNamespace(event_seconds_elapsed=lambda: self.now))
        src._time_point_at, src._injected_since, src._late_excused_s = None, None, 0.0
        src._report_mismatch = lambda kind, ev, off: self.reports.append(ev.index["t"])
        self.src = src

    def planned(self, t: int, at: float, *, reset: bool = False) -> None:
        self.now = at
        self.src._check_schedule(useq.MDAEvent(index={"t": t}, min_start_time=float(t),
                                               reset_event_timer=reset))

    def inject(self, at: float) -> None:
        event = useq.MDAEvent(index={"fb": 1})
        self.injected.append(event)
        self.now = at
        self.src._check_schedule(event)


def test_a_plan_that_caught_up_after_a_burst_is_reported_when_it_falls_behind() -> None:
    """The excuse for a burst stayed for the rest of the run: a plan 3.5 s behind later
    was never reported."""
    c = _Clocked()
    c.planned(1, 1.0)
    c.inject(1.1)  # a 3 s burst
    c.planned(2, 4.1)  # late by the burst's time only
    for t in range(3, 10):
        c.planned(t, float(t))  # caught up
    assert c.reports == []
    c.planned(10, 13.5)  # now the plan itself
    assert c.reports == [10]


def test_small_actions_every_time_point_do_not_hide_a_plan_that_cannot_keep_up() -> None:
    """Each 50 ms feedback frame reset the excuse to the whole lateness: a plan taking 1.5 s
    per 1 s interval was never reported."""
    c, now = _Clocked(), 0.0
    for t in range(1, 8):
        now = max(now, float(t))
        c.planned(t, now)
        now += 1.5
        c.inject(now)
        now += 0.05
    assert c.reports and c.reports[0] <= 4


def test_each_positions_clock_is_its_own() -> None:
    """p before t: useq restarts the event clock at each position's first time point; its
    t=1 has the min_start_time the last position's t=1 had, and was skipped."""
    c = _Clocked()
    c.planned(0, 0.0)
    c.planned(1, 1.0)
    c.planned(0, 0.0, reset=True)
    c.planned(1, 3.5)
    assert c.reports == [1]
