"""Frame sources: where the pipeline's frames come from.

``MicroscopeSource`` runs the pymmcore-plus MDA runner on its own thread, fed by an
:class:`~livemask.acquisition.feed.EventFeed`, and hands every frame to a callback from the
camera thread (the callback must be quick and thread-safe: the service uses
``loop.call_soon_threadsafe``). The ``FrameSource`` protocol lets tests use fakes.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import useq

from livemask.acquisition.engine import ROI_KEY, EventWatch, FocusTolerantEngine, camera_roi
from livemask.acquisition.feed import EventFeed
from livemask.acquisition.mode import Mode
from livemask.errors import AcquisitionEnding, AcquisitionError

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus

log = logging.getLogger("livemask")


class RawFrame:
    """A frame as it leaves the camera thread."""

    __slots__ = ("acquired", "event", "image", "origin", "pixel_size_um", "position",
                 "replayed_from", "settings", "truth")

    def __init__(
        self,
        image: np.ndarray,
        event: useq.MDAEvent,
        acquired: float,
        position: dict[str, float | None],
        truth: np.ndarray | None,
        origin: object | None = None,
        pixel_size_um: float | None = None,
        settings: dict[str, Any] | None = None,
        replayed_from: dict[str, Any] | None = None,
    ) -> None:
        self.image = image
        self.origin = origin  # what delivered it (the acquisition's event feed), for frame_done
        self.event = event
        self.acquired = acquired
        self.position = position
        self.truth = truth
        #: the core's pixel size for this frame (µm; scaled by binning), None where unknown
        self.pixel_size_um = pixel_size_um
        #: what the camera took it with (:func:`frame_settings`, and :func:`frame_roi` for a
        #: frame of a camera ROI); the event's when not given
        self.settings = settings if settings is not None else frame_settings(event)
        #: a replayed frame's place in the file it came from (``ReplayStack.replayed_from``)
        self.replayed_from = replayed_from


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

    def inject(self, events: Iterable[useq.MDAEvent], *, timed_from_first: bool = False) -> int:
        """Add events to the running acquisition (``timed_from_first``: their
        ``min_start_time`` are offsets from when the first of them is taken)."""

    def finish_with(self, events: Iterable[useq.MDAEvent]) -> None:
        """End the running acquisition once ``events`` (queued by :meth:`inject`) have run,
        dropping the other queued events (a feedback ``stop`` after actions of its fire)."""

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


def _plain_value(value: Any) -> Any:
    """An event property's value as JSON takes it (a number, a string, a list of them; other
    objects as their text)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_plain_value(v) for v in value]
    return str(value)


#: A stage read back farther than this from the commanded position did not get there (µm).
STAGE_TOLERANCE_UM = 2.0
#: After a Z move that raised, a focus read back farther than this from the commanded Z did
#: not get there (µm): a z-stack's steps are often 1 µm or less, well within the XY bound.
Z_FAILED_TOLERANCE_UM = 0.05


