"""Pixel geometry across a run: tracks and ``*_change`` features across a binning or camera
ROI change, typed property values of Python devices, and a ROI checked at the binning it
will be taken with."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import useq
from pymmcore_plus import DeviceType

from livemask.acquisition.properties import (
    PropertyInfo,
    PropertyTable,
    check_properties,
    property_table,
)
from livemask.acquisition.source import MicroscopeSource, RawFrame
from livemask.analysis.tracking import PositionTrackers
from livemask.errors import ConfigError, ControlError
from livemask.feedback.context import FeatureTracker, FrameContext
from livemask.inference.models import ModelCard
from livemask.inference.segmenter import Segmenter
from livemask.service.app import Service
from livemask.service.pipeline import Pipeline
from livemask.transport.publisher import MemoryPublisher
from tests.test_pipeline import ThresholdBackend
from tests.test_pixel_size_changes import BIN2, BinCamera, _config, _enqueue_and_collect
from tests.test_service import control

ROI = {"roi": {"offset_x": 6, "offset_y": 4, "width": 64, "height": 64}}


class AllowedBinCamera(BinCamera):
    """:class:`BinCamera` whose ``Binning`` allows 1, 2 and 4 (ints, as a Python camera
    declares them): pymmcore-plus refuses the text "2" for it."""

    def __init__(self) -> None:
        super().__init__()
        self.set_property_allowed_values("Binning", (1, 2, 4))


def _allowed_rig(tmp_path: Path) -> str:
    """The rig of :func:`tests.test_pixel_size_changes._config` with :class:`AllowedBinCamera`."""
    path = Path(_config(tmp_path).hardware.config_file)
    text = path.read_text().replace(
        "#py pyDevice,Camera,tests.test_pixel_size_changes,BinCamera",
        "#py pyDevice,Camera,tests.test_geometry_fixes_s21,AllowedBinCamera")
    assert "AllowedBinCamera" in text
    out = tmp_path / "allowed.cfg"
    out.write_text(text)
    return str(out)


# ------------------------------------------------------------ 1: streams per pixel geometry
def _blobs() -> np.ndarray:
    image = np.full((64, 64), 100, np.uint16)
    for y, x in ((10, 10), (10, 40), (40, 20), (44, 48)):
        image[y:y + 8, x:x + 8] = 1000
    return image


async def _track(frames: list[tuple[float, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run the same image through a tracking pipeline once per (core pixel size, settings)
    of ``frames`` (time points 0, 1, ...): the measurements published."""
    pub = MemoryPublisher()
    pipe = Pipeline(Segmenter(ModelCard(name="fake", file="none.onnx"), ThresholdBackend()),
                    pub, mode="synchronized", pixel_size_um=0.65, core_pixel_size_um=0.65)
    pipe.tracker = PositionTrackers()
    pipe.start()
    for t, (core_px, settings) in enumerate(frames):
        event = useq.MDAEvent(index={"t": t})
        pipe.submit(RawFrame(_blobs(), event, time.time(), {}, None, pixel_size_um=core_px,
                             settings={"exposure_ms": 10.0, **settings}))
    await pipe.drain(5.0)
    await pipe.close()
    return [m.header for m in pub.by_topic("measurements")]


def _ids(message: Mapping[str, Any]) -> set[int]:
    return {o["track_id"] for o in message["objects"]}


async def test_a_binning_or_roi_change_starts_new_tracks() -> None:
    """Before, a frame at another pixel size or camera ROI offset was linked by its pixel
    positions to the frames before it: every track continued (here onto the very pixels,
    on the rig onto other nuclei), with false divisions."""
    meas = await _track([(0.65, {}), (0.65, {}), (1.3, {}), (1.3, {}), (1.3, ROI), (1.3, ROI)])
    assert [len(m["objects"]) for m in meas] == [4] * 6
    assert _ids(meas[1]) == _ids(meas[0])  # the same geometry: tracks go on
    assert not _ids(meas[2]) & _ids(meas[1])  # binning 2: new tracks ...
    assert _ids(meas[3]) == _ids(meas[2])  # ... that go on
    assert not _ids(meas[4]) & _ids(meas[3])  # another ROI offset: new tracks
    assert _ids(meas[5]) == _ids(meas[4])
    for m in meas:
        assert m["summary"]["divisions"] == []
        assert all(o["parent_track_id"] is None for o in m["objects"])


