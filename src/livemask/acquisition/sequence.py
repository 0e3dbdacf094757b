"""The events of a useq sequence, generated lazily for long time-lapses.

useq builds the product of a sequence's axes before its first event: every time point is
listed, about 140 MB and 0.6 s per million (useq-schema 0.9), held until the acquisition
ends, and ``MDASequence.sizes`` walks the time plan again to count it. A night-long
time-lapse, or ``loops: 1000000000`` for "until I stop it", would stall the start and take
the machine's memory. :func:`iter_events` gives the same events, in the same order, with the
same indices and start times, by iterating the sequence ``CHUNK_TIMEPOINTS`` time points at a
time when time is its outermost axis; :func:`event_count` counts without iterating.

useq also memoises each sequence's axes (every time point of it) in ``functools.cache``s keyed
by the sequence, for the life of the process, and a sequence hashes by a uid of its own: every
acquisition's sequence (and every chunk's) would stay there. :func:`iter_events` reuses one
sequence for its full chunks and empties those caches once it has iterated a sequence
(:func:`release_iteration_caches`).
"""

from __future__ import annotations

import importlib
import itertools
import logging
import math
import secrets
from collections.abc import Generator, Iterator
from datetime import timedelta
from typing import Any

import useq
from pydantic import PrivateAttr

from livemask.acquisition.plan_input import check_input, check_types

log = logging.getLogger("livemask")

#: Time points per chunk: about 1.4 MB of useq's lists, made in a few milliseconds.
CHUNK_TIMEPOINTS = 10_000
#: Above this many time points a sequence that cannot be chunked gets a warning.
LARGE_TIMEPOINTS = 1_000_000
#: Most events a sequence may plan per time point (z × positions × grid tiles × channels,
#: a position's own sub-sequence included): useq lists every axis before the first event.
MAX_EVENTS_PER_TIME_POINT = 1_000_000
_SINGLE_PHASE = (useq.TIntervalLoops, useq.TDurationLoops, useq.TIntervalDuration)
_TIME = useq.Axis.TIME


def check_timing(seq: useq.MDASequence, what: str = "") -> None:
    """Raise ``ValueError`` for a time plan that runs backwards (useq accepts a negative
    ``interval`` or ``duration``: the events then come as fast as the camera goes), or a
    ``duration`` with an ``interval`` of 0 (useq divides the one by the other). Positions'
    own sequences are checked too."""
    plan = seq.time_plan
    phases = [] if plan is None else (
        plan.phases if isinstance(plan, useq.MultiPhaseTimePlan) else [plan])
    for phase in phases:
        fields = type(phase).model_fields  # (a property is derived from the fields)
        for name in ("interval", "duration"):
            if name in fields and getattr(phase, name).total_seconds() < 0:
                seconds = getattr(phase, name).total_seconds()
                raise ValueError(f"{what}time_plan {name} must be >= 0 s, got {seconds:g} s")
        if ("interval" in fields and "duration" in fields
                and phase.interval.total_seconds() == 0):
            raise ValueError(
                f"{what}time_plan interval must be > 0 s with a duration (the time points are "
                "the duration divided by the interval); for frames as fast as the camera "
                "goes, give loops (the number of time points) with interval 0 instead")
        if "duration" in fields and "loops" in fields and phase.loops < 2:
            raise ValueError(
                f"{what}time_plan loops must be >= 2 with a duration (the time points span "
                "the duration: interval = duration / (loops - 1)); for one time point give "
                "loops: 1 without a duration")
    for i, position in enumerate(seq.stage_positions):
        if position.sequence is not None:
            check_timing(position.sequence, f"{what}stage_positions[{i}].sequence.")


