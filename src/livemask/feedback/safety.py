"""Safety limits on what feedback may add to an acquisition.

:class:`SafetyGuard` checks the MDA events of an action against the configured limits
(stage travel range, Z range and Z-stack span, frames per action, frames added per minute,
light dose per stage position) and keeps the ledgers those limits need. The light-dose
ledger counts ``exposure_ms × frames`` of every planned event issued at a position
(:meth:`record_planned`, called from the MDA runner thread; a ``set`` exposure before the
event starts corrects it while the acquisition runs, :meth:`exposure_set`,
:meth:`finished`) and of every accepted action
(:meth:`commit`). Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import useq

from livemask.feedback.actions import duration_s, frame_count
from livemask.feedback.spec import LimitsSpec

DEFAULT_EXPOSURE_MS = 10.0


@dataclass(frozen=True)
class Violation:
    """Why an action was refused: the limit (config field) and a sentence for people."""

    limit: str
    message: str


def _outside(value: float | None, rng: tuple[float, float] | None) -> bool:
    return value is not None and rng is not None and not rng[0] <= value <= rng[1]


class SafetyGuard:
    """Checks actions against :class:`LimitsSpec` and keeps the ledgers."""

    def __init__(
        self, limits: LimitsSpec, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._added: deque[tuple[float, int]] = deque()  # (time, frames) of accepted actions
        self.dose_ms: dict[str, float] = {}
        self.last_exposure_ms = DEFAULT_EXPOSURE_MS
        #: the planned event taken last, if it gives no exposure and has not started: its
        #: position and the exposure it was charged (a ``set`` before it starts changes it)
        self._unstarted: tuple[str, float] | None = None
        #: whether an acquisition runs (from :meth:`reset` to :meth:`finished`; a guard
        #: that is not told, as one used on its own, counts as in one)
        self._acquiring = True

    def reset(self) -> None:
        """A new acquisition: clear the dose ledger (the per-minute window stays)."""
        with self._lock:
            self.dose_ms.clear()
            self._unstarted = None
            self._acquiring = True

    def finished(self) -> None:
        """The acquisition has ended: its ledger stays as it is (the ``set`` command no
        longer re-charges a planned event that a stop left taken but never started)."""
        with self._lock:
            self._unstarted = None
            self._acquiring = False

    def exposure_of(self, event: useq.MDAEvent) -> float:
        """The event's exposure, or the last known one when it keeps the current exposure."""
        return float(event.exposure) if event.exposure is not None else self.last_exposure_ms

    def note_exposure(self, exposure_ms: float) -> None:
        """The exposure the camera uses now for events that give none (any thread): what
        :meth:`record_planned` charges them."""
        with self._lock:
            self.last_exposure_ms = float(exposure_ms)

    def exposure_set(self, exposure_ms: float) -> None:
        """The camera's exposure was set outside any event (the ``set`` command; any
        thread): what events that give none are charged from now on, and what the planned
        event already taken but not started yet (:meth:`event_started`) runs with, if it
        gives none (in a time-lapse the runner takes it, then waits for its start time):
        its charge is corrected by the difference, while the acquisition runs."""
        with self._lock:
            self.last_exposure_ms = float(exposure_ms)
            if self._unstarted is not None:
                key, charged = self._unstarted
                self.dose_ms[key] = self.dose_ms.get(key, 0.0) + self.last_exposure_ms - charged
                self._unstarted = (key, self.last_exposure_ms)

    def event_started(self) -> None:
        """An event starts (the MDA runner's ``eventStarted``; runner thread): the planned
        event taken last, if it is this one, is set up with the exposure in effect now."""
        with self._lock:
            self._unstarted = None

    def record_planned(self, event: useq.MDAEvent, key: str) -> None:
        """Count a planned event's light at position ``key`` as the runner takes it (any
        thread): its own exposure, else the one in effect (the last one set or noted;
        corrected by :meth:`exposure_set` until the event starts)."""
        with self._lock:
            if event.exposure is not None:
                self.last_exposure_ms = float(event.exposure)
                self._unstarted = None
            elif self._acquiring:  # (not one the runner takes as the acquisition ends)
                self._unstarted = (key, self.last_exposure_ms)
            self.dose_ms[key] = self.dose_ms.get(key, 0.0) + self.last_exposure_ms

    def dose_snapshot(self, top: int | None = None) -> dict[str, float]:
        """Light per position so far (exposure_ms x frames), rounded to 0.1 ms; with
        ``top``, only the ``top`` most exposed positions (a grid scan has thousands)."""
        with self._lock:
            items = list(self.dose_ms.items())
        if top is not None and len(items) > top:
            items = sorted(items, key=lambda kv: kv[1], reverse=True)[:top]
        return {k: round(v, 1) for k, v in items}

    @property
    def dosed_positions(self) -> int:
        """How many positions have received light from this acquisition's frames."""
        with self._lock:
            return len(self.dose_ms)

    def added_last_minute(self) -> int:
        """Frames added by accepted actions in the last 60 s."""
        with self._lock:
            self._expire()
            return sum(n for _, n in self._added)

    def _expire(self) -> None:
        cutoff = self._clock() - 60.0
        while self._added and self._added[0][0] < cutoff:
            self._added.popleft()

    def check_action(self, action: object) -> Violation | None:
        """The limit ``action`` breaks by its size alone (frames, duration), checked before
        its events are built (a user rule's ``Burst(frames=300_000)`` would otherwise build
        them all on the event loop first)."""
        lim = self.limits
        frames = frame_count(action)
        if frames > lim.max_frames_per_action:
            return Violation(
                "max_frames_per_action",
                f"{frames} frames in one action, limit {lim.max_frames_per_action} "
                "(feedback.limits.max_frames_per_action)",
            )
        span = duration_s(action)
        if span > lim.max_action_duration_s:
            return Violation(
                "max_action_duration_s",
                f"the action's frames span {span:g} s ((frames - 1) x interval_s), longer "
                f"than {lim.max_action_duration_s:g} s (feedback.limits.max_action_duration_s)",
            )
        return None

    def check(
        self, events: Sequence[useq.MDAEvent], keys: str | Sequence[str]
    ) -> Violation | None:
        """The first limit ``events`` (one action) would break; ``keys``: the position each
        event is taken at (one key: all of them there)."""
        lim = self.limits
        if not events:
            return None
        if len(events) > lim.max_frames_per_action:
            return Violation(
                "max_frames_per_action",
                f"{len(events)} frames in one action, limit {lim.max_frames_per_action} "
                "(feedback.limits.max_frames_per_action)",
            )
        for ev in events:
            for axis, value, rng, name in (
                ("X", ev.x_pos, lim.stage_x_range_um, "stage_x_range_um"),
                ("Y", ev.y_pos, lim.stage_y_range_um, "stage_y_range_um"),
                ("Z", ev.z_pos, lim.z_range_um, "z_range_um"),
            ):
                if _outside(value, rng):
                    assert rng is not None and value is not None
                    return Violation(
                        name,
                        f"stage {axis} {value:.1f} µm is outside the allowed "
                        f"[{rng[0]:g}, {rng[1]:g}] µm (feedback.limits.{name})",
                    )
        zs = [ev.z_pos for ev in events if ev.z_pos is not None]
        if lim.max_z_range_um is not None and zs and max(zs) - min(zs) > lim.max_z_range_um:
            return Violation(
                "max_z_range_um",
                f"Z span {max(zs) - min(zs):.1f} µm exceeds {lim.max_z_range_um:g} µm "
                "(feedback.limits.max_z_range_um)",
            )
        with self._lock:
            if lim.max_added_frames_per_minute is not None:
                self._expire()
                recent = sum(n for _, n in self._added)
                if recent + len(events) > lim.max_added_frames_per_minute:
                    return Violation(
                        "max_added_frames_per_minute",
                        f"{recent} frames added in the last minute + {len(events)} would "
                        f"exceed {lim.max_added_frames_per_minute} "
                        "(feedback.limits.max_added_frames_per_minute)",
                    )
            if lim.light_dose_budget_ms is not None:
                for key, dose in self._doses(events, keys).items():
                    used = self.dose_ms.get(key, 0.0)
                    if used + dose > lim.light_dose_budget_ms:
                        return Violation(
                            "light_dose_budget_ms",
                            f"position {key} has had {used:g} ms of light; {dose:g} ms more "
                            f"would exceed {lim.light_dose_budget_ms:g} ms "
                            "(feedback.limits.light_dose_budget_ms)",
                        )
        return None

    def _doses(
        self, events: Sequence[useq.MDAEvent], keys: str | Sequence[str]
    ) -> dict[str, float]:
        """Light of ``events`` per position (``keys``: each event's, or one for all)."""
        if isinstance(keys, str):
            keys = [keys] * len(events)
        doses: dict[str, float] = {}
        for ev, key in zip(events, keys, strict=True):
            exposure = float(ev.exposure) if ev.exposure is not None else self.last_exposure_ms
            doses[key] = doses.get(key, 0.0) + exposure
        return doses

    def commit(self, events: Sequence[useq.MDAEvent], keys: str | Sequence[str]) -> None:
        """Record an accepted action's frames and light (``keys`` as in :meth:`check`)."""
        if not events:
            return
        with self._lock:
            self._added.append((self._clock(), len(events)))
            for key, dose in self._doses(events, keys).items():
                self.dose_ms[key] = self.dose_ms.get(key, 0.0) + dose
