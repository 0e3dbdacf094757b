"""``set exposure_ms`` calls given up on that land late: the newest set that took effect is
planned, and announced where late, once no newer set can still land, also where the newer
set was refused before it ran, failed before the older one's late end, or failed late."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from livemask.acquisition.source import MicroscopeSource
from livemask.client import AsyncSubscriber
from livemask.errors import ControlError, HardwareTimeout
from livemask.service import hardware_calls
from livemask.service.app import Service
from livemask.service.hardware_calls import GivenUp, InRequestOrder, call_hardware
from tests.conftest import make_config
from tests.test_acquisition_end import control
from tests.test_shutdown_and_late_sets import _until

#: a run whose one channel sets its own exposure (10 ms): the plan decides every frame's
_SEQUENCE = {"channels": [{"config": "DAPI", "exposure": 10.0}],
             "time_plan": {"interval": 0.05, "loops": 100000}}


@asynccontextmanager
async def _running(
    monkeypatch: pytest.MonkeyPatch, gates: dict[float, threading.Event], *,
    sequence: dict[str, Any] = _SEQUENCE, start: bool = True,
) -> AsyncIterator[tuple[Service, AsyncSubscriber]]:
    """A running free-run acquisition of ``sequence`` (``start``: else idle), subscribed
    to events, whose camera waits in ``set_exposure(ms)`` for ``gates[ms]`` (the camera
    busy in a long snap)."""
    monkeypatch.setattr(hardware_calls, "HARDWARE_TIMEOUT_S", 0.3)
    cfg = make_config(simulation={"truth": False},
                      acquisition={"sequence": sequence, "mode": "free-run"})
    async with Service(cfg) as svc, AsyncSubscriber(
        svc.publisher.bound_address, ("event", "status")
    ) as sub:
        while (await sub.recv(timeout_s=10)) is None:  # connected (heartbeat status)
            pass
        source = svc.source
        assert source is not None
        real_set = source.set_exposure

        def set_exposure(exposure_ms: float) -> None:
            if exposure_ms in gates:
                gates[exposure_ms].wait(30)
            real_set(exposure_ms)

        monkeypatch.setattr(source, "set_exposure", set_exposure)
        if start:
            await control(svc, "start")
        try:
            yield svc, sub
        finally:
            for gate in gates.values():
                gate.set()
            await control(svc, "stop")


async def _settled(svc: Service) -> None:
    """Every set's camera call ended, and its end was handled on the loop."""
    await _until(lambda: not svc.exposure.order.pending, "a set never ended")


async def _announced(svc: Service, sub: AsyncSubscriber) -> list[tuple[float, bool]]:
    """The ``(exposure_ms, late)`` of the ``setting_changed`` events sent so far."""
    await control(svc, "set", mode="free-run")  # after the sets' announcements
    out: list[tuple[float, bool]] = []
    while True:
        msg = await sub.recv(timeout_s=10)
        assert msg is not None, "no setting_changed for the mode"
        if msg.topic == "event" and msg.header["kind"] == "setting_changed":
            if "mode" in msg.header:
                return out
            out.append((msg.header["exposure_ms"], bool(msg.header.get("late"))))


async def _frames_taken_with(svc: Service) -> tuple[float, float]:
    """The camera's exposure and ``status``'s once 3 more frames ran (each event sets the
    planned exposure before its snap)."""
    counters = svc.pipeline.counters
    seen = counters.snapshot()["frames_acquired"]
    await _until(lambda: counters.snapshot()["frames_acquired"] >= seen + 3, "no frames")
    status = await control(svc, "status")
    assert isinstance(svc.source, MicroscopeSource)
    return svc.source.core.getExposure(), status["core"]["exposure_ms"]


async def test_a_late_set_is_planned_and_announced_after_a_newer_set_refused_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review: set 5 is given up on; set 6 is refused before it ran (too many stuck
    calls). 5 landed late but waited for 6, which never came: no ``setting_changed``, and
    the frames went back to the channel's 10 ms although the camera had taken 5."""
    monkeypatch.setattr(hardware_calls, "MAX_STUCK_CALLS", 1)
    gates = {5.0: threading.Event()}
    async with _running(monkeypatch, gates) as (svc, sub):
        with pytest.raises(ControlError, match=r"did not return within 0\.3 s"):
            await control(svc, "set", exposure_ms=5.0)
        with pytest.raises(ControlError, match=r"not tried: 1 earlier device calls"):
            await control(svc, "set", exposure_ms=6.0)
        gates[5.0].set()
        await _settled(svc)
        assert await _frames_taken_with(svc) == (5.0, 5.0)  # before: 10, 10
        assert await _announced(svc, sub) == [(5.0, True)]  # before: none
        assert svc.exposure.landed is None