def check_z_plans(seq: useq.MDASequence, what: str = "sequence") -> None:
    """Raise ``ValueError`` for a z plan that plans other planes than its range asks for,
    naming what to change: useq takes a step of 0 over a range as one plane, and plans no
    planes (no events at all) where the step goes away from the range's end (a top below
    the bottom, a negative range, a negative step from the bottom up) or a list of
    positions is empty. A negative step from the top down plans its planes and is kept.
    Positions' own sequences are checked too."""
    problem = _z_plan_problem(seq.z_plan)
    if problem is not None:
        raise ValueError(f"{what}.z_plan: {problem}")
    for i, position in enumerate(seq.stage_positions):
        if position.sequence is not None:
            check_z_plans(position.sequence, f"{what}.stage_positions[{i}].sequence")


#: How each z plan from a range and a step plans a single plane.
_ONE_PLANE: dict[type[Any], str] = {
    useq.ZTopBottom: "top equal to bottom",
    useq.ZRangeAround: "range: 0",
    useq.ZAboveBelow: "above: 0 and below: 0",
}


def _z_plan_problem(plan: Any) -> str | None:
    """What makes a z plan plan no planes, or one plane over a range, or None."""
    if isinstance(plan, useq.ZAbsolutePositions | useq.ZRelativePositions):
        field = "absolute" if isinstance(plan, useq.ZAbsolutePositions) else "relative"
        if not plan.positions():
            return (f"{field} is empty, so it plans no planes (and no events); give at least "
                    "one z position in µm, or no z_plan")
        return None
    if not isinstance(plan, useq.ZTopBottom | useq.ZRangeAround | useq.ZAboveBelow):
        return None
    if plan.step == 0:
        if _z_extent(plan) == 0:  # one plane, as asked
            return None
        return ("step must be > 0 µm, got 0 (useq takes it as one plane); give a step > 0 "
                f"(for a single plane: {_ONE_PLANE[type(plan)]}, or no z_plan)")
    if _z_size(plan) > 0:  # (a negative step from the top down plans its planes)
        return None
    if plan.step < 0:
        return (f"step must be > 0 µm, got {plan.step:g}, so it plans no planes; give a "
                "step > 0 (go_up: false images from the top down)")
    if isinstance(plan, useq.ZTopBottom) and plan.top < plan.bottom:
        return (f"top ({plan.top:g} µm) is below bottom ({plan.bottom:g} µm), so it plans no "
                "planes; swap top and bottom (go_up: false images from the top down)")
    if isinstance(plan, useq.ZRangeAround) and plan.range < 0:
        return f"range must be >= 0 µm, got {plan.range:g} (no planes); give a range >= 0"
    return "it plans no planes; give a step > 0 and a range that holds one"


def _z_extent(plan: useq.ZTopBottom | useq.ZRangeAround | useq.ZAboveBelow) -> float:
    """The distance a z plan from a range and a step spans, in µm."""
    if isinstance(plan, useq.ZTopBottom):
        return abs(plan.top - plan.bottom)
    if isinstance(plan, useq.ZRangeAround):
        return abs(plan.range)
    return abs(plan.above) + abs(plan.below)


#: The field of each letter of ``axis_order``: useq iterates only the axes it names.
_AXIS_FIELDS = (("t", "time_plan"), ("p", "stage_positions"), ("g", "grid_plan"),
                ("c", "channels"), ("z", "z_plan"))


def check_axis_order(seq: useq.MDASequence, what: str = "sequence") -> None:
    """Raise ``ValueError`` for a plan whose axis letter ``axis_order`` leaves out (useq
    silently skips it: ``axis_order: pcz`` with a time plan runs one time point), naming
    both ways out. Positions' own sequences are checked too."""
    order = "".join(str(axis) for axis in seq.axis_order)
    for axis, field in _AXIS_FIELDS:
        value = getattr(seq, field)
        is_set = bool(value) if field in ("channels", "stage_positions") else value is not None
        if is_set and axis not in order:
            raise ValueError(
                f"{what}.axis_order: '{order}' leaves out '{axis}', so {field} would be "
                f"ignored; add '{axis}' to axis_order or remove {field}")
    for i, position in enumerate(seq.stage_positions):
        if position.sequence is not None:
            check_axis_order(position.sequence, f"{what}.stage_positions[{i}].sequence")


