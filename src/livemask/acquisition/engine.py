"""The MDA engine livemask runs: pymmcore-plus' own, with a failed stage move or a device
busy past its time-out not fatal, and failed moves and event properties remembered.

pymmcore-plus' ``MDAEngine`` logs a failed XY move, channel or exposure change and snaps
anyway, but lets a Z stage that raises end the whole acquisition: one serial time-out of the
focus drive would stop a night-long time-lapse. It also reads the XY stage outside its
``try`` for an event that gives x or y only, so a stage that cannot be read ended the run.
:class:`FocusTolerantEngine` treats a failed Z or XY move alike: logged, the frame taken
anyway, and the failure remembered (:attr:`~FocusTolerantEngine.z_failed`,
:attr:`~FocusTolerantEngine.xy_failed`) so that the frame is placed where the stage reads
back (nowhere where it cannot be read) and a ``stage_mismatch`` is reported (see
:func:`livemask.acquisition.source.frame_position`).

An event's ``properties`` that a device refuses pymmcore-plus only logs; the engine keeps
each refusal (:attr:`FocusTolerantEngine.property_errors`) for that event's frames, for
which the source reports a ``settings_mismatch``.

Likewise a device still busy after the core's time-out (``waitForSystem``, after every
event's set-up; the core raises "Wait for device ... timed out"): the engine logs it, keeps
the message in :attr:`FocusTolerantEngine.busy_error` for that event's frames (the source
reports a ``device_busy`` event) and snaps anyway, instead of ending the acquisition.

pymmcore-plus logs a hardware autofocus that fails with a ``RuntimeError`` (what the C++
core raises) and goes on; the engine turns a Python device's other errors (a
``TimeoutError`` from ``waitForSystem``, say) into one, so they do not end it either.

For the stall watchdog, :attr:`FocusTolerantEngine.watch` says which imaging event the
runner is inside and since when: set when its set-up begins (after the time plan's wait),
ended when it is torn down (after its frame).

A camera exposure set from another thread while the runner snaps (the service's ``set
exposure_ms``) used to land mid-snap: pymmcore-plus reads the exposure for the frame's
metadata just after the snap, so the frame was labelled with the new exposure although it
was exposed with the old. The engine holds :attr:`FocusTolerantEngine.snap_lock` from before
each snap until its metadata is read; whoever sets the exposure holds it too (see
:meth:`livemask.acquisition.source.MicroscopeSource.set_exposure`) and marks
:attr:`FocusTolerantEngine.exposure_overridden`, so a set waits for the snap in progress and
takes effect from the next one. An event that sets its own exposure (an ``enqueue``d event's,
a feedback action's) keeps it: where a set landed after its set-up, its exposure is set again
just before its snap (the lock is not held through set-ups, stage moves or autofocus, which
would make sets wait on an idle camera).

pymmcore-plus 0.18.1 puts the camera's ROI into its summary metadata only; the engine adds it
to each frame's metadata (``roi``, read just after the snap), so that a frame taken with a
ROI can be placed on the sensor (see :func:`livemask.acquisition.source.frame_roi`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import useq
from pymmcore_plus import DeviceType, Keyword
from pymmcore_plus.core import SequencedEvent
from pymmcore_plus.mda import MDAEngine
from useq import HardwareAutofocus

from livemask.log import is_power_of_ten
from livemask.protocol import plain_index

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus
    from pymmcore_plus.mda._protocol import PImagePayload
    from pymmcore_plus.metadata import FrameMetaV1, PropertyValue

log = logging.getLogger("livemask")

__all__ = ["ROI_KEY", "EventWatch", "FocusTolerantEngine", "camera_roi", "takes_image"]

#: Key of the frame metadata that holds the camera's ROI ``(x, y, width, height)`` (the form
#: and name of pymmcore-plus' image info ``roi``).
ROI_KEY = "roi"


def camera_roi(core: CMMCorePlus) -> tuple[int, int, int, int] | None:
    """The current camera's ROI ``(x, y, width, height)`` in its pixels (the full image
    where none is set), or None where the core cannot say."""
    try:
        x, y, width, height = (int(v) for v in core.getROI())
    except Exception:  # no camera, or one that cannot tell: the frame's ROI is not known
        return None
    return x, y, width, height


def takes_image(event: useq.MDAEvent) -> bool:
    """Whether the event asks the camera for a frame (not a custom action, e.g. a feedback
    action's restore event, nor a hardware autofocus)."""
    return event.action is None or isinstance(event.action, useq.AcquireImage)


class EventWatch:
    """An imaging event the runner is inside: when its set-up began and when it was torn
    down (``time.monotonic()``; ``ended`` None until then)."""

    __slots__ = ("ended", "event", "started")

    def __init__(self, event: useq.MDAEvent) -> None:
        self.event = event
        self.started = time.monotonic()
        self.ended: float | None = None

    def end(self) -> None:
        """Mark the event over (the first time only)."""
        if self.ended is None:
            self.ended = time.monotonic()


class FocusTolerantEngine(MDAEngine):
    """``MDAEngine`` whose failed stage moves and device time-outs are logged instead of
    ending the acquisition, and whose failed moves and event properties are remembered for
    the event's frames."""

    #: Whether the Z (XY) move of the event set up last raised (read it for that event's
    #: frames: the runner emits them before it sets up the next event).
    z_failed: bool = False
    xy_failed: bool = False
    #: The core's message if a device was still busy after its time-out when the event set
    #: up last was ready to snap, else None (read it for that event's frames).
    busy_error: str | None = None
    #: Events at which a device was still busy, and failed Z and XY moves, so far (their
    #: warnings are logged the 1st, 10th, 100th, ... time: a failing device warns at every
    #: event).
    busy_errors: int = 0
    z_failures: int = 0
    xy_failures: int = 0
    #: The imaging event set up last, or None when that one takes no image (read from
    #: other threads: replaced, never changed, apart from its ``ended``).
    watch: EventWatch | None = None
    #: The camera's ROI for the event set up last (read at its first frame: an event's
    #: frames share one), and whether it is still to be read.
    _roi: tuple[int, int, int, int] | None = None
    _binning_at_start: str | None = None  # the camera's Binning when the run's state was taken
    _roi_unread: bool = True
    #: The single event's exposure while it is set up (set after its channel preset)
    _event_exposure: float | None = None

    def __init__(self, mmc: CMMCorePlus, **kwargs: Any) -> None:
        super().__init__(mmc, **kwargs)
        #: Held from before each snap until its frame's metadata (exposure included) is
        #: read; a camera setting changed from another thread must hold it too.
        self.snap_lock = threading.RLock()
        #: Set (under :attr:`snap_lock`) by whoever sets the exposure from another thread;
        #: cleared when an event's set-up begins.
        self.exposure_overridden = False
        #: The exposure a ``set`` since the runner took a planned event gives it (the
        #: runner takes an event before waiting for its start time, which may be minutes in
        #: a time-lapse); None: the event's own. The service's :class:`PlannedExposure`.
        self.planned_exposure: Callable[[useq.MDAEvent], float | None] | None = None
        #: (event, the exposure its set-up commanded), for :meth:`commanded_exposure`
        self._commanded: tuple[useq.MDAEvent, float] | None = None
        #: The event ``properties`` the event set up last could not set: (device,
        #: property) → (the value commanded, the device's error); read it for that event's
        #: frames. Replaced, never changed in place (the source reads it).
        self.property_errors: dict[tuple[str, str], tuple[Any, str]] = {}
        #: Refusals so far in this acquisition, per (device, property), for the log's
        #: back-off
        self._property_failures: dict[tuple[str, str], int] = {}

    def setup_sequence(self, sequence: useq.MDASequence) -> Any:
        """``MDAEngine.setup_sequence``, with the warning counts of a new acquisition."""
        self.busy_errors = self.z_failures = self.xy_failures = 0
        self._property_failures = {}
        return super().setup_sequence(sequence)

    def setup_event(self, event: useq.MDAEvent) -> None:
        """``MDAEngine.setup_event`` (pymmcore-plus 0.18.1), with the wait for the devices
        logged and remembered when it times out; :attr:`watch` starts here."""
        self.exposure_overridden = False
        self.watch = EventWatch(event) if takes_image(event) else None
        self.z_failed = self.xy_failed = False
        self.property_errors = {}
        self.busy_error = None
        self._roi_unread = True
        if isinstance(event, SequencedEvent):
            self.setup_sequenced_event(event)
        else:
            self.setup_single_event(event)
        try:
            self.mmcore.waitForSystem()
        except Exception as exc:  # "Wait for device 'Z' timed out after 5000 ms" (or CMMError)
            self.busy_errors += 1
            if is_power_of_ten(self.busy_errors):  # a device busy at every event: not a flood
                log.warning(
                    "A device is still busy after its time-out at event %s (the frame is "
                    "taken anyway and may show the device moving; core.setTimeoutMs sets the "
                    "time-out; %d time(s) so far): %s",
                    plain_index(event.index), self.busy_errors, exc,
                )
            self.busy_error = str(exc) or type(exc).__name__

    def setup_single_event(self, event: useq.MDAEvent) -> None:
        """``MDAEngine.setup_single_event``, with the event's exposure set only where the
        camera's (as the core reads it once the event's channel preset is set) differs:
        pymmcore-plus sets it at every single event that has one (each frame of a sequence
        whose channels set exposures, a feedback action's frames and the event that
        restores after them), and on some cameras a set stops and re-arms the acquisition.
        Its channel preset is set only on a change already (pymmcore-plus' own check)."""
        exposure = self._exposure_of(event)
        self._commanded = None if exposure is None else (event, exposure)
        if exposure is None:
            super().setup_single_event(event)
            return
        self._event_exposure = exposure
        try:  # set in :meth:`_set_event_channel`, where pymmcore-plus sets it: channel first
            super().setup_single_event(event.model_copy(update={"exposure": None}))
        finally:
            self._event_exposure = None

    def _set_event_channel(self, event: useq.MDAEvent) -> None:  # pymmcore-plus 0.18.1
        """The event's channel preset, then (a single event's) exposure unless the camera
        has it already: read after the preset, which may set an exposure of its own (a
        preset with ``Camera,Exposure``, or one that switches ``Core,Camera``)."""
        super()._set_event_channel(event)
        exposure, self._event_exposure = self._event_exposure, None
        if exposure is None or self._exposure_in_effect(exposure):
            return
        try:
            self.mmcore.setExposure(exposure)
        except Exception as exc:  # as pymmcore-plus' set-up: the frame's read-back tells
            log.warning("Failed to set exposure. %s", exc)

    def _exposure_of(self, event: useq.MDAEvent) -> float | None:
        """The exposure ``event`` is taken with: the newest ``set``'s for a planned event
        that sets one (:attr:`planned_exposure`), else its own (None: the camera's)."""
        if event.exposure is None:
            return None
        hook = self.planned_exposure
        now = hook(event) if hook is not None else None
        return float(event.exposure) if now is None else now

    def commanded_exposure(self, event: useq.MDAEvent) -> float | None:
        """The exposure the set-up of ``event`` (the one running) commanded, which a
        ``set`` since the runner took it may have changed from ``event.exposure``."""
        commanded = self._commanded
        if commanded is not None and commanded[0] is event:
            return commanded[1]
        return None if event.exposure is None else float(event.exposure)

    def _exposure_in_effect(self, exposure_ms: float) -> bool:
        """Whether the camera's exposure (the core's reading) is ``exposure_ms`` already;
        False where it cannot be read (then it is set, as before)."""
        try:
            return math.isclose(float(self.mmcore.getExposure()), float(exposure_ms),
                                rel_tol=1e-9, abs_tol=1e-9)
        except Exception:  # no camera, or it does not answer: set it, and let that tell
            return False

    def exec_single_event(self, event: useq.MDAEvent) -> Iterator[PImagePayload | None]:
        """``MDAEngine.exec_single_event`` with the snap and the read-back of its metadata
        under :attr:`snap_lock` (the event's own exposure set again first where a set
        landed since its set-up); the frames are handed on once it is released."""
        with self.snap_lock:
            if self.exposure_overridden and (exposure := self._exposure_of(event)) is not None:
                self._commanded = (event, exposure)
                self._exposure_again(exposure)
            payloads = list(super().exec_single_event(event))
        # not ``yield from`` (ruff's UP028): the runner's send("cancel") on a stop would
        # reach the list's iterator, which has no send (AttributeError ended the run)
        for payload in payloads:  # noqa: UP028
            yield payload

    def get_frame_metadata(
        self,
        event: useq.MDAEvent,
        prop_values: tuple[PropertyValue, ...] | None = None,
        runner_time_ms: float = 0.0,
        include_position: bool = True,
        camera_device: str | None = None,
    ) -> FrameMetaV1:
        """``MDAEngine.get_frame_metadata`` (pymmcore-plus 0.18.1) with the camera's ROI
        (:data:`ROI_KEY`; absent where the core cannot say), read once per event (a camera
        call: not at every frame of a hardware sequence)."""
        meta = super().get_frame_metadata(
            event, prop_values, runner_time_ms, include_position, camera_device)
        if self._roi_unread:
            self._roi, self._roi_unread = camera_roi(self.mmcore), False
        if self._roi is not None:
            cast(dict[str, Any], meta)[ROI_KEY] = self._roi
        return meta

    def teardown_event(self, event: useq.MDAEvent) -> None:
        """End :attr:`watch` (its frame, if any, has been emitted), then tear down."""
        if (watch := self.watch) is not None:
            watch.end()
        super().teardown_event(event)

    def _exposure_again(self, exposure_ms: float) -> None:
        """Set the event's own exposure again (a set from another thread replaced it after
        the event's set-up); a failure is logged, as pymmcore-plus' set-up does."""
        self.exposure_overridden = False
        try:
            self.mmcore.setExposure(exposure_ms)
        except Exception as exc:  # the frame's read-back and settings_mismatch tell
            log.warning("could not set the event's exposure %g ms again before its snap: %s",
                        exposure_ms, exc)

    def _capture_state(self) -> Any:  # pymmcore-plus 0.18.1
        """pymmcore-plus' state before the run, with the camera's binning (see
        :meth:`_restore_initial_state`)."""
        state = super()._capture_state()
        self._binning_at_start = None
        try:
            camera = self.mmcore.getCameraDevice()
            if camera and self.mmcore.hasProperty(camera, "Binning"):
                self._binning_at_start = str(self.mmcore.getProperty(camera, "Binning"))
        except Exception:  # no binning known: the ROI is put back where it fits
            pass
        return state

    def _restore_initial_state(self) -> None:  # pymmcore-plus 0.18.1
        """pymmcore-plus' restore of the state before the run, with the camera ROI put back
        only at the binning it was set at (an event's ``properties``, which stay, may have
        changed it): pymmcore-plus put it back anyway, which logged an ERROR ("ROI ...
        exceeds sensor bounds") after a binning increase and left a corner crop after a
        decrease; the full image is kept then."""
        state = self._initial_state
        if not isinstance(state, dict):
            super()._restore_initial_state()
            return
        roi = state.pop("roi", None)
        binning, self._binning_at_start = self._binning_at_start, None
        super()._restore_initial_state()
        if roi is None:
            return
        try:
            camera = self.mmcore.getCameraDevice()
            now = (str(self.mmcore.getProperty(camera, "Binning"))
                   if binning is not None and camera else None)
            self.mmcore.clearROI()
            width, height = self.mmcore.getImageWidth(), self.mmcore.getImageHeight()
            x, y, w, h = (int(v) for v in roi)
            if now != binning or x + w > width or y + h > height:
                log.info("the camera ROI from before the run (%s) was set at another binning "
                         "(%s, now %s): the full image (%dx%d) is kept", roi, binning, now,
                         width, height)
            elif (x, y, w, h) != (0, 0, width, height):
                self.mmcore.setROI(x, y, w, h)
        except Exception as exc:  # as pymmcore-plus' own restore steps: logged, not fatal
            log.warning("could not restore the camera ROI from before the run: %s", exc)

    def _execute_autofocus(self, action: HardwareAutofocus) -> float:  # pymmcore-plus 0.18.1
        try:
            return float(super()._execute_autofocus(action))
        except RuntimeError:
            raise  # logged by pymmcore-plus as "Hardware autofocus failed"; the run goes on
        except Exception as exc:  # a Python device's own error: the same, not fatal
            raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc

    def _set_event_z(self, event: useq.MDAEvent) -> None:  # pymmcore-plus 0.18.1
        try:
            if event.z_pos is not None and not self.mmcore.getFocusDevice():
                # pymmcore-plus returns without a word: every "plane" was one image
                raise RuntimeError("the configuration has no focus device (Core-Focus); "
                                   "set one in the .cfg to image z positions")
            super()._set_event_z(event)
        except Exception as exc:  # the device's error (CMMError, RuntimeError, ...)
            self.z_failures += 1
            if is_power_of_ten(self.z_failures):
                log.warning("Failed to set Z position to %s um (the frame is taken anyway, at "
                            "the Z the stage reads back; %d time(s) so far): %s", event.z_pos,
                            self.z_failures, exc)
            self.z_failed = True

    def _set_event_xy_position(self, event: useq.MDAEvent) -> None:  # pymmcore-plus 0.18.1
        """pymmcore-plus' XY move (skipped where the stage was last commanded there), with a
        failure logged, counted and remembered in :attr:`xy_failed`, as a failed Z move:
        pymmcore-plus logged a move that raised and the frame was placed at the commanded
        position even where the stage could not be read back; and it read the stage outside
        its ``try`` for an event that gives x or y only, so a stage that could not be read
        ended the whole acquisition."""
        want_x, want_y = event.x_pos, event.y_pos
        if want_x is None and want_y is None:
            return
        core = self.mmcore
        try:
            if not core.getXYStageDevice():
                # pymmcore-plus warns and skips the move: every position was one field
                raise RuntimeError("the configuration has no XY stage (Core-XYStage); set one "
                                   "in the .cfg to image x/y positions")
            last: dict[str | None, tuple[float, float]] = getattr(
                core, "_last_xy_position", {})  # what pymmcore-plus' core last commanded
            last_x, last_y = last.get(None) or (None, None)
            if (not self.force_set_xy_position
                    and (want_x is None or want_x == last_x)
                    and (want_y is None or want_y == last_y)):
                return
            if want_x is None or want_y is None:  # the other axis stays where it is
                now_x, now_y = core.getXYPosition()
                want_x = now_x if want_x is None else want_x
                want_y = now_y if want_y is None else want_y
            core.setXYPosition(want_x, want_y)
        except Exception as exc:  # the device's error (CMMError, RuntimeError, ...)
            self.xy_failures += 1
            if is_power_of_ten(self.xy_failures):
                log.warning("Failed to set XY position to (%s, %s) um (the frame is taken "
                            "anyway, at the position the stage reads back; %d time(s) so "
                            "far): %s", event.x_pos, event.y_pos, self.xy_failures, exc)
            self.xy_failed = True

    def _set_event_properties(  # pymmcore-plus 0.18.1
        self, properties: Sequence[useq.PropertyTuple]
    ) -> None:
        """pymmcore-plus' setting of an event's ``properties`` (a stage's ``Position`` by a
        move), with each the device refuses logged and kept in :attr:`property_errors` for
        the event's frames (pymmcore-plus only logged it, at every event)."""
        core = self.mmcore
        for dev, prop, value in properties:
            try:
                kind = core.getDeviceType(dev) if prop == Keyword.Position else None
                if kind == DeviceType.XYStage:
                    if not isinstance(value, list | tuple):
                        raise TypeError(f"an XY stage's Position takes [x, y], not {value!r}")
                    x, y, *_ = value
                    core.setXYPosition(dev, float(x), float(y))
                elif kind == DeviceType.Stage:
                    core.setPosition(dev, float(value))
                else:
                    core.setProperty(dev, prop, value)
            except Exception as exc:  # the device's error: the frame is taken anyway
                key = (str(dev), str(prop))
                count = self._property_failures[key] = self._property_failures.get(key, 0) + 1
                if is_power_of_ten(count):
                    log.warning("Failed to set property %s of device %s to %r (the frame is "
                                "taken anyway; %d time(s) so far): %s", prop, dev, value,
                                count, exc)
                self.property_errors = {
                    **self.property_errors, key: (value, str(exc) or type(exc).__name__)}
