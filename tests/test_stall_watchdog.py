"""The stall watchdog: an imaging event whose snap (or device call) never returns is
reported (``acquisition_stalled``, ``status.stalled_s``, ``last_error``), and its end too."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import useq

import livemask.acquisition.source as source_module
from livemask.acquisition.engine import takes_image
from livemask.client import AsyncSubscriber
from livemask.service.app import Service
from tests.conftest import make_config


async def _until(what: Any, timeout_s: float = 10.0) -> None:
    """Wait until ``what()`` is true."""
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _collect(sub: AsyncSubscriber, kinds: list[dict[str, Any]]) -> None:
    """Append every event header to ``kinds`` (until cancelled)."""
    while True:
        msg = await sub.recv(timeout_s=0.05)
        if msg is not None:
            kinds.append(dict(msg.header))


def _kinds(
    events: list[dict[str, Any]], kind: str, index: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """The events of ``kind`` (of the imaging event ``index`` if given)."""
    return [e for e in events
            if e["kind"] == kind and (index is None or e.get("index") == index)]


@asynccontextmanager
async def _started(
    time_plan: dict[str, Any], events: list[dict[str, Any]]
) -> AsyncIterator[Service]:
    """A free-run service with ``time_plan``, its ``event`` headers collected into
    ``events``, once its acquisition has started."""
    cfg = make_config(acquisition={"mode": "free-run", "sequence": {"time_plan": time_plan}})
    async with Service(cfg) as svc, AsyncSubscriber(
        svc.publisher.bound_address, ("event",)
    ) as sub:
        collector = asyncio.create_task(_collect(sub, events))
        await asyncio.sleep(0.3)  # (the subscription reaches the publisher)
        svc.start_acquisition(None)
        try:
            yield svc
        finally:
            collector.cancel()


T3 = {"t": 3}  # the imaging event whose snap hangs


async def test_a_hung_snap_is_reported_and_its_end_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, a snap that hung left status saying running with frames frozen, for ever:
    no event, no log line, no last_error. (A margin of 3 s: a loaded machine's normal
    events, up to ~0.6 s, are no stall; the hung one waits until released.)"""
    from livemask.acquisition.simulated.devices import SimCamera

    monkeypatch.setattr(source_module, "STALL_MARGIN_S", 3.0)
    release, resume_seen = threading.Event(), threading.Event()
    snaps = itertools.count()
    real_snap = SimCamera.snap

    def hanging_snap(self: SimCamera, buffer: Any) -> Any:
        n = next(snaps)
        if n == 3:
            release.wait(60)
        elif n == 4:  # the run goes on once the stall's end was reported: a run that ends
            resume_seen.wait(20)  # first reports no resume (as documented), a race here
        return real_snap(self, buffer)

    monkeypatch.setattr(SimCamera, "snap", hanging_snap)
    events: list[dict[str, Any]] = []
    try:
        async with _started({"interval": 0.0, "loops": 8}, events) as svc:
            await _until(lambda: _kinds(events, "acquisition_stalled", T3), 20)
            status = svc.status()
            assert status["state"] == "running" and status["frames_acquired"] == 3
            assert status["stalled_s"] is not None and status["stalled_s"] >= 0
            await asyncio.sleep(0.3)
            assert svc.status()["stalled_s"] > 0
            assert "acquisition stalled" in (svc.last_error or "")
            (stalled,) = _kinds(events, "acquisition_stalled", T3)
            assert stalled["waited_s"] > stalled["limit_s"] > 3.0
            assert "has not returned" in stalled["detail"] and "stop" in stalled["detail"]
            release.set()
            await _until(lambda: _kinds(events, "acquisition_resumed", T3), 20)
            resume_seen.set()
            await _until(lambda: _kinds(events, "acquisition_finished"), 20)
            assert svc.status()["stalled_s"] is None
            assert svc.status()["frames_acquired"] == 8  # frames continued
    finally:
        release.set()
        resume_seen.set()
    (resumed,) = _kinds(events, "acquisition_resumed", T3)
    assert resumed["stalled_s"] > 0 and resumed["waited_s"] > resumed["stalled_s"]
    assert len(_kinds(events, "acquisition_stalled", T3)) == 1  # reported once
    assert _kinds(events, "acquisition_finished")[0]["error"] is None


async def test_the_wait_between_time_points_is_not_a_stall(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The 3 s wait before the second time point is twice the margin: counted, it would be
    a stall; a loaded machine's normal events (up to ~0.6 s) stay well within it."""
    monkeypatch.setattr(source_module, "STALL_MARGIN_S", 1.5)
    events: list[dict[str, Any]] = []
    async with _started({"interval": 3.0, "loops": 2}, events) as svc:
        stalled_s: list[Any] = []
        while not _kinds(events, "acquisition_finished"):
            stalled_s.append(svc.status()["stalled_s"])
            await asyncio.sleep(0.05)
        assert svc.status()["frames_acquired"] == 2
    assert not _kinds(events, "acquisition_stalled")
    assert set(stalled_s) == {None} and svc.last_error is None


def test_events_without_an_image_are_not_watched() -> None:
    """A feedback action's restore event (a custom action) or an autofocus takes no image."""
    restore = useq.MDAEvent(action=useq.CustomAction(name="livemask-restore-settings"))
    assert not takes_image(restore)
    assert not takes_image(useq.MDAEvent(action=useq.HardwareAutofocus(autofocus_device_name="Z")))
    assert takes_image(useq.MDAEvent()) and takes_image(useq.MDAEvent(action=useq.AcquireImage()))
