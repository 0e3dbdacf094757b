"""What a user's sequence data says against what useq made of it: validation errors that
name the field to change.

useq's unions (time plans, z plans, grid plans) report every member's errors, and its
before-validators drop list indices and ignore unknown keys; :func:`validate_model` reports the
member the given keys ask for, each bad stage position under its index, and
:func:`check_input` names fields useq ignored (a typo would silently run another acquisition)
and numbers that are not finite, and :func:`check_types` values of the wrong JSON type (useq
reads ``true`` as 1).
"""

from __future__ import annotations

import collections.abc
import copy
import difflib
import enum
import functools
import json
import math
import numbers
import re
from collections.abc import Callable, Mapping
from datetime import timedelta
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import useq
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

__all__ = ["check_input", "check_types", "validate_model"]

_Model = TypeVar("_Model", bound=BaseModel)

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
        where = _raising_field(model, data)
        raise ValueError(f"{where}a value has the wrong type or size ({exc})") from None
    except ValidationError as exc:
        raise _union_errors_explained(exc, model, data) from None


def _raising_field(model: type[BaseModel], data: Any) -> str:
    """``"name: "`` of the first field of ``data`` (a mapping) that raises a ``TypeError`` or
    ``OverflowError`` validated on its own (a library's before-validator: pydantic gives
    those no location); ``""`` where none does alone."""
    if not isinstance(data, Mapping):
        return ""
    for name, value in data.items():
        try:
            model.model_validate(_copied({name: value}))
        except (TypeError, OverflowError):
            return f"{name}: "
        except (ValueError, ValidationError):  # (other problems: reported once this is mended)
            continue
    return ""


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
    return {"type": PydanticCustomError("unknown_field", unknown_field_text(key, known)),
            "loc": loc, "input": value}


