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
    ``data`` it was validated from, :func:`check_timing`, and no ``setup`` event;
    ``ValueError`` naming what."""
    check_input(seq, data, what)
    check_timing(seq)
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


def _other_sizes(seq: useq.MDASequence) -> dict[str, int]:
    """Sizes of the axes other than time (these useq counts quickly)."""
    sizes = seq.replace(time_plan=None).sizes
    return {str(axis): n for axis, n in sizes.items() if n and axis != _TIME}


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


def iter_events(
    seq: useq.MDASequence, chunk: int = CHUNK_TIMEPOINTS
) -> Iterator[useq.MDAEvent]:
    """The events of ``seq`` (as ``iter(seq)``), ``chunk`` time points at a time when the
    time plan is longer than that and time is the outermost axis."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 time point, got {chunk}")
    n = time_points(seq)
    if n <= chunk or not _chunkable(seq):
        if n > LARGE_TIMEPOINTS:
            log.warning(
                "the sequence has %d time points and time is not its outermost axis (or it "
                "has several time phases): useq lists them all first, about %.0f MB; put "
                "'t' first in axis_order to run it in chunks", n, 140 * n / 1e6,
            )
        yield from seq
        return
    yield from _keep_shutter_across_chunks(seq, _chunked(seq, n, chunk))


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
