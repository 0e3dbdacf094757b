"""Device properties an event may set, read once, and the check of an event's ``properties``.

An event's ``properties`` (``[device, property, value]``) that the rig cannot take are only
a warning in pymmcore-plus' log, and the frame is taken with the old value: a whole run at
the wrong binning or laser power. :func:`check_properties` refuses them before they are
queued. The table is read when the core is opened, not per request: reading a property's
metadata takes its device's lock, which a running (or hung) snap holds.

A Python device (pymmcore-plus' ``UniMMCore``) compares a value with its allowed values as
Python values: a camera whose ``Binning`` allows ``1, 2, 4`` refuses the text ``"2"`` that a
C++ device would take, so for those the value's type is checked too.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pymmcore_plus import CMMCorePlus, DeviceType, PropertyType

from livemask.errors import ConfigError

log = logging.getLogger("livemask")

__all__ = [
    "PropertyInfo",
    "PropertyTable",
    "binned_shape",
    "binning_factor",
    "binning_set",
    "check_properties",
    "property_table",
]

#: ``Position`` of a stage is set with ``setPosition``/``setXYPosition``, not as a property.
POSITION = "Position"
STAGES = (DeviceType.Stage, DeviceType.XYStage)
#: The camera property that sets its binning.
BINNING = "Binning"
#: The Python type of each property type whose allowed values a Python device compares.
PYTHON_TYPES: dict[PropertyType, type] = {
    PropertyType.String: str, PropertyType.Float: float, PropertyType.Integer: int,
}
#: How an error names values of each Python type.
TYPE_WORDS = {str: "text", float: "numbers", int: "numbers"}


@dataclass(frozen=True)
class PropertyInfo:
    """What the device said about one property when the core was opened."""

    read_only: bool
    limits: tuple[float, float] | None  # (low, high) if the property has limits
    allowed: tuple[str, ...]  # allowed values, empty if any value goes
    pre_init: bool = False  # set before the device initialises (e.g. a serial port)
    #: a Python device's allowed values as it compares them (of the property's type: ints
    #: for an integer property), None for other devices (they take any textual form)
    typed_allowed: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class PropertyTable:
    """Loaded devices, their types, and their properties."""

    devices: Mapping[str, DeviceType]
    properties: Mapping[str, Mapping[str, PropertyInfo]]
    #: each camera's binning factor when the core was opened (cameras with a ``Binning``
    #: that :func:`binning_factor` reads)
    binning: Mapping[str, int] = field(default_factory=dict)


def property_table(mmc: CMMCorePlus) -> PropertyTable:
    """Every loaded device's properties. Call it while no acquisition runs."""
    devices: dict[str, DeviceType] = {}
    properties: dict[str, dict[str, PropertyInfo]] = {}
    binning: dict[str, int] = {}
    for device in mmc.getLoadedDevices():
        devices[device] = DeviceType.Unknown
        try:
            devices[device] = DeviceType(mmc.getDeviceType(device))
            props: dict[str, PropertyInfo] = {}
            for name in mmc.getDevicePropertyNames(device):
                limits = None
                if mmc.hasPropertyLimits(device, name):
                    limits = (mmc.getPropertyLowerLimit(device, name),
                              mmc.getPropertyUpperLimit(device, name))
                allowed = tuple(str(v) for v in mmc.getAllowedPropertyValues(device, name))
                props[name] = PropertyInfo(
                    read_only=bool(mmc.isPropertyReadOnly(device, name)),
                    limits=limits,
                    allowed=allowed,
                    pre_init=bool(mmc.isPropertyPreInit(device, name)),
                    typed_allowed=_typed_allowed(mmc, device, name, allowed),
                )
            properties[device] = props
        except Exception as exc:  # a device that cannot describe itself is not checked
            log.warning("could not read the properties of device %r (events setting them "
                        "are not checked): %s", device, exc)
    cameras = [d for d, kind in devices.items()
               if kind == DeviceType.Camera and BINNING in properties.get(d, {})]
    for camera in cameras:
        if (factor := _binning_now(mmc, camera)) is not None:
            binning[camera] = factor
    return PropertyTable(devices, properties, binning)


def _binning_now(mmc: CMMCorePlus, camera: str) -> int | None:
    """The camera's binning factor as it reads it now; None where it cannot say."""
    try:
        return binning_factor(mmc.getProperty(camera, BINNING))
    except Exception as exc:  # a ROI is then checked against the image at open
        log.warning("could not read the binning of camera %r: %s", camera, exc)
        return None


