"""Blocking hardware calls awaited from the event loop, bounded in time.

A device call can block for as long as the device likes: a camera whose snap never returns
holds its device lock, and a ``setExposure`` then waits on it forever. Run through
``asyncio.to_thread`` such a call would hang the awaiting control request (and the control
channel, which answers one request at a time), and the default executor's threads are
joined at interpreter exit, so the process could not even quit. :func:`call_hardware` runs
the call on a daemon thread of its own and gives up waiting after ``timeout_s`` with
:class:`HardwareTimeout`: the service answers, and can exit, while the device stays stuck.
A call given up on that returns later is logged; :func:`calls_still_stuck` tells whether
one never did. While :data:`MAX_STUCK_CALLS` such calls still run, new ones are refused at
once (each would leave another thread blocked on the hung device). A call given up on that
ends later goes to ``on_late_result`` or ``on_late_error``. Calls given up on may land in any
order when the device frees: :class:`InRequestOrder` keeps an older value of a setting from
landing after a newer one, and knows which requests may still take effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from livemask.errors import AcquisitionError, HardwareTimeout

log = logging.getLogger("livemask")

T = TypeVar("T")

#: How long a control command waits for a device call: under the control client's 2 s
#: per try, so that the reply (an error naming the device) reaches it.
HARDWARE_TIMEOUT_S = 1.5

#: At most this many calls given up on may still run: past it a call is refused at once
#: instead of leaving one more thread blocked on a hung device per request.
MAX_STUCK_CALLS = 4

_given_up: list[threading.Thread] = []  # calls that timed out, while they still run


class Superseded(AcquisitionError):
    """A call of :class:`InRequestOrder` skipped: a later request's call took effect first."""


class GivenUp(HardwareTimeout):
    """:func:`call_hardware` stopped waiting for a call that still runs: it may still take
    effect (its late end goes to ``on_late_result`` or ``on_late_error``)."""


class InRequestOrder:
    """Calls that set one device setting take effect in the order they were requested.

    A call given up on (:func:`call_hardware`) stays blocked on its device, with the calls
    after it: when the device frees, they take its lock in any order, so an older value
    could land last and stay. Each request takes a :meth:`ticket` (on the event loop, in
    request order) and runs through :meth:`call` (one at a time): a call whose turn comes
    after a later ticket's call took effect is skipped. So the setting ends with the
    newest requested value that the device accepted. (Skipping beats re-applying the
    newest after an older one landed: no extra device call, nothing to undo.)
    Run through :meth:`run`, :attr:`pending` holds the tickets whose call may still take
    effect, and :meth:`settled` tells when the newest that took effect is final.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.issued = 0  # the newest ticket handed out
        self.applied = 0  # the newest ticket whose call took effect
        self.pending: set[int] = set()  # tickets whose call may still take effect (loop)

    def ticket(self) -> int:
        """The next ticket (in request order)."""
        self.issued += 1
        self.pending.add(self.issued)
        return self.issued

    def settled(self) -> bool:
        """Whether no pending call can still take effect over :attr:`applied` (nor is
        :attr:`applied`'s own end still to come)."""
        return not any(ticket >= self.applied for ticket in self.pending)

    async def run(
        self,
        ticket: int,
        fn: Callable[..., T],
        *args: object,
        what: str,
        on_late_end: Callable[[bool], None],
    ) -> T:
        """:meth:`call` through :func:`call_hardware`. The ticket leaves :attr:`pending`
        when the call returns or fails, or is refused before it ran; one given up on (or
        cancelled) stays until it ends after all: then ``on_late_end(took_effect)``."""

        def late_end(took_effect: bool) -> None:
            self.pending.discard(ticket)
            on_late_end(took_effect)

        may_land = False
        try:
            return await call_hardware(
                self.call, ticket, fn, *args, what=what,
                on_late_result=lambda _: late_end(True),
                on_late_error=lambda _: late_end(False),
            )
        except (GivenUp, asyncio.CancelledError):
            may_land = True  # (its late end comes through late_end)
            raise
        finally:
            if not may_land:
                self.pending.discard(ticket)

    def call(self, ticket: int, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)``, or :class:`Superseded` where a later ticket's call took effect
        already. Its exception passes through (then it did not take effect)."""
        with self._lock:
            if ticket < self.applied:
                raise Superseded("skipped: a later request for this setting took effect first")
            result = fn(*args)
            self.applied = ticket
            return result


def calls_still_stuck() -> bool:
    """Whether a device call given up on (timed out) has still not returned."""
    _given_up[:] = [t for t in _given_up if t.is_alive()]
    return bool(_given_up)


async def call_hardware(
    fn: Callable[..., T],
    *args: object,
    what: str,
    timeout_s: float | None = None,
    on_late_result: Callable[[T], None] | None = None,
    bounded: bool = False,
    on_late_error: Callable[[BaseException], None] | None = None,
) -> T:
    """``fn(*args)`` on a daemon thread; its result, its exception, or :class:`GivenUp`
    after ``timeout_s`` (default :data:`HARDWARE_TIMEOUT_S`). ``on_late_result`` gets the
    result of a call given up on (or whose awaiting was cancelled) that returned after all,
    ``on_late_error`` the exception of one that failed after all (on the loop; not where the
    loop closed first); HardwareTimeout at once where too many calls are stuck. ``bounded``: the
    call bounds its own wait (a stop), so it is tried even while earlier calls are stuck
    (e.g. sets waiting for a long snap)."""
    timeout_s = HARDWARE_TIMEOUT_S if timeout_s is None else timeout_s
    if not bounded and calls_still_stuck() and len(_given_up) >= MAX_STUCK_CALLS:
        raise HardwareTimeout(
            f"{what} not tried: {len(_given_up)} earlier device calls have not returned "
            "(a device is hung, e.g. a camera in a snap that never ends); check the hardware"
        )
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.cancelled():  # given up on: say how it ended after all
            if error is not None:
                log.warning("%s failed after its %g s timeout: %s", what, timeout_s, error)
                if on_late_error is not None:
                    on_late_error(error)
            else:
                log.warning("%s returned after its %g s timeout (it took effect)", what,
                            timeout_s)
                if on_late_result is not None:
                    on_late_result(result)  # type: ignore[arg-type]
        elif error is not None:
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

    thread = threading.Thread(target=run, name="livemask-hardware", daemon=True)
    thread.start()
    try:
        return await asyncio.wait_for(future, timeout_s)
    except TimeoutError:
        if future.done() and not future.cancelled():  # the call's own TimeoutError
            raise
        _given_up.append(thread)
        raise GivenUp(
            f"{what} did not return within {timeout_s:g} s: the device is busy or hung "
            "(e.g. a camera snap that never returns; the change may still take effect "
            "when it answers); check the hardware"
        ) from None
