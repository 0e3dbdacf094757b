"""The event feed: an iterator of MDA events that the MDA runner consumes while it runs.

The runner thread calls ``next()``; the service thread injects events at any time. The
source reports each frame as delivered (in the runner thread, before the next ``next()``);
the pipeline reports when a frame leaves the inference queue (``frame_started``: taken by
the model, or skipped) and when it is published (``frame_done``). The mode decides what
``next()`` waits for:

- ``free-run``: nothing;
- ``pipelined``: no delivered frame still waiting for the model (the camera acquires the
  next frame while the model runs, and never piles frames up in front of it);
- ``synchronized``: every delivered frame done, so each frame is analysed before the next
  event reaches the microscope.

An event whose snap failed (no frame) holds nothing: pymmcore-plus logs the failure and goes
on. The feed notices it when the runner asks for the next event (or at the end) and counts
it as missing (``on_missing``). A wait longer than ``sync_timeout_s`` gives the late frames
up and releases the next event: never hang on a lost frame.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import useq

from livemask.acquisition.mode import Mode
from livemask.errors import AcquisitionEnding, AcquisitionError

log = logging.getLogger("livemask")

#: Injected events that may wait to run at once (≈ 1 KB each in memory); the service's own
#: events (:func:`is_service_event`) are not counted: one per enqueue, feedback action or
#: exposure set, at most.
MAX_PENDING_EVENTS = 100_000
#: The name prefix of the custom actions of the service's own events (putting back the
#: settings that enqueued events or feedback actions change, or an exposure just set).
SERVICE_ACTION_PREFIX = "livemask-"


def is_service_event(event: useq.MDAEvent) -> bool:
    """Whether ``event`` is one of the service's own (takes no image, puts settings back),
    not counted as an enqueued event."""
    action = event.action
    return isinstance(action, useq.CustomAction) and action.name.startswith(
        SERVICE_ACTION_PREFIX)


@dataclass
class _Reports:
    """How many delivered frames have been reported past one point of the pipeline."""

    count: int = 0
    owed: int = 0  # reports still to come for frames given up on (timeouts)

    def report(self, delivered: int) -> None:
        if self.owed:  # a frame given up on after the timeout: already counted
            self.owed -= 1
        elif self.count < delivered:  # else a late report from an earlier feed
            self.count += 1

    def give_up(self, delivered: int) -> None:
        self.owed += delivered - self.count
        self.count = delivered


@dataclass
class _TimedBatch:
    """Events injected ``timed_from_first``: when the first of them was taken (runner
    clock, s; None: not yet)."""

    start: float | None = None


class EventFeed(Iterator[useq.MDAEvent]):
    """Planned events plus injected ones (injected first), consumed one at a time."""

    def __init__(
        self,
        planned: Iterable[useq.MDAEvent],
        *,
        mode: Mode = "free-run",
        sync_timeout_s: float = 10.0,
        on_missing: Callable[[useq.MDAEvent], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._planned = iter(planned)
        self._injected: deque[useq.MDAEvent] = deque()
        #: the runner's event clock (s), which ``min_start_time`` is measured on; None: the
        #: start times of batches injected ``timed_from_first`` are not kept
        self._clock = clock
        self._timed: dict[int, _TimedBatch] = {}  # id of an injected event -> its batch
        #: the injected events issued last (the runner may look an event ahead; kept, not
        #: their ids, which a later event may reuse)
        self._issued_injected: deque[useq.MDAEvent] = deque(maxlen=16)
        self._cond = threading.Condition()
        self._closed = False
        self._planned_done = False
        self._finishing = False  # finish_with: the run ends once the injected queue is empty
        self.mode: Mode = mode
        self.sync_timeout_s = sync_timeout_s
        self.issued = 0
        self.image_events_issued = 0  # events that ask the camera for a frame
        self.delivered = 0
        self._started = _Reports()
        self._done = _Reports()
        self.sync_timeouts = 0
        self.missing = 0  # image events that delivered no frame (a failed snap)
        self._on_missing = on_missing
        self._awaiting: useq.MDAEvent | None = None  # the last image event issued
        self._delivered_before = 0  # frames delivered before it was issued
        self.not_run = 0  # injected events dropped when the feed was closed (not the service's)
        self._counted = 0  # injected events waiting, not the service's own
        #: the exposure of the last event issued that set one (ms; 0.0 before any): the snap
        #: in progress may take that long (a stop waits for it)
        self.last_exposure_ms = 0.0

    @property
    def pending(self) -> int:
        """Injected events waiting to run, not counting the service's own
        (:func:`is_service_event`)."""
        return self._counted

    @property
    def started(self) -> int:
        """Delivered frames that left the inference queue (or were given up on)."""
        return self._started.count

    @property
    def done(self) -> int:
        """Delivered frames reported done (or given up on)."""
        return self._done.count

    def _holding(self) -> tuple[str, _Reports] | None:
        """What the next event waits for now, or None."""
        if self.mode == "synchronized" and self._done.count < self.delivered:
            return "analysed", self._done
        if self.mode == "pipelined" and self._started.count < self.delivered:
            return "taken by the model", self._started
        return None

    def __next__(self) -> useq.MDAEvent:
        with self._cond:
            deadline: float | None = None
            while (holding := self._holding()) is not None and not self._closed:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.sync_timeout_s
                if now >= deadline:
                    log.warning(
                        "%s mode: frame %d of this acquisition not %s after %g s; releasing the "
                        "next event (raise acquisition.frame_timeout_s if the model or analysis "
                        "is slower)",
                        self.mode, holding[1].count + 1, holding[0], self.sync_timeout_s,
                    )
                    self.sync_timeouts += 1
                    self._started.give_up(self.delivered)
                    self._done.give_up(self.delivered)
                    break
                self._cond.wait(min(0.05, deadline - now))
            if self._closed:  # (a stopped acquisition's last snap may have been cut short)
                raise StopIteration
            self._check_delivery()
            if self._injected:
                event = self._timed_start(self._injected.popleft())
                self._issued_injected.append(event)
                if not is_service_event(event):
                    self._counted -= 1
            else:
                nxt = None if self._finishing else next(self._planned, None)
                if nxt is None:
                    self._planned_done = True
                    raise StopIteration
                event = nxt
            self.issued += 1
            if event.exposure is not None:
                self.last_exposure_ms = float(event.exposure)
            if event.action is None or isinstance(event.action, useq.AcquireImage):
                self.image_events_issued += 1
                self._awaiting, self._delivered_before = event, self.delivered
            return event

    def was_injected(self, event: useq.MDAEvent) -> bool:
        """Whether ``event``, issued lately, was injected (not one of the plan's)."""
        return any(event is issued for issued in self._issued_injected)

    def _timed_start(self, event: useq.MDAEvent) -> useq.MDAEvent:
        """``event`` with its ``min_start_time`` on the runner's clock where it was injected
        ``timed_from_first`` (an offset from its batch's first event, taken now if it is
        that one); else as it is (lock held)."""
        batch = self._timed.pop(id(event), None)
        if batch is None:
            return event
        if batch.start is None:
            batch.start = self._clock() if self._clock is not None else 0.0
        if event.min_start_time is None:
            return event
        if self._clock is None:  # (an offset read as a time would not wait)
            return event.model_copy(update={"min_start_time": None})
        return event.model_copy(update={"min_start_time": batch.start + event.min_start_time})

    def _check_delivery(self) -> None:
        """Count the last image event as missing if no frame came of it (runner thread)."""
        event, self._awaiting = self._awaiting, None
        if event is None or self.delivered > self._delivered_before:
            return
        self.missing += 1
        if self._on_missing is not None:
            try:
                self._on_missing(event)
            except Exception:  # a reporting fault must not stop the acquisition
                log.exception("reporting a missing frame failed")

    def inject(self, events: Iterable[useq.MDAEvent], *, timed_from_first: bool = False) -> int:
        """Queue events to run before the remaining planned ones; returns how many.
        ``timed_from_first``: their ``min_start_time`` are offsets (s) from when the first
        of them is taken (a feedback burst's intervals hold even when it waits behind other
        events), not times on the runner's clock.

        :class:`AcquisitionEnding` once the runner has taken the last event or the feed is
        closed (nothing would run them), :class:`AcquisitionError` past
        ``MAX_PENDING_EVENTS`` waiting (the service's own events not counted)."""
        items = list(events)
        counted = sum(not is_service_event(e) for e in items)
        with self._cond:
            if self._closed or self._planned_done or self._finishing:
                raise AcquisitionEnding(
                    "the acquisition has taken its last event and is ending; the events were "
                    "not added"
                )
            if self._counted + counted > MAX_PENDING_EVENTS:
                raise AcquisitionError(
                    f"{self._counted} enqueued events wait to run and at most "
                    f"{MAX_PENDING_EVENTS} may wait; enqueue more once some have run "
                    "(status: pending_events)"
                )
            self._injected.extend(items)
            if timed_from_first:
                batch = _TimedBatch()
                self._timed.update((id(e), batch) for e in items)
            self._counted += counted
            self._cond.notify_all()
        return len(items)

    def frame_delivered(self) -> None:
        """Report that the camera delivered one frame (call before handing it on)."""
        with self._cond:
            self.delivered += 1

    def frame_started(self) -> None:
        """Report that one delivered frame left the inference queue (taken or skipped)."""
        with self._cond:
            self._started.report(self.delivered)
            self._cond.notify_all()

    def frame_done(self) -> None:
        """Report that one delivered frame has been analysed (or skipped) and published."""
        with self._cond:
            self._done.report(self.delivered)
            self._cond.notify_all()

    def set_mode(self, mode: Mode) -> None:
        """Switch the mode while running."""
        with self._cond:
            self.mode = mode
            self._cond.notify_all()

    def finish_with(self, keep: Iterable[useq.MDAEvent]) -> None:
        """End the acquisition once the injected events ``keep`` still waiting have run: the
        other injected events waiting are dropped (counted in ``not_run``, the service's own
        not), no planned event follows and no more are taken (``inject`` raises
        :class:`AcquisitionEnding`)."""
        with self._cond:
            ids = {id(e) for e in keep}
            dropped = [e for e in self._injected if id(e) not in ids]
            self._injected = deque(e for e in self._injected if id(e) in ids)
            lost = sum(not is_service_event(e) for e in dropped)
            self.not_run += lost
            self._counted -= lost
            for event in dropped:
                self._timed.pop(id(event), None)
            self._finishing = True
            self._cond.notify_all()

    def close(self) -> None:
        """Make the runner's next ``next()`` end the acquisition; injected events still
        waiting are dropped (counted in ``not_run``, the service's own not)."""
        with self._cond:
            self._closed = True
            self.not_run += self._counted
            self._counted = 0
            self._injected.clear()
            self._timed.clear()
            self._cond.notify_all()


class PlannedExposure(Iterator[useq.MDAEvent]):
    """Planned events with the exposure the ``set`` command gave since the run started.

    pymmcore-plus sets each event's own exposure (a channel's) before its snap, so a camera
    exposure set during a run lasted one frame. Once :meth:`set` is called, every later
    event that carries an exposure carries that one; events without one keep the camera's.
    The runner takes an event before it waits for the event's start time (a time-lapse's
    interval, or the look-ahead of hardware sequencing): :meth:`exposure_now` gives the
    engine the newest set's exposure for such an event at its set-up.
    ``__next__`` runs on the runner thread, :meth:`set` on the event loop.
    """

    #: Events given out that :meth:`exposure_now` still knows as planned ones (the runner
    #: holds one, and pymmcore-plus' sequencing looks one ahead).
    GIVEN_KEPT = 16

    def __init__(self, events: Iterable[useq.MDAEvent]) -> None:
        self._events = iter(events)
        self._lock = threading.Lock()
        self._exposure_ms: float | None = None
        #: the events given out, each with its own exposure (before a set replaced it)
        self._given: deque[tuple[useq.MDAEvent, float | None]] = deque(maxlen=self.GIVEN_KEPT)

    def set(self, exposure_ms: float | None) -> float | None:
        """Give every later planned event that sets an exposure ``exposure_ms`` instead
        (None: their own again); returns the value before."""
        with self._lock:
            before = self._exposure_ms
            self._exposure_ms = None if exposure_ms is None else float(exposure_ms)
        return before

    def __next__(self) -> useq.MDAEvent:
        event = next(self._events)
        own = event.exposure
        with self._lock:
            exposure = self._exposure_ms
        if exposure is not None and own is not None and own != exposure:
            event = event.model_copy(update={"exposure": exposure})
        with self._lock:
            self._given.append((event, own))
        return event

    def exposure_now(self, event: useq.MDAEvent) -> float | None:
        """The exposure a planned ``event`` this plan gave out is to be taken with: the
        newest :meth:`set`'s, also one that came after the runner took it, else (a set
        undone since) its own; None for other events (enqueued, feedback) and events
        without an exposure."""
        with self._lock:
            own = next((o for e, o in self._given if e is event), None)
            if own is None:
                return None
            return own if self._exposure_ms is None else self._exposure_ms
