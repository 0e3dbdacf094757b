"""The check of an event's device properties against what the rig said it takes."""

from __future__ import annotations

import pytest
from pymmcore_plus import DeviceType

from livemask.acquisition.properties import PropertyInfo, PropertyTable, check_properties
from livemask.errors import ConfigError

TABLE = PropertyTable(
    devices={"Cam": DeviceType.Camera, "XY": DeviceType.XYStage, "Odd": DeviceType.Generic},
    properties={
        "Cam": {
            "Binning": PropertyInfo(read_only=False, limits=None, allowed=("1", "2", "4")),
            "Gain": PropertyInfo(read_only=False, limits=(0.0, 10.0), allowed=()),
            "Mode": PropertyInfo(read_only=False, limits=None, allowed=()),
            "Port": PropertyInfo(read_only=False, limits=None, allowed=(), pre_init=True),
        },
        "XY": {},
        # "Odd" could not describe its properties when the core was opened
    },
)


@pytest.mark.parametrize(
    "entry",
    [
        ("Cam", "Binning", "2"),
        ("Cam", "Binning", 2),
        ("Cam", "Binning", 4.0),  # as Micro-Manager compares numbers
        ("Cam", "Gain", 10),
        ("Cam", "Gain", "2.5"),
        ("Cam", "Mode", "anything"),  # no allowed values, no limits
        ("XY", "Position", [1.0, 2.0]),  # a stage move, not a property
        ("Odd", "Whatever", 1),  # not described: left to the device
    ],
)
def test_what_the_rig_takes_passes(entry: tuple[str, str, object]) -> None:
    check_properties(TABLE, [entry], "events")


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        (("Cam", "Binning", 3), "3 is not an allowed value of property 'Binning'"),
        (("Cam", "Gain", 10.5), "outside the limits of property 'Gain' of device 'Cam': 0..10"),
        (("Cam", "Gain", "high"), "'high' is outside the limits"),
        (("Cam", "Gain", float("nan")), "nan is outside the limits"),
        (("XY", "Speed", 1), "device 'XY' has no property 'Speed' (its properties: none)"),
        (("Lamp", "Power", 1), "no such device is loaded (devices: Cam, Odd, XY)"),
        (("Cam", "Port", "COM3"), "'Port' of device 'Cam' is set before the device "
         "initialises; change it in hardware.config_file"),
    ],
)
def test_what_the_rig_cannot_take_is_named(entry: tuple[str, str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=r"^events: ") as info:
        check_properties(TABLE, [("XY", "Position", (0, 0)), entry], "events")
    assert needle in str(info.value)


def test_values_are_left_to_the_device_when_the_request_sets_several_of_its_properties() -> None:
    """A device may change what one property allows when another changes (binning with the
    readout mode), and the table is from when the core was opened."""
    check_properties(TABLE, [("Cam", "Mode", "fast"), ("Cam", "Binning", 3)], "events")
    with pytest.raises(ConfigError, match="no property 'Bining'"):  # names are still checked
        check_properties(TABLE, [("Cam", "Mode", "fast"), ("Cam", "Bining", 3)], "events")
