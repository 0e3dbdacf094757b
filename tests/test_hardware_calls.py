"""Bounded device calls from the event loop (``livemask.service.hardware_calls``)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from livemask.errors import HardwareTimeout
from livemask.service.hardware_calls import (
    InRequestOrder,
    Superseded,
    call_hardware,
    calls_still_stuck,
)


async def test_result_and_exception_pass_through() -> None:
    assert await call_hardware(lambda x: x * 2, 21, what="doubling") == 42

    def refuse() -> None:
        raise ValueError("out of range")

    with pytest.raises(ValueError, match="out of range"):
        await call_hardware(refuse, what="refusing")

    def own_timeout() -> None:
        raise TimeoutError("the device's own timeout")

    with pytest.raises(TimeoutError, match="the device's own timeout") as info:
        await call_hardware(own_timeout, what="timing out")
    assert not isinstance(info.value, HardwareTimeout)


async def test_a_stuck_call_is_given_up_on_and_its_late_end_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    with pytest.raises(HardwareTimeout, match=r"setting the exposure did not return within 0.2 s"):
        await call_hardware(release.wait, 30, what="setting the exposure", timeout_s=0.2)
    assert calls_still_stuck()
    release.set()
    deadline = time.monotonic() + 5
    while calls_still_stuck() or "returned after its 0.2 s timeout" not in caplog.text:
        assert time.monotonic() < deadline, "the late return was not noticed"
        await asyncio.sleep(0.01)


async def test_calls_are_refused_at_once_while_too_many_are_stuck() -> None:
    """Each request to a hung device used to leave one more thread blocked on it."""
    from livemask.service import hardware_calls

    release = threading.Event()
    try:
        for _ in range(hardware_calls.MAX_STUCK_CALLS):
            with pytest.raises(HardwareTimeout, match="did not return within"):
                await call_hardware(release.wait, 30, what="setting the exposure", timeout_s=0.1)
        threads = threading.active_count()
        with pytest.raises(HardwareTimeout, match="4 earlier device calls have not returned"):
            await call_hardware(release.wait, 30, what="setting the exposure", timeout_s=0.1)
        assert threading.active_count() == threads  # no new thread for the hung device
    finally:
        release.set()
    deadline = time.monotonic() + 5
    while calls_still_stuck():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert await call_hardware(lambda: 7, what="reading") == 7  # the device answers again


def test_a_call_whose_turn_comes_after_a_newer_one_took_effect_is_skipped() -> None:
    """Calls given up on take the device, once it frees, in any order: an older value that
    came last used to stay. Here the newest call runs before an older one."""
    order = InRequestOrder()
    camera: list[float] = []
    first, older, newest = order.ticket(), order.ticket(), order.ticket()
    assert order.call(first, camera.append, 4.0) is None
    order.call(newest, camera.append, 7.0)
    with pytest.raises(Superseded, match=r"a later request for this setting took effect"):
        order.call(older, camera.append, 6.0)
    assert camera == [4.0, 7.0] and order.applied == newest == order.issued

    def refuse(_: float) -> None:
        raise ValueError("out of range")

    refused = order.ticket()
    with pytest.raises(ValueError, match="out of range"):
        order.call(refused, refuse, 1e9)
    assert order.applied == newest  # a refused call took no effect: older ones still may