async def test_change_features_compare_frames_of_one_pixel_geometry() -> None:
    """Before, ``area_change`` (and the intensity changes) compared an object with the one
    at its pixel position in the frame before a binning or ROI change: another nucleus."""
    meas = await _track([(0.65, {}), (0.65, {}), (1.3, {}), (1.3, {}), (1.3, ROI), (1.3, ROI)])
    tracker = FeatureTracker()
    changes = [[f["area_change"] for f in tracker.compute(
        FrameContext.from_measurements(m, (64, 64)))] for m in meas]
    assert changes[0] == [None] * 4  # a stream's first frame
    assert changes[1] == pytest.approx([1.0] * 4)
    assert changes[2] == [None] * 4  # binning 2: a stream of its own
    assert changes[3] == pytest.approx([1.0] * 4)
    assert changes[4] == [None] * 4  # another ROI offset
    assert changes[5] == pytest.approx([1.0] * 4)


def test_the_stage_key_holds_the_pixel_geometry() -> None:
    from livemask.feedback.context import FeatureTracker

    features = FeatureTracker()

    def key(pixel_size_um: float, settings: dict[str, Any], shape: tuple[int, int]) -> Any:
        message = {"index": {"t": 0}, "position": {"x_um": 1.0, "y_um": 2.0},
                   "pixel_size_um": pixel_size_um, "settings": settings}
        return features._stream(FrameContext.from_measurements(message, shape))

    base = key(0.65, {}, (64, 64))
    assert base == key(0.65 * (1 + 1e-6), {}, (64, 64))  # a wobbling reading: the same
    assert base != key(1.3, {}, (64, 64))
    assert base != key(0.65, ROI, (64, 64))
    assert base != key(0.65, {}, (32, 64))
    assert key(0.65, {"roi": None}, (64, 64)) != base  # a ROI not known


async def test_tracks_do_not_continue_across_binning_on_the_rig(tmp_path: Path) -> None:
    """The simulated rig at binning 1, then 2: its tracks used to continue across the
    change, joined to other nuclei."""
    cfg = _config(tmp_path, tracking={"enabled": True})
    async with Service(cfg) as svc:
        meas, _ = await _enqueue_and_collect(
            svc, [{"index": {"t": t}, **({"properties": [BIN2]} if t == 2 else {})}
                  for t in range(4)])
    assert [m["pixel_size_um"] for m in meas] == pytest.approx([0.65, 0.65, 1.3, 1.3])
    assert all(m["objects"] for m in meas)
    assert _ids(meas[1]) & _ids(meas[0])
    assert not _ids(meas[2]) & (_ids(meas[0]) | _ids(meas[1]))
    assert _ids(meas[3]) & _ids(meas[2])
    assert meas[2]["summary"]["divisions"] == []


# ------------------------------------------------------------ 2: typed values, Python devices
def test_property_table_has_a_python_devices_typed_allowed_values(tmp_path: Path) -> None:
    from pymmcore_plus.experimental.unicore import UniMMCore

    core = UniMMCore()
    core.loadSystemConfiguration(_allowed_rig(tmp_path))
    try:
        table = property_table(core)
    finally:
        core.unloadAllDevices()
    assert table.properties["Camera"]["Binning"].typed_allowed == (1, 2, 4)
    assert table.properties["Filter"]["Label"].typed_allowed == ("DAPI", "GFP", "Empty")
    assert table.binning == {"Camera": 1}
    check_properties(table, [("Camera", "Binning", 2)], "events")
    check_properties(table, [("Camera", "Binning", 2.0)], "events")  # 2.0 == 2: it takes it
    with pytest.raises(ConfigError, match=r"^events: property 'Binning' of Python device "
                       r"'Camera': '2' is text, but the device takes numbers \(allowed: 1, "
                       r"2, 4\) .* give 2$"):
        check_properties(table, [("Camera", "Binning", "2")], "events")


