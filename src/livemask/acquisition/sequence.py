"""The events of a useq sequence, generated lazily for long time-lapses.

useq builds the product of a sequence's axes before its first event: every time point is
listed, about 140 MB and 0.6 s per million (useq-schema 0.9), held until the acquisition
ends, and ``MDASequence.sizes`` walks the time plan again to count it. A night-long
time-lapse, or ``loops: 1000000000`` for "until I stop it", would stall the start and take
the machine's memory. :func:`iter_events` gives the same events, in the same order, with the
same indices and start times, by iterating the sequence ``CHUNK_TIMEPOINTS`` time points at a
time when time is its outermost axis; :func:`event_count` counts without iterating.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, TypeVar

import useq
from pydantic import BaseModel

log = logging.getLogger("livemask")

#: Time points per chunk: about 1.4 MB of useq's lists, made in a few milliseconds.
CHUNK_TIMEPOINTS = 10_000
#: Above this many time points a sequence that cannot be chunked gets a warning.
LARGE_TIMEPOINTS = 1_000_000
#: Most events a sequence may plan per time point (z × positions × grid tiles × channels,
#: a position's own sub-sequence included): useq lists every axis before the first event.
MAX_EVENTS_PER_TIME_POINT = 1_000_000
_Model = TypeVar("_Model", bound=BaseModel)
_SINGLE_PHASE = (useq.TIntervalLoops, useq.TDurationLoops, useq.TIntervalDuration)
_TIME = useq.Axis.TIME


def validate_model(model: type[_Model], data: Any) -> _Model:
    """``model.model_validate(data)``, with a ``TypeError`` or ``OverflowError`` from a
    library's own before-validator (useq's ``timedelta(**interval)`` for an interval given
    as ``{a: 1}``) raised as a ``ValueError``: pydantic passes only ``ValueError`` on as a
    validation error, so a config file and a control request both name it."""
    try:
        return model.model_validate(data)
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"a value has the wrong type or size ({exc})") from None


def check_timing(seq: useq.MDASequence) -> None:
    """Raise ``ValueError`` for a time plan that runs backwards: useq accepts a negative
    ``interval`` or ``duration`` (the events then come as fast as the camera goes)."""
    plan = seq.time_plan
    if plan is None:
        return
    phases = plan.phases if isinstance(plan, useq.MultiPhaseTimePlan) else [plan]
    for phase in phases:
        for name in ("interval", "duration"):
            if name not in type(phase).model_fields:  # a property, derived from the fields
                continue
            seconds = getattr(phase, name).total_seconds()
            if seconds < 0:
                raise ValueError(f"time_plan {name} must be >= 0 s, got {seconds:g} s")


def check_sequence(seq: useq.MDASequence, data: Any, what: str = "sequence") -> None:
    """The checks a sequence from a config or a client gets: :func:`check_input` on the
    ``data`` it was validated from, :func:`check_timing`, :func:`check_size` and no
    ``setup`` event; ``ValueError`` naming what."""
    check_input(seq, data, what)
    check_timing(seq)
    check_size(seq, what, fov_needed=False)
    if seq.setup is not None:  # pymmcore-plus runs it only for a whole MDASequence
        raise ValueError(
            f"{what}.setup is not run by livemask (the service feeds pymmcore-plus its "
            "events one by one); put its settings on the sequence's channels, or enqueue "
            "them as an event first"
        )


def check_input(model: BaseModel, data: Any, what: str) -> None:
    """Raise ``ValueError`` naming fields of ``data`` that the validated ``model`` ignored, or
    numbers that are not finite.

    useq ignores unknown keys, so a typo (``time_pan``, ``xpos``) would silently run another
    acquisition than the one asked for; and it accepts NaN or infinite stage positions."""
    try:
        problems = [*_unknown_fields(model, data, what), *_non_finite(model, what)]
    except RecursionError:
        raise ValueError(f"{what} nests too deeply to check") from None
    if problems:
        raise ValueError("; ".join(problems))


#: Keys useq's before-validators rename (deprecated spellings it still takes).
_RENAMED_KEYS: dict[type[Any], frozenset[str]] = {useq.Position: frozenset({"row", "col"})}


def _unknown_fields(model: Any, data: Any, where: str) -> list[str]:
    if isinstance(model, (list, tuple)) and isinstance(data, (list, tuple)):
        if len(model) != len(data):
            return []
        return [p for i, (m, d) in enumerate(zip(model, data, strict=True))
                for p in _unknown_fields(m, d, f"{where}[{i}]")]
    if isinstance(model, useq.MultiPhaseTimePlan) and isinstance(data, (list, tuple)):
        return _unknown_fields(list(model.phases), data, where)  # phases given as a list
    if not isinstance(model, BaseModel) or not isinstance(data, dict):
        return []
    fields = type(model).model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    for cls, renamed in _RENAMED_KEYS.items():
        if isinstance(model, cls):
            known |= renamed
    problems = [
        f"{where}.{key}: unknown field (known: {', '.join(sorted(fields))})"
        for key in data if key not in known
    ]
    for name, field in fields.items():
        key = name if name in data else field.alias
        if key in data:
            problems += _unknown_fields(getattr(model, name), data[key], f"{where}.{key}")
    return problems


def _non_finite(model: Any, where: str) -> list[str]:
    """Non-finite floats in a validated model: given as numbers, or as strings pydantic
    turns into floats ("NaN", "-inf")."""
    if isinstance(model, float) and not math.isfinite(model):
        return [f"{where}: {model} is not a finite number"]
    if isinstance(model, BaseModel):
        return [p for name in type(model).model_fields
                for p in _non_finite(getattr(model, name), f"{where}.{name}")]
    if isinstance(model, dict):
        return [p for k, v in model.items() for p in _non_finite(v, f"{where}.{k}")]
    if isinstance(model, (list, tuple)):
        return [p for i, v in enumerate(model) for p in _non_finite(v, f"{where}[{i}]")]
    return []


def time_points(seq: useq.MDASequence) -> int:
    """Time points of ``seq``'s time plan (0 without one), from the plan, not by iterating."""
    return int(seq.time_plan.num_timepoints()) if seq.time_plan is not None else 0


