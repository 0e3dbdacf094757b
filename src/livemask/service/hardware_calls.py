"""Blocking hardware calls awaited from the event loop, bounded in time.

A device call can block for as long as the device likes: a camera whose snap never returns
holds its device lock, and a ``setExposure`` then waits on it forever. Run through
``asyncio.to_thread`` such a call would hang the awaiting control request, and the default
executor's threads are joined at interpreter exit, so the process could not even quit.
:func:`call_hardware` runs the call on a daemon thread of its own and gives up waiting after
``timeout_s`` with :class:`HardwareTimeout`: the service answers, and can exit, while the
device stays stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

from livemask.errors import HardwareTimeout

T = TypeVar("T")

#: How long a control command waits for a device call (longer than any sane exposure).
HARDWARE_TIMEOUT_S = 10.0


async def call_hardware(
    fn: Callable[..., T], *args: object, what: str, timeout_s: float | None = None
) -> T:
    """``fn(*args)`` on a daemon thread; its result, its exception, or HardwareTimeout
    after ``timeout_s`` (default :data:`HARDWARE_TIMEOUT_S`)."""
    timeout_s = HARDWARE_TIMEOUT_S if timeout_s is None else timeout_s
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # given up on (timeout) or cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # handed to the awaiting coroutine
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="livemask-hardware", daemon=True).start()
    try:
        return await asyncio.wait_for(future, timeout_s)
    except TimeoutError:
        raise HardwareTimeout(
            f"{what} did not return within {timeout_s:g} s: the device is busy or hung "
            "(e.g. a camera snap that never returns); check the hardware"
        ) from None
