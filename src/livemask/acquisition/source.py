"""Frame sources: where the pipeline's frames come from.

``MicroscopeSource`` runs the pymmcore-plus MDA runner on its own thread, fed by an
:class:`~livemask.acquisition.feed.EventFeed`, and hands every frame to a callback from the
camera thread (the callback must be quick and thread-safe: the service uses
``loop.call_soon_threadsafe``). The ``FrameSource`` protocol lets tests use fakes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import useq

from livemask.acquisition.feed import EventFeed
from livemask.acquisition.mode import Mode
from livemask.errors import AcquisitionError

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus

log = logging.getLogger("livemask")


class RawFrame:
    """A frame as it leaves the camera thread."""

    __slots__ = ("acquired", "event", "image", "origin", "position", "truth")

    def __init__(
        self,
        image: np.ndarray,
        event: useq.MDAEvent,
        acquired: float,
        position: dict[str, float | None],
        truth: np.ndarray | None,
        origin: object | None = None,
    ) -> None:
        self.image = image
        self.origin = origin  # what delivered it (the acquisition's event feed), for frame_done
        self.event = event
        self.acquired = acquired
        self.position = position
        self.truth = truth


FrameCallback = Callable[[RawFrame], None]
DoneCallback = Callable[[str | None], None]


class FrameSource(Protocol):
    """Something that acquires frames for the pipeline.

    Optional: an ``image_events_issued`` attribute (events that asked for a frame in the
    current or last acquisition) lets the service report an acquisition that got none."""

    @property
    def running(self) -> bool:
        """Whether an acquisition is in progress."""

    def start(
        self,
        events: Iterable[useq.MDAEvent],
        *,
        mode: Mode,
        on_done: DoneCallback,
    ) -> None:
        """Start acquiring ``events``; ``on_done(error or None)`` is called when it ends.

        ``mode`` says what the next event waits for (see :mod:`livemask.acquisition.feed`):
        in ``pipelined`` mode for :meth:`frame_started`, in ``synchronized`` mode for
        :meth:`frame_done`."""

    def inject(self, events: Iterable[useq.MDAEvent]) -> int:
        """Add events to the running acquisition."""

    def frame_started(self, origin: object | None = None) -> None:
        """Report that one frame left the inference queue (taken by the model or skipped;
        may release the next event, see ``start``)."""

    def frame_done(self, origin: object | None = None) -> None:
        """Report one frame fully handled (may release the next event, see ``start``);
        ``origin`` is the frame's :attr:`RawFrame.origin`, so a late report for a frame of
        an earlier acquisition can be told apart."""

    def set_mode(self, mode: Mode) -> None:
        """Switch mode while running."""

    def set_exposure(self, exposure_ms: float) -> None:
        """Change the camera exposure."""

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the acquisition and wait for the runner to end."""

    def close(self) -> None:
        """Stop and release the hardware."""


#: A stage read back farther than this from the commanded position did not get there (µm).
STAGE_TOLERANCE_UM = 2.0


def frame_position(
    event: useq.MDAEvent, meta: Any = None
) -> tuple[dict[str, float | None], dict[str, Any] | None]:
    """Where a frame was taken, and the mismatch if the XY stage was not where commanded.

    The position is the event's commanded one (None on axes it does not command). But a
    move that failed is only a warning in pymmcore-plus' log, so where pymmcore-plus read
    the stages back for the frame (``meta["position"]``, for each snapped frame) and a
    commanded x or y is more than ``STAGE_TOLERANCE_UM`` off, the read-back value replaces
    it, and the mismatch ``{"commanded": {...}, "read": {...}}`` is returned too. Z is not
    compared: autofocus and focus locks move it away from the commanded value on purpose.
    """
    position = {"x_um": event.x_pos, "y_um": event.y_pos, "z_um": event.z_pos}
    read_meta = meta.get("position") if isinstance(meta, dict) else None
    if not isinstance(read_meta, dict):
        return position, None
    commanded: dict[str, float] = {}
    read: dict[str, float] = {}
    for axis in ("x_um", "y_um"):
        want, got = position[axis], read_meta.get(axis[0])
        if want is None or not isinstance(got, int | float) or not math.isfinite(got):
            continue
        if abs(float(got) - want) > STAGE_TOLERANCE_UM:
            commanded[axis], read[axis] = want, float(got)
            position[axis] = float(got)
    if not read:
        return position, None
    return position, {"commanded": commanded, "read": read}


class FeedThreadSource:
    """What the frame sources that run an :class:`EventFeed` on a thread of their own share:
    whether that thread runs, and forwarding ``frame_done`` and mode switches to the feed."""

    _feed: EventFeed | None = None
    _thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Whether the source's thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def image_events_issued(self) -> int:
        """Events asking for a frame that the runner took in the current (or last)
        acquisition (the service checks it against the frames that came)."""
        return self._feed.image_events_issued if self._feed is not None else 0

    def _feed_of(self, origin: object | None) -> EventFeed | None:
        """The running feed, unless the frame came from another (earlier) one: a report for
        it must not count for a frame of this acquisition."""
        feed = self._feed
        return feed if feed is not None and (origin is None or origin is feed) else None

    def frame_started(self, origin: object | None = None) -> None:
        """Forward to the feed (may release the next event; no-op idle)."""
        if (feed := self._feed_of(origin)) is not None:
            feed.frame_started()

    def frame_done(self, origin: object | None = None) -> None:
        """Forward to the feed (may release the next event; no-op idle)."""
        if (feed := self._feed_of(origin)) is not None:
            feed.frame_done()

    def set_mode(self, mode: Mode) -> None:
        """Switch the running feed's mode."""
        if self._feed is not None:
            self._feed.set_mode(mode)


