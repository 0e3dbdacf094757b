"""Actions that rules return, and their conversion to ``useq.MDAEvent`` s.

Actions are small frozen dataclasses. Those that acquire (:class:`Burst`, :class:`Centre`,
:class:`MoveTo`, :class:`ZStack`, :class:`SetChannel`, :class:`Revisit`) become MDA events
that the service injects into the running acquisition ahead of the remaining planned
events; :class:`SkipPosition`, :class:`SetMode` and :class:`Stop` change the acquisition
itself. :func:`to_events` does the conversion, given the triggering frame's context and an
:class:`EventPlanner` (pixel-to-stage geometry, known positions).

Pixel positions are ``(row, col)`` in the triggering frame (as ``centroid_yx`` in the
measurements); stage positions are µm.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, get_args

import numpy as np
import useq

from livemask.acquisition.mode import Mode
from livemask.analysis.tracking import pixel_to_stage_at, positive_number
from livemask.feedback.context import FEEDBACK_INDEX_KEY, FrameContext
from livemask.feedback.spec import MAX_EXPOSURE_MS

#: Key of ``MDAEvent.metadata`` that tags events made by feedback actions.
METADATA_KEY = "livemask_feedback"


#: The most planes a Z-stack action is turned into (the events are built on the event loop;
#: the safety limit ``max_frames_per_action`` is usually far lower).
MAX_ZSTACK_PLANES = 10_000


def zstack_planes(range_um: float, step_um: float) -> int:
    """Planes of a Z-stack spanning ``range_um`` in ``step_um`` steps (both > 0)."""
    ratio = range_um / step_um
    return MAX_ZSTACK_PLANES + 1 if ratio > MAX_ZSTACK_PLANES else math.floor(ratio + 1e-9) + 1


class ActionError(ValueError):
    """An action cannot be turned into events here (becomes a refusal)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        #: the action that could not be made, as its rule gives it, where known: published
        #: in the refusal's ``action``
        self.action: SpecAction | None = None


@dataclass(frozen=True, kw_only=True)
class _Frames:
    """Settings shared by actions that acquire frames (keyword-only: ``Burst(frames=4)``)."""

    channel: str | None = None  # channel preset (None: the triggering frame's)
    exposure_ms: float | None = None  # None: the triggering frame's

    kind: ClassVar[str] = ""

    def describe(self) -> dict[str, Any]:
        """JSON-ready form: ``{"kind": ..., **fields}``."""
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class Burst(_Frames):
    """``frames`` frames ``interval_s`` apart; centred on ``centre_yx`` when given."""

    frames: int = 5
    interval_s: float = 0.0
    centre_yx: tuple[float, float] | None = None

    kind: ClassVar[str] = "burst"


@dataclass(frozen=True, kw_only=True)
class Centre(_Frames):
    """Move the stage so that pixel ``centre_yx`` is in the middle; take ``frames``."""

    centre_yx: tuple[float, float] = (0.0, 0.0)
    frames: int = 1

    kind: ClassVar[str] = "centre"


@dataclass(frozen=True, kw_only=True)
class MoveTo(_Frames):
    """Go to stage ``(x_um, y_um[, z_um])``, or by ``(dx_um, dy_um)``; take ``frames``."""

    x_um: float | None = None
    y_um: float | None = None
    z_um: float | None = None
    dx_um: float | None = None
    dy_um: float | None = None
    frames: int = 1

    kind: ClassVar[str] = "move"


@dataclass(frozen=True, kw_only=True)
class ZStack(_Frames):
    """A Z-stack spanning ``range_um`` around the frame's Z in ``step_um`` steps."""

    range_um: float = 10.0
    step_um: float = 1.0
    centre_yx: tuple[float, float] | None = None

    kind: ClassVar[str] = "zstack"


@dataclass(frozen=True, kw_only=True)
class SetChannel(_Frames):
    """``frames`` frames here with another channel and/or exposure."""

    frames: int = 1

    kind: ClassVar[str] = "channel"


