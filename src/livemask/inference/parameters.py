"""Reading the ``parameters:`` of model cards whose runtime is not a network.

Each runtime declares its parameters as a :class:`CardParameters` model (the classical
pipelines in ``classical.py``, the forest in ``random_forest.py``): unknown keys, NaN or
infinite numbers, strings where numbers or booleans belong, and out-of-range values are a
ModelError naming ``parameters.<key>`` (before, ``fill_holes: "no"`` read as true and
``scales: "1248"`` as (1, 2, 4, 8)).
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from livemask.errors import ModelError

Positive = Annotated[float, Field(gt=0)]
ClassIndex = Annotated[int, Field(ge=0)]


class CardParameters(BaseModel):
    """Base of a runtime's parameters: strict types, no unknown keys, finite numbers."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


P = TypeVar("P", bound=CardParameters)


def read_parameters(kind: type[P], card_name: str, raw: dict[str, Any]) -> P:
    """``raw`` (a card's ``parameters``) as ``kind``; ModelError naming each bad key."""
    try:
        return kind.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(dict.fromkeys(  # a union reports once per member: once here
            f"parameters.{_where(err['loc'])}: {err['msg']}" for err in exc.errors()
        ))
        raise ModelError(f"model {card_name!r}: {problems}; fix them in its card") from None


def _where(loc: tuple[int | str, ...]) -> str:
    """The key and list positions of an error (without pydantic's union member names)."""
    return ".".join(str(p) for i, p in enumerate(loc) if i == 0 or isinstance(p, int))