def frame_position(
    event: useq.MDAEvent, meta: Any = None, *, z_failed: bool = False, xy_failed: bool = False
) -> tuple[dict[str, float | None], dict[str, Any] | None]:
    """Where a frame was taken, and the mismatch if a stage was not where commanded.

    The position is the event's commanded one (None on axes it does not command). But a
    move that failed is only a warning in pymmcore-plus' log, so where pymmcore-plus read
    the stages back for the frame (``meta["position"]``, for each snapped frame) and a
    commanded x or y is more than ``STAGE_TOLERANCE_UM`` off, the read-back value replaces
    it, and the mismatch ``{"commanded": {...}, "read": {...}}`` is returned too. Z is
    compared only if its move raised (``z_failed``): autofocus and focus locks move it
    away from the commanded value on purpose. After a failed Z move a read-back more than
    ``Z_FAILED_TOLERANCE_UM`` off replaces the commanded Z (a z-stack's 1 µm steps are within
    the XY bound). After a failed move (``z_failed``, ``xy_failed``: livemask's engine says)
    a commanded axis without a read-back is at an unknown place: None, and a mismatch whose
    ``read`` is None on it.
    """
    position = {"x_um": event.x_pos, "y_um": event.y_pos, "z_um": event.z_pos}
    read_meta = meta.get("position") if isinstance(meta, dict) else None
    if not isinstance(read_meta, dict):
        read_meta = {}
    commanded: dict[str, float] = {}
    read: dict[str, float | None] = {}
    for axis in ("x_um", "y_um", "z_um") if z_failed else ("x_um", "y_um"):
        want, got = position[axis], read_meta.get(axis[0])
        if want is None:
            continue
        if not isinstance(got, int | float) or not math.isfinite(got):
            move_failed = z_failed if axis == "z_um" else xy_failed
            if move_failed:  # the move raised and the stage cannot say where it is
                commanded[axis], read[axis] = want, None
                position[axis] = None
            continue
        bound = Z_FAILED_TOLERANCE_UM if axis == "z_um" else STAGE_TOLERANCE_UM
        if abs(float(got) - want) > bound:
            commanded[axis], read[axis] = want, float(got)
            position[axis] = float(got)
    if not read:
        return position, None
    return position, {"commanded": commanded, "read": read}


def frame_pixel_size(meta: Any) -> float | None:
    """The core's pixel size for a frame (µm), from pymmcore-plus' frame metadata: the
    active pixel-size preset's, scaled by the camera's binning as MMCore does; None when
    the metadata has none or the core has no calibration for the frame (0)."""
    px = meta.get("pixel_size_um") if isinstance(meta, dict) else None
    if isinstance(px, bool) or not isinstance(px, int | float):
        return None
    return float(px) if math.isfinite(px) and px > 0 else None


#: A channel preset in effect: (channel group, preset name).
ChannelPreset = tuple[str, str]


def frame_settings(
    event: useq.MDAEvent, meta: Any = None, channel_now: ChannelPreset | None = None,
    *, channel_failed: bool = False,
) -> dict[str, Any]:
    """What a frame was taken with: ``{"channel", "channel_group", "exposure_ms"}``.

    ``exposure_ms`` is the camera's for the frame as pymmcore-plus read it into the frame
    metadata (``meta["exposure_ms"]``, read just after the snap; livemask's engine holds its
    snap lock until then, so a set from another thread cannot land in between), else the
    event's, else None. The channel is the
    event's preset, else ``channel_now`` (the preset in effect: pymmcore-plus keeps the last
    one set for events that give none), else None; None too when the frame's read-back
    contradicts the event's preset (``channel_failed``, see :func:`settings_mismatch`)."""
    used = meta.get("exposure_ms") if isinstance(meta, dict) else None
    if isinstance(used, bool) or not isinstance(used, int | float) or not math.isfinite(used):
        used = event.exposure
    channel: ChannelPreset | None = channel_now
    if event.channel is not None:
        channel = (str(event.channel.group), str(event.channel.config))
    if channel_failed:
        channel = None
    return {
        "channel": channel[1] if channel else None,
        "channel_group": channel[0] if channel else None,
        "exposure_ms": float(used) if used is not None else None,
    }


def frame_roi(
    shape: tuple[int, ...], meta: Any, at_open: tuple[int, int] | None
) -> dict[str, Any]:
    """``settings`` entry that places a frame taken with a camera ROI: ``roi``,
    ``{"offset_x", "offset_y", "width", "height"}`` (useq's ``CameraROI``) as the frame
    metadata's ``roi`` (:data:`~livemask.acquisition.engine.ROI_KEY`) gives it. Nothing for a
    frame of the camera's image at open (``at_open``: (rows, columns), None where not known)
    at offset (0, 0); ``{"roi": None}`` for a frame of another shape whose ROI is not known
    (metadata without one, or one of another size than the frame)."""
    rows, cols = int(shape[0]), int(shape[1])
    roi = meta.get(ROI_KEY) if isinstance(meta, dict) else None
    ok = (isinstance(roi, list | tuple) and len(roi) == 4
          and all(isinstance(v, int) and v >= 0 for v in roi) and tuple(roi[2:]) == (cols, rows))
    if not ok:
        return {"roi": None} if at_open is not None and at_open != (rows, cols) else {}
    assert isinstance(roi, list | tuple)
    if tuple(roi[:2]) == (0, 0) and at_open == (rows, cols):
        return {}
    return {"roi": {"offset_x": roi[0], "offset_y": roi[1], "width": cols, "height": rows}}