#: What a plan whose size overflows counts as (more than any cap).
_HUGE = 2**63


def _z_size(plan: Any) -> int:
    """Positions of a z plan (0 without one), as useq iterates it, from its range and step
    (useq's own ``num_positions``; the list itself only where it is small)."""
    if plan is None:
        return 0
    try:
        n = max(int(plan.num_positions()), 0)
    except (OverflowError, ValueError, ZeroDivisionError):
        return _HUGE
    return len(plan.positions()) if n <= MAX_EVENTS_PER_TIME_POINT else n


def _grid_size(plan: Any, *, fov_needed: bool = True) -> int:
    """Tiles of a grid plan (0 without one), as useq iterates it (a missing field of view
    counts as 1 µm, as useq takes it), from its rows and columns or its extent and field.

    With ``fov_needed=False`` a plan whose tiles depend on a field of view it does not give
    counts as 1: the camera's field is filled in at the start (:func:`with_field_of_view`).
    A polygon counts as the tiles of its bounding box where that is large."""
    if plan is None:
        return 0
    if isinstance(plan, useq.GridRowsColumns):
        return int(plan.rows) * int(plan.columns)
    if plan.fov_width is None or plan.fov_height is None:
        if not fov_needed:
            return 1
        if isinstance(plan, useq.GridFromPolygon):  # useq iterates it with a 1 µm field
            plan = plan.model_copy(update={"fov_width": plan.fov_width or 1.0,
                                           "fov_height": plan.fov_height or 1.0})
    try:
        dx, dy = plan._step_size(plan.fov_width or 1.0, plan.fov_height or 1.0)
        n = int(plan._nrows(dy)) * int(plan._ncolumns(dx))
    except (OverflowError, ValueError, ZeroDivisionError):
        return _HUGE
    if isinstance(plan, useq.GridFromPolygon) and n <= MAX_EVENTS_PER_TIME_POINT:
        return len(list(plan))
    return n


def _other_sizes(seq: useq.MDASequence) -> dict[str, int]:
    """Sizes of the axes other than time, as ``seq.sizes`` has them, counted from the plans
    (useq lists every z position and grid tile to count them)."""
    sizes = {
        str(useq.Axis.POSITION): len(seq.stage_positions),
        str(useq.Axis.GRID): _grid_size(seq.grid_plan),
        str(useq.Axis.CHANNEL): len(seq.channels),
        str(useq.Axis.Z): _z_size(seq.z_plan),
    }
    return {axis: n for axis, n in sizes.items() if n}


