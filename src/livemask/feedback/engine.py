"""The rule engine: frame context in, checked actions (decisions) out. No I/O.

For each analysed frame :meth:`RuleEngine.evaluate` computes the object features, asks
every rule for actions, turns each action into MDA events and checks them against the
safety limits. Each action yields one :class:`Decision`, accepted or refused (with the
limit it would break). Applying accepted decisions to a microscope is the job of
:class:`~livemask.feedback.controller.FeedbackController`.

:class:`PlannedEvents` wraps the planned event iterator of an acquisition: it drops the
visits of skipped positions, records where each planned position is (for ``revisit``) and
counts planned light in the dose ledger.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import useq

from livemask.errors import ConfigError
from livemask.feedback.actions import (
    ACTION_TYPES,
    ActionError,
    EventPlanner,
    event_json,
    plain_action,
    to_events,
)
from livemask.feedback.context import FeatureTracker, FrameContext, position_key
from livemask.feedback.rules import DeclarativeRule, RuleSlot
from livemask.feedback.safety import SafetyGuard, Violation
from livemask.feedback.spec import FeedbackConfig, RuleSpec, check_rule_limits
from livemask.log import RepeatedErrors

log = logging.getLogger("livemask")


@dataclass
class Decision:
    """One action a rule asked for, and what became of it."""

    action_id: int
    rule: str
    action: Any
    frame_id: int
    index: dict[str, int]
    position: dict[str, float | None]
    position_key: str
    trigger_acquired: float  # epoch s of the triggering frame
    events: list[useq.MDAEvent] = field(default_factory=list)
    #: the light-dose ledger key of each event: the position it is taken at
    dose_keys: list[str] = field(default_factory=list)
    #: an event without an image after ``events`` that puts back the exposure / channel
    #: they change (set by the controller)
    restore: useq.MDAEvent | None = None
    #: the very events queued on the acquisition (``events`` and the restore event as
    #: tagged for the settings tracker; set by the controller)
    queued: list[useq.MDAEvent] = field(default_factory=list)
    violation: Violation | None = None
    target: dict[str, Any] | None = None
    decided: float = 0.0  # epoch s

    @property
    def accepted(self) -> bool:
        """Whether the action passed the safety checks."""
        return self.violation is None

    def describe(self) -> dict[str, Any]:
        """JSON-ready fields for the ``feedback_action`` / ``feedback_refused`` event."""
        action, describe = self.action, getattr(self.action, "describe", None)
        if callable(describe):
            action = describe()
        elif action is not None:  # what a user rule returned that is no action
            action = repr(action)
        out: dict[str, Any] = {
            "action_id": self.action_id,
            "frame_id": self.frame_id,
            "rule": self.rule,
            "action": action,
            "events": [event_json(e) for e in self.events],
            **({"restore": event_json(self.restore)} if self.restore is not None else {}),
            "index": dict(self.index),
            "position": dict(self.position),
            "position_key": self.position_key,
            "target": self.target,
            "t_trigger_acquired": self.trigger_acquired,
            "t_decided": self.decided,
            "decision_ms": round((self.decided - self.trigger_acquired) * 1e3, 3),
        }
        if self.violation is not None:
            out["reason"] = self.violation.message
            out["limit"] = self.violation.limit
        return out


class RuleEngine:
    """Rules, features, event conversion and safety checks of one service."""

    def __init__(
        self,
        config: FeedbackConfig,
        *,
        planner: EventPlanner | None = None,
        guard: SafetyGuard | None = None,
        wall_clock: Callable[[], float] = time.time,
        check_events: Callable[[Sequence[useq.MDAEvent]], None] | None = None,
    ) -> None:
        """``check_events`` (optional) raises for events the microscope cannot run as
        given (a channel preset it lacks, an exposure beyond its camera's limits): the
        action is then refused (``invalid_action``)."""
        self.config = config
        self.planner = planner or EventPlanner()
        self.guard = guard or SafetyGuard(config.limits)
        self.tracker = FeatureTracker(config.match_radius_px, config.baseline_frames)
        self.slots: list[RuleSlot] = []
        self._ids = itertools.count(1)
        self._wall_clock = wall_clock
        self._check_events = check_events
        self._rule_errors = RepeatedErrors(log)  # a rule failing on every frame
        self.set_rules(config.rules)

    def set_rules(self, specs: Sequence[RuleSpec], rules: Sequence[Any] | None = None) -> None:
        """Replace the rules (``rules``: ready-made rule objects for the specs, optional).

        A rule whose name and spec are unchanged (``enabled`` aside: it is set) keeps its
        slot: its ``max_fires`` count, cooldowns, persistence and counters go on (re-sending
        the same list changes nothing); any other rule starts afresh. ConfigError (nothing
        changed) when a rule cannot be built or breaks a limit outright."""
        try:
            check_rule_limits(list(specs), self.config.limits, "rules")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        old = {s.name: s for s in self.slots}
        slots: list[RuleSlot] = []
        kept: list[tuple[RuleSlot, RuleSpec]] = []
        for i, spec in enumerate(specs):  # every new rule is built before anything changes
            slot = old.get(spec.name)
            if rules is None and slot is not None and _same_rule(slot.spec, spec):
                kept.append((slot, spec))
                slots.append(slot)
            else:
                slots.append(RuleSlot(spec, rules[i] if rules is not None else None))
        for slot, spec in kept:  # (a rule that failed to build above left all as they were)
            slot.spec, slot.enabled = spec, spec.enabled
        self.slots = slots

    def add_rule(self, rule: Any, spec: RuleSpec | None = None) -> RuleSlot:
        """Add a rule object (any object with ``name`` and ``evaluate``)."""
        if spec is None:
            name = str(getattr(rule, "name", type(rule).__name__))
            spec = RuleSpec(name=name, use="livemask.feedback:added_in_code")
        slot = RuleSlot(spec, rule)
        self.slots.append(slot)
        return slot

    def slot(self, name: str) -> RuleSlot:
        """The rule called ``name`` (KeyError if none)."""
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(name)

    def reset(self) -> None:
        """A new acquisition starts. A rule whose ``reset()`` raises is counted (``errors``)
        and logged, and runs on: it must not keep the acquisition from starting."""
        self.tracker.reset()
        self.guard.reset()
        for s in self.slots:
            try:
                s.reset()
            except Exception as exc:
                s.errors += 1
                self._rule_errors.error(
                    f"reset {s.name}",
                    f"feedback rule {s.name!r}: its reset() failed as the acquisition started "
                    "(the rule runs on, with the state it had)", exc)

    def evaluate(
        self, ctx: FrameContext, apply: Callable[[Decision], None] | None = None
    ) -> list[Decision]:
        """Run every rule on one analysed frame; one decision per action asked for.

        Declarative rules get ``ctx`` as it is (they only read it); user rules (their own
        code) a read-only copy of its message and features
        (:meth:`~FrameContext.read_only_view`), made only when one runs, so that one that
        writes into it fails alone instead of changing what is recorded, published and
        seen by the next rules.

        ``apply`` (the controller's) carries out each decision before the next is made, and
        may still refuse it (set ``violation``); only then does an accepted action count in
        the ledgers (frames per minute, light dose) and in its rule's ``actions``."""
        if not self.slots:  # nothing to compute for; rules loaded later start without
            self.tracker.reset()  # baselines rather than with stale ones
            return []
        # with every rule off too: the baselines stay current for when one is switched on
        self.tracker.compute(ctx)
        # (and rules switched off count the frame toward their cooldown_frames)
        decisions: list[Decision] = []
        view: FrameContext | None = None  # what user rules see, made for the first of them
        for slot in self.slots:
            seen = ctx
            if slot.kind == "user" and slot.enabled and slot.sees(ctx):
                view = view if view is not None else ctx.read_only_view()
                seen = replace(view)  # (an attribute it rebinds stays its own)
            try:
                actions = slot.evaluate(seen)
            except ActionError as exc:  # it fired, but its action cannot be made here
                # (a declarative rule's: the action as the rule gives it; else none)
                d = self._decision(slot, exc.action, ctx, None)
                d.violation = Violation(exc.reason, str(exc))
                d.decided = self._wall_clock()
                self._settle(slot, d, apply)
                decisions.append(d)
                continue
            except Exception as exc:  # a faulty rule must not stop the pipeline or others
                slot.errors += 1
                self._rule_errors.error(
                    slot.name, f"feedback rule {slot.name!r} failed on frame {ctx.frame_id}", exc
                )
                continue
            targets = slot.rule.targets if isinstance(slot.rule, DeclarativeRule) else []
            for k, action in enumerate(actions):
                target = targets[k] if k < len(targets) else None
                d = self._decide(slot, action, ctx, target)
                self._settle(slot, d, apply)
                decisions.append(d)
        return decisions

    def _settle(
        self, slot: RuleSlot, d: Decision, apply: Callable[[Decision], None] | None
    ) -> None:
        """Apply ``d``; then commit it to the ledgers and count it, accepted or refused."""
        if apply is not None:
            apply(d)
        if d.accepted:
            self.guard.commit(d.events, d.dose_keys or d.position_key)
            slot.actions += 1
        else:
            slot.refused += 1

    def _decision(
        self, slot: RuleSlot, action: Any, ctx: FrameContext, target: dict[str, Any] | None
    ) -> Decision:
        """A new, undecided decision of ``slot`` on the frame ``ctx``."""
        return Decision(
            action_id=next(self._ids),
            rule=slot.name,
            action=action,
            frame_id=ctx.frame_id,
            index=dict(ctx.index),
            position=dict(ctx.position),
            position_key=ctx.position_key,
            trigger_acquired=ctx.acquired,
            target=target,
        )

    def _decide(
        self, slot: RuleSlot, action: Any, ctx: FrameContext, target: dict[str, Any] | None
    ) -> Decision:
        action = plain_action(action)  # numpy numbers as int / float: checked and published
        d = self._decision(slot, action, ctx, target)
        if not isinstance(action, ACTION_TYPES):
            d.violation = Violation(
                "unknown_action", f"rule {slot.name!r} returned {action!r}, not an action"
            )
        else:
            try:
                d.violation = self.guard.check_action(action)
                if d.violation is None:
                    d.events = to_events(
                        action, ctx, self.planner, action_id=d.action_id, rule=slot.name
                    )
                    if self._check_events is not None and d.events:
                        try:
                            self._check_events(d.events)
                        except Exception as exc:  # e.g. a channel the microscope lacks
                            raise ActionError("invalid_action", str(exc)) from None
                    d.dose_keys = self._dose_keys(d.events, ctx)
                    d.violation = self.guard.check(d.events, d.dose_keys)
            except ActionError as exc:
                d.violation = Violation(exc.reason, str(exc))
            except Exception as exc:  # a bad value in a user rule's action: refuse it alone
                # (logged with its traceback, once per kind: it may be livemask's own bug)
                self._rule_errors.error(
                    f"action {slot.name}", f"rule {slot.name!r}: an action was refused", exc)
                d.violation = Violation(
                    "invalid_action",
                    f"{getattr(action, 'kind', 'action')} cannot be made: "
                    f"{type(exc).__name__}: {exc}",
                )
        d.decided = self._wall_clock()
        return d

    def _dose_keys(self, events: Sequence[useq.MDAEvent], ctx: FrameContext) -> list[str]:
        """The light-dose ledger key of each event: the planned position whose field it
        overlaps, its own ``p`` (the trigger's, or a revisit's) first; else its rounded
        stage x, y. Planned frames are keyed the same way (``p<i>``, else x, y)."""
        field_um = self._field_um(ctx)
        positions = self.planner.known_positions()
        planned = self.planner.plan_coordinates
        keys: list[str] = []
        memo: dict[tuple[Any, ...], str] = {}  # an action's frames are mostly at one place
        for ev in events:
            p = ev.index.get("p")
            place = (p, ev.x_pos, ev.y_pos)
            if place not in memo:
                memo[place] = _dose_key(
                    None if p is None else int(p), ev.x_pos, ev.y_pos, ctx, positions, field_um,
                    planned.get(int(p)) if p is not None else None)
            keys.append(memo[place])
        return keys

    def _field_um(self, ctx: FrameContext) -> tuple[float, float] | None:
        """The field of view's extent along stage x and y (µm), or None if not known."""
        h, w = ctx.image_shape
        matrix = self.planner.stage_matrix(ctx)  # at the frame's pixel size (binning)
        if matrix is None or h <= 0 or w <= 0:
            return None
        (a, b), (c, d) = matrix
        return abs(a) * w + abs(b) * h, abs(c) * w + abs(d) * h


def _dose_key(
    p: int | None,
    x: float | None,
    y: float | None,
    ctx: FrameContext,
    positions: dict[int, tuple[float | None, float | None, float | None]],
    field_um: tuple[float, float] | None,
    planned: tuple[float | None, ...] | None = None,
) -> str:
    """The ledger key of a frame at stage ``(x, y)`` with position index ``p`` (see
    :meth:`RuleEngine._dose_keys`); ``planned``: ``p``'s coordinates in the plan, where it
    counts too (a revisit images there; its last issued tile may be a field away)."""
    here = (ctx.position.get("x_um"), ctx.position.get("y_um"), None)
    home = positions.get(p) if p is not None else None
    if p is not None and home is None and p == ctx.index.get("p"):
        home = here
    if x is None or y is None or not math.isfinite(x + y):
        return f"p{p}" if p is not None else ctx.position_key  # wherever the stage is
    if p is not None and any(h is not None and _overlaps(x, y, h, field_um)
                             for h in (home, planned)):
        return f"p{p}"
    near = [
        (abs(x - pos[0]) + abs(y - pos[1]), i)  # type: ignore[operator]
        for i, pos in positions.items() if _overlaps(x, y, pos, field_um)
    ]
    if near:
        return f"p{min(near)[1]}"
    if p is None and _overlaps(x, y, here, field_um):
        return ctx.position_key  # (a trigger without ``p``: keyed by its own x, y)
    return position_key({}, x, y)


def _same_rule(a: RuleSpec, b: RuleSpec) -> bool:
    """Whether two specs are one rule, but for ``enabled`` (switching a rule off and on
    by re-sending the list keeps its state, as the ``enabled`` argument does)."""
    return a.model_dump(exclude={"enabled"}) == b.model_dump(exclude={"enabled"})


def _overlaps(
    x: float, y: float, pos: tuple[float | None, ...], field_um: tuple[float, float] | None
) -> bool:
    """Whether a field at ``(x, y)`` overlaps one at ``pos`` (without a field size: whether
    they are within 0.5 µm)."""
    px, py = pos[0], pos[1]
    if px is None or py is None:
        return False
    width, height = field_um if field_um is not None else (0.5, 0.5)
    return abs(x - px) < width and abs(y - py) < height


@dataclass
class _Skip:
    """The skip of one position: planned visits still to drop, and the visit under way."""

    left: int | None  # visits still to drop (None: all)
    visit: Any  # the ``t`` of the position's visit under way (_UNSEEN: none yet)
    dropping: bool  # whether the visit under way is dropped


#: No visit of a position has been issued yet.
_UNSEEN = object()


class PlannedEvents(Iterator[useq.MDAEvent]):
    """The planned events of a run, minus skipped visits; feeds positions and dose ledger.

    A *visit* of position ``p`` is all its events of one time point ``t`` (every grid tile,
    channel and plane). ``__next__`` runs on the MDA runner thread, :meth:`skip` on the
    event loop.
    """

    def __init__(
        self,
        events: Iterable[useq.MDAEvent],
        *,
        guard: SafetyGuard | None = None,
        planner: EventPlanner | None = None,
    ) -> None:
        self._events = iter(events)
        self._guard = guard
        self._planner = planner
        self._lock = threading.Lock()
        self._skips: dict[int, _Skip] = {}
        self._visit: dict[int, Any] = {}  # p -> the t of its latest issued or dropped event
        self._closed = False
        self.skipped = 0

    def close(self) -> None:
        """End the plan now: the next ``next()`` raises StopIteration (thread-safe)."""
        with self._lock:
            self._closed = True

    def skip(self, p: int, visits: int | None) -> None:
        """Drop the next ``visits`` visits (None: all remaining) of position ``p``.

        The visit of ``p`` under way (the trigger's own, in synchronized mode) goes on: its
        remaining events (other channels, planes, tiles) are imaged and it is not one of
        the ``visits`` (unless an earlier skip is dropping it: then it stays dropped)."""
        with self._lock:
            current = self._visit.get(int(p), _UNSEEN)
            old = self._skips.get(int(p))
            dropping = old is not None and old.dropping and old.visit == current
            self._skips[int(p)] = _Skip(visits, current, dropping)

    def _drop(self, event: useq.MDAEvent) -> bool:
        p = event.index.get("p")
        if p is None:
            return False
        t = event.index.get("t")
        with self._lock:
            self._visit[int(p)] = t
            state = self._skips.get(int(p))
            if state is None:
                return False
            if state.visit is not _UNSEEN and t == state.visit:
                return state.dropping  # another event of the visit under way
            if state.left is not None and state.left <= 0:  # the skipped visits are over
                del self._skips[int(p)]
                return False
            if state.left is not None:
                state.left -= 1
            state.visit, state.dropping = t, True
            return True

    def __next__(self) -> useq.MDAEvent:
        while True:
            with self._lock:
                if self._closed:
                    raise StopIteration
            event = next(self._events)
            if self._drop(event):
                self.skipped += 1
                continue
            p = event.index.get("p")
            if self._planner is not None and p is not None:
                self._planner.positions[int(p)] = (event.x_pos, event.y_pos, event.z_pos)
            if self._guard is not None:
                self._guard.record_planned(
                    event, position_key(event.index, event.x_pos, event.y_pos)
                )
            return event