async def test_a_late_set_is_planned_and_announced_after_a_newer_set_fails_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review: set 5 is given up on, then set 20000 too (waiting its turn); 5 lands, then
    the camera refuses 20000, after its timeout: only logged, so 5 was never planned nor
    announced."""
    gates = {5.0: threading.Event()}
    async with _running(monkeypatch, gates) as (svc, sub):
        for exposure_ms in (5.0, 20000.0):
            with pytest.raises(ControlError, match=r"did not return within 0\.3 s"):
                await control(svc, "set", exposure_ms=exposure_ms)
        gates[5.0].set()
        await _settled(svc)
        assert await _frames_taken_with(svc) == (5.0, 5.0)  # before: 10, 10
        assert await _announced(svc, sub) == [(5.0, True)]  # before: none


async def test_a_late_set_is_planned_and_announced_after_a_newer_set_failed_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review: set 5 is given up on; set 20000 waits its turn; 5 lands, and 20000 is
    refused before 5's late end reaches the loop. 20000's failure found nothing landed
    yet, and 5's late end then left the plan to 20000: 5 was lost."""
    gates = {5.0: threading.Event()}
    newer_failed = threading.Event()
    async with _running(monkeypatch, gates) as (svc, sub):
        order = svc.exposure.order
        real_call = order.call

        def call(ticket: int, fn: Callable[..., Any], *args: object) -> Any:
            result = real_call(ticket, fn, *args)
            if ticket == 1:  # 5 landed: its end reaches the loop after 20000's
                newer_failed.wait(30)
            return result

        monkeypatch.setattr(order, "call", call)
        with pytest.raises(ControlError, match=r"did not return within 0\.3 s"):
            await control(svc, "set", exposure_ms=5.0)
        monkeypatch.setattr(hardware_calls, "HARDWARE_TIMEOUT_S", 10.0)
        newer = asyncio.ensure_future(control(svc, "set", exposure_ms=20000.0))
        await _until(lambda: order.issued == 2, "set 20000 was not issued")
        gates[5.0].set()
        with pytest.raises(ControlError, match=r"20000"):
            await newer
        newer_failed.set()
        await _settled(svc)
        # (before too: the camera refused the 20000 the plan kept, so it stayed at 5)
        assert await _frames_taken_with(svc) == (5.0, 5.0)
        assert await _announced(svc, sub) == [(5.0, True)]  # before: none


async def test_an_older_set_ending_after_a_newer_one_took_effect_is_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Set 5 is given up on before it reached the camera; set 6 takes effect in time; 5's
    call then comes: skipped, and its late end neither plans nor announces anything."""
    gate = threading.Event()
    async with _running(monkeypatch, {}) as (svc, sub):
        order = svc.exposure.order
        real_call = order.call

        def call(ticket: int, fn: Callable[..., Any], *args: object) -> Any:
            if ticket == 1:
                gate.wait(30)  # set 5 on its way to the camera
            return real_call(ticket, fn, *args)

        monkeypatch.setattr(order, "call", call)
        with pytest.raises(ControlError, match=r"did not return within 0\.3 s"):
            await control(svc, "set", exposure_ms=5.0)
        assert await control(svc, "set", exposure_ms=6.0) == {"exposure_ms": 6.0}
        gate.set()
        await _settled(svc)
        assert await _frames_taken_with(svc) == (6.0, 6.0)
        assert await _announced(svc, sub) == [(6.0, False)]


async def test_a_call_given_up_on_that_fails_late_goes_to_on_late_error() -> None:
    """``call_hardware`` only logged a late failure: no one could act on it."""
    release = threading.Event()
    errors: list[BaseException] = []

    def refuse() -> None:
        release.wait(30)
        raise ValueError("out of range")

    with pytest.raises(GivenUp, match=r"did not return within 0\.1 s"):
        await call_hardware(refuse, what="setting", timeout_s=0.1,
                            on_late_error=errors.append)
    release.set()
    await _until(lambda: bool(errors), "the late failure was not handed on")
    assert [str(e) for e in errors] == ["out of range"]


async def test_a_request_refused_before_its_call_ran_is_no_longer_pending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request given up on may still take effect; one refused at once never will."""
    monkeypatch.setattr(hardware_calls, "MAX_STUCK_CALLS", 1)
    order, release = InRequestOrder(), threading.Event()
    ends: list[bool] = []
    try:
        stuck, refused = order.ticket(), order.ticket()
        with pytest.raises(GivenUp):
            await order.run(stuck, release.wait, 30, what="setting", on_late_end=ends.append)
        with pytest.raises(HardwareTimeout, match=r"not tried") as info:
            await order.run(refused, release.wait, 30, what="setting",
                            on_late_end=ends.append)
        assert not isinstance(info.value, GivenUp)
        assert order.pending == {stuck} and not order.settled()
    finally:
        release.set()
    await _until(lambda: ends == [True], "the late end was not handed on")
    assert not order.pending and order.settled() and order.applied == stuck