def check_sequence(
    seq: useq.MDASequence, data: Any, what: str = "sequence", *, events: bool = True
) -> None:
    """The checks a sequence from a config or a client gets: :func:`check_input` and
    :func:`check_types` on the ``data`` it was validated from, :func:`check_axis_order`,
    :func:`check_timing`, :func:`check_z_plans`, :func:`check_size`, no ``setup``
    event and (``events``) some events planned (:func:`check_plans_events`: a config's
    sequence gets that where it runs, since ``serve --frames`` adds its time plan later);
    ``ValueError`` naming what."""
    check_input(seq, data, what)
    check_types(seq, data, what)
    check_axis_order(seq, what)
    check_timing(seq)
    check_z_plans(seq, what)
    check_size(seq, what, fov_needed=False)
    if seq.setup is not None:  # pymmcore-plus runs it only for a whole MDASequence
        raise ValueError(
            f"{what}.setup is not run by livemask (the service feeds pymmcore-plus its "
            "events one by one); put its settings on the sequence's channels, or enqueue "
            "them as an event first"
        )
    if events:
        check_plans_events(seq, what)


def check_plans_events(seq: useq.MDASequence, what: str) -> None:
    """``ValueError`` for a sequence with no plan that makes events (useq runs none: the
    acquisition would end at once, as if it had run). Each plan makes at least one event
    (an empty z plan is refused before)."""
    plans = (seq.time_plan, seq.grid_plan, seq.z_plan)
    if seq.stage_positions or seq.channels or any(p is not None for p in plans):
        return
    raise ValueError(
        f"{what} plans no events (no time_plan, stage_positions, grid_plan, channels or "
        "z_plan), so the acquisition would end at once; give at least one, e.g. "
        "time_plan: {interval: 1, loops: 10}"
    )


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
    A polygon counts as the tiles of its bounding box where that is large; random points
    as their number, a single RelativePosition as 1, any other plan as useq lists it."""
    if plan is None:
        return 0
    if isinstance(plan, useq.GridRowsColumns):
        return int(plan.rows) * int(plan.columns)
    if isinstance(plan, useq.RandomPoints | useq.RelativePosition):
        return int(plan.num_positions())
    if not isinstance(plan, useq.GridFromEdges | useq.GridWidthHeight | useq.GridFromPolygon):
        return sum(1 for _ in itertools.islice(plan, MAX_EVENTS_PER_TIME_POINT + 1))
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
    """Events ``seq`` plans, counted from the plans without walking the time plan: every
    time point's tiles, channels and planes, those of positions' own sub-sequences too.

    More than run where useq skips events (a channel's ``acquire_every`` or
    ``do_stack: false``), fewer where hardware autofocus adds events."""
    t = time_points(seq)
    if not t and not _other_sizes(seq):
        return 0
    return max(t, 1) * _events_per_time_point(seq)


def _events_per_time_point(seq: useq.MDASequence) -> int:
    """Events of one time point of ``seq`` as useq iterates them: a position with a
    sub-sequence takes the events of its sub-sequence (time points too) once for each of
    the parent's tiles, channels and planes that useq keeps for it (its ``_should_skip``:
    only the first of an axis the sub-sequence plans itself)."""
    grid, channels, planes = _grid_size(seq.grid_plan), len(seq.channels), _z_size(seq.z_plan)
    base = max(grid, 1) * max(channels, 1) * max(planes, 1)
    if all(p.sequence is None for p in seq.stage_positions):
        return base * max(len(seq.stage_positions), 1)
    total = 0
    for position in seq.stage_positions:
        sub = position.sequence
        if sub is None:
            total += base
            continue
        if sub.autofocus_plan is None:  # (useq keeps every parent event for one with one)
            plans = any(p is not None for p in (sub.grid_plan, sub.z_plan, sub.time_plan))
            channels_kept = 1 if not plans or sub.channels else channels
            grid_kept = 1 if sub.grid_plan is not None else grid
            planes_kept = 1 if sub.z_plan is not None else planes
        else:
            grid_kept, channels_kept, planes_kept = grid, channels, planes
        outer = max(grid_kept, 1) * max(channels_kept, 1) * max(planes_kept, 1)
        has_axes = (sub.time_plan is not None or sub.stage_positions or sub.z_plan is not None
                    or sub.channels or sub.grid_plan is not None)
        inner = _events_per_time_point(sub) * max(time_points(sub), 1) if has_axes else 1
        total += outer * inner
    return total


def _chunkable(seq: useq.MDASequence) -> bool:
    """Whether chunks of time points give the same events: one time phase, time outermost,
    and no position with a time plan of its own."""
    if not isinstance(seq.time_plan, _SINGLE_PHASE):
        return False
    others = _other_sizes(seq)
    used = [str(axis) for axis in seq.axis_order if axis == _TIME or str(axis) in others]
    if not used or used[0] != _TIME:  # (no 't' in axis_order: useq runs no time plan)
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
        if field is None and _sized_by_field(grid):
            raise ValueError(
                f"{what}.grid_plan has no fov_width/fov_height and the camera's field of "
                "view is unknown (the core has no pixel size): give the grid_plan fov_width "
                "and fov_height in µm, or calibrate the pixel size (PixelSize_um in "
                "hardware.config_file)"
            )
        if field is not None:
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


def _sized_by_field(plan: Any) -> bool:
    """Whether the positions of a grid plan depend on its field of view: not those of a
    single RelativePosition, nor random points that may overlap."""
    if isinstance(plan, useq.RandomPoints):
        return not plan.allow_overlap
    return not isinstance(plan, useq.RelativePosition)


def iter_events(
    seq: useq.MDASequence, chunk: int = CHUNK_TIMEPOINTS
) -> Generator[useq.MDAEvent, None, None]:
    """The events of ``seq`` (as ``iter(seq)``), about ``chunk`` time points at a time when
    the time plan is longer than that and time is the outermost axis.

    Grid plans without a field of view count with useq's 1 µm: fill it in first
    (:func:`with_field_of_view`, as the service does). ``ValueError`` for more than
    ``MAX_EVENTS_PER_TIME_POINT`` events per time point (:func:`check_size`), raised here,
    before the first event is asked for. Once all are taken, or the generator is closed or
    dropped, useq's iteration caches are emptied (:func:`release_iteration_caches`)."""
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
        return _releasing(iter(seq))
    return _releasing(_keep_shutter_across_chunks(seq, _chunked(seq, n, chunk)))


