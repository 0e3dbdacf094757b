"""Where a pixel size comes from: an uncalibrated rig's recording, image files' metadata
(read alike by ``livemask replay`` and ``livemask segment``), square pixels, units."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from typer.testing import CliRunner

from livemask.acquisition.replay import ReplaySource, ReplayStack, open_stack
from livemask.cli import app
from livemask.offline import read_image_file
from livemask.recording import open_recording
from tests.conftest import make_config
from tests.test_recording import _run_dir, _run_to_end

runner = CliRunner()


def _warnings(records: list[logging.LogRecord]) -> str:
    return "\n".join(r.getMessage() for r in records if r.levelno >= logging.WARNING)


def _replay_args(path: Path, out: Path, *more: str) -> list[str]:
    return ["replay", str(path), "--exit-when-done", "--interval", "0",
            "--mode", "synchronized", "--pub", "tcp://127.0.0.1:*",
            "--control", "tcp://127.0.0.1:*", "--record", str(out), *more]


# ------------------------------------------------------------------ an uncalibrated rig
async def _record_uncalibrated_tiles(tmp_path: Path) -> Path:
    """A recording by a service without a pixel-size calibration (a replay of two grain
    tiles that touch at 0.65 µm/px, 83.2 µm apart, with no pixel size): as a rig without a
    PixelSize preset records them, with the placeholder 1.0."""
    from livemask.acquisition.simulated.grains import GrainSample
    from livemask.service.app import Service

    sample = GrainSample(seed=2)
    tiles = [sample.render((0.0, 128.0 * i), (128, 128)).image for i in range(2)]
    stack = ReplayStack(
        Path("tiles"), "tiff", 2, (128, 128), np.dtype(tiles[0].dtype), lambda i: tiles[i],
        positions=[{"x_um": 83.2 * i, "y_um": 0.0, "z_um": None} for i in range(2)])
    cfg = make_config(model={"name": "grains"}, simulation={"sample": "grains"},
                      record={"enabled": True, "path": str(tmp_path / "live")},
                      acquisition={"sequence": {"time_plan": {"interval": 0, "loops": 2}}})
    async with Service(cfg, source=ReplaySource(stack, interval_s=0.0)) as svc:
        assert svc.pixel_size_known is False
        svc.start_acquisition(None)
        await _run_to_end(svc)
    return _run_dir(tmp_path / "live")


def test_a_recording_of_an_uncalibrated_rig_replays_uncalibrated(tmp_path: Path) -> None:
    """Before, the recording said pixel_size_um 1.0 like any calibration, and its replay
    measured at 1 µm/px as calibrated: the grain overlap check, which the live run skipped,
    left touching tiles out of the cumulative statistics (12 of 16 in a 4x4 scan)."""
    run = asyncio.run(_record_uncalibrated_tiles(tmp_path))
    units = json.loads((run / "units.json").read_text(encoding="utf-8"))
    assert units["pixel_size_calibrated"] is False and units["pixel_size_um"] == 1.0
    rec = open_recording(run)
    assert rec.pixel_size_calibrated is False
    assert rec.attributes["livemask"]["pixel_size_calibrated"] is False
    stack = open_stack(run)
    assert stack.pixel_size_um is None and stack.pixel_sizes is None

    config = tmp_path / "grains.yaml"
    config.write_text("model:\n  name: grains\n", encoding="utf-8")
    result = runner.invoke(app, _replay_args(run, tmp_path / "again", "-c", str(config)))
    assert result.exit_code == 0, result.output
    assert "was recorded on a rig without a pixel-size calibration" in result.output
    assert "hardware.pixel_size_um is not set" in result.output
    assert "overlaps a tile already pooled" not in result.output
    again = open_recording(_run_dir(tmp_path / "again"))
    cumulative = again.frames[-1]["grains"]["cumulative"]
    assert (cumulative["tiles"], cumulative["tiles_overlapping"]) == (2, 0)
    assert again.pixel_size_calibrated is False  # and so is a recording of the replay


def test_a_recording_that_does_not_say_replays_at_its_scale(tmp_path: Path) -> None:
    """Recordings from before the flag (none in their attributes) stay calibrated."""
    from livemask.recording import Recorder
    from tests.test_recording import _frame

    rec = Recorder(tmp_path / "run", pixel_size_um=0.5).start()
    frame = _frame(0, np.ones((16, 16), np.uint16), kind="skipped")
    frame.pixel_size_um = 0.5
    rec.on_frame(frame)
    rec.close(frames_acquired=1)
    root = zarr.open_group(tmp_path / "run" / "images.ome.zarr", mode="r+")
    recorded: Any = root.attrs["livemask"]
    attrs = dict(recorded)
    assert attrs.pop("pixel_size_calibrated") is True
    root.attrs["livemask"] = attrs
    assert open_recording(tmp_path / "run").pixel_size_calibrated is True
    assert open_stack(tmp_path / "run").pixel_size_um == 0.5


# ------------------------------------------------------------------ image files
def _write(path: Path, how: str, px: float = 0.325, py: float | None = None) -> None:
    """A 64x64 image whose metadata gives ``px`` (x) and ``py`` (y, default ``px``) µm."""
    image = np.random.default_rng(1).integers(0, 999, (64, 64)).astype(np.uint16)
    py = px if py is None else py
    if how == "ome":
        tifffile.imwrite(path, image, ome=True, metadata={
            "axes": "YX", "PhysicalSizeX": px, "PhysicalSizeY": py})
    elif how == "ome-greek-mu":  # U+03BC, not the micro sign U+00B5
        tifffile.imwrite(path, image, ome=True, metadata={
            "axes": "YX", "PhysicalSizeX": px, "PhysicalSizeXUnit": "\u03bcm",
            "PhysicalSizeY": py, "PhysicalSizeYUnit": "\u03bcm"})
    elif how == "ome-furlong":
        tifffile.imwrite(path, image, ome=True, metadata={
            "axes": "YX", "PhysicalSizeX": px, "PhysicalSizeXUnit": "furlong"})
    elif how == "imagej":
        tifffile.imwrite(path, image, imagej=True, resolution=(1 / px, 1 / py),
                         metadata={"unit": "micron"})
    elif how in ("resolution-cm", "resolution-mm"):
        per = 1e4 if how == "resolution-cm" else 1e3
        tifffile.imwrite(path, image, resolution=(per / px, per / py),
                         resolutionunit="CENTIMETER" if how == "resolution-cm" else "MILLIMETER")
    elif how == "resolution-inch":  # a print resolution: not a pixel size
        tifffile.imwrite(path, image, resolution=(72, 72), resolutionunit="INCH")
    else:
        tifffile.imwrite(path, image)


@pytest.mark.parametrize(
    ("how", "expected"),
    [("ome", 0.325), ("ome-greek-mu", 0.325), ("imagej", 0.325), ("resolution-cm", 0.325),
     ("resolution-mm", 0.325), ("resolution-inch", None), ("plain", None)],
)
def test_replay_and_segment_read_the_same_pixel_size(
    tmp_path: Path, how: str, expected: float | None
) -> None:
    """Before, replay ignored TIFF resolution tags in cm/mm/µm that segment used, and both
    read an OME size in "μm" (Greek mu) as no size."""
    src = tmp_path / f"{how}.tif"
    _write(src, how)
    replayed = open_stack(src)
    replayed.close()
    for got in (replayed.pixel_size_um, read_image_file(src).pixel_size_um):
        assert got == (None if expected is None else pytest.approx(expected, rel=1e-6))


def test_a_size_in_an_unknown_unit_is_logged_naming_the_unit(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    """Before, such a file was silently treated as having no pixel size."""
    src = tmp_path / "furlong.tif"
    _write(src, "ome-furlong")
    assert read_image_file(src).pixel_size_um is None
    assert "its OME PhysicalSizeX is in unit 'furlong', which livemask does not know" in (
        _warnings(livemask_log))


@pytest.mark.parametrize("how", ["cm", "plain"])
def test_replay_of_an_image_file_logs_where_its_pixel_size_came_from(
    tmp_path: Path, how: str
) -> None:
    """Before, a file without a usable size replayed at 1 µm/px (µm values, ASTM G) with
    no word, and a size in TIFF resolution tags in cm was ignored."""
    src = tmp_path / "image.tif"
    _write(src, "resolution-cm" if how == "cm" else "plain")
    result = runner.invoke(app, _replay_args(src, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    rec = open_recording(_run_dir(tmp_path / "out"))
    if how == "cm":
        assert "pixel size 0.325 µm/px, from TIFF resolution" in result.output
        assert "no pixel size" not in result.output
        assert rec.pixel_size_um == pytest.approx(0.325)
        assert rec.pixel_size_calibrated is True
    else:
        assert "no pixel size:" in result.output and "has no pixel size in its metadata" in (
            result.output)
        assert "Set hardware.pixel_size_um in the config" in result.output
        assert rec.pixel_size_calibrated is False


# ------------------------------------------------------------------ square pixels
@pytest.mark.parametrize("how", ["ome", "imagej", "resolution-cm"])
def test_non_square_pixels_are_measured_with_x_and_a_warning(
    tmp_path: Path, how: str, livemask_log: list[logging.LogRecord]
) -> None:
    """Before, a y size other than x was ignored without a word."""
    src = tmp_path / "oblong.tif"
    _write(src, how, px=0.325, py=0.5)
    assert read_image_file(src).pixel_size_um == pytest.approx(0.325)
    replayed = open_stack(src)
    replayed.close()
    assert replayed.pixel_size_um == pytest.approx(0.325)
    warned = [m for m in _warnings(livemask_log).splitlines() if "not square" in m]
    assert len(warned) == 2  # segment's read and replay's
    assert "0.325 µm in x, 0.5 µm in y" in warned[0]
    assert "measurements assume square pixels and use the x size" in warned[0]


def test_pixels_square_within_one_percent_give_no_warning(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    src = tmp_path / "square.tif"
    _write(src, "ome", px=0.325, py=0.3275)  # 0.8 %: rounding in the writer's metadata
    assert read_image_file(src).pixel_size_um == pytest.approx(0.325)
    assert "not square" not in _warnings(livemask_log)


def test_an_ome_zarr_with_non_square_pixels_replays_with_x_and_a_warning(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    root = zarr.open_group(tmp_path / "img.zarr", mode="w", zarr_format=3, attributes={"ome": {
        "version": "0.5", "multiscales": [{
            "axes": [{"name": "t", "type": "time"},
                     {"name": "y", "type": "space", "unit": "micrometer"},
                     {"name": "x", "type": "space", "unit": "micrometer"}],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, 0.5, 0.325]}]}]}]}})
    root.create_array("0", shape=(1, 16, 16), dtype="uint16")[:] = 7
    assert open_stack(tmp_path / "img.zarr").pixel_size_um == pytest.approx(0.325)
    assert "its pixels are not square (OME-Zarr scale: 0.325 µm in x, 0.5 µm in y)" in (
        _warnings(livemask_log))


def test_an_uncalibrated_recordings_images_copied_alone_replay_uncalibrated(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    """Before, the images.ome.zarr of a rig without a calibration, copied without its run
    folder, replayed at its placeholder scale 1.0 as µm (the unit-less axes defaulted to
    micrometer; ``livemask.pixel_size_calibrated: false`` was not read)."""
    import shutil

    from livemask.acquisition.replay import replay_pixel_size
    from livemask.analysis.measure import UNITS
    from livemask.recording import Recorder
    from tests.test_recording import _frame

    run = tmp_path / "run"
    rec = Recorder(run, pixel_size_um=1.0, pixel_size_calibrated=False, units=UNITS).start()
    rec.on_frame(_frame(0, np.ones((24, 32), np.uint16)))
    rec.close(frames_acquired=1)
    alone = tmp_path / "copy" / "images.ome.zarr"
    shutil.copytree(run / "images.ome.zarr", alone)
    stack = open_stack(alone)
    assert stack.kind == "ome-zarr" and stack.frames == 1
    assert stack.pixel_size_um is None and stack.pixel_size_calibrated is False
    assert replay_pixel_size(stack, None) is None
    assert "was recorded on a rig without a pixel-size calibration" in _warnings(livemask_log)


def test_an_ome_zarr_without_units_replays_in_pixels_with_a_warning(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    """NGFF allows axes without a unit: the scale is then not known to be µm (before: it
    was taken as µm/px without a word)."""
    from livemask.acquisition.replay import replay_pixel_size

    root = zarr.open_group(tmp_path / "img.zarr", mode="w", zarr_format=3, attributes={"ome": {
        "version": "0.5", "multiscales": [{
            "axes": [{"name": "t", "type": "time"}, {"name": "y", "type": "space"},
                     {"name": "x", "type": "space"}],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, 0.5, 0.5]}]}]}]}})
    root.create_array("0", shape=(2, 16, 16), dtype="uint16")[:] = 7
    stack = open_stack(tmp_path / "img.zarr")
    assert stack.frames == 2 and stack.pixel_size_um is None
    assert stack.pixel_size_calibrated is True  # it does not say that it has none
    np.testing.assert_array_equal(stack.plane(1), np.full((16, 16), 7, np.uint16))
    assert replay_pixel_size(stack, None) is None
    assert "has no pixel size in its metadata" in _warnings(livemask_log)
    assert replay_pixel_size(stack, 0.25) == 0.25  # hardware.pixel_size_um still wins