#: An imaging event that has not delivered its frame this long (s) past its exposure, or
#: 3 × its exposure if longer, is reported as stalled (see ``event_in_progress``).
STALL_MARGIN_S = 30.0
#: A time point of the plan that starts this much (s) after its planned time is reported
#: (``behind_schedule``): its events take longer than the interval.
BEHIND_SCHEDULE_S = 1.0


MismatchCallback = Callable[[str, useq.MDAEvent, dict[str, Any]], None]
#: A camera exposure this far (relative) from the commanded one was not applied.
EXPOSURE_TOLERANCE = 0.02


def settings_mismatch(
    event: useq.MDAEvent, meta: Any, preset: dict[str, str] | None,
    exposure_ms: float | None = None,
) -> dict[str, Any] | None:
    """What of the event's exposure and channel the frame was not taken with, or None.

    pymmcore-plus' frame metadata has the exposure used (``exposure_ms``) and the current
    values of the channel group's properties (``property_values``); a setting that failed
    is only a warning in its log. ``preset`` is the channel preset's property values
    (``"Device-Property": value``); ``exposure_ms``: the exposure commanded where it is not
    the event's own (a planned event after a ``set``), else None."""
    if not isinstance(meta, dict):
        return None
    off: dict[str, Any] = {}
    used = meta.get("exposure_ms")
    want = exposure_ms if exposure_ms is not None else event.exposure
    if (want is not None and isinstance(used, int | float) and math.isfinite(used)
            and abs(used - want) > EXPOSURE_TOLERANCE * max(want, 1.0)):
        off["exposure_ms"] = {"commanded": want, "read": float(used)}
    if event.channel is not None and preset:
        current = {f"{pv.get('dev')}-{pv.get('prop')}": str(pv.get("val"))
                   for pv in meta.get("property_values") or () if isinstance(pv, dict)}
        wrong = {k: current[k] for k, v in preset.items() if k in current and current[k] != v}
        if wrong:
            off["channel"] = {"commanded": str(event.channel.config), "read": wrong}
    return off or None