def test_a_typed_value_is_checked_also_with_other_properties_of_the_device() -> None:
    """Values are not checked when a request sets two properties of a device (one may change
    what the other allows), but a Python device refuses a value of the wrong type anyway."""
    table = PropertyTable(
        devices={"Cam": DeviceType.Camera},
        properties={"Cam": {
            "Binning": PropertyInfo(False, None, ("1", "2"), typed_allowed=(1, 2)),
            "Mode": PropertyInfo(False, None, ("fast", "slow"), typed_allowed=("fast", "slow")),
            "Gain": PropertyInfo(False, None, ("1", "2")),  # a C++ device's: any form
        }},
    )
    check_properties(table, [("Cam", "Mode", "fast"), ("Cam", "Binning", 4)], "events")
    check_properties(table, [("Cam", "Gain", "2")], "events")
    with pytest.raises(ConfigError, match=r"'2' is text.* give 2$"):
        check_properties(table, [("Cam", "Mode", "fast"), ("Cam", "Binning", "2")], "events")
    # the value converted is no allowed one either: no advice to give it (it was "give 4")
    with pytest.raises(ConfigError, match=r"'4' is text.* give one of them$"):
        check_properties(table, [("Cam", "Mode", "fast"), ("Cam", "Binning", "4")], "events")
    with pytest.raises(ConfigError, match=r"'Mode' .*: 1 is an int, .*takes text.* give one "):
        check_properties(table, [("Cam", "Mode", 1)], "events")
    with pytest.raises(ConfigError, match=r"'slowest' is not an allowed value"):
        check_properties(table, [("Cam", "Mode", "slowest")], "events")


async def test_enqueue_refuses_a_value_the_python_camera_would_refuse(tmp_path: Path) -> None:
    """Before, ``"2"`` was enqueued and the camera stayed at binning 1 (only a pymmcore-plus
    log warning); ``2`` bins."""
    cfg = _config(tmp_path, hardware={"config_file": _allowed_rig(tmp_path)})
    async with Service(cfg) as svc:
        with pytest.raises(ControlError, match=r"invalid_args.*'2' is text.* give 2"):
            await control(svc, "enqueue", events=[{"properties": [BIN2]}])
        meas, _ = await _enqueue_and_collect(svc, [{"properties": [["Camera", "Binning", 2]]}])
    assert [m["pixel_size_um"] for m in meas] == pytest.approx([1.3])


# ------------------------------------------------------------ 3: a ROI at the binning then
async def test_a_roi_is_checked_against_the_image_at_its_binning(tmp_path: Path) -> None:
    """Before, a ROI was checked against the 128x128 image at open: at binning 2 (64x64)
    one beyond it was accepted and the camera took its whole image (a core warning)."""
    roi = {"roi": [40, 40, 50, 50]}
    async with Service(_config(tmp_path)) as svc:
        with pytest.raises(ControlError, match=r"events\[1\]\.roi .* goes beyond the camera's "
                           r"64x64 \(width x height\) image at binning 2"):
            await control(svc, "enqueue", events=[{"properties": [BIN2]}, roi])
        with pytest.raises(ControlError, match=r"events\[0\]\.roi .* 64x64 .* at binning 2"):
            await control(svc, "enqueue", events=[{"properties": [BIN2], **roi}])
        await _enqueue_and_collect(svc, [{"properties": [BIN2]}])  # binning 2 stays set
        with pytest.raises(ControlError, match=r"events\[0\]\.roi .* 64x64 .* at binning 2"):
            await control(svc, "enqueue", events=[roi])
        # within the binned image, or back at binning 1 first: taken
        small, _ = await _enqueue_and_collect(svc, [{"roi": [10, 10, 50, 50]}])
        back, _ = await _enqueue_and_collect(
            svc, [{"properties": [["Camera", "Binning", 1]]}, roi])
    assert small[0]["settings"]["roi"] == {"offset_x": 10, "offset_y": 10, "width": 50,
                                           "height": 50}
    assert back[-1]["settings"]["roi"] == {"offset_x": 40, "offset_y": 40, "width": 50,
                                           "height": 50}
    assert back[-1]["pixel_size_um"] == pytest.approx(0.65)


