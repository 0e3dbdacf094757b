"""Applies the rule engine's decisions to a running acquisition and reports them.

The service creates one :class:`FeedbackController` and hands it, for each analysed frame,
the frame and its published measurements (:meth:`on_measurements`, on the event loop, right
after the ``measurements`` message went out and, in synchronized mode, before the next event
is released). Accepted actions that acquire are injected into the acquisition's event feed,
ahead of the remaining planned events; ``skip`` / ``mode`` / ``stop`` act at once (a
``stop`` after actions of its own fire that queued events ends the plan only: their events
run, then the acquisition ends by itself).

Every decision is published on ``event``: ``feedback_action`` (with ``reaction_ms``) or
``feedback_refused``. ``reaction_ms`` runs from the triggering frame's ``t.acquired`` to the
moment the first resulting event starts on the core: the MDA runner's ``eventStarted``
signal when the source has a pymmcore-plus core (``reaction_from: "eventStarted"``), else
the ``t.acquired`` of the first resulting frame (``"frameReady"``); for actions without
events, the moment the action was applied (``"applied"``). The feedback_action event of an
acquiring action is therefore published when its first event starts.

An action whose events change the exposure or channel is followed by an event that takes no
image and puts back the settings in effect before it (pymmcore-plus keeps an event's
settings for the following events that give none). The settings in effect are kept by one
:class:`SettingsInEffect`, the service's, which its ``enqueue`` shares: each knows the
other's restore events still queued, so neither puts back the other's added settings.
Rules run only while an acquisition
runs (between :meth:`~FeedbackController.acquisition_started` and
:meth:`~FeedbackController.acquisition_finished`, and not after a ``stop`` action).

The controller owns no sockets or devices: the service passes callables in.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import useq

from livemask.feedback.actions import (
    METADATA_KEY,
    ActionError,
    Burst,
    Centre,
    EventPlanner,
    MoveTo,
    Revisit,
    SetChannel,
    SetMode,
    SkipPosition,
    Stop,
    ZStack,
    restore_event,
)
from livemask.feedback.context import FEEDBACK_INDEX_KEY, FrameContext
from livemask.feedback.engine import Decision, PlannedEvents, RuleEngine
from livemask.feedback.safety import SafetyGuard, Violation
from livemask.feedback.spec import FeedbackConfig, RuleSpec
from livemask.log import is_power_of_ten

log = logging.getLogger("livemask")

#: Distinct (rule, limit, place) refusals counted per acquisition before the counts restart.
MAX_REFUSAL_KEYS = 10_000

#: The status lists the light dose of at most this many positions (the most exposed): the
#: status goes out every heartbeat, and a grid scan has thousands of positions.
STATUS_DOSE_POSITIONS = 50

Publish = Callable[[str, dict[str, Any]], None]

#: Actions that take new frames or change the planned ones (a replay can do neither).
ACQUIRING = (Burst, Centre, MoveTo, ZStack, SetChannel, Revisit, SkipPosition)

#: Metadata key of the events (queued by ``enqueue`` and by feedback actions) that put back
#: the settings added events changed: see :meth:`SettingsInEffect.tag`.
RESTORE_TAG_KEY = "livemask_restore"
#: Micro-Manager's keyword for a camera's binning property.
BINNING = "Binning"


def sets_binning(properties: Sequence[Any] | None) -> bool:
    """Whether event ``properties`` set a ``Binning`` (the camera's: what a ROI is in)."""
    return any(tuple(entry)[1] == BINNING for entry in properties or ())


def known_camera_settings(now: Mapping[str, Any]) -> dict[str, Any]:
    """``{"exposure", "channel"}`` from the camera's settings as a service knows them
    (``exposure_ms``, ``channel``, ``channel_group``); None where not known."""
    exposure, channel, group = now.get("exposure_ms"), now.get("channel"), now.get(
        "channel_group")
    known: dict[str, Any] = {"exposure": None, "channel": None}
    if (isinstance(exposure, int | float) and not isinstance(exposure, bool)
            and math.isfinite(exposure) and exposure > 0):
        known["exposure"] = float(exposure)
    if isinstance(channel, str) and channel:  # in the rig's channel group (useq's default:
        known["channel"] = useq.EventChannel(  # "Channel")
            config=channel, **({"group": group} if isinstance(group, str) and group else {}))
    return known


def roi_box(roi: Any) -> tuple[int, int, int, int] | None:
    """``(offset_x, offset_y, width, height)`` of a ``useq.CameraROI``; None for none or an
    empty one (not known)."""
    if not isinstance(roi, useq.CameraROI) or roi.width < 1 or roi.height < 1:
        return None
    return roi.offset_x, roi.offset_y, roi.width, roi.height


class SettingsInEffect:
    """The exposure, channel, stage position (``x_pos``, ``y_pos``, ``z_pos``) and camera ROI
    the running acquisition's events leave in effect, as far as known: what the events added
    to it (``enqueue``, feedback actions) are followed by, to put back (the planned events
    that give none would otherwise run with theirs).

    ``values`` follows each event as it starts (runner thread): the added events' too;
    ``pending`` holds what the restore events queued but not started yet will set (event
    loop), in the order queued. Both kinds of restore events are registered here, so the
    restore of events added while others' restore is still queued puts back the settings
    from before all of them (:meth:`expected`)."""

    FIELDS = ("exposure", "channel", "x_pos", "y_pos", "z_pos", "roi")

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.pending: dict[int, dict[str, Any]] = {}
        self._ids = itertools.count(1)

    def reset(self, **known: Any) -> None:
        """A new acquisition starts with ``known`` settings (None: not known)."""
        self.values = {k: v for k, v in known.items() if v is not None}
        self.pending = {}

    def event_started(self, event: useq.MDAEvent) -> int | None:
        """Take the settings ``event`` gives (runner thread); the id of a queued restore
        event it is, else None."""
        for name in self.FIELDS:
            value = getattr(event, name)
            if value is not None:
                self.values[name] = value
        if sets_binning(event.properties):  # a ROI known is in the old binning's pixels
            self.values.pop("roi", None)
        tag = (event.metadata or {}).get(RESTORE_TAG_KEY)
        return tag if isinstance(tag, int) else None

    def expected(self) -> dict[str, Any]:
        """The settings in effect once the restore events queued so far have run."""
        out = dict(self.values)
        for values in list(self.pending.values()):
            out.update(values)
        return out

    def tag(self, event: useq.MDAEvent) -> useq.MDAEvent:
        """``event`` tagged as a restore event (see :meth:`queued`); its metadata kept."""
        return event.model_copy(update={
            "metadata": {**(event.metadata or {}), RESTORE_TAG_KEY: next(self._ids)}})

    def queued(self, event: useq.MDAEvent) -> None:
        """The tagged ``event`` was queued: remember what it sets until it starts."""
        n = event.metadata[RESTORE_TAG_KEY]
        self.pending[n] = {k: v for k in self.FIELDS if (v := getattr(event, k)) is not None}

    def started(self, n: int) -> None:
        """The restore event ``n`` has started (event loop)."""
        self.pending.pop(n, None)


class FeedbackController:
    """Rule engine + the glue to a service: inject, mode, stop, publish, latency."""

    def __init__(
        self,
        config: FeedbackConfig,
        *,
        pixel_size_um: float | None,
        inject: Callable[[list[useq.MDAEvent]], int],
        publish: Publish,
        set_mode: Callable[[str], None] | None = None,
        stop: Callable[[], None] | None = None,
        finish_with: Callable[[list[useq.MDAEvent]], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        latency_window: int = 2000,
        camera_settings: Callable[[], Mapping[str, Any]] | None = None,
        check_events: Callable[[Sequence[useq.MDAEvent]], None] | None = None,
        cannot_acquire: str | None = None,
        settings: SettingsInEffect | None = None,
    ) -> None:
        """``settings`` (optional): the service's tracker of the settings in effect, which
        it resets at each start, feeds every event that starts and shares with ``enqueue``;
        the controller builds its restore events from it and registers them there. Without
        it the controller keeps its own, fed by :meth:`on_event_started` and reset from
        ``camera_settings`` (optional: the camera's settings as the service knows them
        without a device call, ``exposure_ms``, ``channel``), read when an acquisition
        starts; without either the settings are known only from the events that set them.
        ``finish_with`` (optional) ends the acquisition once the given queued events have
        run, dropping the others (a ``stop`` after actions of its own fire); without it such
        a stop cancels them too.
        ``check_events``
        (optional) raises for an action's events that the microscope cannot run as given
        (a channel preset it lacks, an exposure beyond its camera's limits): refused."""
        self.config = config
        matrix = config.pixel_to_stage
        # for the pixel size at open: centring scales it by each frame's (binning, objective)
        planner = (
            EventPlanner(pixel_to_stage=matrix, matrix_pixel_size_um=pixel_size_um)
            if matrix is not None
            else EventPlanner.for_pixel_size(pixel_size_um, matrix_pixel_size_um=pixel_size_um)
        )
        self.guard = SafetyGuard(config.limits)
        self.engine = RuleEngine(
            config, planner=planner, guard=self.guard, check_events=check_events
        )
        self._inject = inject
        #: why the frame source cannot take new events (a replay), None if it can: every
        #: action that acquires or skips is refused with it, before any other check's reason
        self._cannot_acquire = cannot_acquire
        self._publish = publish
        self._set_mode = set_mode
        self._stop = stop
        self._finish_with = finish_with
        self._loop = loop
        self._planned: PlannedEvents | None = None
        self._pending: dict[int, Decision] = {}
        self._camera_settings = camera_settings
        self._running = False  # an acquisition runs and no stop action was applied
        # the settings that planned (and added) events leave in effect, as far as known
        self._settings = settings if settings is not None else SettingsInEffect()
        self._own_settings = settings is None  # reset and fed here, not by the service
        self._restoring: set[int] = set()  # actions whose restore event has not started
        self.reaction_ms: deque[float] = deque(maxlen=latency_window)
        self.accepted = 0
        self.refused = 0
        self._refusals: dict[tuple[str, str | None, str], int] = {}  # per acquisition
        self.frames_seen = 0
        self.eval_ms: deque[float] = deque(maxlen=latency_window)

    @property
    def enabled(self) -> bool:
        """Whether rules are evaluated (``feedback.enabled``)."""
        return self.config.enabled

    # ------------------------------------------------------------ acquisition
    def wrap_planned(
        self, events: Iterable[useq.MDAEvent], positions: Collection[int] | None = None,
        coordinates: Mapping[int, Sequence[float | None]] | None = None,
        channel_exposures: Mapping[str, float] | None = None,
    ) -> PlannedEvents:
        """Wrap a new acquisition's planned events (skips, positions, dose ledger);
        ``positions``: every ``p`` index they have (None: not known), which ``skip`` may
        name; ``coordinates``: their stage ``(x, y, z)`` µm where known (an action's frames
        there count at that position before it is first visited); ``channel_exposures``:
        the plan's exposure of each channel preset (an action naming another channel than
        its trigger's takes it). The positions seen in an earlier acquisition are
        forgotten."""
        planner = self.engine.planner
        planner.start_plan(positions, coordinates, channel_exposures)
        self._planned = PlannedEvents(events, guard=self.guard, planner=planner)
        return self._planned

    def acquisition_started(self) -> None:
        """Reset rule state, features and the dose ledger; rules run from now on."""
        self.engine.reset()
        self._pending.clear()
        self._restoring.clear()
        self._refusals.clear()
        if self._own_settings:
            self._settings.reset(**self._read_camera())
        exposure = self._settings.expected().get("exposure")
        if exposure is not None:  # what planned events that give none are charged
            self.guard.note_exposure(exposure)
        self._running = True

    def acquisition_finished(self) -> None:
        """Report actions whose events never ran (the acquisition ended first); rules no
        longer run (on the last frames of the run, still being analysed). The dose ledger
        stays as it is: an idle ``set`` exposure re-charges no frame."""
        self._running = False
        self.guard.finished()
        self._restoring.clear()
        for d in list(self._pending.values()):
            self._publish_action(d, None, "not_started")
        self._pending.clear()

    def exposure_set(self, exposure_ms: float) -> None:
        """The camera's exposure was set outside any event (the ``set`` command): the
        planned frames run with it from now on (event loop), and the dose ledger charges
        it. The service's tracker (``settings``) it has already: the service queues what
        keeps it after the restore events still queued. Without one, a restore event still
        queued would put the older exposure back after its action: an event that takes no
        image and sets this one follows it. A planned frame the runner has taken but not
        started yet (waiting for its time point) runs with it too: its light is re-charged."""
        self.guard.exposure_set(float(exposure_ms))
        if not self._own_settings:
            return
        self._settings.values["exposure"] = float(exposure_ms)
        if self._restoring and self._running:
            event = self._settings.tag(useq.MDAEvent(
                exposure=float(exposure_ms),
                action=useq.CustomAction(name="livemask-set-exposure")))
            try:
                self._inject([event])
            except Exception as exc:  # ending (nothing left to restore), or a full queue
                log.warning("feedback: the exposure just set (%g ms) could not be queued after "
                            "an action's restore event, which may put the older one back: %s",
                            exposure_ms, exc)
                return
            self._settings.queued(event)

    def _read_camera(self) -> dict[str, Any]:
        """The exposure and channel in effect as read from ``camera_settings`` (None where
        not known), read when an acquisition starts: the camera is idle, its settings those
        of the planned events until an event or the ``set`` command changes them."""
        if self._camera_settings is None:
            return {}
        try:
            return known_camera_settings(dict(self._camera_settings() or {}))
        except Exception:  # the settings are known from the events only
            log.debug("feedback: could not read the camera's settings", exc_info=True)
            return {}

    # ------------------------------------------------------------ rules
    def set_rules(self, specs: Sequence[RuleSpec]) -> None:
        """Replace the rules (validated specs); user rules are imported now. The safety
        ledgers (light dose, frames per minute) go on: only a new acquisition resets them;
        so do the counters, cooldowns and state of rules whose spec is unchanged.
        ConfigError for a rule that breaks a limit outright (``max_action_duration_s``)."""
        self.engine.set_rules(specs)

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Enable or disable one rule (KeyError if unknown)."""
        self.engine.slot(name).enabled = enabled

    # ------------------------------------------------------------ per frame
    def on_measurements(self, frame: Any, measurements: dict[str, Any]) -> None:
        """Evaluate the rules on one analysed frame and apply the decisions (event loop)."""
        if not self.config.enabled:
            return
        if not self._running:  # no acquisition runs: the last frames of a finished one act
            if self._pending:  # no more; but a stop let its fire's actions run first:
                self._clock_only(measurements)  # their reaction clock still runs
            return
        t0 = time.perf_counter()
        image = getattr(frame, "image", None)
        shape = tuple(image.shape[:2]) if image is not None else (0, 0)
        ctx = FrameContext.from_measurements(measurements, shape)
        # the action's events set no ROI and run after those queued: they keep this one
        ctx.action_roi = roi_box(self._settings.expected().get("roi"))
        self.frames_seen += 1
        if ctx.is_feedback:  # fallback reaction clock: the first frame an action produced
            self._started(int(ctx.index[FEEDBACK_INDEX_KEY]), ctx.acquired, "frameReady")
        self.engine.evaluate(ctx, apply=self._apply)
        self.eval_ms.append((time.perf_counter() - t0) * 1e3)

    def _clock_only(self, measurements: dict[str, Any]) -> None:
        """The fallback reaction clock on a frame no rule sees (after a ``stop``)."""
        ctx = FrameContext.from_measurements(measurements, (0, 0))
        if ctx.is_feedback:
            self._started(int(ctx.index[FEEDBACK_INDEX_KEY]), ctx.acquired, "frameReady")

    def _apply(self, d: Decision) -> None:
        """Carry out one decision (the engine's ``apply``); a late refusal sets
        ``d.violation``, and the engine then charges no ledger."""
        if self._cannot_acquire is not None and isinstance(d.action, ACQUIRING):
            # the reason that holds whatever else is wrong (e.g. settings not known)
            d.violation = Violation("not_acquiring", self._cannot_acquire)
        if not d.accepted:
            self._refuse(d)
            return
        if not self._running:  # e.g. a stop action of this same frame came first
            d.violation = Violation(
                "not_acquiring", "no acquisition is running (it has ended or is stopping)"
            )
            self._refuse(d)
            return
        action = d.action
        if d.events:
            known = self._settings.expected()  # after the restore events still queued
            try:
                d.restore = restore_event(
                    d.events, known.get("exposure"), known.get("channel"),
                    action_id=d.action_id, rule=d.rule,
                )
            except ActionError as exc:
                d.violation = Violation(exc.reason, str(exc))
                self._refuse(d)
                return
            restore = self._settings.tag(d.restore) if d.restore is not None else None
            d.queued = [*d.events, *([restore] if restore is not None else [])]
            self._pending[d.action_id] = d
            try:
                self._inject(d.queued)
            except Exception as exc:  # e.g. the acquisition has just ended
                self._pending.pop(d.action_id, None)
                d.violation = Violation("not_acquiring", f"could not inject the events: {exc}")
                self._refuse(d)
                return
            if restore is not None:
                self._settings.queued(restore)
                self._restoring.add(d.action_id)
            self.accepted += 1
            self._accepted_here(d)
            return
        try:
            if isinstance(action, SkipPosition):
                p = action.position if action.position is not None else d.index.get("p")
                if p is None or self._planned is None:
                    raise ValueError("the triggering frame has no position index `p` to skip")
                self._planned.skip(int(p), action.visits)
            elif isinstance(action, SetMode):
                if self._set_mode is None:
                    raise ValueError("this service cannot switch modes")
                self._set_mode(action.mode)
            elif isinstance(action, Stop):
                if self._stop is None:
                    raise ValueError("this service cannot stop the acquisition")
                if self._planned is not None:  # no further planned event, even in the
                    self._planned.close()  # instant before the stop below takes effect
                fire = self._fire_queued(d)
                if fire and self._finish_with is not None:
                    # the actions before it in this fire (a list runs in order) take their
                    # frames first; everything else queued is dropped, as by a stop
                    self._finish_with(fire)
                else:
                    self._stop()
                self._running = False  # the run is over: no more actions
        except Exception as exc:
            d.violation = Violation("not_applicable", str(exc))
            self._refuse(d)
            return
        self.accepted += 1
        self._accepted_here(d)
        self._publish_action(d, time.time(), "applied")

    def _fire_queued(self, d: Decision) -> list[useq.MDAEvent]:
        """The queued events (restore events too) of the actions of ``d``'s fire (its rule,
        on its frame) before it that have not started yet."""
        return [e for p in self._pending.values()
                if p.rule == d.rule and p.frame_id == d.frame_id and p.action_id < d.action_id
                for e in p.queued]

    def _accepted_here(self, d: Decision) -> None:
        """The rule got through at this place: its next refusal there is news again."""
        if self._refusals:
            self._refusals = {k: n for k, n in self._refusals.items()
                              if (k[0], k[2]) != (d.rule, d.position_key)}

    def _refuse(self, d: Decision) -> None:
        """Count a refusal; report it the 1st, 10th, 100th, ... time the same rule is refused
        by the same limit at the same place in this acquisition (``repeats``) since it last
        got through there: a rule whose limit is spent (a position's light budget) is
        refused on every frame."""
        self.refused += 1
        limit = d.violation.limit if d.violation is not None else None
        if limit in ("not_applicable", "invalid_action") and d.violation is not None:
            # one code, many causes: each is news
            limit = f"{limit}: {d.violation.message}"
        key = (d.rule, limit, d.position_key)
        if key not in self._refusals and len(self._refusals) >= MAX_REFUSAL_KEYS:
            self._refusals.clear()
        n = self._refusals[key] = self._refusals.get(key, 0) + 1
        if not is_power_of_ten(n):
            return
        log.info("feedback: refused %s of rule %r: %s%s", d.action, d.rule, d.violation,
                 f" ({n} times here in this acquisition)" if n > 1 else "")
        self._publish("feedback_refused", {**d.describe(), "repeats": n})

    # ------------------------------------------------------------ reaction clock
    def on_event_started(self, event: useq.MDAEvent) -> None:
        """``core.mda.events.eventStarted`` handler (MDA runner thread): the reaction clock,
        the exposure the dose ledger charges the planned events, and (without the
        service's tracker) the settings in effect."""
        self.guard.event_started()  # set up with the exposure in effect from here on
        if self._own_settings:
            self._follow(event)
        meta = event.metadata.get(METADATA_KEY) if event.metadata else None
        if (not meta or meta.get("restore")) and event.exposure is not None:
            # a planned, enqueued or restore event: its exposure stays on after it
            self.guard.note_exposure(float(event.exposure))
        if not meta:
            return
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if meta.get("restore"):
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._restoring.discard, int(meta["action_id"]))
            return
        if meta.get("frame") != 0:
            return
        now = time.time()
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._started, int(meta["action_id"]), now, "eventStarted")

    def _follow(self, event: useq.MDAEvent) -> None:
        """Take the settings ``event`` leaves in effect (runner thread)."""
        tag = self._settings.event_started(event)
        if tag is None:
            return
        loop = self._loop
        if loop is None:
            self._settings.started(tag)
        elif not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._settings.started, tag)

    def _started(self, action_id: int, at: float, source: str) -> None:
        d = self._pending.pop(action_id, None)
        if d is not None:
            self._publish_action(d, at, source)

    def _publish_action(self, d: Decision, started: float | None, source: str) -> None:
        detail = d.describe()
        if started is None:
            detail.update(reaction_ms=None, reaction_from=None, started=False)
        else:
            ms = (started - d.trigger_acquired) * 1e3
            self.reaction_ms.append(ms)
            detail.update(
                reaction_ms=round(ms, 3), reaction_from=source, started=True, t_started=started
            )
        self._publish("feedback_action", detail)

    # ------------------------------------------------------------ status
    def report(self) -> dict[str, Any]:
        """Rules, counters, reaction-latency percentiles and ledgers for the status."""
        def pct(values: Iterable[float]) -> dict[str, float | int | None]:
            arr = np.fromiter(values, float)
            if arr.size == 0:
                return {"p50": None, "p95": None, "p99": None, "max": None, "n": 0}
            p = np.percentile(arr, [50, 95, 99])
            return {
                "p50": round(float(p[0]), 2),
                "p95": round(float(p[1]), 2),
                "p99": round(float(p[2]), 2),
                "max": round(float(arr.max()), 2),
                "n": int(arr.size),
            }

        return {
            "enabled": self.config.enabled,
            "rules": [s.describe() for s in self.engine.slots],
            "frames_seen": self.frames_seen,
            "actions": self.accepted,
            "refused": self.refused,
            "pending": len(self._pending),
            "planned_skipped": self._planned.skipped if self._planned is not None else 0,
            "added_frames_last_minute": self.guard.added_last_minute(),
            "dose_ms": self.guard.dose_snapshot(top=STATUS_DOSE_POSITIONS),
            "dosed_positions": self.guard.dosed_positions,
            "reaction_ms": pct(self.reaction_ms),
            "rules_eval_ms": pct(self.eval_ms),
        }

