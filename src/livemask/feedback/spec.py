"""The ``feedback`` section of the service configuration (pydantic models, no I/O).

A rule is either declarative (``when`` + ``actions``) or a user rule (``use:
"package.module:factory"``). See ``docs/feedback.md`` for the full reference::

    feedback:
      limits: {max_added_frames_per_minute: 120, stage_x_range_um: [-1000, 1000]}
      rules:
        - name: mitosis
          applies_to: overview
          when:
            objects:
              where:
                mean_intensity_change: {gt: 1.4}
                area_change: {lt: 0.85}
          target: {max: mean_intensity_change}
          action: {burst: {frames: 5, interval_s: 0.2, centre: true}}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator

from livemask.acquisition.mode import Mode

#: The longest exposure (ms) an action may ask for (as the ``set`` command allows).
MAX_EXPOSURE_MS = 60_000.0


#: A 2 × 2 matrix of numbers (``feedback.pixel_to_stage``).
_Matrix = tuple[tuple[StrictFloat, StrictFloat], tuple[StrictFloat, StrictFloat]]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Compare(_Spec):
    """Thresholds a value must meet (all that are given); a missing value never matches."""

    gt: StrictFloat | None = None
    ge: StrictFloat | None = None
    lt: StrictFloat | None = None
    le: StrictFloat | None = None
    eq: StrictFloat | None = None
    ne: StrictFloat | None = None

    @model_validator(mode="after")
    def _some(self) -> Compare:
        if not self._ops():
            raise ValueError("give at least one of gt, ge, lt, le, eq, ne")
        if self._empty():
            raise ValueError(
                f"no number is {self.describe()}: the test can never pass; check the "
                "thresholds (gt/ge is the lower bound, lt/le the upper)"
            )
        return self

    def _empty(self) -> bool:
        """Whether no number meets every threshold (e.g. ``gt: 10, lt: 5``)."""
        ops = self._ops()
        lows = [(v, k == "gt") for k, v in ops.items() if k in ("gt", "ge", "eq")]
        highs = [(v, k == "lt") for k, v in ops.items() if k in ("lt", "le", "eq")]
        if lows and highs:
            lo, lo_strict = max(lows, key=lambda b: (b[0], b[1]))
            hi, hi_strict = min(highs, key=lambda b: (b[0], not b[1]))
            if lo > hi or (lo == hi and (lo_strict or hi_strict)):
                return True
            if lo == hi and ops.get("ne") == lo:  # one number left, and it is excluded
                return True
        return ops.get("eq") is not None and ops.get("eq") == ops.get("ne")

    def _ops(self) -> dict[str, float]:
        return {
            k: v
            for k in ("gt", "ge", "lt", "le", "eq", "ne")
            if (v := getattr(self, k)) is not None
        }

    def test(self, value: Any) -> bool:
        """Whether ``value`` meets every threshold (False for None, bool or non-numbers)."""
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            return False
        v = float(value)
        if v != v:  # NaN
            return False
        checks = {
            "gt": v.__gt__,
            "ge": v.__ge__,
            "lt": v.__lt__,
            "le": v.__le__,
            "eq": v.__eq__,
            "ne": v.__ne__,
        }
        return all(checks[op](limit) for op, limit in self._ops().items())

    def describe(self) -> str:
        """E.g. ``> 1.4 and < 2``."""
        sym = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "eq": "==", "ne": "!="}
        return " and ".join(f"{sym[op]} {v:g}" for op, v in self._ops().items())


class ObjectCondition(_Spec):
    """Per-object tests: an object matches when it passes every test in ``where``."""

    where: dict[str, Compare] = Field(
        min_length=1,
        description="feature name -> thresholds, e.g. {mean_intensity_rel: {gt: 1.5}}; "
        "features are listed in docs/feedback.md",
    )
    match: Literal["any", "all"] | Compare = Field(
        default="any",
        description="any: at least one object matches; all: every object (and at least one); "
        "or a count test such as {ge: 3}",
    )


class ValueTest(Compare):
    """A test on one value of the measurements message, by dotted path."""

    path: str = Field(
        min_length=1,
        description="dotted path into the measurements message, e.g. summary.count or "
        "grains.cumulative.mean_equivalent_diameter_ci95_um",
    )
    reduce: Literal["value", "width", "half_width", "relative_width", "length"] = Field(
        default="value",
        description="value: the number itself; width / half_width: of a [low, high] "
        "interval; relative_width: width / midpoint; length: of a list",
    )


class Condition(_Spec):
    """When a declarative rule matches: all given parts must hold."""

    objects: ObjectCondition | None = None
    values: list[ValueTest] = Field(default_factory=list)

    @model_validator(mode="after")
    def _some(self) -> Condition:
        if self.objects is None and not self.values:
            raise ValueError("give `objects` and/or `values`")
        return self


class Target(_Spec):
    """Which matching object an action centres on (default: nearest the field centre)."""

    max: str | None = None
    min: str | None = None

    @model_validator(mode="after")
    def _one(self) -> Target:
        if (self.max is None) == (self.min is None):
            raise ValueError("give exactly one of max or min (a feature name)")
        return self


# ------------------------------------------------------------------ actions
class _FrameSettings(_Spec):
    channel: str | None = Field(
        default=None,
        description="channel preset of the core's channel group (None: the triggering frame's)",
    )
    exposure_ms: StrictFloat | None = Field(
        default=None, gt=0, le=MAX_EXPOSURE_MS,
        description="camera exposure (None: the triggering frame's)")


class BurstSpec(_FrameSettings):
    """``frames`` frames, ``interval_s`` apart, at the (optionally centred) position."""

    frames: StrictInt = Field(default=5, ge=1, le=10_000)
    interval_s: StrictFloat = Field(default=0.0, ge=0)
    centre: bool = Field(default=True, description="centre the target object first")


class CentreSpec(_FrameSettings):
    """Move the stage to centre the target object and take ``frames`` frames."""

    frames: StrictInt = Field(default=1, ge=1, le=10_000)


class MoveSpec(_FrameSettings):
    """Move to an absolute (x_um, y_um) or by (dx_um, dy_um) and take ``frames`` frames."""

    x_um: StrictFloat | None = None
    y_um: StrictFloat | None = None
    dx_um: StrictFloat | None = None
    dy_um: StrictFloat | None = None
    frames: StrictInt = Field(default=1, ge=1, le=10_000)

    @model_validator(mode="after")
    def _where(self) -> MoveSpec:
        absolute = self.x_um is not None or self.y_um is not None
        relative = self.dx_um is not None or self.dy_um is not None
        if absolute == relative:
            raise ValueError("give x_um/y_um (absolute) or dx_um/dy_um (relative), not both")
        return self


class ZStackSpec(_FrameSettings):
    """A Z-stack of ``range_um`` (centred on the frame's Z) in steps of ``step_um``."""

    range_um: StrictFloat = Field(gt=0)
    step_um: StrictFloat = Field(gt=0)
    centre: bool = False

    @model_validator(mode="after")
    def _not_too_many_planes(self) -> ZStackSpec:
        from livemask.feedback.actions import MAX_ZSTACK_PLANES, zstack_planes

        if zstack_planes(self.range_um, self.step_um) > MAX_ZSTACK_PLANES:
            raise ValueError(
                f"range_um / step_um gives more than {MAX_ZSTACK_PLANES} planes; use a "
                "larger step_um"
            )
        return self


class ChannelSpec(_FrameSettings):
    """``frames`` frames at this position with another channel and/or exposure."""

    frames: StrictInt = Field(default=1, ge=1, le=10_000)


class SkipSpec(_Spec):
    """Drop the planned events of a position (default: the triggering frame's)."""

    position: StrictInt | None = Field(default=None, ge=0, description="`p` index; None: this one")
    visits: StrictInt | None = Field(
        default=None, ge=1, description="planned visits to drop; None: the rest of the run"
    )


class RevisitSpec(_Spec):
    """Image a planned position (default: the triggering frame's) again now."""

    position: StrictInt | None = Field(default=None, ge=0)
    frames: StrictInt = Field(default=1, ge=1, le=10_000)
    interval_s: StrictFloat = Field(default=0.0, ge=0)
    channel: str | None = None
    exposure_ms: StrictFloat | None = Field(default=None, gt=0, le=MAX_EXPOSURE_MS)


class ActionSpec(_Spec):
    """Exactly one action, e.g. ``{burst: {frames: 5}}``, ``{mode: synchronized}``,
    ``{stop: true}``."""

    burst: BurstSpec | None = None
    centre: CentreSpec | None = None
    move: MoveSpec | None = None
    zstack: ZStackSpec | None = None
    channel: ChannelSpec | None = None
    skip: SkipSpec | None = None
    revisit: RevisitSpec | None = None
    mode: Mode | None = None
    stop: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ActionSpec:
        given = [k for k, v in self.__dict__.items() if v is not None and v is not False]
        if len(given) != 1:
            names = ", ".join(type(self).model_fields)
            raise ValueError(f"give exactly one action of {names} (got {given or 'none'})")
        return self


class RuleSpec(_Spec):
    """One rule: declarative (``when`` + ``actions``) or a user rule (``use``)."""

    name: str = Field(min_length=1)
    enabled: bool = True
    applies_to: Literal["overview", "feedback", "all"] = Field(
        default="overview",
        description="frames the rule sees: overview (planned or enqueued frames), feedback "
        "(frames produced by feedback actions) or all",
    )
    when: Condition | None = None
    use: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
        description="a user rule: 'package.module:factory'; factory(**params) returns a Rule",
    )
    params: dict[str, Any] = Field(default_factory=dict)
    actions: list[ActionSpec] = Field(default_factory=list)
    target: Target | None = None
    max_targets: StrictInt = Field(
        default=1,
        ge=1,
        description="act on up to N matching objects per frame (best first by `target`), "
        "one set of actions each",
    )
    persist_frames: StrictInt = Field(
        default=1, ge=1, description="consecutive matching frames (in scope) before firing"
    )
    cooldown_s: StrictFloat = Field(default=0.0, ge=0, description="no firing again within (s)")
    cooldown_frames: StrictInt = Field(
        default=0, ge=0, description="no firing again within N frames")
    scope: Literal["position", "global"] = Field(
        default="position",
        description="position: persistence and cooldown per stage position; global: one count",
    )
    max_fires: StrictInt | None = Field(
        default=None, ge=1, description="fire at most N times per run")

    @model_validator(mode="before")
    @classmethod
    def _single_action(cls, data: Any) -> Any:
        if isinstance(data, dict) and "action" in data:
            data = dict(data)
            if "actions" in data:
                raise ValueError("give `action` or `actions`, not both")
            data["actions"] = [data.pop("action")]
        return data

    @model_validator(mode="after")
    def _kind(self) -> RuleSpec:
        if (self.when is None) == (self.use is None):
            raise ValueError(f"rule {self.name!r}: give either `when` (with actions) or `use`")
        if self.when is not None and not self.actions:
            raise ValueError(f"rule {self.name!r}: a `when` rule needs `action` or `actions`")
        return self

    def object_features(self) -> list[str]:
        """The object features the rule names: its ``when.objects.where`` tests, then its
        ``target``'s ``max`` / ``min``."""
        objects = self.when.objects if self.when is not None else None
        target = self.target
        named = [*(objects.where if objects is not None else {})]
        if target is not None:
            named += [f for f in (target.max, target.min) if f is not None]
        return named