#: useq's memos of the sequences it iterates (``functools.cache`` in useq-schema 0.9).
_USEQ_CACHED = ("_iter_axis", "_sizes", "_used_axes")


def release_iteration_caches() -> None:
    """Empty useq's memos of the axes of the sequences it has iterated.

    useq keeps every time point of each sequence it iterates, keyed by the sequence (a new
    uid for each), until the process ends: about 0.4 MB per 10,000. While a sequence is
    being iterated, emptying them only costs recomputation (useq takes its axes before the
    first event; a position's own sequence is looked up again), except for random points
    without a seed or with ``order: random`` in a position's own sequence, which useq would
    draw anew: the chunked path draws them once (:func:`_random_points_fixed`), and the
    service empties the memos only when its one acquisition has ended. Does nothing (logs
    at debug) where useq has no such caches."""
    try:
        module = importlib.import_module("useq._iter_sequence")
    except ImportError:
        log.debug("useq._iter_sequence is gone: no iteration caches to empty")
        return
    for name in _USEQ_CACHED:
        clear = getattr(getattr(module, name, None), "cache_clear", None)
        if callable(clear):
            clear()
        else:
            log.debug("useq._iter_sequence.%s has no cache_clear: not emptied", name)


def _releasing(events: Iterator[useq.MDAEvent]) -> Generator[useq.MDAEvent, None, None]:
    """``events``, then useq's iteration caches emptied: once they are all taken, or the
    iteration is closed or dropped (a stopped acquisition)."""
    try:
        yield from events
    finally:
        release_iteration_caches()


