"""Helpers of the microscope frame source."""

from __future__ import annotations

import types

import numpy as np
import useq

from livemask.acquisition.source import (
    STAGE_TOLERANCE_UM,
    MicroscopeSource,
    frame_position,
    settings_mismatch,
)


def test_frame_position_is_the_commanded_one_unless_the_stage_read_back_differs() -> None:
    event = useq.MDAEvent(x_pos=100.0, y_pos=50.0)
    # no read-back (sequenced frames, other engines): the commanded position
    assert frame_position(event, {}) == ({"x_um": 100.0, "y_um": 50.0, "z_um": None}, None)
    # a read-back within the tolerance, and an axis the event does not command: unchanged
    near = {"position": {"x": 100.0 + STAGE_TOLERANCE_UM / 2, "y": 50.0, "z": 7.0}}
    assert frame_position(event, near) == ({"x_um": 100.0, "y_um": 50.0, "z_um": None}, None)
    # the stage stayed at x = 0: the frame is placed there, and the mismatch is returned
    far = {"position": {"x": 0.0, "y": 50.1, "z": 7.0}}
    assert frame_position(event, far) == (
        {"x_um": 0.0, "y_um": 50.0, "z_um": None},
        {"commanded": {"x_um": 100.0}, "read": {"x_um": 0.0}},
    )


def test_z_and_unreadable_axes_are_not_compared() -> None:
    # autofocus moves z away from the commanded value on purpose; a NaN read-back is no
    # position
    event = useq.MDAEvent(x_pos=100.0, y_pos=50.0, z_pos=10.0)
    meta = {"position": {"x": float("nan"), "y": 50.0, "z": 13.5}}
    assert frame_position(event, meta) == ({"x_um": 100.0, "y_um": 50.0, "z_um": 10.0}, None)


def test_z_is_compared_when_its_move_raised() -> None:
    event = useq.MDAEvent(z_pos=10.0)
    meta = {"position": {"z": 13.5}}
    assert frame_position(event, meta, z_failed=True) == (
        {"x_um": None, "y_um": None, "z_um": 13.5},
        {"commanded": {"z_um": 10.0}, "read": {"z_um": 13.5}},
    )
    # within a z-stack's step of the target: still not there (the XY bound does not apply)
    assert frame_position(event, {"position": {"z": 10.5}}, z_failed=True) == (
        {"x_um": None, "y_um": None, "z_um": 10.5},
        {"commanded": {"z_um": 10.0}, "read": {"z_um": 10.5}},
    )
    # the move raised but the drive got there after all: nothing to report
    assert frame_position(event, {"position": {"z": 10.01}}, z_failed=True) == (
        {"x_um": None, "y_um": None, "z_um": 10.0}, None)
    # the drive cannot say where it is either: the frame's Z is unknown
    assert frame_position(event, {"position": {}}, z_failed=True) == (
        {"x_um": None, "y_um": None, "z_um": None},
        {"commanded": {"z_um": 10.0}, "read": {"z_um": None}},
    )


def test_settings_mismatch_names_the_exposure_and_channel_not_applied() -> None:
    event = useq.MDAEvent(exposure=40.0, channel={"group": "Channel", "config": "DAPI"})
    preset = {"Filter-Label": "DAPI"}
    as_asked = {"exposure_ms": 40.2, "property_values": [
        {"dev": "Filter", "prop": "Label", "val": "DAPI"}]}
    assert settings_mismatch(event, as_asked, preset) is None  # within 2 %
    stuck = {"exposure_ms": 10.0, "property_values": [
        {"dev": "Filter", "prop": "Label", "val": "GFP"}]}
    assert settings_mismatch(event, stuck, preset) == {
        "exposure_ms": {"commanded": 40.0, "read": 10.0},
        "channel": {"commanded": "DAPI", "read": {"Filter-Label": "GFP"}},
    }
    # an event that asks for neither, or no metadata: nothing to compare
    assert settings_mismatch(useq.MDAEvent(), stuck, None) is None
    assert settings_mismatch(event, None, preset) is None



def test_a_stage_off_by_noise_each_frame_is_reported_once_per_position() -> None:
    """The key held the raw read-back, new on every frame: a stage 3 µm off with 0.05 µm of
    noise sent one event per frame (about 6 million in a week; long-run hunt)."""
    reported: list[dict[str, object]] = []
    source = types.SimpleNamespace(
        _on_mismatch=lambda kind, event, off: reported.append(off), _reported=set())
    rng = np.random.default_rng(0)
    for x in (1000.0, 2000.0):
        event = useq.MDAEvent(x_pos=x, y_pos=500.0)
        for _ in range(200):
            meta = {"position": {"x": x + 3.0 + rng.normal(0, 0.05), "y": 500.0}}
            _, off = frame_position(event, meta)
            MicroscopeSource._report_mismatch(source, "stage", event, off)  # type: ignore[arg-type]
    assert [r["commanded"] for r in reported] == [{"x_um": 1000.0}, {"x_um": 2000.0}]