class LimitsSpec(_Spec):
    """Safety limits; an action that would break one is refused (and the refusal published)."""

    stage_x_range_um: tuple[StrictFloat, StrictFloat] | None = Field(
        default=None, description="allowed stage X [min, max] (µm); None: unchecked"
    )
    stage_y_range_um: tuple[StrictFloat, StrictFloat] | None = None
    z_range_um: tuple[StrictFloat, StrictFloat] | None = Field(
        default=None, description="allowed absolute Z [min, max] (µm); None: unchecked"
    )
    max_z_range_um: StrictFloat | None = Field(
        default=50.0, gt=0, description="largest Z-stack span (µm)"
    )
    max_added_frames_per_minute: StrictInt | None = Field(
        default=120, ge=0, description="frames added by feedback in any 60 s window"
    )
    max_frames_per_action: StrictInt = Field(default=200, ge=1)
    max_action_duration_s: StrictFloat = Field(
        default=600.0,
        gt=0,
        description="longest an action may hold the microscope by its frame spacing: "
        "(frames - 1) x interval_s of a burst or revisit (s); the planned events wait "
        "meanwhile",
    )
    light_dose_budget_ms: StrictFloat | None = Field(
        default=None,
        gt=0,
        description="per stage position: sum of exposure_ms x frames (planned and added) "
        "after which feedback adds no more frames there; None: unchecked",
    )

    @model_validator(mode="after")
    def _ordered(self) -> LimitsSpec:
        for name in ("stage_x_range_um", "stage_y_range_um", "z_range_um"):
            rng = getattr(self, name)
            if rng is not None and rng[0] > rng[1]:
                raise ValueError(f"{name}: min {rng[0]} is above max {rng[1]}")
        return self