def _chunked(
    seq: useq.MDASequence, n: int, chunk: int
) -> Iterator[tuple[bool, useq.MDAEvent]]:
    """(first event of a chunk?, event) for the chunks of ``seq``, renumbered as ``seq``'s.

    One sequence serves every full chunk (and one the shorter last): each new one would be
    validated, and kept in useq's caches, which are emptied after each chunk."""
    plan = seq.time_plan
    assert isinstance(plan, _SINGLE_PHASE)
    interval = plan.interval
    fixed = _random_points_fixed(seq)
    full: useq.MDASequence | None = None
    for start in range(0, n, chunk):
        if n - start < chunk:
            part = _with_loops(fixed, interval, n - start)
        else:
            part = full = _with_loops(fixed, interval, chunk) if full is None else full
        offset = start * interval  # timedelta arithmetic, exact in microseconds as useq's
        yield from _renumbered(seq, part, start, offset)
        release_iteration_caches()  # (an endless time-lapse: one chunk's axes at a time)


def _with_loops(seq: useq.MDASequence, interval: timedelta, loops: int) -> useq.MDASequence:
    """``seq`` with a time plan of ``loops`` time points ``interval`` apart."""
    return seq.replace(time_plan=useq.TIntervalLoops(interval=interval, loops=loops))


def _renumbered(
    seq: useq.MDASequence, part: useq.MDASequence, start: int, offset: timedelta
) -> Iterator[tuple[bool, useq.MDAEvent]]:
    """(first event?, event) of the chunk ``part`` from time point ``start`` (``offset``
    after the first), as ``seq``'s events."""
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


def _random_points_fixed(seq: useq.MDASequence) -> useq.MDASequence:
    """``seq`` with its random-points grid plans (its own, and its positions' sequences')
    drawn once for every chunk (:func:`_points_drawn_once`). A changed position's sequence
    gets a new uid: useq's memos take sequences equal in their fields as one."""
    update: dict[str, Any] = {}
    plan = _points_drawn_once(seq.grid_plan)
    if plan is not seq.grid_plan:
        update["grid_plan"] = plan
    positions = [
        p.model_copy(update={"sequence": _random_points_fixed(p.sequence)})
        if p.sequence is not None else p
        for p in seq.stage_positions
    ]
    if any(a.sequence is not b.sequence
           for a, b in zip(positions, seq.stage_positions, strict=True)):
        update["stage_positions"] = positions
    return seq.replace(**update) if update else seq


def _points_drawn_once(plan: Any) -> Any:
    """``plan`` as every chunk must iterate it, where it is random points: with a seed
    drawn now where it has none (useq draws the points on each pass), and with
    ``order: random`` in the order of one pass of useq's, kept (useq shuffles them again,
    unseeded, on each pass). Any other plan as it is."""
    if not isinstance(plan, useq.RandomPoints):
        return plan
    if plan.random_seed is None:
        plan = plan.model_copy(update={"random_seed": secrets.randbits(32)})
    if plan.order != useq.TraversalOrder.RANDOM or isinstance(plan, _PointsInFixedOrder):
        return plan
    fixed = _PointsInFixedOrder.model_construct(
        _fields_set=plan.model_fields_set,
        **{name: getattr(plan, name) for name in type(plan).model_fields})
    fixed._points = tuple((p.x, p.y) for p in plan)  # (one pass: useq's own order)
    return fixed


class _PointsInFixedOrder(useq.RandomPoints):
    """Random points that give the same points in the same order on every pass (the
    fields are the plan's, ``order: random`` included: this is what it drew once)."""

    _points: tuple[tuple[float, float], ...] = PrivateAttr(default=())

    def __iter__(self) -> Iterator[useq.RelativePosition]:  # type: ignore[override]
        if not self._points:  # (a copy useq re-validated, e.g. ``replace``: useq's own draw)
            yield from super().__iter__()
            return
        for i, (x, y) in enumerate(self._points):
            yield useq.RelativePosition(x=x, y=y, name=f"{i:04d}")  # (as useq names them)


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