@dataclass(frozen=True, kw_only=True)
class Revisit(_Frames):
    """Image planned position ``position`` again now (None: the triggering frame's own, at
    its tile and plane; another: at its ``stage_positions`` coordinates, without a ``g``)."""

    position: int | None = None
    frames: int = 1
    interval_s: float = 0.0

    kind: ClassVar[str] = "revisit"


@dataclass(frozen=True)
class SkipPosition:
    """Drop the next ``visits`` planned visits (None: all) of position ``position``."""

    position: int | None = None
    visits: int | None = None

    kind: ClassVar[str] = "skip"

    def describe(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class SetMode:
    """Switch the service's acquisition mode (free-run, pipelined or synchronized)."""

    mode: Mode = "synchronized"

    kind: ClassVar[str] = "mode"

    def describe(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class Stop:
    """End the acquisition."""

    kind: ClassVar[str] = "stop"

    def describe(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"kind": self.kind}


Action = Burst | Centre | MoveTo | ZStack | SetChannel | Revisit | SkipPosition | SetMode | Stop
ACTION_TYPES: tuple[type, ...] = (
    Burst,
    Centre,
    MoveTo,
    ZStack,
    SetChannel,
    Revisit,
    SkipPosition,
    SetMode,
    Stop,
)


@dataclass
class EventPlanner:
    """What :func:`to_events` needs besides the action and the triggering frame.

    ``pixel_to_stage`` is ``((dx/dcol, dx/drow), (dy/dcol, dy/drow))`` in µm per pixel;
    None where the rig's pixel size is not calibrated (centring is then refused).
    ``matrix_pixel_size_um``: the pixel size it holds for; a frame of another one (the
    camera's binning or the objective changed) scales it (None: used as given).
    An action's frames at an interval carry ``min_start_time`` as offsets (s) from its
    first frame, which the service injects ``timed_from_first`` (the event feed puts them
    on the runner's clock when that frame is taken: a burst queued behind another keeps
    its intervals).
    ``positions`` maps planned ``p`` indices to their ``(x, y, z)`` (filled as the planned
    events are issued: where the last one issued there was, a tile or plane of it);
    ``plan_positions``: every ``p`` index of the acquisition's plan (None: not known), which
    ``skip`` may name; ``plan_coordinates``: the plan's stage position of each ``p`` (known
    before it is first visited: the light-dose ledger charges an action's frames at the
    planned field they overlap; a revisit of another position images there).
    """

    pixel_to_stage: tuple[tuple[float, float], tuple[float, float]] | None = (
        (1.0, 0.0),
        (0.0, 1.0),
    )
    positions: dict[int, tuple[float | None, float | None, float | None]] = field(
        default_factory=dict
    )
    plan_positions: frozenset[int] | None = None
    matrix_pixel_size_um: float | None = None
    plan_coordinates: dict[int, tuple[float | None, float | None, float | None]] = field(
        default_factory=dict
    )
    #: the exposure (ms) the plan gives each channel preset that has one
    channel_exposures: dict[str, float] = field(default_factory=dict)

    def start_plan(
        self,
        positions: Collection[int] | None,
        coordinates: Mapping[int, Sequence[float | None]] | None = None,
        channel_exposures: Mapping[str, float] | None = None,
    ) -> None:
        """A new acquisition plans ``positions`` (``p`` indices; None: not known) at
        ``coordinates`` (``p`` -> ``(x, y[, z])`` µm; None: not known), its channels with
        ``channel_exposures`` (preset -> ms); the positions seen in an earlier acquisition
        are forgotten."""
        self.positions.clear()
        self.channel_exposures = dict(channel_exposures or {})
        self.plan_positions = frozenset(positions) if positions is not None else None
        self.plan_coordinates = {
            int(p): (xyz[0], xyz[1], xyz[2] if len(xyz) > 2 else None)
            for p, xyz in (coordinates or {}).items()
        }

    def known_positions(self) -> dict[int, tuple[float | None, float | None, float | None]]:
        """Where each planned ``p`` is: as issued so far, else as planned."""
        return {**self.plan_coordinates, **self.positions}  # (the runner adds to positions)

    @classmethod
    def for_pixel_size(cls, pixel_size_um: float | None, **kwargs: Any) -> EventPlanner:
        """Image axes aligned with the stage axes, ``pixel_size_um`` µm per pixel (None:
        not calibrated)."""
        if pixel_size_um is None:
            return cls(pixel_to_stage=None, **kwargs)
        s = float(pixel_size_um)
        return cls(pixel_to_stage=((s, 0.0), (0.0, s)), **kwargs)

    def stage_matrix(
        self, ctx: FrameContext
    ) -> tuple[tuple[float, float], tuple[float, float]] | None:
        """``pixel_to_stage`` for ``ctx``'s frame: scaled by its pixel size over
        ``matrix_pixel_size_um``, where both are known."""
        return pixel_to_stage_at(self.pixel_to_stage, self.matrix_pixel_size_um,
                                 ctx.pixel_size_um)

    def centred(
        self, ctx: FrameContext, centre_yx: tuple[float, float]
    ) -> tuple[float, float]:
        """Stage (x, y) that puts pixel ``centre_yx`` of ``ctx``'s frame in the middle of the
        action's frames (:meth:`FrameContext.aim_yx`: the camera ROI they will be taken with,
        which may not be the triggering frame's)."""
        x, y = ctx.position.get("x_um"), ctx.position.get("y_um")
        if x is None or y is None:
            raise ActionError(
                "no_stage_position",
                "cannot centre: the triggering frame has no stage position (give the "
                "acquisition stage_positions, or use a rule without centring)",
            )
        h, w = ctx.image_shape
        if h <= 0 or w <= 0:
            raise ActionError("no_image_shape", "cannot centre: unknown image size")
        matrix = self.stage_matrix(ctx)
        if matrix is None:
            raise ActionError(
                "no_pixel_size",
                "cannot centre: the rig's pixel size is not calibrated (no active pixel-size "
                "preset in its .cfg); calibrate it, or set hardware.pixel_size_um or "
                "feedback.pixel_to_stage",
            )
        axis = ctx.aim_yx()
        if axis is None:
            raise ActionError(
                "unknown_roi",
                "cannot centre: the frame was taken with a camera ROI the camera did not give "
                "(its settings.roi is null), so the ROI of the action's frames cannot be "
                "placed in it; centre from frames whose ROI the camera gives",
            )
        drow = float(centre_yx[0]) - axis[0]
        dcol = float(centre_yx[1]) - axis[1]
        (a, b), (c, d) = matrix
        return float(x) + a * dcol + b * drow, float(y) + c * dcol + d * drow


def plain_action(action: Any) -> Any:
    """``action`` with its numbers as plain Python ``int`` / ``float`` (a rule that computes
    them with numpy gives ``np.int64``, ``np.float32``, ...) and a ``centre_yx`` given as a
    list or numpy array as a tuple; anything else as it is (bools, ``np.bool_`` and other
    values that are no numbers are refused as invalid later). The same action when nothing
    changes."""
    if not isinstance(action, ACTION_TYPES):
        return action
    made: Any = action  # (a dataclass instance)
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(made):
        value = getattr(made, f.name)
        new = _plain(value)
        if isinstance(value, list | tuple) or (isinstance(value, np.ndarray) and value.ndim):
            items = tuple(_plain(v) for v in value)  # centre_yx
            same = type(value) is tuple and all(a is b for a, b in zip(items, value, strict=True))
            new = value if same else items
        if new is not value:
            changes[f.name] = new
    return dataclasses.replace(made, **changes) if changes else action


def _plain(value: Any) -> Any:
    """A number (a numpy scalar too) as a plain ``int`` / ``float``; a ``str`` subclass
    (``np.str_``) as a ``str``; bools and other values as they are."""
    if type(value) in (int, float, str, bool) or value is None:
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def frame_count(action: Any) -> int:
    """Frames (MDA events) ``action`` asks for, without building them (0: none)."""
    action = plain_action(action)
    if isinstance(action, ZStack):
        ok = positive_number(action.range_um) and positive_number(action.step_um)
        return zstack_planes(action.range_um, action.step_um) if ok else 0
    frames = getattr(action, "frames", 1)
    if not isinstance(action, _Frames) or not _count(frames, 0):
        return 0  # (a bad count is refused by to_events)
    return int(frames)


def duration_s(action: Any) -> float:
    """How long ``action``'s frames hold the microscope by their spacing alone:
    ``(frames - 1) × interval_s`` (0 for actions without an interval; numpy numbers too:
    :func:`frame_count` and ``positive_number`` take them)."""
    if not isinstance(action, Burst | Revisit) or not positive_number(action.interval_s):
        return 0.0
    return max(frame_count(action) - 1, 0) * float(action.interval_s)


def _number(value: Any) -> bool:
    """Whether ``value`` is a real number (a numpy one too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    """Whether ``value`` is a finite number (not a bool)."""
    return _number(value) and math.isfinite(value)


def _count(value: Any, least: int) -> bool:
    """Whether ``value`` is an integer (a numpy one too; not a bool) >= ``least``."""
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and int(value) >= least)


def _invalid(action: Any, what: str, value: Any, fix: str) -> ActionError:
    return ActionError("invalid_action", f"{action.kind} with {what}={value!r}: {fix}")


def _check_frames(action: Any) -> None:
    """ActionError ``invalid_action`` for fewer than one frame, a bad interval, exposure or
    channel, or a stage target that is not a finite number."""
    if not isinstance(action, _Frames):
        return
    if isinstance(action, ZStack) and not (
        positive_number(action.range_um) and positive_number(action.step_um)
    ):
        raise ActionError(
            "invalid_action",
            f"zstack with range_um={action.range_um!r}, step_um={action.step_um!r}: give "
            "finite range_um and step_um > 0",
        )
    frames = getattr(action, "frames", 1)
    if not isinstance(action, ZStack) and not _count(frames, 1):
        raise _invalid(action, "frames", frames, "give frames as an integer >= 1")
    interval = getattr(action, "interval_s", 0.0)
    if not _finite(interval) or interval < 0:
        raise _invalid(action, "interval_s", interval, "give a finite interval_s >= 0")
    exposure = action.exposure_ms
    if exposure is not None and not (positive_number(exposure) and exposure <= MAX_EXPOSURE_MS):
        raise _invalid(action, "exposure_ms", exposure,
                       f"give a finite exposure_ms > 0 and <= {MAX_EXPOSURE_MS:g}")
    if action.channel is not None and not (isinstance(action.channel, str) and action.channel):
        raise _invalid(action, "channel", action.channel, "give a channel preset's name")
    for name in ("x_um", "y_um", "z_um", "dx_um", "dy_um"):
        value = getattr(action, name, None)
        if value is not None and not _finite(value):
            raise _invalid(action, name, value, "give a finite number (µm)")
    centre = getattr(action, "centre_yx", None)
    if centre is not None and not (
        isinstance(centre, tuple | list) and len(centre) == 2 and all(map(_finite, centre))
    ):
        raise _invalid(action, "centre_yx", centre, "give a (row, col) pair of finite numbers")


def _check_other(action: Any, ctx: FrameContext, planner: EventPlanner) -> None:
    """ActionError for a ``skip`` of a position the plan does not have, or a ``mode`` that
    is not one of the service's modes."""
    if isinstance(action, SkipPosition):
        if action.position is not None and not _count(action.position, 0):
            raise _invalid(action, "position", action.position,
                           "give a `p` index: an integer >= 0")
        if action.visits is not None and not _count(action.visits, 1):
            raise _invalid(action, "visits", action.visits,
                           "give visits as an integer >= 1 (None: all)")
        p = action.position if action.position is not None else ctx.index.get("p")
        known = planner.plan_positions
        if p is not None and known is not None and int(p) not in known:
            raise ActionError(
                "unknown_position",
                f"cannot skip position {p}: not a stage position of this acquisition "
                f"(positions: {', '.join(map(str, sorted(known))) or 'none'})",
            )
    elif isinstance(action, SetMode) and action.mode not in get_args(Mode):
        raise _invalid(action, "mode", action.mode, f"give one of {', '.join(get_args(Mode))}")


def restore_event(
    events: list[useq.MDAEvent],
    exposure_ms: float | None,
    channel: useq.EventChannel | None,
    *,
    action_id: int = 0,
    rule: str = "",
) -> useq.MDAEvent | None:
    """An event that takes no image and puts back the exposure and/or channel that
    ``events`` (one action's) change: ``exposure_ms`` / ``channel`` in effect before them.

    None when the events change neither. pymmcore-plus sets an event's channel and exposure
    before it runs it, also for a ``CustomAction`` (which takes no image), and keeps them
    for the following events that give none: without this event the planned frames after
    the action would be taken with the action's settings. Raises :class:`ActionError`
    (``unknown_camera_settings``) when a setting to put back is not known.
    """
    if not events:
        return None
    changes_exposure = any(e.exposure is not None for e in events)
    changes_channel = any(e.channel is not None for e in events)
    if not (changes_exposure or changes_channel):
        return None
    for changed, known, what, fix in (
        (changes_exposure, exposure_ms, "exposure", "give the acquisition's channels an "
         "exposure, or drop exposure_ms from the action"),
        (changes_channel, channel, "channel", "give the acquisition channels, or drop "
         "channel from the action"),
    ):
        if changed and known is None:
            raise ActionError(
                "unknown_camera_settings",
                f"cannot put the camera's {what} back after this action: the {what} in "
                f"effect before it is not known (the acquisition's events set none); {fix}",
            )
    first = events[0]
    return useq.MDAEvent(
        index=first.index,
        channel=channel if changes_channel else None,
        exposure=exposure_ms if changes_exposure else None,
        action=useq.CustomAction(name="livemask-restore-settings"),
        metadata={METADATA_KEY: {"action_id": action_id, "rule": rule, "restore": True}},
    )


def _index(ctx: FrameContext, action_id: int, **extra: int) -> dict[str, int]:
    keep = {k: int(v) for k, v in ctx.index.items() if k in ("t", "p", "g")}
    return {**keep, FEEDBACK_INDEX_KEY: int(action_id), **extra}


def to_events(
    action: Any,
    ctx: FrameContext,
    planner: EventPlanner,
    *,
    action_id: int = 0,
    rule: str = "",
) -> list[useq.MDAEvent]:
    """The MDA events that carry out ``action`` (empty for non-acquiring actions).

    Raises :class:`ActionError` when the action cannot be done from this frame (no stage
    position to centre from, unknown position index, ...) or is invalid (``invalid_action``).
    """
    action = plain_action(action)
    if isinstance(action, SkipPosition | SetMode | Stop):
        _check_other(action, ctx, planner)
        return []
    _check_frames(action)
    x, y, z = ctx.position.get("x_um"), ctx.position.get("y_um"), ctx.position.get("z_um")
    frames = 1
    interval = 0.0
    zs: list[float | None] | None = None
    extra_index: list[dict[str, int]] | None = None
    elsewhere: int | None = None  # the ``p`` a revisit of another position images
    if isinstance(action, Burst):
        frames, interval = action.frames, action.interval_s
        if action.centre_yx is not None:
            x, y = planner.centred(ctx, action.centre_yx)
    elif isinstance(action, Centre):
        frames = action.frames
        x, y = planner.centred(ctx, action.centre_yx)
    elif isinstance(action, MoveTo):
        frames = action.frames
        if action.dx_um is not None or action.dy_um is not None:
            if x is None or y is None:
                raise ActionError(
                    "no_stage_position", "cannot move relative: the frame has no stage position"
                )
            x, y = x + (action.dx_um or 0.0), y + (action.dy_um or 0.0)
        else:
            _check_move_back(ctx, x=action.x_um, y=action.y_um)
            x = action.x_um if action.x_um is not None else x
            y = action.y_um if action.y_um is not None else y
        _check_move_back(ctx, z=action.z_um)
        z = action.z_um if action.z_um is not None else z
    elif isinstance(action, ZStack):
        if z is None:
            raise ActionError(
                "no_z_position",
                "cannot make a Z-stack around the frame: it has no Z position (give the "
                "stage positions a z)",
            )
        if action.centre_yx is not None:
            x, y = planner.centred(ctx, action.centre_yx)
        n = zstack_planes(action.range_um, action.step_um)
        if n > MAX_ZSTACK_PLANES:
            raise ActionError(
                "max_frames_per_action",
                f"a Z-stack of {action.range_um:g} µm in {action.step_um:g} µm steps has {n} "
                f"planes; at most {MAX_ZSTACK_PLANES} are made (use a larger step)",
            )
        start = float(z) - (n - 1) * action.step_um / 2
        zs = [start + i * action.step_um for i in range(n)]
        frames = n
        extra_index = [{"z": i} for i in range(n)]
    elif isinstance(action, SetChannel):
        frames = action.frames
    elif isinstance(action, Revisit):
        (x, y, z), elsewhere = _revisit_place(action, ctx, planner)
        frames, interval = action.frames, action.interval_s
    else:
        raise ActionError("unknown_action", f"not a feedback action: {action!r}")

    for axis, value in (("x", x), ("y", y), ("z", z)):
        if value is not None and not _finite(value):  # e.g. a stage that read back NaN
            raise ActionError(
                "invalid_action",
                f"{action.kind}: stage {axis} target {value!r} is not a finite number",
            )
    settings = _camera_settings(action, ctx, planner)
    events = []
    for i in range(frames):
        idx = _index(ctx, action_id, **(extra_index[i] if extra_index else {}))
        if elsewhere is not None:  # another position: its own index, no tile of the trigger's
            idx.pop("g", None)
            idx["p"] = elsewhere
        kwargs: dict[str, Any] = {
            "index": idx,
            "x_pos": x,
            "y_pos": y,
            "z_pos": zs[i] if zs is not None else z,
            "metadata": {METADATA_KEY: {"action_id": action_id, "rule": rule, "frame": i}},
            **settings,
        }
        if interval > 0 and i > 0:  # from the first frame (EventFeed.inject)
            kwargs["min_start_time"] = i * interval
        events.append(useq.MDAEvent(**kwargs))
    return events


def _revisit_place(
    action: Revisit, ctx: FrameContext, planner: EventPlanner
) -> tuple[tuple[float | None, float | None, float | None], int | None]:
    """Where a revisit images, and the ``p`` of the position it images when that is not the
    triggering frame's own (None: its own).

    Its own position (a planned trigger): the trigger's place, its tile and plane, as it was
    imaged. Another position (or a trigger made by an action): that position's coordinates
    in the plan (its ``stage_positions`` entry); an axis the plan gives it none on: where
    its last planned frame issued was."""
    own = ctx.index.get("p")
    p = action.position if action.position is not None else own
    if p is None or int(p) not in planner.positions:
        raise ActionError(
            "unknown_position",
            f"cannot revisit position {p}: not a planned stage position seen so far",
        )
    if own is not None and int(p) == int(own) and not ctx.is_feedback:
        where = ctx.position
        return (where.get("x_um"), where.get("y_um"), where.get("z_um")), None
    planned = planner.plan_coordinates.get(int(p), (None, None, None))
    issued = planner.positions[int(p)]
    x, y, z = (a if a is not None else b for a, b in zip(planned, issued, strict=True))
    return (x, y, z), int(p)


def _camera_settings(
    action: _Frames, ctx: FrameContext, planner: EventPlanner | None = None
) -> dict[str, Any]:
    """``channel`` and ``exposure`` of an action's events: the action's, else the
    triggering frame's (its ``settings``), so that its frames are taken as the trigger was
    in every mode, not with whatever the planned frames run meanwhile left in effect; for
    another channel than the trigger's, the exposure the plan gives that channel (none
    where the plan gives it none: the action should give ``exposure_ms``)."""
    given = ctx.measurements.get("settings") if isinstance(ctx.measurements, Mapping) else None
    trigger = given if isinstance(given, Mapping) else {}
    out: dict[str, Any] = {}
    preset, group = trigger.get("channel"), trigger.get("channel_group")
    if action.channel is not None:
        out["channel"] = {"config": action.channel}
    elif isinstance(preset, str) and preset:
        out["channel"] = {"config": preset,
                          **({"group": group} if isinstance(group, str) and group else {})}
    exposure: Any = trigger.get("exposure_ms")
    other_channel = action.channel is not None and action.channel != preset
    if action.exposure_ms is not None:
        out["exposure"] = action.exposure_ms
    elif other_channel:  # (the trigger's exposure is its own channel's)
        planned = planner.channel_exposures.get(str(action.channel)) if planner else None
        if planned is not None:
            out["exposure"] = float(planned)
    elif positive_number(exposure):
        out["exposure"] = float(exposure)
    return out


def _check_move_back(ctx: FrameContext, **targets: float | None) -> None:
    """ActionError (``no_stage_position``) for a move along an axis the triggering frame
    has no position on: its planned events give none there, so pymmcore-plus would take every
    later planned frame at the moved-to place (as centring, a move needs the acquisition's
    stage positions)."""
    for axis, target in targets.items():
        if target is not None and ctx.position.get(f"{axis}_um") is None:
            raise ActionError(
                "no_stage_position",
                f"cannot move to {axis} = {target:g} µm: the triggering frame has no stage "
                f"{axis} position, so the acquisition's later frames would stay at the new "
                "place; give the acquisition stage positions (stage_positions or a grid plan, "
                "with a z for z moves)",
            )


def action_from_spec(spec: Mapping[str, Any], target_yx: tuple[float, float] | None) -> Any:
    """Build an action from one ``ActionSpec`` (as a dict of its single set field).

    ``target_yx`` is the centroid of the object the rule picked (None: no object).
    """
    (kind, params), = ((k, v) for k, v in spec.items() if v is not None and v is not False)
    p = dict(params) if isinstance(params, Mapping) else {}
    if kind == "burst":
        centre = p.pop("centre", True)
        if centre and target_yx is None:
            raise _no_target("burst with centre: true")
        return Burst(centre_yx=target_yx if centre else None, **p)
    if kind == "centre":
        if target_yx is None:
            raise _no_target("centre", "give the rule ")
        return Centre(centre_yx=target_yx, **p)
    if kind == "move":
        return MoveTo(**p)
    if kind == "zstack":
        centre = p.pop("centre", False)
        if centre and target_yx is None:
            raise _no_target("zstack with centre: true")
        return ZStack(centre_yx=target_yx if centre else None, **p)
    if kind == "channel":
        return SetChannel(**p)
    if kind == "revisit":
        return Revisit(**p)
    if kind == "skip":
        return SkipPosition(**p)
    if kind == "mode":
        return SetMode(mode=params)
    if kind == "stop":
        return Stop()
    raise ActionError("unknown_action", f"unknown action {kind!r}")  # pragma: no cover


@dataclass(frozen=True)
class SpecAction:
    """A declarative rule's action that could not be made (e.g. ``no_target``: nothing to
    centre on), as the rule gives it: what its refusal publishes as ``action``."""

    fields: dict[str, Any]

    @property
    def kind(self) -> str:
        """The action's kind (``burst``, ...)."""
        return str(self.fields["kind"])

    def describe(self) -> dict[str, Any]:
        """JSON-ready form: ``{"kind": ..., **the rule's fields}``."""
        return dict(self.fields)


def spec_action(spec: Mapping[str, Any]) -> SpecAction:
    """One ``ActionSpec`` (as a dict) as a :class:`SpecAction`: ``{"kind": ..., **its
    fields as the rule gives them}``."""
    (kind, params), = ((k, v) for k, v in spec.items() if v is not None and v is not False)
    if isinstance(params, Mapping):
        return SpecAction({"kind": kind, **params})
    return SpecAction({"kind": kind} if kind == "stop" else {"kind": kind, kind: params})


def _no_target(what: str, fix: str = "use centre: false, or ") -> ActionError:
    """The refusal of a centring action when no object was picked to centre on."""
    return ActionError(
        "no_target",
        f"{what}: no object on this frame to centre on (none matches the rule's "
        "`when.objects`, though its `match` holds, e.g. {lt: 3} with none; or the object "
        f"has no centroid); {fix}a `match` that needs an object",
    )


def event_json(event: useq.MDAEvent) -> dict[str, Any]:
    """An event as JSON for the ``event`` topic (without the runner's bookkeeping)."""
    data: dict[str, Any] = event.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    meta = dict(data.get("metadata") or {})
    meta.pop("runner_t0", None)
    if meta:
        data["metadata"] = meta
    else:
        data.pop("metadata", None)
    return data