def binning_factor(value: Any) -> int | None:
    """A camera's ``Binning`` value as its factor (2, "2", 2.0 and "2x2" give 2); None for
    one that does not start with a whole number >= 1."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    found = re.match(r"\s*(\d+)(?![.\d])", str(value))
    factor = int(found.group(1)) if found else 0
    return factor if factor >= 1 else None


def binning_set(properties: Iterable[Iterable[Any]] | None, camera: str | None) -> int | None:
    """The binning factor an event's ``properties`` set on ``camera`` (the last, where
    several do), None where they set none (or one :func:`binning_factor` cannot read)."""
    factor = None
    for device, name, value in (tuple(entry) for entry in properties or ()):
        if camera and device == camera and name == BINNING:
            factor = binning_factor(value)
    return factor


def binned_shape(
    shape: tuple[int, int], at_open: int | None, binning: int | None
) -> tuple[int, int]:
    """The camera's image ``shape`` (rows, cols) at open, binned ``at_open``, as binning
    ``binning`` makes it (a camera's image is its sensor // its binning); ``shape`` where a
    binning is not known."""
    if not at_open or not binning or at_open == binning:
        return shape
    return (shape[0] * at_open // binning, shape[1] * at_open // binning)


def _typed_allowed(
    mmc: CMMCorePlus, device: str, name: str, allowed: tuple[str, ...]
) -> tuple[Any, ...] | None:
    """``allowed`` as a Python device compares them (converted to the property's type);
    None for a C++ device, a property with no allowed values or of another type."""
    is_python = getattr(mmc, "isPyDevice", None)  # UniMMCore only
    if not allowed or not callable(is_python) or not is_python(device):
        return None
    kind = PYTHON_TYPES.get(PropertyType(mmc.getPropertyType(device, name)))
    if kind is None:
        return None
    try:
        return tuple(kind(v) for v in allowed)
    except ValueError:  # e.g. "2.5" of an integer property: not checked by type
        return None


def check_properties(
    table: PropertyTable, properties: Iterable[Iterable[Any]], what: str
) -> None:
    """Raise :class:`ConfigError` for an event property the rig cannot take: an unknown
    device or property, a read-only or pre-initialisation property, or a value outside its
    allowed values or limits as the device gave them when the core was opened.

    Devices may change a property's allowed values or limits when another of their
    properties changes (a camera's binning with its readout mode), so values are checked
    only for devices of which the request sets one property."""
    entries = [tuple(entry) for entry in properties]
    named: dict[str, set[str]] = {}
    for device, name, _ in entries:
        named.setdefault(device, set()).add(name)
    for device, name, value in entries:
        if device not in table.devices:
            raise ConfigError(
                f"{what}: property {name!r} of device {device!r}: no such device is loaded "
                f"(devices: {', '.join(sorted(table.devices)) or 'none'})"
            )
        if name == POSITION and table.devices[device] in STAGES:
            continue  # a stage move, which pymmcore-plus makes with setPosition
        props = table.properties.get(device)
        if props is None:  # it could not describe itself when the core was opened
            continue
        info = props.get(name)
        if info is None:
            raise ConfigError(
                f"{what}: device {device!r} has no property {name!r} "
                f"(its properties: {', '.join(sorted(props)) or 'none'})"
            )
        if info.read_only:
            raise ConfigError(f"{what}: property {name!r} of device {device!r} is read-only")
        if table.devices[device] == DeviceType.Core:
            continue  # its device-role lists know C++ devices only, not Python ones
        if info.pre_init:
            raise ConfigError(
                f"{what}: property {name!r} of device {device!r} is set before the device "
                "initialises; change it in hardware.config_file"
            )
        if info.typed_allowed:  # its type does not change with the other properties
            _check_type(value, info.typed_allowed, f"{what}: property {name!r} of Python "
                        f"device {device!r}")
        if len(named[device]) > 1:
            continue  # one may change what the others allow
        if info.allowed and not _allowed(value, info):
            raise ConfigError(
                f"{what}: {value!r} is not an allowed value of property {name!r} of device "
                f"{device!r} (allowed: {', '.join(info.allowed)})"
            )
        if info.limits is not None and not _within(value, info.limits):
            lo, hi = info.limits
            raise ConfigError(
                f"{what}: {value!r} is outside the limits of property {name!r} of device "
                f"{device!r}: {lo:g}..{hi:g}"
            )


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _check_type(value: Any, typed: tuple[Any, ...], where: str) -> None:
    """ConfigError where a Python device would refuse ``value`` for its type alone (the
    text ``"2"`` where its allowed values are the numbers ``1, 2, 4``), naming the value of
    the right type."""
    kind = type(typed[0])
    numeric = kind is not str
    if isinstance(value, int | float) if numeric else isinstance(value, str):
        return
    right = _as_type(value, kind)
    name = type(value).__name__
    given = "text" if isinstance(value, str) else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    give = repr(right) if right is not None and right in typed else "one of them"
    raise ConfigError(
        f"{where}: {value!r} is {given}, but the device takes {TYPE_WORDS[kind]} (allowed: "
        f"{', '.join(repr(v) for v in typed)}) and compares values with their type, so it "
        f"would refuse it; give {give}"
    )


def _as_type(value: Any, kind: type) -> Any:
    """``value`` converted to ``kind`` (int, float or str), None where it does not convert
    (an int only from a whole number)."""
    if kind is str:
        return str(value) if _number(value) is not None else None
    number = _number(value) if not isinstance(value, bool) else None
    if number is None:
        return None
    if kind is int:
        return int(number) if number.is_integer() else None
    return number


def _allowed(value: Any, info: PropertyInfo) -> bool:
    """``value`` is one of the property's allowed values: exactly (a Python device's,
    typed), else as Micro-Manager would write it (:func:`_among`)."""
    if info.typed_allowed is not None:
        return value in info.typed_allowed
    return _among(value, info.allowed)


def _among(value: Any, allowed: tuple[str, ...]) -> bool:
    """``value`` as Micro-Manager would write it is one of ``allowed`` (``2`` and ``2.0``
    match ``"2"``)."""
    if str(value) in allowed:
        return True
    number = _number(value)
    return number is not None and any(_number(a) == number for a in allowed)


def _within(value: Any, limits: tuple[float, float]) -> bool:
    number = _number(value)
    return number is not None and limits[0] <= number <= limits[1]