class FeedThreadSource:
    """What the frame sources that run an :class:`EventFeed` on a thread of their own share:
    whether that thread runs, and forwarding ``frame_done`` and mode switches to the feed."""

    _feed: EventFeed | None = None
    _thread: threading.Thread | None = None
    _ended = False  # the thread's acquisition has ended (it is calling on_done, or exiting)
    _exit_waited = False  # join_ended has waited for that thread (it may still be stuck)

    @property
    def running(self) -> bool:
        """Whether an acquisition runs: its thread is alive and has not ended it."""
        return self._thread is not None and self._thread.is_alive() and not self._ended

    def finish_with(self, events: Iterable[useq.MDAEvent]) -> None:
        """End the running acquisition once ``events`` (queued by :meth:`inject`) have run,
        dropping the other queued events (see :meth:`EventFeed.finish_with`)."""
        if self._feed is not None:
            self._feed.finish_with(events)

    @property
    def pending_events(self) -> int:
        """Enqueued events waiting to run in the current acquisition."""
        return self._feed.pending if self._feed is not None else 0

    @property
    def events_not_run(self) -> int:
        """Enqueued events the current (or last) acquisition dropped when it was stopped."""
        return self._feed.not_run if self._feed is not None else 0

    def join_ended(self, timeout_s: float = 2.0) -> None:
        """Wait for the thread of an acquisition that has ended to exit (blocking: the
        service calls it off its event loop before starting the next, which then does not
        wait again)."""
        thread = self._thread
        if thread is not None and self._ended and thread.is_alive():
            thread.join(timeout_s)
            self._exit_waited = True

    def ready_to_start(self) -> None:
        """Raise :class:`AcquisitionError` unless :meth:`start` can start now (callers check
        this before they change anything for a new acquisition): not while an acquisition
        runs; let the thread of one that ended finish exiting (it has called on_done, so the
        service may already start the next), unless :meth:`join_ended` has just waited for
        it."""
        if self.running:
            raise AcquisitionError("an acquisition is already running; stop it first")
        waited, self._exit_waited = self._exit_waited, False
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(0.0 if waited else 2.0)
            if self._thread.is_alive():
                raise AcquisitionError("the last acquisition's thread has not exited yet; retry")
        self._ended = False

    def _end(self, feed: EventFeed, on_done: DoneCallback | None, error: str | None) -> None:
        """The thread's last act: close its feed (events injected from now on are refused,
        those a fault left waiting are counted), :meth:`_after_run`, mark the acquisition
        ended, then report it."""
        feed.close()
        self._after_run()
        self._ended = True
        if on_done is not None:
            on_done(error)

    def _after_run(self) -> None:
        """What a source does once its run is over, before reporting the end."""

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
        on_mismatch: MismatchCallback | None = None,
    ) -> None:
        """``on_missing`` is called (on the runner thread) with each image event that
        delivered no frame: pymmcore-plus only logs a failed snap. ``on_mismatch`` with
        ``("stage" | "settings" | "busy", event, what differs)`` for frames taken away from
        their event's commanded position (:func:`frame_position`), with another exposure or
        channel than it asked for (:func:`settings_mismatch`) or without an event property
        the device refused (``{"properties": {"Device-Property": {"commanded", "error"}}}``),
        or while a device was still busy after its time-out (``{"error": the core's
        message}``): pymmcore-plus only logs a failed move or setting, and snaps anyway; so
        does livemask's engine after a time-out."""
        from livemask.acquisition.core import exposure_limits
        from livemask.acquisition.properties import property_table

        self.core = core
        # read now, not per request: the call waits on the camera's lock, held while it snaps
        self.exposure_limits = exposure_limits(core)
        self.properties = property_table(core)
        roi = camera_roi(core)  # frames of another shape or offset say their ROI
        self._shape_at_open = (roi[3], roi[2]) if roi is not None else None
        self._engine = FocusTolerantEngine(core)
        core.register_mda_engine(self._engine)
        self._on_frame = on_frame
        self._truth_lookup = truth_lookup
        self._sync_timeout_s = sync_timeout_s
        self._on_missing = on_missing
        self._on_mismatch = on_mismatch
        self._reported: set[str] = set()  # mismatches reported in this acquisition
        self._time_point_at: float | None = None  # min_start_time of the plan's last event
        #: when the injected events running since the plan's last event began (event clock)
        self._injected_since: float | None = None
        self._late_excused_s = 0.0  # lateness that injected events caused, not the plan
        self._presets: dict[tuple[str, str], dict[str, str]] = {}  # (group, preset) → props
        self._stuck = False  # a stop waited for the runner in vain
        self._exposure_ms = 0.0  # of the last frame (pymmcore-plus' frame metadata)
        self._set_exposure_ms = 0.0  # the last set_exposure
        #: What the camera does now, for status: ``image_shape``, ``exposure_ms`` and
        #: ``channel`` of the last frame (a ROI, exposure or preset change shows there), of
        #: the core after a run (pymmcore-plus may restore the settings from before it), or
        #: the exposure last set. Empty until one of these happens.
        self.camera_now: dict[str, Any] = {}
        self._feed: EventFeed | None = None
        self._thread: threading.Thread | None = None
        self._on_done: DoneCallback | None = None
        #: the channel preset the events of the run have left in effect (runner thread)
        self._channel_now: ChannelPreset | None = None
        #: (device, property) pairs the channel group's presets set, read as a run starts
        self._channel_props: frozenset[tuple[str, str]] = frozenset()
        core.mda.events.eventStarted.connect(self._event_started)
        core.mda.events.frameReady.connect(self._frame_ready)

    def _event_started(self, event: useq.MDAEvent) -> None:
        """Note the channel preset an event sets (also one without an image, e.g. the event
        that puts back what enqueued events changed): later events that give none keep it.
        An event's ``properties`` that set a property of the presets leave none known."""
        if event.channel is not None:
            self._channel_now = (str(event.channel.group), str(event.channel.config))
        if event.properties and any((str(pv.device_name), str(pv.property_name))
                                    in self._channel_props for pv in event.properties):
            self._channel_now = None
        self._check_schedule(event)

    def _check_schedule(self, event: useq.MDAEvent) -> None:
        """Report (``schedule``, once per acquisition) a time point of the plan that starts
        more than :data:`BEHIND_SCHEDULE_S` after its planned time: the events of each time
        point take longer than the interval, and the runner, which only waits for events
        that are early, runs on behind the plan without a word. Only the first event of a
        time point counts (a multi-position or multi-channel time point's later events start
        later by design), and not injected events (``enqueue``, feedback), nor the time they
        took: that is excused, until the plan has caught up with it."""
        feed = self._feed
        if feed is None:
            return
        now = self.core.mda.event_seconds_elapsed()
        if event.reset_event_timer:  # a new clock (each position's time-lapse, p before t)
            self._time_point_at, self._injected_since, self._late_excused_s = None, None, 0.0
        if feed.was_injected(event):
            if self._injected_since is None:
                self._injected_since = now
            return
        if self._injected_since is not None:  # the injected events ran until now
            self._late_excused_s += max(now - self._injected_since, 0.0)
            self._injected_since = None
        planned = event.min_start_time
        if not planned or planned == self._time_point_at:
            return
        self._time_point_at = planned
        late = now - planned
        self._late_excused_s = min(self._late_excused_s, max(late, 0.0))  # caught up since
        if late - self._late_excused_s > BEHIND_SCHEDULE_S:
            self._report_mismatch("schedule", event, {
                "planned_s": round(planned, 3), "started_s": round(now, 3),
                "late_s": round(late, 3)})

    def _frame_ready(self, image: np.ndarray, event: useq.MDAEvent, meta: Any = None) -> None:
        acquired = time.time()
        feed = self._feed
        truth = self._truth_lookup(image) if self._truth_lookup else None
        position, off = frame_position(event, meta, z_failed=self._engine.z_failed,
                                       xy_failed=self._engine.xy_failed)
        self._report_mismatch("stage", event, off)
        preset = self._preset(event.channel) if event.channel is not None else None
        settings_off = settings_mismatch(event, meta, preset,
                                         self._engine.commanded_exposure(event))
        self._report_mismatch("settings", event, settings_off)
        for (device, prop), (value, error) in self._engine.property_errors.items():
            self._report_mismatch("settings", event, {"properties": {
                f"{device}-{prop}": {"commanded": _plain_value(value), "error": error}}})
        channel_failed = settings_off is not None and "channel" in settings_off
        if channel_failed:  # the rig is at no known preset until an event sets one
            self._channel_now = None
        busy = self._engine.busy_error
        self._report_mismatch("busy", event, {"error": busy} if busy is not None else None)
        if isinstance(meta, dict) and isinstance(meta.get("exposure_ms"), int | float):
            self._exposure_ms = float(meta["exposure_ms"])
        self.camera_now = {
            **self.camera_now,
            "image_shape": [int(image.shape[0]), int(image.shape[1])],
            "exposure_ms": self._exposure_ms or event.exposure,
            **({"channel": event.channel.config} if event.channel is not None else {}),
        }
        settings = frame_settings(event, meta, self._channel_now, channel_failed=channel_failed)
        settings.update(frame_roi(image.shape, meta, self._shape_at_open))
        raw = RawFrame(image, event, acquired, position, truth, origin=feed,
                       pixel_size_um=frame_pixel_size(meta), settings=settings)
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

    def _report_mismatch(
        self, kind: str, event: useq.MDAEvent, off: dict[str, Any] | None
    ) -> None:
        """Report each distinct mismatch once per acquisition (a stuck filter wheel would
        otherwise report every other frame of a two-channel run); a stage's once per
        commanded position and axes (its read-back differs by noise on every frame); a
        refused event property once per property (the value commanded and the device's
        message may differ from event to event)."""
        if off is None or self._on_mismatch is None:
            return
        if kind == "schedule":  # once per acquisition: it is late from then on
            what: Any = None
        elif kind == "stage":
            what = {"commanded": off.get("commanded"), "axes": sorted(off.get("read", {}))}
        elif kind == "settings" and "properties" in off:
            what = {"properties": sorted(off["properties"])}
        else:
            what = off
        key = kind + json.dumps(what, sort_keys=True)
        if key in self._reported:
            return
        if len(self._reported) >= 1000:  # bounded: a long run of ever new mismatches
            self._reported.clear()
        self._reported.add(key)
        try:
            self._on_mismatch(kind, event, off)
        except Exception:  # reporting must not lose the frame
            log.exception("reporting a %s mismatch failed", kind)

    def _preset(self, channel: Any) -> dict[str, str] | None:
        """``"Device-Property": value`` of a channel preset (read once; runner thread)."""
        key = (str(channel.group), str(channel.config))
        if key not in self._presets:
            try:
                data = self.core.getConfigData(*key)
                self._presets[key] = {f"{d}-{p}": str(v) for d, p, v in data}
            except Exception:  # an unknown preset: pymmcore-plus has warned already
                return None
        return self._presets[key]

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
        self.ready_to_start()
        self._stuck = False
        self._reported.clear()
        self._time_point_at, self._injected_since, self._late_excused_s = None, None, 0.0
        self._feed = EventFeed(events, mode=mode, sync_timeout_s=self._sync_timeout_s,
                               on_missing=self._on_missing,
                               clock=self.core.mda.event_seconds_elapsed)
        self._on_done = on_done
        self._thread = threading.Thread(
            target=self._run, args=(self._feed,), name="livemask-mda", daemon=True
        )
        self._thread.start()

    def field_of_view(self) -> tuple[float, float] | None:
        """(width, height) of the camera's image in µm, or None without a pixel size."""
        px = float(self.core.getPixelSizeUm())
        if not (math.isfinite(px) and px > 0):
            return None
        return (self.core.getImageWidth() * px, self.core.getImageHeight() * px)

    def _run(self, feed: EventFeed) -> None:
        error: str | None = None
        self._channel_now, self._channel_props = self._core_channel()
        try:
            self.core.mda.run(feed)
        except Exception as exc:  # a hardware fault must not kill the service
            log.exception("acquisition failed")
            error = f"{type(exc).__name__}: {exc}"
        finally:
            if (watch := self._engine.watch) is not None:  # a set-up that raised
                watch.end()
            self._end(feed, self._on_done, error)

    def _core_channel(self) -> tuple[ChannelPreset | None, frozenset[tuple[str, str]]]:
        """The channel group's preset as a run starts (None without a channel group or a
        preset that matches) and the (device, property) pairs its presets set; from the
        core's cache and configuration: no device call (runner thread)."""
        core = self.core
        try:
            group = core.getChannelGroup()
            if not group:
                return None, frozenset()
            preset = core.getCurrentConfigFromCache(group)
            props = frozenset((str(d), str(p)) for name in core.getAvailableConfigs(group)
                              for d, p, _ in core.getConfigData(group, name))
        except Exception as exc:  # the frames then say "channel": null until an event sets one
            log.warning("could not read the channel preset as the run starts: %s", exc)
            return None, frozenset()
        return ((str(group), str(preset)) if preset else None), props

    def _after_run(self) -> None:
        """:attr:`camera_now` from the core, once a run has ended (runner thread)."""
        core = self.core
        try:
            group = core.getChannelGroup()
            self.camera_now = {
                "image_shape": [int(core.getImageHeight()), int(core.getImageWidth())],
                "exposure_ms": float(core.getExposure()),
                "channel": core.getCurrentConfig(group) if group else "",
            }
        except Exception as exc:  # status keeps the last frame's settings
            log.warning("could not read the camera's settings after the run: %s", exc)

    def inject(self, events: Iterable[useq.MDAEvent], *, timed_from_first: bool = False) -> int:
        """Queue events on the running acquisition (:class:`AcquisitionEnding` once it has
        ended, though the service may not have been told yet); ``timed_from_first``: see
        :meth:`EventFeed.inject`."""
        if self._feed is None:
            raise AcquisitionError("no acquisition is running")
        if not self.running:
            raise AcquisitionEnding("the acquisition has ended; the events were not added")
        return self._feed.inject(events, timed_from_first=timed_from_first)

    def follow_planned_exposure(
        self, exposure_now: Callable[[useq.MDAEvent], float | None] | None
    ) -> None:
        """Take planned events with the exposure ``exposure_now`` gives at their set-up
        (:meth:`PlannedExposure.exposure_now`; None: their own)."""
        self._engine.planned_exposure = exposure_now

    def set_exposure(self, exposure_ms: float) -> None:
        """Set the camera exposure; ``ValueError`` with the camera's reason if it refuses the
        value. Waits for the snap in progress (the engine's snap lock), which keeps the
        exposure it was taken with: the change takes effect from the next snap, except for
        an event that sets its own exposure (set again before its snap)."""
        with self._engine.snap_lock:
            try:
                self.core.setExposure(exposure_ms)
            except Exception as exc:  # the device's own range check (CMMError, ValueError, ...)
                raise ValueError(
                    f"camera {self.core.getCameraDevice()!r} refused exposure "
                    f"{exposure_ms:g} ms: {exc}"
                ) from exc
            self._engine.exposure_overridden = True
        self.camera_now = {**self.camera_now, "exposure_ms": float(exposure_ms)}
        self._set_exposure_ms = float(exposure_ms)

    def _longest_snap_ms(self) -> float:
        """The longest exposure the snap in progress may have: the last frame's, the last
        set one, or that of the last event issued (a run's first long snap has no frame)."""
        feed = self._feed.last_exposure_ms if self._feed is not None else 0.0
        return max(self._exposure_ms, self._set_exposure_ms, feed)

    def event_in_progress(self) -> tuple[EventWatch, float] | None:
        """The imaging event the runner was last inside (see :attr:`EventWatch.ended`), and
        how long (s) it may take before it counts as stalled: its exposure (or the longest
        the snap may have) plus ``max(STALL_MARGIN_S, 3 × exposure)``; None while the last
        event takes no image. Cheap: the service's heartbeat asks each second."""
        watch = self._engine.watch
        if watch is None:
            return None
        exposure_s = max(watch.event.exposure or 0.0, self._longest_snap_ms()) / 1e3
        return watch, exposure_s + max(STALL_MARGIN_S, 3 * exposure_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel the acquisition and join the runner thread (waiting at least two of the
        longest exposure the snap in progress may have, so that a long snap is not taken for
        a hung one)."""
        if self._feed is not None:
            self._feed.close()
        if self.running:
            self.core.mda.cancel()
            assert self._thread is not None
            timeout_s = max(timeout_s, 2 * self._longest_snap_ms() / 1e3 + 1)
            if self._stuck:  # a stop already waited in vain: answer at once this time
                timeout_s = 0.1
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self._stuck = True
                log.warning("MDA runner did not stop within %.1f s", timeout_s)

    def close(self) -> None:
        """Stop, disconnect and unload the devices."""
        from livemask.acquisition.core import close_core

        self.stop(timeout_s=2.0)  # the service's stop has waited already
        self.core.mda.events.frameReady.disconnect(self._frame_ready)
        self.core.mda.events.eventStarted.disconnect(self._event_started)
        try:
            close_core(self.core, timeout_s=1.0)
        except Exception:  # releasing the hardware is best effort at shutdown
            log.exception("closing the Micro-Manager core failed")