def unknown_field_text(key: Any, known: set[str], meant: str | None = None) -> str:
    """``unknown field (did you mean 'x'? known: ...)``, with ``meant`` as 'x' where given."""
    close = [meant] if meant else difflib.get_close_matches(str(key), sorted(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown field ({hint}known: {', '.join(sorted(known))})"


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


#: Fields useq's before-validators fill from a deprecated spelling of their key it still
#: takes (field: key as written).
_OLD_SPELLINGS: dict[type[Any], dict[str, str]] = {
    useq.Position: {"grid_row": "row", "grid_col": "col"}}
#: Keys useq's before-validators rename.
_RENAMED_KEYS: dict[type[Any], frozenset[str]] = {
    cls: frozenset(old.values()) for cls, old in _OLD_SPELLINGS.items()}


def _known_keys(model: type[BaseModel]) -> set[str]:
    """The keys ``model`` takes: its fields, their aliases and the spellings useq renames."""
    fields = model.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    for cls, renamed in _RENAMED_KEYS.items():
        if issubclass(model, cls):
            known |= renamed
    return known


def _per_item(
    model: Any, data: Any, where: str, visit: Callable[[Any, Any, str], list[str]]
) -> list[str] | None:
    """``visit``'s problems for each item where the validated ``model`` and the ``data``
    given for it are lists (a multi-phase time plan's phases given as a list too); none
    where their lengths differ; None where they are not lists."""
    if isinstance(model, useq.MultiPhaseTimePlan) and isinstance(data, (list, tuple)):
        model = list(model.phases)
    if not (isinstance(model, (list, tuple)) and isinstance(data, (list, tuple))):
        return None
    if len(model) != len(data):
        return []
    return [p for i, (m, d) in enumerate(zip(model, data, strict=True))
            for p in visit(m, d, f"{where}[{i}]")]


def _unknown_fields(model: Any, data: Any, where: str, annotation: Any = None) -> list[str]:
    if (items := _per_item(model, data, where, _unknown_fields)) is not None:
        return items
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
    # a null for a key the model takes is "not given", not a typo: a grid_plan position as
    # useq dumps it has grid_row: null (what ControlClient.start sends)
    given = [key for key in data if not (data[key] is None and key in _known_keys(type(model)))]
    problems = [
        f"{where}.{key}: {unknown_field_text(key, known & set(fields), _typo_of(key, members))}"
        for key in given if key not in known]
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
    return problems + [f"{where}.{key}: {unknown_field_text(key, fields, meant)}"
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


#: Most wrongly typed values :func:`check_types` names (then ``and N more``).
_MAX_LISTED_TYPES = 10


def check_types(model: BaseModel, data: Any, what: str) -> None:
    """Raise ``ValueError`` naming each value of ``data`` (JSON or YAML, validated into
    ``model``) of the wrong type for its field: a boolean or a string where a number goes,
    a fractional JSON number (2.5, 2.0) where an integer goes, anything but true/false where
    a boolean goes.

    pydantic's lax mode (useq's) reads ``true`` as 1 and ``"10"`` as 10, so a wrong value
    would silently run another acquisition. A time plan's ``interval`` and ``duration`` take
    seconds, a duration string (``"0:00:01"``, ``"PT1S"``) or a mapping of ``timedelta``'s
    arguments (``{seconds: 1}``), as useq does."""
    try:
        problems = _wrong_types(model, data, what)
    except RecursionError:
        raise ValueError(f"{what} nests too deeply to check") from None
    if len(problems) > _MAX_LISTED_TYPES:
        problems[_MAX_LISTED_TYPES:] = [f"and {len(problems) - _MAX_LISTED_TYPES} more"]
    if problems:
        raise ValueError("; ".join(problems))


def _wrong_types(model: Any, data: Any, where: str) -> list[str]:
    """:func:`check_types`' problems, walking ``model`` and the ``data`` given for it."""
    if (items := _per_item(model, data, where, _wrong_types)) is not None:
        return items
    if not isinstance(model, BaseModel) or not isinstance(data, dict):
        return []
    fields = _fields_by_key(type(model))
    problems: list[str] = []
    for key, value in data.items():
        if key not in fields:
            continue
        name, kind = fields[key]
        held = getattr(model, name)
        if name in _CONVERTED.get(type(model), ()):
            if isinstance(value, bool):  # (useq's own forms are strings, numbers or lists)
                problems.append(f"{where}.{key}: expected {_CONVERTED[type(model)][name]}, "
                                f"got {_shown(value)}")
        elif _holds_models(held):
            problems += _wrong_types(held, value, f"{where}.{key}")
        else:
            problems += _value_types(kind, value, f"{where}.{key}")
    return problems


@functools.cache
def _fields_by_key(model: type[BaseModel]) -> dict[str, tuple[str, Any]]:
    """(field name, type) of each key ``model`` takes: its fields, their aliases and the old
    spellings useq renames."""
    fields = model.model_fields
    out = {key: (name, fields[name].annotation) for cls, old in _OLD_SPELLINGS.items()
           if issubclass(model, cls) for name, key in old.items()}
    for name, field in fields.items():
        out[name] = (name, field.annotation)
        if field.alias:
            out[field.alias] = (name, field.annotation)
    return out


def _holds_models(value: Any) -> bool:
    """Whether a validated field's ``value`` is a model or a non-empty sequence of them."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(isinstance(v, BaseModel) for v in value)
    return isinstance(value, BaseModel)


def _value_types(kind: Any, value: Any, where: str) -> list[str]:
    """What is wrong with the JSON type of ``value`` for a field of type ``kind`` (numbers,
    booleans, durations and sequences of them are checked; other types are left to
    pydantic, which reads none of them from another JSON type)."""
    while get_origin(kind) is Annotated:
        kind = get_args(kind)[0]
    if value is None:
        return []
    origin = get_origin(kind)
    if origin in (Union, UnionType):
        return _union_types(get_args(kind), value, where)
    if origin in (list, tuple, collections.abc.Sequence):
        return _items_types(get_args(kind), value, where, fixed=origin is tuple)
    if kind is timedelta:
        return _duration_types(value, where)
    expected = _EXPECTED.get(kind)
    if expected is None or _is_json(kind, value):
        return []
    return [f"{where}: expected {expected}, got {_shown(value)}"]


#: Fields a useq before-validator converts from other JSON types than their own (what it
#: takes, in words): only booleans are refused there.
_CONVERTED: dict[type[Any], dict[str, str]] = {useq.WellPlatePlan: {
    "rotation": "degrees, an angle with its unit (\"5deg\", \"0.1rad\") or a rotation matrix"}}

#: What a checked scalar type takes, in words.
_EXPECTED: dict[Any, str] = {float: "a number", int: "an integer", bool: "true or false"}


def _is_json(kind: Any, value: Any) -> bool:
    """Whether ``value`` is of the JSON type of ``kind`` (float, int or bool)."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, numbers.Integral if kind is int else numbers.Real)


def _union_types(members: tuple[Any, ...], value: Any, where: str) -> list[str]:
    """:func:`_value_types` of a union: none where a member takes ``value`` (a string for a
    member that takes strings, a number for a numeric one); else the first checked
    member's."""
    found: list[list[str]] = []
    for member in members:
        if member is type(None):
            continue
        if isinstance(value, str) and _takes_strings(member):
            return []
        if member in _EXPECTED or member is timedelta or get_origin(member) is not None:
            problems = _value_types(member, value, where)
            if not problems:
                return []
            found.append(problems)
    return found[0] if found else []


def _takes_strings(kind: Any) -> bool:
    """Whether pydantic reads a string as a ``kind`` (str, an enum or a literal of them)."""
    if get_origin(kind) is Literal:
        return any(isinstance(a, str) for a in get_args(kind))
    return isinstance(kind, type) and issubclass(kind, str | enum.Enum)


def _items_types(args: tuple[Any, ...], value: Any, where: str, *, fixed: bool) -> list[str]:
    """:func:`_value_types` of a sequence (``list[float]``; ``fixed``: a tuple,
    ``tuple[float, float]`` or ``tuple[int, ...]``) given as a list, or as one value useq
    repeats (``overlap: 10``)."""
    if not args:
        return []
    if not isinstance(value, (list, tuple)):
        return _value_types(args[0], value, where)
    fixed = fixed and not (len(args) == 2 and args[1] is Ellipsis)
    if fixed and len(args) != len(value):
        return []  # (pydantic takes no such list)
    return [p for i, item in enumerate(value)
            for p in _value_types(args[i] if fixed else args[0], item, f"{where}[{i}]")]


def _duration_types(value: Any, where: str) -> list[str]:
    """A time plan's duration: seconds, a duration string or ``timedelta``'s arguments."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _value_types(float, v, f"{where}.{k}")]
    if isinstance(value, str | timedelta) or _is_json(float, value):
        return []
    return [f"{where}: expected a number of seconds, a duration (\"0:00:01\", \"PT1S\") "
            f"or timedelta's arguments ({{seconds: 1}}), got {_shown(value)}"]


def _shown(value: Any) -> str:
    """``value`` as JSON writes it (``true``, ``"10"``), cut to 60 characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