def _sizes_per_time_point(
    seq: useq.MDASequence, where: str, fov_needed: bool
) -> tuple[int, list[tuple[str, int]]]:
    """Events of one time point of ``seq`` (an upper bound where positions carry
    sub-sequences: their events times the parent's), and the sizes of the plans that make
    them, named by field."""
    parts = [
        (f"{where}z_plan", _z_size(seq.z_plan)),
        (f"{where}grid_plan", _grid_size(seq.grid_plan, fov_needed=fov_needed)),
        (f"{where}channels", len(seq.channels)),
    ]
    base = math.prod(max(n, 1) for _, n in parts)
    positions = seq.stage_positions
    if not positions:
        return base, parts
    parts.append((f"{where}stage_positions", len(positions)))
    total = 0
    for i, position in enumerate(positions):
        sub = position.sequence
        if sub is None:
            total += base
            continue
        n, sub_parts = _sizes_per_time_point(
            sub, f"{where}stage_positions[{i}].sequence.", fov_needed)
        t = (f"{where}stage_positions[{i}].sequence.time_plan", time_points(sub))
        parts += [*sub_parts, t]
        total += base * n * max(t[1], 1)
    return total, parts


def check_size(seq: useq.MDASequence, what: str = "sequence", *, fov_needed: bool = True) -> None:
    """Raise ``ValueError`` naming the plan to change when ``seq`` plans more than
    ``MAX_EVENTS_PER_TIME_POINT`` events per time point, counted from its plans.

    ``fov_needed=False`` (before the camera's field of view is known) leaves out grids
    sized by a field of view they do not give."""
    n, parts = _sizes_per_time_point(seq, f"{what}.", fov_needed)
    if n <= MAX_EVENTS_PER_TIME_POINT:
        return
    field, _ = max(parts, key=lambda part: part[1])
    named = [f"{name} {k:,}" for name, k in parts if k > 1]
    sizes = ", ".join(named[:6]) + (f", … {len(named) - 6} more" if len(named) > 6 else "")
    raise ValueError(
        f"{what} plans {n:,} events per time point ({sizes}); at most "
        f"{MAX_EVENTS_PER_TIME_POINT:,} are allowed: change {field} "
        f"({_SHRINK[field.rsplit('.', 1)[-1]]})"
    )


#: How to make each plan smaller, for :func:`check_size`'s message.
_SHRINK = {
    "z_plan": "a larger step or a smaller range",
    "grid_plan": "fewer rows and columns, a smaller area or a larger fov_width/fov_height",
    "channels": "fewer channels",
    "stage_positions": "fewer positions",
    "time_plan": "fewer time points",
}


def event_count(seq: useq.MDASequence) -> int:
    """Events ``seq`` plans: the product of its axis sizes, counted from the plans.

    Like ``math.prod(seq.sizes.values())`` without walking the time plan. More than run
    where useq skips events (e.g. z stacks only every n-th time point), fewer where
    positions carry sub-sequences (grids) or hardware autofocus adds events."""
    others = _other_sizes(seq)
    t = time_points(seq)
    if not t and not others:
        return 0
    return max(t, 1) * math.prod(others.values())


def _chunkable(seq: useq.MDASequence) -> bool:
    """Whether chunks of time points give the same events: one time phase, time outermost,
    and no position with a time plan of its own."""
    if not isinstance(seq.time_plan, _SINGLE_PHASE):
        return False
    others = _other_sizes(seq)
    used = [str(axis) for axis in seq.axis_order if axis == _TIME or str(axis) in others]
    if used[0] != _TIME:
        return False
    return all(p.sequence is None or p.sequence.time_plan is None for p in seq.stage_positions)


