"""Setting the camera exposure while the service runs: the camera call, the running
plan's exposure, and the sets that land late (after their timeout)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import useq

from livemask.acquisition.feed import PlannedExposure
from livemask.acquisition.source import FrameSource
from livemask.errors import AcquisitionError
from livemask.feedback.controller import FeedbackController, SettingsInEffect
from livemask.service.hardware_calls import InRequestOrder, Superseded

log = logging.getLogger("livemask")


class ExposureOwner(Protocol):
    """What the exposure setting reads of the service, as it is at each call."""

    @property
    def source(self) -> FrameSource | None: ...

    @property
    def acquiring(self) -> bool: ...

    @property
    def feedback(self) -> FeedbackController | None: ...


class CameraExposure:
    """The service's ``set exposure_ms``: the camera's exposure and the running plan's.

    ``settings``: the settings in effect that enqueue and feedback actions put back;
    ``publish``: publishes a service event (``setting_changed`` of a late set)."""

    def __init__(
        self, owner: ExposureOwner, settings: SettingsInEffect,
        publish: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self._owner = owner
        self._settings = settings
        self._publish = publish
        # the running acquisition's planned events, and the exposures its channels set
        self.planned: PlannedExposure | None = None
        self.plan_exposures: list[float] = []
        self.order = InRequestOrder()  # set exposure_ms calls, newest wins
        # the plan (this run's) and its exposure as the sets that took effect left it, and
        # (ticket, exposure, its plan, late) of the newest set that took effect, until no
        # newer one can land (then it is planned, and announced where late)
        self._plan: tuple[PlannedExposure | None, float | None] = (None, None)
        self.landed: tuple[int, float, PlannedExposure | None, bool] | None = None

    def begin_run(
        self, events: Iterable[useq.MDAEvent], plan_exposures: set[float] | None
    ) -> PlannedExposure:
        """A new acquisition of ``events`` starts: its plan, whose exposure a set replaces
        (``plan_exposures``: the exposures its channels set)."""
        self.planned = PlannedExposure(events)
        self.plan_exposures = sorted(plan_exposures or ())
        return self.planned

    async def set(self, exposure_ms: float) -> None:
        """Set the camera's exposure (and the running plan's), or raise.

        Sets given up on (the camera busy in a long snap) return late, in any order once
        it frees: they run in request order (:class:`InRequestOrder`), and one whose turn
        comes after a newer set took effect is skipped. The newest set that took effect
        (late or not) is planned, and announced where late, once no newer set can still
        land (each newer one failed, in time or late, or was refused before it ran); until
        then a newer set being waited for keeps its own in the plan, else the plan stays as
        the sets that took effect left it. So the camera, ``status`` and the last
        ``setting_changed`` end with the newest exposure the camera accepted, and no planned
        frame goes back to an older one."""
        if self._owner.source is None:
            raise AcquisitionError("no frame source")
        if self._owner.acquiring and len(self.plan_exposures) > 1:
            shown = ", ".join(f"{e:g}" for e in self.plan_exposures)
            raise ValueError(
                f"the running sequence's channels (or the events that started it) set "
                f"their own exposures ({shown} ms); exposure_ms would give all of them "
                f"{exposure_ms:g} ms: stop, and start a sequence with the exposures you "
                "want")
        order = self.order
        ticket = order.ticket()
        # the planned events first (else the runner may take the next one meanwhile
        # and put its own exposure back); undone if the camera refuses or hangs
        planned = self.planned if self._owner.acquiring else None
        before = planned.set(exposure_ms) if planned is not None else None
        if self._plan[0] is not planned:  # the first set of this run (or none)
            self._plan = (planned, before)

        def late(took_effect: bool) -> None:  # a call given up on ended after all
            if took_effect:
                self._took_effect(ticket, exposure_ms, planned, late=True)
            self._settle(ticket)

        try:
            await order.run(
                ticket, self._owner.source.set_exposure, exposure_ms,
                what=f"setting the camera exposure to {exposure_ms:g} ms",
                on_late_end=late,
            )
        except BaseException as exc:
            self._settle(ticket)
            if isinstance(exc, Superseded):
                raise AcquisitionError(
                    f"exposure_ms {exposure_ms:g} was not set: a newer set exposure_ms took "
                    "effect first, and stays") from None
            raise
        self._took_effect(ticket, exposure_ms, planned, late=False)
        self._settle(ticket)
        if ticket != order.applied:  # a newer set took effect right after: it stays
            raise AcquisitionError(
                f"exposure_ms {exposure_ms:g} was replaced at once by a newer set "
                "exposure_ms, which stays")

    def _took_effect(
        self, ticket: int, exposure_ms: float, planned: PlannedExposure | None, *, late: bool
    ) -> None:
        """A set's camera call took effect: the newest that did, unless a newer one did
        since (that one decides). ``late``: after its timeout (else the reply announces it)."""
        if ticket != self.order.applied:
            if late:
                log.warning("the camera exposure %g ms, set after its timeout, was replaced "
                            "by a newer set exposure_ms", exposure_ms)
            return
        if late and not self.order.settled():
            log.warning("the camera exposure %g ms, set after its timeout, is not planned "
                        "while a newer set exposure_ms may still take effect", exposure_ms)
        self.landed = (ticket, exposure_ms, planned, late)

    def _settle(self, ticket: int) -> None:
        """After ``ticket``'s call ended or was given up on: once no set can still land
        over the newest that took effect, plan (and announce) that one; else, ``ticket``
        being the newest request, the plan goes back to what the sets that took effect
        left (a newer request still waited for keeps its own)."""
        order = self.order
        if order.settled():
            self._plan_landed()
        elif ticket == order.issued:
            plan, exposure = self._plan
            if plan is not None:
                plan.set(exposure)

    def _plan_landed(self) -> None:
        """Plan the newest set that took effect, now that no newer one can land (into the
        plan it was set in, if that one still runs), and announce it where it landed late
        and the camera still has it: not where the end of the run it landed in put the
        exposure from before the run back (pymmcore-plus' restore), nor where the running
        acquisition's events set their own exposures (another run's than it was set in)."""
        plan, exposure = self._plan
        landed, self.landed = self.landed, None
        if landed is not None:
            _, landed_ms, landed_plan, late = landed
            if landed_plan is plan:
                exposure = landed_ms
                self._plan = (plan, exposure)
            reason = self._not_in_effect(landed_ms, landed_plan) if late else None
            if late and reason is None:
                self.hold(landed_ms)
                self._publish("setting_changed", {"exposure_ms": landed_ms, "late": True})
            elif late:
                log.warning("the camera exposure %g ms, set after its timeout, took effect "
                            "but is not announced: %s", landed_ms, reason)
        if plan is not None:
            plan.set(exposure)

    def _not_in_effect(
        self, landed_ms: float, landed_plan: PlannedExposure | None
    ) -> str | None:
        """Why a late set's exposure is no longer the camera's, else None."""
        running = self.planned if self._owner.acquiring else None
        if running is not None and running is landed_plan:
            return None  # its own run: planned, so every later frame takes it
        if running is not None and self.plan_exposures:
            return "the running acquisition's events set their own exposures"
        now = getattr(self._owner.source, "camera_now", {}).get("exposure_ms")
        if isinstance(now, int | float) and not math.isclose(now, landed_ms, rel_tol=0.02):
            return f"the camera is at {now:g} ms again (e.g. restored when the run ended)"
        return None

    def hold(self, exposure_ms: float) -> None:
        """A ``set exposure_ms``: the planned frames run with it from now on, also after the
        restore events of enqueued events and feedback actions still queued (an event that
        takes no image and sets this exposure is queued after them)."""
        self._settings.values["exposure"] = float(exposure_ms)
        if self._owner.feedback is not None:
            self._owner.feedback.exposure_set(exposure_ms)
        if not self._owner.acquiring or self._owner.source is None or not any(
                "exposure" in v for v in list(self._settings.pending.values())):
            return
        event = self._settings.tag(useq.MDAEvent(
            exposure=float(exposure_ms), action=useq.CustomAction(name="livemask-set-exposure")))
        try:
            self._owner.source.inject([event])
            self._settings.queued(event)
        except Exception as exc:  # ending (nothing left to restore), or a full queue
            log.warning("the exposure just set (%g ms) could not be queued after the restore "
                        "events of added events, which may put the older one back: %s",
                        exposure_ms, exc)