class MicroscopeSource(FeedThreadSource):
    """Frames from a pymmcore-plus core (real hardware or simulated Python devices)."""

    def __init__(
        self,
        core: CMMCorePlus,
        on_frame: FrameCallback,
        *,
        truth_lookup: Callable[[np.ndarray], np.ndarray | None] | None = None,
        sync_timeout_s: float = 10.0,
        on_missing: Callable[[useq.MDAEvent], None] | None = None,
        on_stage_mismatch: Callable[[useq.MDAEvent, dict[str, Any]], None] | None = None,
    ) -> None:
        """``on_missing`` is called (on the runner thread) with each image event that
        delivered no frame: pymmcore-plus only logs a failed snap. ``on_stage_mismatch``
        with each frame taken away from its event's commanded position (the stage did not
        get there: pymmcore-plus only logs a failed move), and what :func:`frame_position`
        found."""
        from livemask.acquisition.core import exposure_limits

        self.core = core
        # read now, not per request: the call waits on the camera's lock, held while it snaps
        self.exposure_limits = exposure_limits(core)
        self._on_frame = on_frame
        self._truth_lookup = truth_lookup
        self._sync_timeout_s = sync_timeout_s
        self._on_missing = on_missing
        self._on_stage_mismatch = on_stage_mismatch
        self._last_mismatch: dict[str, Any] | None = None
        self._exposure_ms = 0.0  # of the last frame (pymmcore-plus' frame metadata)
        self._feed: EventFeed | None = None
        self._thread: threading.Thread | None = None
        self._on_done: DoneCallback | None = None
        core.mda.events.frameReady.connect(self._frame_ready)

    def _frame_ready(self, image: np.ndarray, event: useq.MDAEvent, meta: Any = None) -> None:
        acquired = time.time()
        feed = self._feed
        truth = self._truth_lookup(image) if self._truth_lookup else None
        position, off = frame_position(event, meta)
        self._report_mismatch(event, off)
        if isinstance(meta, dict) and isinstance(meta.get("exposure_ms"), int | float):
            self._exposure_ms = float(meta["exposure_ms"])
        raw = RawFrame(image, event, acquired, position, truth, origin=feed)
        if feed is None:
            self._on_frame(raw)
            return
        feed.frame_delivered()
        try:
            self._on_frame(raw)
        except BaseException:  # never handed on: nothing will report it, so do it here
            feed.frame_started()
            feed.frame_done()
            raise

    def _report_mismatch(self, event: useq.MDAEvent, off: dict[str, Any] | None) -> None:
        """Report a stage mismatch once, until a frame is where commanded again."""
        last, self._last_mismatch = self._last_mismatch, off
        if off is None or off == last or self._on_stage_mismatch is None:
            return
        try:
            self._on_stage_mismatch(event, off)
        except Exception:  # reporting must not lose the frame
            log.exception("reporting a stage position mismatch failed")

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(rows, columns) of the camera's images at its current binning and ROI."""
        return (int(self.core.getImageHeight()), int(self.core.getImageWidth()))

    def start(
        self,
        events: Iterable[useq.MDAEvent],
        *,
        mode: Mode,
        on_done: DoneCallback,
    ) -> None:
        """Run ``events`` through the MDA runner on a new thread."""
        if self.running:
            raise AcquisitionError("an acquisition is already running; stop it first")
        self._feed = EventFeed(events, mode=mode, sync_timeout_s=self._sync_timeout_s,
                               on_missing=self._on_missing)
        self._on_done = on_done
        self._thread = threading.Thread(
            target=self._run, args=(self._feed,), name="livemask-mda", daemon=True
        )
        self._thread.start()

    def _run(self, feed: EventFeed) -> None:
        error: str | None = None
        try:
            self.core.mda.run(feed)
        except Exception as exc:  # a hardware fault must not kill the service
            log.exception("acquisition failed")
            error = f"{type(exc).__name__}: {exc}"
        finally:
            if self._on_done is not None:
                self._on_done(error)

    def inject(self, events: Iterable[useq.MDAEvent]) -> int:
        """Queue events on the running acquisition."""
        if self._feed is None or not self.running:
            raise AcquisitionError("no acquisition is running")
        return self._feed.inject(events)

    def set_exposure(self, exposure_ms: float) -> None:
        """Set the camera exposure (takes effect from the next snap); ``ValueError`` with the
        camera's reason if it refuses the value."""
        try:
            self.core.setExposure(exposure_ms)
        except Exception as exc:  # the device's own range check (CMMError, ValueError, ...)
            raise ValueError(
                f"camera {self.core.getCameraDevice()!r} refused exposure {exposure_ms:g} ms: "
                f"{exc}"
            ) from exc

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel the acquisition and join the runner thread (waiting at least two of the
        last frame's exposures, so that a long snap is not taken for a hung one)."""
        if self._feed is not None:
            self._feed.close()
        if self.running:
            self.core.mda.cancel()
            assert self._thread is not None
            timeout_s = max(timeout_s, 2 * self._exposure_ms / 1e3 + 1)
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("MDA runner did not stop within %.1f s", timeout_s)

    def close(self) -> None:
        """Stop, disconnect and unload the devices."""
        from livemask.acquisition.core import close_core

        self.stop(timeout_s=2.0)  # the service's stop has waited already
        self.core.mda.events.frameReady.disconnect(self._frame_ready)
        try:
            close_core(self.core, timeout_s=1.0)
        except Exception:  # releasing the hardware is best effort at shutdown
            log.exception("closing the Micro-Manager core failed")
