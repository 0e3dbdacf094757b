"""Rules: the plug-in interface, declarative YAML rules and user rules.

A rule is any object with a ``name`` and ``evaluate(ctx) -> iterable of actions``; it sees
every analysed frame it subscribes to (``applies_to``), keeps whatever state it likes, and may
define ``reset()`` (called when an acquisition starts). Rules must be quick: they run on the
service's event loop right after a frame's measurements are published, and in synchronized
mode the next event waits for them. A user rule is given a read-only copy of the frame's
message and features (:meth:`~.context.FrameContext.read_only_view`), declarative rules the
context as it is.

:class:`DeclarativeRule` implements the YAML rules of :class:`~.spec.RuleSpec`; user rules
are loaded from ``"package.module:factory"`` with :func:`load_user_rule`. :class:`RuleSlot`
wraps either kind with what the config adds to every rule: ``enabled``, ``applies_to``,
``cooldown_s`` / ``cooldown_frames``, ``scope`` and ``max_fires``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from livemask.errors import ConfigError
from livemask.feedback.actions import ACTION_TYPES, ActionError, action_from_spec, spec_action
from livemask.feedback.context import FEATURES, FrameContext
from livemask.feedback.spec import ActionSpec, Compare, RuleSpec, ValueTest

log = logging.getLogger("livemask")


@runtime_checkable
class Rule(Protocol):
    """What the rule engine calls for each analysed frame."""

    name: str

    def evaluate(self, ctx: FrameContext) -> Iterable[Any]:
        """Actions to take because of this frame (usually none)."""
        ...


def reduce_value(value: Any, how: str) -> float | None:
    """Apply a :class:`~.spec.ValueTest` ``reduce`` to a message value."""
    if how == "value":
        return float(value) if isinstance(value, int | float) and not isinstance(
            value, bool
        ) else None
    if how == "length":
        return float(len(value)) if isinstance(value, list | tuple | Mapping) else None
    if not (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) for v in value)
    ):
        return None
    lo, hi = float(value[0]), float(value[1])
    if how == "width":
        return hi - lo
    if how == "half_width":
        return (hi - lo) / 2
    mid = (hi + lo) / 2
    return (hi - lo) / abs(mid) if mid else None


#: The fields of a ``measurements`` message (docs/protocol.md); a message may carry more.
MESSAGE_FIELDS = frozenset({
    "v", "topic", "seq", "arrays", "t", "frame_id", "index", "acquisition", "position",
    "settings", "pixel_size_um", "image_shape", "summary", "objects", "grains",
    "replayed_from",
})
#: Fields that hold no ``[low, high]`` interval anywhere below them.
NO_INTERVALS = frozenset(MESSAGE_FIELDS - {"objects", "grains"})


def value_path_problem(test: ValueTest) -> str | None:
    """Why ``test`` will most likely never pass, as far as its path tells without data: a
    field the measurements message does not have, or an interval ``reduce`` on values that
    are no intervals (None: no such problem seen)."""
    root = test.path.split(".", 1)[0]
    if root not in MESSAGE_FIELDS:
        return (
            f"path {test.path!r}: the measurements message has no field {root!r} (fields: "
            f"{', '.join(sorted(MESSAGE_FIELDS))}); a missing value never passes: check "
            "the spelling"
        )
    if test.reduce in ("width", "half_width", "relative_width") and root in NO_INTERVALS:
        return (
            f"path {test.path!r} with reduce: {test.reduce}: {root!r} holds no [low, high] "
            "intervals, and a value that is none never passes; use reduce: value (or "
            "length for a list)"
        )
    return None


def value_passes(ctx: FrameContext, test: ValueTest) -> bool:
    """Whether the message value at ``test.path`` passes ``test``."""
    return test.test(reduce_value(ctx.value(test.path), test.reduce))


def scope_key(ctx: FrameContext, scope: str) -> str:
    """The key that persistence and cooldown are counted under."""
    return "*" if scope == "global" else ctx.position_key


def target_of(ctx: FrameContext, row: int, matches: int) -> dict[str, Any]:
    """The object an action acts on, as published in ``target``: its ``row`` in the
    measurements table (also as ``index``, its name before: kept for v1 clients), how many
    objects ``matches``, its features and, with tracking on, its ``track_id``."""
    target: dict[str, Any] = {"row": row, "index": row, "matches": matches,
                              **ctx.features[row]}
    track_id = ctx.objects[row].get("track_id") if row < len(ctx.objects) else None
    if isinstance(track_id, numbers.Integral) and not isinstance(track_id, bool):
        target["track_id"] = int(track_id)
    return target


class DeclarativeRule:
    """A rule from YAML: tests on values and objects, persistence, then actions."""

    def __init__(self, spec: RuleSpec) -> None:
        if spec.when is None:
            raise ConfigError(f"rule {spec.name!r} has no `when`")
        self.spec = spec
        self.name = spec.name
        self.when = spec.when
        self._streak: dict[str, int] = {}
        #: the target object of each action of the last evaluate (parallel to its result)
        self.targets: list[dict[str, Any] | None] = []
        objects = self.when.objects
        for feat in spec.object_features():
            if feat not in FEATURES:
                raise ConfigError(
                    f"rule {spec.name!r}: unknown object feature {feat!r}; known: "
                    f"{', '.join(FEATURES)}"
                )
        needs_target = any(
            (a.burst is not None and a.burst.centre)
            or a.centre is not None
            or (a.zstack is not None and a.zstack.centre)
            for a in spec.actions
        )
        if needs_target and objects is None:
            raise ConfigError(
                f"rule {spec.name!r}: centring actions need an object condition "
                "(`when.objects`) to pick the object to centre on (a burst centres unless "
                "given `centre: false`)"
            )
        for i, test in enumerate(self.when.values):
            problem = value_path_problem(test)
            if problem is not None:
                log.warning("feedback rule %r: when.values[%d]: %s", spec.name, i, problem)

    def reset(self) -> None:
        """Forget persistence counts (a new acquisition)."""
        self._streak.clear()
        self.targets = []

    def switched_on(self) -> None:
        """The rule was switched back on: the frames it did not see while off broke every
        streak (``persist_frames`` counts consecutive frames)."""
        self._streak.clear()

    def matching_objects(self, ctx: FrameContext) -> list[int]:
        """Indices of the objects that pass every ``where`` test."""
        cond = self.when.objects
        if cond is None:
            return []
        tests = list(cond.where.items())
        return [
            i
            for i, f in enumerate(ctx.features)
            if all(test.test(f.get(name)) for name, test in tests)
        ]

    def matches(self, ctx: FrameContext) -> tuple[bool, list[int]]:
        """Whether this frame meets the condition, and the matching objects."""
        if not all(value_passes(ctx, t) for t in self.when.values):
            return False, []
        cond = self.when.objects
        if cond is None:
            return True, []
        hits = self.matching_objects(ctx)
        n = len(ctx.features)
        if cond.match == "any":
            ok = bool(hits)
        elif cond.match == "all":
            ok = n > 0 and len(hits) == n
        else:
            assert isinstance(cond.match, Compare)
            ok = cond.match.test(len(hits))
        return ok, hits

    def pick(self, ctx: FrameContext, hits: Sequence[int]) -> list[int]:
        """Objects to act on, best first (by ``target``, else nearest the field centre)."""
        t = self.spec.target
        if t is not None:
            name = (t.max if t.max is not None else t.min) or ""
            sign = -1.0 if t.max is not None else 1.0
        else:
            name, sign = "centre_distance_px", 1.0

        def key(i: int) -> float:
            v = ctx.features[i].get(name)
            return sign * v if v is not None else math.inf

        return sorted(hits, key=key)[: self.spec.max_targets]

    def evaluate(self, ctx: FrameContext) -> list[Any]:
        """Actions when the condition has held for ``persist_frames`` frames in scope."""
        key = scope_key(ctx, self.spec.scope)
        ok, hits = self.matches(ctx)
        if not ok:  # only places in a streak are kept (a grid scan visits thousands)
            self._streak.pop(key, None)
            return []
        streak = self._streak.get(key, 0) + 1
        if streak < self.spec.persist_frames:
            self._streak[key] = streak
            return []
        self._streak.pop(key, None)
        self.targets = []
        chosen = self.pick(ctx, hits)
        if not chosen:
            return [_make(a, None) for a in self.spec.actions]
        actions: list[Any] = []
        for i in chosen:
            f = ctx.features[i]
            cy, cx = f.get("centroid_y"), f.get("centroid_x")
            target_yx = (cy, cx) if cy is not None and cx is not None else None
            target = target_of(ctx, i, len(hits))
            for a in self.spec.actions:
                actions.append(_make(a, target_yx))
                self.targets.append(target)
        return actions


def _make(action: ActionSpec, target_yx: tuple[float, float] | None) -> Any:
    """The action of ``action``; an ActionError raised names it (``spec_action``)."""
    spec = action.model_dump()
    try:
        return action_from_spec(spec, target_yx)
    except ActionError as exc:
        if exc.action is None:
            exc.action = spec_action(spec)
        raise


def load_user_rule(spec: RuleSpec) -> Rule:
    """Import ``spec.use`` (``"package.module:factory"``) and call it with ``spec.params``."""
    assert spec.use is not None
    module_name, _, attr = spec.use.partition(":")
    where = f"feedback rule {spec.name!r} (use: {spec.use})"
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{where}: cannot import {module_name!r} ({exc}); install it or put it on "
            "PYTHONPATH"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{where}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ConfigError(f"{where}: {attr!r} is not callable; give a rule factory or class")
    try:
        rule = obj(**spec.params)
    except TypeError as exc:
        raise ConfigError(f"{where}: calling it with params {spec.params} failed: {exc}") from None
    except Exception as exc:  # e.g. the factory's own check of its params: a config error
        log.debug("%s: its factory raised", where, exc_info=True)
        raise ConfigError(
            f"{where}: calling it with params {spec.params} failed: "
            f"{type(exc).__name__}: {exc}; change the params (or fix the factory)"
        ) from None
    if not callable(getattr(rule, "evaluate", None)):
        raise ConfigError(
            f"{where}: {attr}(**params) returned {type(rule).__name__}, which has no "
            "evaluate(ctx) method"
        )
    if not isinstance(getattr(rule, "name", None), str):
        with contextlib.suppress(AttributeError):
            rule.name = spec.name
    return rule


def build_rule(spec: RuleSpec) -> Rule:
    """A declarative or user rule from its spec."""
    return DeclarativeRule(spec) if spec.when is not None else load_user_rule(spec)


def as_actions(result: Any) -> list[Any]:
    """A rule's ``evaluate`` result as a list: None and other false values but strings
    (``return cond and [Burst(...)]`` gives False) are none, a single action is a list of
    one; ActionError (``unknown_action``) for a string, a mapping or anything else that is
    not an iterable of actions (refused once, not item by item)."""
    if result is None or (not result and not isinstance(result, str | bytes)):
        return []
    if isinstance(result, ACTION_TYPES):
        return [result]
    if isinstance(result, str | bytes | Mapping) or not isinstance(result, Iterable):
        raise ActionError(
            "unknown_action",
            f"evaluate() must return a list of actions (e.g. [Burst(frames=3)]), not "
            f"{type(result).__name__} {_short(result)}",
        )
    return list(result)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: A frame acquired this much (s) before the rule last fired means the wall clock was set
#: back (frames analysed out of order are milliseconds apart), not an earlier frame.
CLOCK_STEP_S = 1.0


class RuleSlot:
    """A rule plus the settings every rule has (enabled, applies_to, cooldown, scope, max_fires)."""

    def __init__(self, spec: RuleSpec, rule: Rule | None = None) -> None:
        self.spec = spec
        self.rule: Rule = rule if rule is not None else build_rule(spec)
        self._enabled = spec.enabled
        # counters of the current (or last) acquisition: reset when one starts
        self.fired = 0  # times the rule returned actions
        self.actions = 0  # actions carried out (accepted and applied or injected)
        self.refused = 0  # actions refused (by a limit, or when applied)
        self.errors = 0  # exceptions raised by the rule
        self._last_fire: dict[str, list[float]] = {}  # key -> [acquired time, frames since]

    @property
    def enabled(self) -> bool:
        """Whether the rule is evaluated. Switched from off to on, a declarative rule's
        ``persist_frames`` streaks start again (the frames it did not see broke them)."""
        return self._enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        if on and not self._enabled and isinstance(self.rule, DeclarativeRule):
            self.rule.switched_on()
        self._enabled = on

    @property
    def name(self) -> str:
        """The rule's name from the config."""
        return self.spec.name

    @property
    def kind(self) -> str:
        """``declarative`` or ``user``."""
        return "declarative" if isinstance(self.rule, DeclarativeRule) else "user"

    def reset(self) -> None:
        """A new acquisition: clear cooldowns, counters and the rule's own state."""
        self._last_fire.clear()
        self.fired = self.actions = self.refused = self.errors = 0
        reset = getattr(self.rule, "reset", None)
        if callable(reset):
            reset()

    def sees(self, ctx: FrameContext) -> bool:
        """Whether this frame is one the rule looks at (``applies_to``)."""
        on = self.spec.applies_to
        return on == "all" or (on == "feedback") == ctx.is_feedback

    def evaluate(self, ctx: FrameContext) -> list[Any]:
        """The rule's actions for this frame, after enabled/applies_to/cooldown/max_fires."""
        spec = self.spec
        if not self.sees(ctx):
            return []
        key = scope_key(ctx, spec.scope)
        last = self._last_fire.get(key)
        if not self._enabled:  # off: its frames still count toward ``cooldown_frames``
            if last is not None:  # (as the time toward ``cooldown_s`` goes on)
                last[1] += 1
            return []
        if spec.max_fires is not None and self.fired >= spec.max_fires:
            return []
        acquired = ctx.acquired  # (read before the rule runs: it may rebind ``ctx.t``)
        if last is not None:
            last[1] += 1
            if acquired - last[0] < -CLOCK_STEP_S:  # the wall clock was set back:
                last[0] = acquired  # the cooldown restarts here instead of lasting that long
            if acquired - last[0] < spec.cooldown_s or last[1] <= spec.cooldown_frames:
                return []
            del self._last_fire[key]  # its cooldown is over: nothing to remember
        try:
            actions = as_actions(self.rule.evaluate(ctx))
        except ActionError:  # it fired, but its action cannot be made: a refused fire
            self._fire(key, acquired)
            raise
        if actions:
            self._fire(key, acquired)
        return actions

    def _fire(self, key: str, acquired: float) -> None:
        """Count a fire (toward ``max_fires``; refused or not) at the trigger's ``acquired``
        time and start its cooldown."""
        self.fired += 1
        self._last_fire[key] = [acquired, 0.0]

    def describe(self) -> dict[str, Any]:
        """Name, kind and counters for the status."""
        return {
            "name": self.name,
            "kind": self.kind,
            "enabled": self.enabled,
            "fired": self.fired,
            "actions": self.actions,
            "refused": self.refused,
            "errors": self.errors,
        }