#: Most rules at once (``feedback.rules``, the ``rules`` command): each is checked on every
#: frame (20,000 rules took 2.3 s to set and then held up the analysis of every frame).
MAX_RULES = 100


class FeedbackConfig(_Spec):
    """Feedback rules and their safety limits."""

    enabled: bool = Field(default=True, description="evaluate rules (the `rules` command too)")
    rules: list[RuleSpec] = Field(default_factory=list, max_length=MAX_RULES)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    pixel_to_stage: _Matrix | None = Field(
        default=None,
        description="[[dx/dcol, dx/drow], [dy/dcol, dy/drow]] in µm per pixel (the Micro-"
        "Manager pixel affine); None: pixel size, image axes = stage axes",
    )
    match_radius_px: StrictFloat = Field(
        default=8.0, gt=0, description="max centroid shift to pair objects across frames"
    )
    baseline_frames: StrictInt = Field(
        default=1,
        ge=1,
        le=20,
        description="the *_change features compare with the object in the previous frame of "
        "the same stream (stage position, grid tile, channel and plane) (1), or with its most "
        "recent clean match (no merge) in the last this many frames of that stream",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> FeedbackConfig:
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names must be unique; repeated: {dupes}")
        check_rule_limits(self.rules, self.limits, "feedback.rules")
        return self


def check_rule_limits(rules: list[RuleSpec], limits: LimitsSpec, what: str) -> None:
    """ValueError for a declarative rule whose action breaks a limit on every fire:
    too long (``max_action_duration_s``), too many frames (``max_frames_per_action``, or
    more than ``max_added_frames_per_minute`` allows in any minute) or a Z-stack spanning
    more than ``max_z_range_um``."""
    check_rule_durations(rules, limits, what)
    for i, rule in enumerate(rules):
        for action in rule.actions:
            problem = _action_over_limits(action, limits)
            if problem is not None:
                raise ValueError(f"{what}[{i}] ({rule.name!r}): {problem}")


def _action_over_limits(action: ActionSpec, limits: LimitsSpec) -> str | None:
    """What makes ``action`` break ``max_frames_per_action``, ``max_added_frames_per_minute``
    or ``max_z_range_um`` on every fire (None: nothing)."""
    from livemask.feedback.actions import zstack_planes

    kind, frames, span = "", 0, 0.0
    for name in ("burst", "centre", "move", "channel", "revisit"):
        params = getattr(action, name)
        if params is not None:
            kind, frames = name, params.frames
    if action.zstack is not None:
        kind, frames = "zstack", zstack_planes(action.zstack.range_um, action.zstack.step_um)
        span = (frames - 1) * action.zstack.step_um
    if frames > limits.max_frames_per_action:
        return (
            f"{kind} of {frames} frames, more than feedback.limits.max_frames_per_action "
            f"({limits.max_frames_per_action}): every fire would be refused; lower "
            f"{'zstack.range_um or raise zstack.step_um' if kind == 'zstack' else kind + '.frames'}"
            ", or raise the limit"
        )
    per_minute = limits.max_added_frames_per_minute
    if per_minute is not None and frames > per_minute:
        return (
            f"{kind} of {frames} frames, more than feedback.limits.max_added_frames_per_minute "
            f"({per_minute}): every fire would be refused; lower "
            f"{'zstack.range_um or raise zstack.step_um' if kind == 'zstack' else kind + '.frames'}"
            ", or raise the limit"
        )
    z_max = limits.max_z_range_um
    if z_max is not None and span > z_max + 1e-9:
        return (
            f"zstack spanning {span:g} µm, more than feedback.limits.max_z_range_um "
            f"({z_max:g} µm): every fire would be refused; lower zstack.range_um, or raise "
            "the limit"
        )
    return None


def check_rule_durations(rules: list[RuleSpec], limits: LimitsSpec, what: str) -> None:
    """ValueError for a declarative rule whose burst or revisit would hold the microscope
    longer than ``limits.max_action_duration_s``: ``(frames - 1) × interval_s``."""
    for i, rule in enumerate(rules):
        for action in rule.actions:
            for kind, params in (("burst", action.burst), ("revisit", action.revisit)):
                if params is None:
                    continue
                span = (params.frames - 1) * params.interval_s
                if span > limits.max_action_duration_s:
                    raise ValueError(
                        f"{what}[{i}] ({rule.name!r}): {kind} of {params.frames} frames "
                        f"{params.interval_s:g} s apart takes {span:g} s, longer than "
                        f"feedback.limits.max_action_duration_s ({limits.max_action_duration_s:g}"
                        f" s); lower {kind}.interval_s or {kind}.frames, or raise the limit"
                    )