@pytest.mark.timeout(90)
@pytest.mark.parametrize("newer", [None, 20000.0])
async def test_a_late_set_of_an_earlier_acquisition_is_not_announced_in_the_next(
    monkeypatch: pytest.MonkeyPatch, newer: float | None
) -> None:
    """A set given up on in acquisition 1 that lands while acquisition 2 runs (whose
    events set their own exposure; with or without a newer set of its own that fails late)
    was announced (``setting_changed`` 5 ms, late) although every frame of acquisition 2
    was taken at 10 ms and status said 10: it is logged only."""
    gates = {5.0: threading.Event()}
    async with _running(monkeypatch, gates) as (svc, sub):
        with pytest.raises(ControlError, match=r"did not return"):
            await control(svc, "set", exposure_ms=5.0)
        await control(svc, "stop")
        await _until(lambda: not svc._acquiring, "not stopped")
        await control(svc, "start")
        if newer is not None:
            with pytest.raises(ControlError, match=r"did not return"):
                await control(svc, "set", exposure_ms=newer)
        gates[5.0].set()
        await _settled(svc)
        assert await _frames_taken_with(svc) == (10.0, 10.0)
        assert await _announced(svc, sub) == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("given_up_in", ["acquisition 1", "idle"])
async def test_a_late_set_in_effect_in_a_run_without_exposures_of_its_own_is_announced(
    monkeypatch: pytest.MonkeyPatch, given_up_in: str
) -> None:
    """A set given up on (in acquisition 1, or while idle) that lands while a run whose
    events set no exposure runs: every frame is taken with it, so it is announced (and
    kept for restore events), as the camera and status say; a first fix only logged it."""
    gates = {5.0: threading.Event()}
    seq = {"time_plan": {"interval": 0.05, "loops": 100_000}}  # no channel exposure
    async with _running(monkeypatch, gates, sequence=seq,
                        start=given_up_in == "acquisition 1") as (svc, sub):
        with pytest.raises(ControlError, match="did not return"):
            await control(svc, "set", exposure_ms=5.0)
        if given_up_in == "acquisition 1":
            await control(svc, "stop")
            await _until(lambda: not svc._acquiring, "not stopped")
        await control(svc, "start")
        gates[5.0].set()
        await _settled(svc)
        assert await _announced(svc, sub) == [(5.0, True)]
        assert svc._settings.values.get("exposure") == 5.0


@pytest.mark.timeout(90)
async def test_a_late_set_undone_by_the_end_of_its_run_is_not_announced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """5 ms lands in acquisition 1 while a newer set (20,000 ms) is still given up on; the
    run is stopped and pymmcore-plus puts the exposure from before it back (10 ms); the
    newer one then fails late. 5 ms was announced although the camera was at 10."""
    gates = {5.0: threading.Event(), 20000.0: threading.Event()}
    seq = {"channels": [{"config": "DAPI", "exposure": 10.0}],
           "time_plan": {"interval": 0.05, "loops": 100_000}}
    async with _running(monkeypatch, gates, sequence=seq) as (svc, sub):
        source = svc.source
        assert isinstance(source, MicroscopeSource)
        landed: list[float] = []  # (the camera's reading may be back at the plan's 10 ms
        gated = source.set_exposure  # by the next event's set-up before a poll sees 5)

        def set_and_note(exposure_ms: float) -> None:
            gated(exposure_ms)
            landed.append(exposure_ms)

        monkeypatch.setattr(source, "set_exposure", set_and_note)
        for ms in gates:
            with pytest.raises(ControlError, match="did not return"):
                await control(svc, "set", exposure_ms=ms)
        gates[5.0].set()
        await _until(lambda: 5.0 in landed, "5 ms did not land")
        await control(svc, "stop")
        await _until(lambda: not svc._acquiring, "not stopped")
        await _until(lambda: source.core.getExposure() == 10.0, "not restored")
        gates[20000.0].set()
        await _settled(svc)
        assert await _announced(svc, sub) == []
        assert (await control(svc, "status"))["core"]["exposure_ms"] == 10.0


@pytest.mark.timeout(90)
async def test_a_late_set_in_its_own_run_is_announced_after_the_next_frame_came(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review H: a set landing in its own run (whose events set their own exposure) was
    planned, so every later frame took it, but not announced when the runner's next frame
    (at the plan's 10 ms, the plan having gone back while the set was given up on) came
    before the loop handled the late end: the camera's last frame said 10."""
    import time

    gates = {5.0: threading.Event()}
    seq = {"channels": [{"config": "DAPI", "exposure": 10.0}],
           "time_plan": {"interval": 0.0, "loops": 100_000}}
    async with _running(monkeypatch, gates, sequence=seq) as (svc, sub):
        source = svc.source
        assert isinstance(source, MicroscopeSource)
        order = svc.exposure.order
        real_call = order.call

        def call(ticket: int, fn: Callable[..., Any], *args: object) -> Any:
            result = real_call(ticket, fn, *args)
            deadline = time.monotonic() + 2  # the loop late by a frame: 10 ms comes first
            while source.camera_now.get("exposure_ms") != 10.0 and time.monotonic() < deadline:
                time.sleep(0.001)
            return result

        monkeypatch.setattr(order, "call", call)
        with pytest.raises(ControlError, match="did not return"):
            await control(svc, "set", exposure_ms=5.0)
        gates[5.0].set()
        await _settled(svc)
        assert await _frames_taken_with(svc) == (5.0, 5.0)
        assert await _announced(svc, sub) == [(5.0, True)]
