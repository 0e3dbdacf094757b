"""The event feed: an iterator of MDA events that the MDA runner consumes while it runs.

The runner thread calls ``next()``; the service thread injects events at any time. In
synchronized mode ``next()`` waits until every frame delivered so far has been reported done,
so each frame is analysed before the next event reaches the microscope. The source reports
each frame as delivered (in the runner thread, before the next ``next()``), so an event whose
snap failed (no frame) does not hold the next one.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Iterator

import useq

log = logging.getLogger("livemask")


class EventFeed(Iterator[useq.MDAEvent]):
    """Planned events plus injected ones (injected first), consumed one at a time."""

    def __init__(
        self,
        planned: Iterable[useq.MDAEvent],
        *,
        synchronized: bool = False,
        sync_timeout_s: float = 10.0,
    ) -> None:
        self._planned = iter(planned)
        self._injected: deque[useq.MDAEvent] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._planned_done = False
        self.synchronized = synchronized
        self.sync_timeout_s = sync_timeout_s
        self.issued = 0
        self.image_events_issued = 0  # events that ask the camera for a frame
        self.delivered = 0
        self.done = 0
        self._owed = 0  # frame_done calls still to come for frames given up on (timeouts)
        self.sync_timeouts = 0

    def __next__(self) -> useq.MDAEvent:
        with self._cond:
            waited = 0.0
            while self.synchronized and self.done < self.delivered and not self._closed:
                if waited >= self.sync_timeout_s:
                    log.warning(
                        "synchronized mode: frame %d not analysed after %.1f s; releasing the "
                        "next event (raise acquisition.frame_timeout_s if analysis is slow)",
                        self.delivered - 1,
                        waited,
                    )
                    self.sync_timeouts += 1
                    self._owed += self.delivered - self.done
                    self.done = self.delivered
                    break
                self._cond.wait(0.05)
                waited += 0.05
            if self._closed:
                raise StopIteration
            if self._injected:
                event = self._injected.popleft()
            else:
                nxt = next(self._planned, None)
                if nxt is None:
                    self._planned_done = True
                    raise StopIteration
                event = nxt
            self.issued += 1
            if event.action is None or isinstance(event.action, useq.AcquireImage):
                self.image_events_issued += 1
            return event

    def inject(self, events: Iterable[useq.MDAEvent]) -> int:
        """Queue events to run before the remaining planned ones; returns how many."""
        items = list(events)
        with self._cond:
            self._injected.extend(items)
            self._cond.notify_all()
        return len(items)

    def frame_delivered(self) -> None:
        """Report that the camera delivered one frame (call before handing it on)."""
        with self._cond:
            self.delivered += 1

    def frame_done(self) -> None:
        """Report that one delivered frame has been analysed (or skipped) and published."""
        with self._cond:
            if self._owed:  # a frame given up on after the timeout: already counted done
                self._owed -= 1
            elif self.done < self.delivered:  # else a late report from an earlier feed
                self.done += 1
            self._cond.notify_all()

    def set_synchronized(self, value: bool) -> None:
        """Switch between free-run and synchronized while running."""
        with self._cond:
            self.synchronized = value
            self._cond.notify_all()

    def close(self) -> None:
        """Make the runner's next ``next()`` end the acquisition."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Injected events not yet consumed."""
        with self._cond:
            return len(self._injected)
