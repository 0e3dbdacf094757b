"""Feedback: rules that turn measurements into MDA events, within safety limits.

- :mod:`.spec`: the ``feedback`` config section (rules, limits) as pydantic models.
- :mod:`.context`: :class:`FrameContext` (what a rule sees) and the object features.
- :mod:`.actions`: action dataclasses and their conversion to ``useq.MDAEvent`` s.
- :mod:`.rules`: the :class:`Rule` protocol, declarative rules, user rules.
- :mod:`.safety`: :class:`SafetyGuard` (limits, refusals, dose ledger).
- :mod:`.engine`: :class:`RuleEngine` (pure) and :class:`PlannedEvents`.
- :mod:`.controller`: :class:`FeedbackController`, the glue to the running service.

A user rule is any object with ``name`` and ``evaluate(ctx) -> list of actions``::

    from livemask.feedback import Burst, FrameContext

    class BrightestNucleus:
        name = "brightest"

        def __init__(self, threshold: float = 3000.0) -> None:
            self.threshold = threshold

        def evaluate(self, ctx: FrameContext) -> list[Burst]:
            bright = [o for o in ctx.objects if o["mean_intensity"] > self.threshold]
            if not bright:
                return []
            best = max(bright, key=lambda o: o["mean_intensity"])
            return [Burst(frames=3, centre_yx=tuple(best["centroid_yx"]))]

configured as ``{name: brightest, use: "mypackage.rules:BrightestNucleus",
params: {threshold: 2500}}``. See ``docs/feedback.md``.
"""

from __future__ import annotations

from livemask.feedback.actions import (
    Action,
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
    to_events,
)
from livemask.feedback.context import (
    FEATURES,
    FeatureTracker,
    FrameContext,
    ReadOnlyDict,
    ReadOnlyList,
)
from livemask.feedback.controller import FeedbackController
from livemask.feedback.engine import Decision, PlannedEvents, RuleEngine
from livemask.feedback.rules import DeclarativeRule, Rule, RuleSlot, load_user_rule
from livemask.feedback.safety import SafetyGuard, Violation
from livemask.feedback.spec import FeedbackConfig, LimitsSpec, RuleSpec

__all__ = [
    "FEATURES",
    "Action",
    "ActionError",
    "Burst",
    "Centre",
    "Decision",
    "DeclarativeRule",
    "EventPlanner",
    "FeatureTracker",
    "FeedbackConfig",
    "FeedbackController",
    "FrameContext",
    "LimitsSpec",
    "MoveTo",
    "PlannedEvents",
    "ReadOnlyDict",
    "ReadOnlyList",
    "Revisit",
    "Rule",
    "RuleEngine",
    "RuleSlot",
    "RuleSpec",
    "SafetyGuard",
    "SetChannel",
    "SetMode",
    "SkipPosition",
    "Stop",
    "Violation",
    "ZStack",
    "load_user_rule",
    "to_events",
]
