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

import copy
import difflib
import functools
import itertools
import logging
import math
import re
from collections.abc import Iterator
from datetime import timedelta
from types import UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import useq
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

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
    validation error, so a config file and a control request both name it.

    Where a value fits none of a union's models (useq's time, z and grid plans), pydantic
    reports every model's errors; the ``ValidationError`` raised here keeps those of the
    model the given keys ask for, or names the keys no model of the union knows."""
    try:
        return model.model_validate(_copied(data))
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"a value has the wrong type or size ({exc})") from None
    except ValidationError as exc:
        raise _union_errors_explained(exc, model, data) from None


def _copied(data: Any) -> Any:
    """A deep copy of plain ``data``: useq's before-validators rename keys in the dicts they
    are given (a grid_plan's ``row`` becomes ``grid_row``), and :func:`check_input` must
    see the keys as written."""
    if not isinstance(data, dict | list | tuple):
        return data
    try:
        return copy.deepcopy(data)
    except RecursionError:  # (check_input says it nests too deeply)
        return data


def _union_errors_explained(
    exc: ValidationError, model: type[BaseModel], data: Any
) -> ValidationError:
    """``exc`` with the errors of stage positions indexed (:func:`_positions_indexed`) and
    those of each failed union cut down (:func:`_prune_union_errors`)."""
    errors = exc.errors()
    names = _model_names(model)
    kept = _prune_union_errors(_positions_indexed(errors, data, names), data, names)
    if kept == errors:
        return exc
    return ValidationError.from_exception_data(exc.title, [
        {"type": e["type"] if isinstance(e["type"], PydanticCustomError)
         else PydanticCustomError(e["type"], e["msg"]),
         "loc": e["loc"], "input": e.get("input")}
        for e in kept
    ])


#: Marks an error already explained (a stage position validated on its own).
_EXPLAINED = "livemask_explained"


def _positions_indexed(errors: list[Any], data: Any, names: dict[str, type[BaseModel]]
                       ) -> list[Any]:
    """``errors`` with those inside a stage position replaced by the errors of each position
    validated on its own, at ``stage_positions[i]``: useq validates the positions in a
    before-validator, so pydantic reports the first bad one without its index, and its own
    sequence's unions without the data they were given."""
    out: list[Any] = []
    found: dict[tuple[Any, ...], list[Any]] = {}
    for err in errors:
        at = _unindexed_positions(err["loc"], data, names)
        if at is None:
            out.append(err)
        elif at[0] not in found:
            found[at[0]] = explained = _each_position(*at)
            out += explained or [e for e in errors  # (none alone: keep them as they came)
                                 if _unindexed_positions(e["loc"], data, names) == at]
    return out


def _unindexed_positions(loc: tuple[Any, ...], data: Any, names: dict[str, type[BaseModel]]
                         ) -> tuple[tuple[Any, ...], list[Any] | tuple[Any, ...]] | None:
    """(the location of the ``stage_positions`` given as a list, that list) where ``loc``
    goes inside it without an index, else None."""
    here = data
    for i, part in enumerate(loc[:-1]):
        if _holds(here, part):
            here = here[part]
            if (part == "stage_positions" and isinstance(here, list | tuple)
                    and not isinstance(loc[i + 1], int)):
                return tuple(loc[: i + 1]), here
        elif _tagged_model(part, names) is None:
            return None
    return None


def _each_position(prefix: tuple[Any, ...], positions: list[Any] | tuple[Any, ...]
                   ) -> list[Any]:
    """The errors of each of ``positions`` validated on its own, at ``prefix + (i, ...)``."""
    out: list[Any] = []
    for i, position in enumerate(positions):
        try:
            if isinstance(position, dict):
                validate_model(useq.Position, position)
            else:  # (x, y, z): as useq's before-validator takes it
                useq.MDASequence.model_validate({"stage_positions": [_copied(position)]})
        except ValidationError as exc:
            skip = 0 if isinstance(position, dict) else 1
            out += [{**e, "loc": (*prefix, i, *e["loc"][skip:]), _EXPLAINED: True}
                    for e in exc.errors()]
        except ValueError as exc:  # (a library's own validator: validate_model)
            out.append({"type": "value_error", "msg": str(exc), "loc": (*prefix, i),
                        "input": position, _EXPLAINED: True})
    return out


@functools.cache
def _model_names(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """The pydantic models ``root``'s fields may hold, at any depth, by class name (the
    names pydantic puts in an error's location for the models of a union)."""
    found: dict[str, type[BaseModel]] = {}
    todo: list[Any] = [root]
    while todo:
        kind = todo.pop()
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            if kind.__name__ not in found:
                found[kind.__name__] = kind
                todo += [field.annotation for field in kind.model_fields.values()]
        else:
            todo += get_args(kind)
    return found


def _tagged_model(part: Any, names: dict[str, type[BaseModel]]) -> type[BaseModel] | None:
    """The model a part of an error's location names as a union's member (``TIntervalLoops``,
    ``function-after[_validate_startat(), RandomPoints]``), or None."""
    if not isinstance(part, str):
        return None
    name = re.search(r"(\w+)\]*$", part)
    return names.get(name[1]) if name else None


_NOWHERE = object()  # (a place in the data that a location does not lead to)


def _union_place(loc: tuple[Any, ...], data: Any, names: dict[str, type[BaseModel]]
                 ) -> tuple[int, Any] | None:
    """(index in ``loc`` of the first union member's name, the data given there), or None;
    the data is ``_NOWHERE`` where a before-validator reshaped it."""
    here = data
    for i, part in enumerate(loc):
        if _holds(here, part):
            here = here[part]
        elif _tagged_model(part, names) is not None:
            return i, here
        else:
            here = _NOWHERE
    return None


def _holds(data: Any, part: Any) -> bool:
    """Whether ``data[part]`` is a value given in ``data`` (a key of a dict, an index of a
    list)."""
    if isinstance(data, dict):
        return part in data
    return isinstance(data, list | tuple) and isinstance(part, int) and 0 <= part < len(data)


def _prune_union_errors(errors: list[Any], data: Any, names: dict[str, type[BaseModel]]
                        ) -> list[Any]:
    """``errors`` with those of each failed union of models replaced by
    :func:`_explain_union`'s, in the place of the union's first error."""
    slots: list[Any] = []  # errors, and (prefix,) for a union's errors
    unions: dict[tuple[Any, ...], tuple[Any, dict[str, list[Any]]]] = {}
    for err in errors:
        place = None if err.get(_EXPLAINED) else _union_place(err["loc"], data, names)
        if place is None:
            slots.append(err)
            continue
        i, given = place
        prefix = tuple(err["loc"][:i])
        if prefix not in unions:
            unions[prefix] = (given, {})
            slots.append((prefix,))
        unions[prefix][1].setdefault(err["loc"][i], []).append(err)
    out: list[Any] = []
    for slot in slots:
        if isinstance(slot, dict):
            out.append(slot)
            continue
        (prefix,) = slot
        given, branches = unions[prefix]
        if given is _NOWHERE:
            given = _given_to_members(prefix, branches)
        if given is not _NOWHERE and _all_models(prefix, errors, names):
            out += _explain_union(prefix, given, branches, data, names)
        else:  # a member that is not a model failed too (a list, a literal), or the data
            # given is unknown (a before-validator reshaped it): keep them all
            out += [e for errs in branches.values() for e in errs]
    return out


def _given_to_members(prefix: tuple[Any, ...], branches: dict[str, list[Any]]) -> Any:
    """The mapping a union's members were given, as a member's missing field reports it
    (where a before-validator reshaped the data: a list of time phases), or ``_NOWHERE``."""
    n = len(prefix)
    for errs in branches.values():
        for e in errs:
            if e["type"] == "missing" and len(e["loc"]) == n + 2 and isinstance(
                    e.get("input"), dict):
                return e["input"]
    return _NOWHERE


def _all_models(prefix: tuple[Any, ...], errors: list[Any],
                names: dict[str, type[BaseModel]]) -> bool:
    """Whether every error inside the value at ``prefix`` comes from a model of its union."""
    n = len(prefix)
    return all(_tagged_model(e["loc"][n], names) is not None for e in errors
               if len(e["loc"]) > n and tuple(e["loc"][:n]) == prefix)


def _explain_union(prefix: tuple[Any, ...], given: Any, branches: dict[str, list[Any]],
                   data: Any, names: dict[str, type[BaseModel]]) -> list[Any]:
    """The errors of a union at ``prefix`` that no model took: keys none of the models
    knows, when there are some; else the errors of the model that knows most of the
    given keys (then has fewest missing fields, then fewest errors), or of each of those
    that tie."""
    models = {tag: _tagged_model(tag, names) for tag in branches}
    known = {tag: _known_keys(m) for tag, m in models.items() if m is not None}
    keys = list(given) if isinstance(given, dict) else []
    everywhere = set().union(*known.values())
    unknown = [k for k in keys if k not in everywhere]
    if unknown:
        return [_unknown_key_error((*prefix, k), k, everywhere, given[k]) for k in unknown]

    def rank(tag: str) -> tuple[int, int, int]:
        errs = branches[tag]
        missing = sum(e["type"] == "missing" and len(e["loc"]) == len(prefix) + 2
                      for e in errs)
        return -sum(k in known[tag] for k in keys), missing, len(errs)

    best = min(map(rank, branches))
    chosen = [tag for tag in branches if rank(tag) == best]
    if len(chosen) > 1:
        return _tied(prefix, given, [branches[tag] for tag in chosen])
    n = len(prefix)
    stripped = [{**e, "loc": (*e["loc"][:n], *e["loc"][n + 1:])} for e in branches[chosen[0]]]
    return _prune_union_errors(stripped, data, names)  # the unions inside that model


def _tied(prefix: tuple[Any, ...], given: Any, branches: list[list[Any]]) -> list[Any]:
    """The errors of union members that fit the given keys equally well: one line where
    each lacks only fields (``add duration or loops``) or none was given a mapping, else
    each member's errors, named by its model."""
    n = len(prefix)
    if all(e["type"] == "model_type" and len(e["loc"]) == n + 1 for b in branches for e in b):
        return [{"type": PydanticCustomError(
            "model_type", "Input should be a mapping of field names to values"),
            "loc": prefix, "input": given}]
    if all(e["type"] == "missing" and len(e["loc"]) == n + 2 for b in branches for e in b):
        ways = sorted({" and ".join(str(e["loc"][-1]) for e in b) for b in branches})
        return [{"type": PydanticCustomError(
            "missing", f"Field required: add {' or '.join(ways)}"),
            "loc": prefix, "input": given}]
    return [e for b in branches for e in b]


def _unknown_key_error(loc: tuple[Any, ...], key: Any, known: set[str], value: Any
                       ) -> dict[str, Any]:
    """A line error for a key no model knows, suggesting the closest known one."""
    return {"type": PydanticCustomError("unknown_field", _unknown(key, known)),
            "loc": loc, "input": value}


def _unknown(key: Any, known: set[str], meant: str | None = None) -> str:
    """``unknown field (did you mean 'x'? known: ...)``, with ``meant`` as 'x' where given."""
    close = [meant] if meant else difflib.get_close_matches(str(key), sorted(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown field ({hint}known: {', '.join(sorted(known))})"


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


def check_sequence(seq: useq.MDASequence, data: Any, what: str = "sequence") -> None:
    """The checks a sequence from a config or a client gets: :func:`check_input` on the
    ``data`` it was validated from, :func:`check_timing`, :func:`check_z_plans`,
    :func:`check_size` and no ``setup`` event; ``ValueError`` naming what."""
    check_input(seq, data, what)
    check_timing(seq)
    check_z_plans(seq, what)
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


def _known_keys(model: type[BaseModel]) -> set[str]:
    """The keys ``model`` takes: its fields, their aliases and the spellings useq renames."""
    fields = model.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    for cls, renamed in _RENAMED_KEYS.items():
        if issubclass(model, cls):
            known |= renamed
    return known


def _unknown_fields(model: Any, data: Any, where: str, annotation: Any = None) -> list[str]:
    if isinstance(model, (list, tuple)) and isinstance(data, (list, tuple)):
        if len(model) != len(data):
            return []
        return [p for i, (m, d) in enumerate(zip(model, data, strict=True))
                for p in _unknown_fields(m, d, f"{where}[{i}]")]
    if isinstance(model, useq.MultiPhaseTimePlan) and isinstance(data, (list, tuple)):
        return _unknown_fields(list(model.phases), data, where)  # phases given as a list
    if not isinstance(model, BaseModel) or not isinstance(data, dict):
        return []
    members = _union_members(annotation)
    meant = _meant_member(type(model), members, data)
    if isinstance(meant, str):
        return [f"{where}: {meant}"]
    if meant is not None:
        return _member_problems(meant, data, where)
    fields = type(model).model_fields
    known = _known_in(type(model), members)
    problems = [f"{where}.{key}: {_unknown(key, known & set(fields), _typo_of(key, members))}"
                for key in data if key not in known]
    for name, field in fields.items():
        key = name if name in data else field.alias
        if key in data:
            problems += _unknown_fields(getattr(model, name), data[key], f"{where}.{key}",
                                        field.annotation)
    return problems


def _union_members(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models of a field's union type (``MultiPointPlan | None``), in order."""
    if isinstance(annotation, type):
        return [annotation] if issubclass(annotation, BaseModel) else []
    if get_origin(annotation) not in (Union, UnionType, Annotated):  # (not list[...] and such)
        return []
    return [m for arg in get_args(annotation) for m in _union_members(arg)]


#: Keys a RelativePosition takes that, in a grid_plan, are likely typos of a grid's
#: (useq would take ``{row: 2, col: 2}`` as one tile, named grid row 2 and column 2).
_GRID_TYPOS = {"row": "rows", "grid_row": "rows", "col": "columns", "grid_col": "columns"}


def _is_grid_union(members: list[type[BaseModel]]) -> bool:
    """Whether ``members`` are those of a grid_plan (a RelativePosition is one of them)."""
    return useq.GridRowsColumns in members and useq.RelativePosition in members


def _known_in(model: type[BaseModel], members: list[type[BaseModel]]) -> set[str]:
    """:func:`_known_keys` of ``model`` as a member of the union ``members``: in a grid_plan,
    a RelativePosition's row and column keys are typos of a grid's (:data:`_GRID_TYPOS`)."""
    known = _known_keys(model)
    if model is useq.RelativePosition and _is_grid_union(members):
        return known - set(_GRID_TYPOS)
    return known


def _typo_of(key: Any, members: list[type[BaseModel]]) -> str | None:
    """The grid field a grid_plan's ``key`` was likely meant as (``row``: ``rows``), or None."""
    return _GRID_TYPOS.get(key) if _is_grid_union(members) else None


def _meant_member(
    chosen: type[BaseModel], members: list[type[BaseModel]], data: dict[Any, Any]
) -> type[BaseModel] | str | None:
    """The model of the union of ``members`` that knows more of ``data``'s keys than the
    one pydantic fell back to (``chosen``), or None: useq's grid_plan takes a dict that no
    grid fits, such as ``{rows: 0, columns: 2}`` or ``{row: 2, col: 2}``, as a single
    RelativePosition. In a grid_plan the grids win a tie with the RelativePosition
    (``{rows: 2, x: 1}``); where several do, what each needs (a str)."""
    if len(members) < 2 or chosen not in members:
        return None

    def score(model: type[BaseModel]) -> int:
        known = _known_in(model, members)
        if model is useq.GridRowsColumns and _is_grid_union(members):
            known |= set(_GRID_TYPOS)
        return len(known & set(data))

    top = max(map(score, members))
    best = [m for m in members if m is not chosen and score(m) == top]
    grid_wins_tie = chosen is useq.RelativePosition and _is_grid_union(members) and top > 0
    if not best or (score(chosen) == top and not grid_wins_tie):
        return None
    if len(best) == 1:
        return best[0]
    ways = sorted(" and ".join(k for k, f in m.model_fields.items() if f.is_required())
                  for m in best)
    return f"Field required: add {' or '.join(ways)}"


def _member_problems(model: type[BaseModel], data: dict[Any, Any], where: str) -> list[str]:
    """What is wrong with ``data`` as a ``model``: its validation errors and the keys it
    does not know."""
    try:
        instance = validate_model(model, data)
    except ValidationError as exc:
        problems = [f"{where}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                    for e in exc.errors()]
    except ValueError as exc:
        problems = [f"{where}: {exc}"]
    else:  # (pydantic would have taken it: look inside)
        return _unknown_fields(instance, data, where)
    fields = set(model.model_fields)
    known = _known_keys(model)
    return problems + [f"{where}.{key}: {_unknown(key, fields, meant)}"
                       for key in data if key not in known
                       for meant in [_GRID_TYPOS.get(key) if _GRID_TYPOS.get(key) in fields
                                     else None]]


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