async def test_a_run_that_changed_the_binning_ends_without_a_roi_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pymmcore-plus puts back the ROI from before the run (the full image at binning 1)
    after a run whose event set ``Binning`` 2 (properties stay): it logged an ERROR "ROI
    (0, 0, 128, 128) exceeds sensor bounds (64x64)" at the end of every such run. The full
    image at the new binning is kept, without an error."""
    import logging

    caplog.set_level(logging.WARNING)
    async with Service(_config(tmp_path)) as svc:
        meas, _ = await _enqueue_and_collect(svc, [
            {"index": {"t": 0}}, {"index": {"t": 1}, "properties": [BIN2]}])
        assert isinstance(svc.source, MicroscopeSource)
        core = svc.source.core
        assert [m["pixel_size_um"] for m in meas] == [0.65, 1.3]
        assert list(core.getROI()) == [0, 0, 64, 64]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


def test_a_pixel_size_that_wobbles_in_its_last_digits_keeps_one_stream() -> None:
    """A zoom's reading of 0.65 and 0.65 * (1 + 1e-6) frame by frame split the stream in two
    (rounded to 6 digits: two keys) and the objects swapped track ids every frame; a real
    change (binning: x2) still starts a new stream."""
    from livemask.analysis.tracking import PositionTrackers, frame_geometry

    trackers = PositionTrackers()
    index, shape = {"t": 0, "p": 0}, (64, 64)

    def key(size: float) -> object:
        return trackers.key(index, {}, frame_geometry(size, (0, 0), shape))

    base = key(0.65)
    for wobble in (1 + 1e-6, 1 - 1e-6, 1 + 4e-3, 1 - 4e-3):
        assert key(0.65 * wobble) == base
    assert key(1.3) != base


def test_a_slow_drift_of_the_pixel_size_keeps_one_stream() -> None:
    """With the first size seen as a fixed anchor, a zoom drifting past 1 % with reading
    noise flipped between two keys (24 switches back over 400 frames): each frame is
    compared with the stream's last reading, so a drift keeps one stream; a jump (x1.5)
    starts another, and a return to an earlier size continues that size's stream."""
    from livemask.analysis.tracking import StreamPixelSizes

    sizes = StreamPixelSizes()
    rng = np.random.default_rng(0)
    drift = np.linspace(0.65, 0.67, 400) * (1 + rng.uniform(-1e-3, 1e-3, 400))
    keys = {sizes.geometry("s", (float(v), (0, 0), (64, 64)))[0] for v in drift}
    assert len(keys) == 1
    first = keys.pop()
    jumped = sizes.geometry("s", (0.67 * 1.5, (0, 0), (64, 64)))[0]
    assert jumped != first
    assert sizes.geometry("s", (0.6701, (0, 0), (64, 64)))[0] == first  # back again
    other = StreamPixelSizes()  # another tracker's: what this one saw does not matter
    assert other.geometry("s", (0.6564, (0, 0), (64, 64)))[0] == 0.6564


def test_more_streams_than_the_default_keep_their_keys() -> None:
    """The stream sizes were bounded at 4096 while tracking.max_positions allows more:
    with 5,000 positions every stream was forgotten before it came round again and split
    (5,000 changed track ids, no warning)."""
    from livemask.analysis.tracking import PositionTrackers, frame_geometry

    trackers = PositionTrackers(max_positions=10_000)
    first = [trackers.key({"t": 0, "p": p}, {}, frame_geometry(0.65, (0, 0), (8, 8)))
             for p in range(5000)]
    again = [trackers.key({"t": 1, "p": p}, {}, frame_geometry(0.6502, (0, 0), (8, 8)))
             for p in range(5000)]
    assert again == first


async def test_a_run_that_lowered_the_binning_ends_with_the_full_image(tmp_path: Path) -> None:
    """After a run at binning 2 (its ROI: the full 64 x 64 image then), a run that set
    Binning 1 had pymmcore-plus put back (0, 0, 64, 64), which fits the 128 x 128 image:
    the next run's frames were a corner crop. A ROI is put back only at its binning."""
    bin1 = ["Camera", "Binning", "1"]
    async with Service(_config(tmp_path)) as svc:
        assert isinstance(svc.source, MicroscopeSource)
        core = svc.source.core
        await _enqueue_and_collect(svc, [{"index": {"t": 0}, "properties": [BIN2]}])
        assert list(core.getROI()) == [0, 0, 64, 64]
        await _enqueue_and_collect(svc, [{"index": {"t": 0}, "properties": [bin1]}])
        assert list(core.getROI()) == [0, 0, 128, 128]
        core.setROI(8, 8, 32, 32)  # a ROI of the user's at binning 1 is put back
        await _enqueue_and_collect(svc, [{"index": {"t": 0}}])
        assert list(core.getROI()) == [8, 8, 32, 32]
