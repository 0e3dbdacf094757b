"""Shutdown with a dashboard browser that does not read; ``set exposure_ms`` calls that the
service gave up on and that return late, out of order."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import threading
import time
from typing import Any

import pytest

from livemask.client import AsyncSubscriber
from livemask.errors import ControlError
from livemask.service.app import Service
from tests.conftest import make_config
from tests.test_acquisition_end import control


def _ws_that_never_reads(port: int) -> socket.socket:
    """A raw connection that does the dashboard's WebSocket handshake, then reads nothing
    (a small receive buffer: the server's writes back up at once)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    return sock


async def _until(check: Any, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


def _assert_closed_after_the_dashboard(svc: Service) -> None:
    """The close went on past the dashboard: the service closed, its publisher too."""
    assert svc.state == "closed"
    with pytest.raises(RuntimeError):
        svc.publisher.publish("event", {"kind": "test"})


async def _browser_blocked_in_a_send(dashboard: Any) -> Any:
    """The dashboard's one browser (connected by :func:`_ws_that_never_reads`), once its
    pump has taken an image bigger than the socket buffers and waits in aiohttp's drain
    (the write is synchronous; the drain is its only await)."""
    await _until(lambda: len(dashboard.browsers) == 1, "the browser did not connect")
    browser = next(iter(dashboard.browsers))
    browser.offer_image(bytes(32 << 20))
    await _until(lambda: browser.image is None, "the pump did not take the image")
    return browser


async def test_shutdown_completes_when_a_browser_does_not_read_its_websocket() -> None:
    """Closing the browser's pump, blocked in aiohttp's drain, cancelled the drain future
    that ``ws.close()`` then waited on: a CancelledError ended ``Service.close`` before it
    closed the control server, the publisher, the model and the microscope."""
    svc = Service(make_config(dashboard={"enabled": True, "port": 0},
                              simulation={"truth": False}))
    await svc.start()
    dashboard = svc.dashboard
    assert dashboard is not None
    sock = _ws_that_never_reads(dashboard.port)
    try:
        browser = await _browser_blocked_in_a_send(dashboard)
        assert browser.images_sent == 0 and browser.task is not None
        assert not browser.task.done()
        try:
            await svc.close()
        except asyncio.CancelledError:
            pytest.fail("Service.close raised CancelledError (a browser that does not read)")
        _assert_closed_after_the_dashboard(svc)
        assert dashboard.url is None
    finally:
        sock.close()
        if svc.state != "closed":
            await svc.close()


async def _try_set(svc: Service, exposure_ms: float) -> None:
    """``set exposure_ms``: acknowledged, or given up on while the camera is busy."""
    try:
        await control(svc, "set", exposure_ms=exposure_ms)
    except ControlError as exc:
        assert "did not return within 0.3 s" in str(exc), exc


async def test_a_set_exposure_given_up_on_does_not_land_after_a_newer_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sets given up on stayed blocked on the camera and took it, once it freed, in any
    order: an older exposure could land after a newer one (acknowledged or late) and stay,
    announced by a late ``setting_changed``. Here the first set hangs (the camera busy)
    while newer ones come: before, they took effect at once and the old one landed last."""
    import livemask.service.hardware_calls as hardware_calls

    monkeypatch.setattr(hardware_calls, "HARDWARE_TIMEOUT_S", 0.3)
    async with Service(make_config(simulation={"truth": False})) as svc, AsyncSubscriber(
        svc.publisher.bound_address, ("event", "status")
    ) as sub:
        while (await sub.recv(timeout_s=10)) is None:  # connected (heartbeat status)
            pass
        source = svc.source
        assert source is not None
        real_set, busy = source.set_exposure, threading.Event()

        def set_exposure(exposure_ms: float) -> None:
            if exposure_ms == 5.0:
                busy.wait(30)  # the camera in a long snap: this set waits for it
            real_set(exposure_ms)

        monkeypatch.setattr(source, "set_exposure", set_exposure)
        try:
            with pytest.raises(ControlError, match=r"did not return within 0\.3 s"):
                await control(svc, "set", exposure_ms=5.0)
            for exposure_ms in (6.0, 7.0):
                await _try_set(svc, exposure_ms)
        finally:
            busy.set()
        await _until(lambda: not hardware_calls.calls_still_stuck(), "a set never returned")
        await control(svc, "set", mode="free-run")  # after the late sets' announcements
        exposures = []
        while True:
            msg = await sub.recv(timeout_s=10)
            assert msg is not None, "no setting_changed for the mode"
            if msg.topic == "event" and msg.header["kind"] == "setting_changed":
                if "mode" in msg.header:
                    break
                exposures.append(msg.header["exposure_ms"])
        status = await control(svc, "status")
        assert source.core.getExposure() == 7.0, exposures
        assert status["core"]["exposure_ms"] == 7.0
        assert exposures and exposures[-1] == 7.0, exposures


async def test_a_refused_set_does_not_undo_an_older_set_that_landed_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review: set 5 ms is given up on (the camera busy); it lands while set 20000 ms waits
    its turn, and the camera refuses 20000. The refused set put back the plan from before
    5 ms landed: the frames went back to the channel's 10 ms, though the last event said 5."""
    import livemask.service.hardware_calls as hardware_calls

    monkeypatch.setattr(hardware_calls, "HARDWARE_TIMEOUT_S", 0.5)
    seq = {"channels": [{"config": "DAPI", "exposure": 10.0}],
           "time_plan": {"interval": 0.05, "loops": 100000}}
    async with Service(make_config(simulation={"truth": False},
                                   acquisition={"sequence": seq, "mode": "free-run"})) as svc:
        source = svc.source
        assert source is not None
        real_set, busy = source.set_exposure, threading.Event()

        def set_exposure(exposure_ms: float) -> None:
            if exposure_ms == 5.0:
                busy.wait(30)  # the camera in a long snap
            real_set(exposure_ms)

        monkeypatch.setattr(source, "set_exposure", set_exposure)
        order = svc.exposure.order
        real_ticket = order.ticket

        def ticket() -> int:  # the camera frees once the newer set has its turn number
            n = real_ticket()
            if n > 1:
                busy.set()
            return n

        monkeypatch.setattr(order, "ticket", ticket)
        await control(svc, "start")
        try:
            with pytest.raises(ControlError, match=r"did not return"):
                await control(svc, "set", exposure_ms=5.0)
            monkeypatch.setattr(hardware_calls, "HARDWARE_TIMEOUT_S", 10.0)
            with pytest.raises(ControlError, match=r"20000"):
                await control(svc, "set", exposure_ms=20000.0)
            counters = svc.pipeline.counters
            seen = counters.snapshot()["frames_acquired"]
            await _until(lambda: counters.snapshot()["frames_acquired"] >= seen + 3,
                         "no frames after the sets")
            assert source.core.getExposure() == 5.0  # the plan kept what landed
        finally:
            busy.set()
            await control(svc, "stop")


async def test_close_completes_in_an_owner_task_that_is_being_cancelled() -> None:
    """Review: ``async with Service(...)`` in a task that is cancelled (Ctrl-C under
    ``asyncio.run``) closes while the task is cancelling; the drain's CancelledError of a
    browser that does not read was then taken for the task's own and ended the close."""
    holder: dict[str, Service] = {}
    entered = asyncio.Event()

    async def owner() -> None:
        async with Service(make_config(dashboard={"enabled": True, "port": 0},
                                       simulation={"truth": False})) as svc:
            holder["svc"] = svc
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(owner())
    await entered.wait()
    svc = holder["svc"]
    dashboard = svc.dashboard
    assert dashboard is not None
    sock = _ws_that_never_reads(dashboard.port)
    try:
        await _browser_blocked_in_a_send(dashboard)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        _assert_closed_after_the_dashboard(svc)
    finally:
        sock.close()
        if svc.state != "closed":
            await svc.close()