def _chunk_size(seq: useq.MDASequence, chunk: int) -> int:
    """``chunk`` rounded down to a multiple of every channel's ``acquire_every`` (at least
    their least common multiple): useq skips a channel by the time index *within* the
    iteration, so a chunk must start where ``t % acquire_every`` is 0 for all of them."""
    every = math.lcm(*(int(c.acquire_every) for c in sequence_channels(seq)))
    size = max(chunk // every, 1) * every
    if size > chunk:
        log.warning(
            "the channels' acquire_every values (least common multiple %d) make each chunk "
            "of the time-lapse %d time points instead of %d; give them a small common "
            "multiple", every, size, chunk,
        )
    return size


def with_field_of_view(
    seq: useq.MDASequence, field: tuple[float, float] | None, what: str = "sequence"
) -> useq.MDASequence:
    """``seq`` with ``field`` (width, height in µm) as the ``fov_width``/``fov_height`` of its
    grid plans and its positions' sub-sequences' that do not give them (given values are
    kept); ``ValueError`` naming both ways out where a grid needs it and ``field`` is None."""
    grid = seq.grid_plan
    update: dict[str, Any] = {}
    if grid is not None and (grid.fov_width is None or grid.fov_height is None):
        if field is None:
            raise ValueError(
                f"{what}.grid_plan has no fov_width/fov_height and the camera's field of "
                "view is unknown (the core has no pixel size): give the grid_plan fov_width "
                "and fov_height in µm, or calibrate the pixel size (PixelSize_um in "
                "hardware.config_file)"
            )
        update["grid_plan"] = grid.model_copy(update={
            "fov_width": field[0] if grid.fov_width is None else grid.fov_width,
            "fov_height": field[1] if grid.fov_height is None else grid.fov_height,
        })
    positions = list(seq.stage_positions)
    for i, position in enumerate(positions):
        if position.sequence is not None:
            sub = with_field_of_view(
                position.sequence, field, f"{what}.stage_positions[{i}].sequence")
            if sub is not position.sequence:
                positions[i] = position.model_copy(update={"sequence": sub})
                update["stage_positions"] = positions
    return seq.replace(**update) if update else seq  # (a new uid: useq caches by it)


def iter_events(
    seq: useq.MDASequence, chunk: int = CHUNK_TIMEPOINTS
) -> Iterator[useq.MDAEvent]:
    """The events of ``seq`` (as ``iter(seq)``), about ``chunk`` time points at a time when
    the time plan is longer than that and time is the outermost axis.

    Grid plans without a field of view count with useq's 1 µm: fill it in first
    (:func:`with_field_of_view`, as the service does). ``ValueError`` for more than
    ``MAX_EVENTS_PER_TIME_POINT`` events per time point (:func:`check_size`), raised here,
    before the first event is asked for."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 time point, got {chunk}")
    check_size(seq)
    n = time_points(seq)
    chunk = _chunk_size(seq, chunk) if n > chunk else chunk
    if n <= chunk or not _chunkable(seq):
        if n > LARGE_TIMEPOINTS:
            log.warning(
                "the sequence has %d time points and time is not its outermost axis (or it "
                "has several time phases): useq lists them all first, about %.0f MB; put "
                "'t' first in axis_order to run it in chunks", n, 140 * n / 1e6,
            )
        return iter(seq)
    return _keep_shutter_across_chunks(seq, _chunked(seq, n, chunk))


def _chunked(
    seq: useq.MDASequence, n: int, chunk: int
) -> Iterator[tuple[bool, useq.MDAEvent]]:
    """(first event of a chunk?, event) for the chunks of ``seq``, renumbered as ``seq``'s."""
    plan = seq.time_plan
    assert isinstance(plan, _SINGLE_PHASE)
    interval = plan.interval
    for start in range(0, n, chunk):
        part = seq.replace(
            time_plan=useq.TIntervalLoops(interval=interval, loops=min(chunk, n - start))
        )
        offset = start * interval  # timedelta arithmetic, exact in microseconds as useq's
        for i, event in enumerate(part):
            update: dict[str, object] = {"sequence": seq}
            if start:
                index = dict(event.index)
                if _TIME in index:
                    index[_TIME] += start
                update["index"] = type(event.index)(index)
                update["reset_event_timer"] = False  # the run's clock goes on across chunks
                if event.min_start_time is not None:
                    update["min_start_time"] = (
                        timedelta(seconds=event.min_start_time) + offset
                    ).total_seconds()
            yield i == 0, event.model_copy(update=update)


def _keep_shutter_across_chunks(
    seq: useq.MDASequence, events: Iterator[tuple[bool, useq.MDAEvent]]
) -> Iterator[useq.MDAEvent]:
    """Set ``keep_shutter_open`` on each chunk's last event as useq would have, had the
    next chunk's first event been in the same iteration."""
    axes = {str(a) for a in seq.keep_shutter_open_across}
    held: useq.MDAEvent | None = None
    for first, event in events:
        if held is not None:
            if first and axes and all(
                str(axis) in axes
                for axis, idx in held.index.items()
                if idx != event.index.get(axis)
            ):
                held = held.model_copy(update={"keep_shutter_open": True})
            yield held
        held = event
    if held is not None:
        yield held


def sequence_channels(seq: useq.MDASequence) -> list[useq.Channel]:
    """The channels of ``seq`` and of its positions' sub-sequences."""
    channels: list[useq.Channel] = list(seq.channels)
    for position in seq.stage_positions:
        if position.sequence is not None:
            channels += sequence_channels(position.sequence)
    return channels
