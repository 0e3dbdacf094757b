"""Device properties an event may set, read once, and the check of an event's ``properties``.

An event's ``properties`` (``[device, property, value]``) that the rig cannot take are only
a warning in pymmcore-plus' log, and the frame is taken with the old value: a whole run at
the wrong binning or laser power. :func:`check_properties` refuses them before they are
queued. The table is read when the core is opened, not per request: reading a property's
metadata takes its device's lock, which a running (or hung) snap holds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pymmcore_plus import CMMCorePlus, DeviceType

from livemask.errors import ConfigError

log = logging.getLogger("livemask")

__all__ = ["PropertyInfo", "PropertyTable", "check_properties", "property_table"]

#: ``Position`` of a stage is set with ``setPosition``/``setXYPosition``, not as a property.
POSITION = "Position"
STAGES = (DeviceType.Stage, DeviceType.XYStage)


@dataclass(frozen=True)
class PropertyInfo:
    """What the device said about one property when the core was opened."""

    read_only: bool
    limits: tuple[float, float] | None  # (low, high) if the property has limits
    allowed: tuple[str, ...]  # allowed values, empty if any value goes
    pre_init: bool = False  # set before the device initialises (e.g. a serial port)


@dataclass(frozen=True)
class PropertyTable:
    """Loaded devices, their types, and their properties."""

    devices: Mapping[str, DeviceType]
    properties: Mapping[str, Mapping[str, PropertyInfo]]


def property_table(mmc: CMMCorePlus) -> PropertyTable:
    """Every loaded device's properties. Call it while no acquisition runs."""
    devices: dict[str, DeviceType] = {}
    properties: dict[str, dict[str, PropertyInfo]] = {}
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
                props[name] = PropertyInfo(
                    read_only=bool(mmc.isPropertyReadOnly(device, name)),
                    limits=limits,
                    allowed=tuple(str(v) for v in mmc.getAllowedPropertyValues(device, name)),
                    pre_init=bool(mmc.isPropertyPreInit(device, name)),
                )
            properties[device] = props
        except Exception as exc:  # a device that cannot describe itself is not checked
            log.warning("could not read the properties of device %r (events setting them "
                        "are not checked): %s", device, exc)
    return PropertyTable(devices, properties)


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
        if len(named[device]) > 1:
            continue  # one may change what the others allow
        if info.allowed and not _among(value, info.allowed):
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
