"""The recording's layout: units of an uncalibrated run, the order the arrays grow in, a run
of no frames (made at start, complete at close), a simulated rig without a pixel-size preset."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from livemask.acquisition.replay import open_stack
from livemask.acquisition.simulated import SIMULATED_CFG
from livemask.analysis.measure import UNITS
from livemask.cli import app
from livemask.errors import ReplayError
from livemask.recording import Recorder, find_recording, open_recording
from livemask.recording.writer import IMAGES
from livemask.service.app import Service
from tests.conftest import make_config
from tests.test_recording import _frame, _run_dir, _wait

runner = CliRunner()


def _zarr_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
    return data


def _space_axes(group: Path) -> list[dict[str, Any]]:
    axes: list[dict[str, Any]] = _zarr_json(group)["attributes"]["ome"]["multiscales"][0]["axes"]
    return axes[1:]


# ------------------------------------------------------------------ units
def test_an_uncalibrated_recording_says_its_object_columns_are_pixels(tmp_path: Path) -> None:
    """Before, units.json gave µm² and µm for columns that held pixel values, and the OME
    axes said micrometer for a placeholder scale of 1.0 (data-analyst hunt)."""
    run = tmp_path / "run"
    rec = Recorder(run, pixel_size_um=1.0, pixel_size_calibrated=False, units=UNITS).start()
    rec.on_frame(_frame(0, np.ones((24, 32), np.uint16)))
    rec.close(frames_acquired=1)

    units = json.loads((run / "units.json").read_text(encoding="utf-8"))
    columns = units["columns"]
    assert columns["area_um2"].startswith("px² (no pixel-size calibration")
    assert columns["equivalent_diameter_um"].startswith("px (no pixel-size calibration")
    assert columns["x_um"] == columns["y_um"] == columns["z_um"] == "µm"  # the stage's
    assert columns["area_px"] == "px"
    for group in (run / IMAGES, run / IMAGES / "labels" / "masks"):
        assert [a["name"] for a in _space_axes(group)] == ["y", "x"]
        assert all("unit" not in a for a in _space_axes(group)), group
    yaozarrs = pytest.importorskip("yaozarrs")
    yaozarrs.validate_zarr_store(str(run / IMAGES))
    # read back, and replayed, as a recording of an uncalibrated rig (not at 1 µm/px)
    assert open_recording(run).pixel_size_calibrated is False
    for path in (run, run / IMAGES):
        stack = open_stack(path)
        assert stack.kind == "recording" and stack.pixel_size_um is None
        assert stack.pixel_size_calibrated is False


def test_a_calibrated_recording_keeps_its_micrometres(tmp_path: Path) -> None:
    run = tmp_path / "run"
    rec = Recorder(run, pixel_size_um=0.65, units=UNITS).start()
    rec.on_frame(_frame(0, np.ones((24, 32), np.uint16)))
    rec.close(frames_acquired=1)
    columns = json.loads((run / "units.json").read_text(encoding="utf-8"))["columns"]
    assert (columns["area_um2"], columns["equivalent_diameter_um"]) == ("µm²", "µm")
    for group in (run / IMAGES, run / IMAGES / "labels" / "masks"):
        assert [a["unit"] for a in _space_axes(group)] == ["micrometer", "micrometer"]


# ------------------------------------------------------------------ growing the arrays
@pytest.mark.parametrize("path", ["batch", "frame"])
def test_the_images_are_never_longer_than_the_labels_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Before, the images grew first: a SIGKILL between the two metadata writes left them a
    frame longer than the labels (2 of 9 kills), and reading ``labels[t]`` for every ``t``
    of the images failed. After each resize the t axes on disk are checked."""
    run = tmp_path / "run"
    seen: list[tuple[int, int]] = []  # (images, labels) frames on disk after each resize
    real_resize = zarr.Array.resize

    def checked_resize(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = real_resize(self, *args, **kwargs)
        images = _zarr_json(run / IMAGES / "0")["shape"][0]
        labels_json = run / IMAGES / "labels" / "masks" / "0"
        seen.append((images, _zarr_json(labels_json)["shape"][0]))
        return out

    monkeypatch.setattr(zarr.Array, "resize", checked_resize)
    if path == "frame":  # the batch does not grow them: each frame's write does
        def create_only(self: Recorder, frames: list[Any]) -> None:
            if frames and self._images is None:
                self._create_arrays(frames[0].image)

        monkeypatch.setattr(Recorder, "_grow", create_only)
    rec = Recorder(run, pixel_size_um=0.65, units=UNITS).start()
    image = np.ones((16, 16), np.uint16)
    for fid in range(3):
        rec.on_frame(_frame(fid, image))
        _wait(lambda n=fid + 1: rec.report()["frames_written"] == n)
    rec.close(frames_acquired=3)
    assert len(seen) == 6  # two resizes a frame
    assert all(images <= labels for images, labels in seen), seen
    assert seen[-1] == (3, 3)


# ------------------------------------------------------------------ a run of no frames
def test_a_run_of_no_frames_is_a_recording_that_says_it_holds_none(tmp_path: Path) -> None:
    """Before, the image group was made with the first frame: a run killed before it, or
    closed without frames, had no images.ome.zarr (zarr.open_group failed, replay said
    "neither a livemask recording nor a zarr group") and no ``complete: true`` anywhere."""
    run = tmp_path / "run-20250101-120000"
    rec = Recorder(run, pixel_size_um=0.65, units=UNITS).start()
    try:  # as after a SIGKILL before the first frame: the group, not complete
        live = zarr.open_group(run / IMAGES, mode="r")
        assert "ome" not in live.attrs  # (no image yet: OME metadata comes with the arrays)
        assert live.attrs["livemask"]["complete"] is False
        with pytest.raises(ReplayError, match=r"holds no frames: its recorder was stopped"):
            open_recording(run)
    finally:
        rec.close(frames_acquired=0)
    attrs = zarr.open_group(run / IMAGES, mode="r").attrs["livemask"]
    assert attrs["complete"] is True
    assert (attrs["frames_written"], attrs["frames_acquired"], attrs["frames"]) == (0, 0, [])
    with pytest.raises(ReplayError, match=r"holds no frames: its run ended before the first"):
        open_recording(run)
    for path in (run, run / IMAGES, tmp_path):  # the run, its images, its parent
        result = runner.invoke(app, ["replay", str(path)])
        assert result.exit_code == 2, result.output
        flat = " ".join(result.output.split())
        assert f"error: recording {run} holds no frames" in flat, flat
        assert "Traceback" not in result.output


def test_a_run_of_no_frames_does_not_hide_the_run_that_recorded_frames(tmp_path: Path) -> None:
    """Before, the empty run's images.ome.zarr (made at start) counted it as one of two runs:
    ``find_recording(parent)`` gave None and replay of the parent said "is a folder but
    neither a livemask recording … nor a zarr group"."""
    empty, full = tmp_path / "run-20260101-000000", tmp_path / "run-20260101-000100"
    Recorder(empty, pixel_size_um=0.5, units=UNITS).start().close(frames_acquired=0)
    rec = Recorder(full, pixel_size_um=0.5, units=UNITS).start()
    rec.on_frame(_frame(0, np.ones((24, 32), np.uint16)))
    rec.close(frames_acquired=1)
    assert find_recording(tmp_path) == full
    stack = open_stack(tmp_path)
    assert (stack.kind, stack.path, stack.frames) == ("recording", full, 1)
    # the empty run itself still says that it holds none
    with pytest.raises(ReplayError, match=r"holds no frames: its run ended before the first"):
        open_stack(empty)


def test_a_folder_of_runs_that_recorded_no_frames_says_so(tmp_path: Path) -> None:
    """With no run of frames, the one empty run is found (and holds none)."""
    run = tmp_path / "run-20260101-000000"
    Recorder(run, pixel_size_um=0.5, units=UNITS).start().close(frames_acquired=0)
    assert find_recording(tmp_path) == run
    with pytest.raises(ReplayError, match=r"holds no frames"):
        open_stack(tmp_path)


def test_a_run_recorded_before_the_group_was_made_at_start_holds_no_frames(
    tmp_path: Path,
) -> None:
    """A run killed before its first frame by an older recorder has the side files only."""
    import shutil

    run = tmp_path / "run"
    Recorder(run, pixel_size_um=0.65, units=UNITS).start().close(frames_acquired=0)
    shutil.rmtree(run / IMAGES, ignore_errors=True)  # (an older recorder made none)
    with pytest.raises(ReplayError, match=r"holds no frames"):
        open_recording(run)
    result = runner.invoke(app, ["replay", str(run)])
    assert result.exit_code == 2 and "holds no frames" in result.output, result.output


# ------------------------------------------------------------------ a simulated rig
async def test_a_simulated_rig_without_a_pixel_size_preset_records_in_micrometres(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the core warned "measurements stay in pixels" while the service measured, and
    recorded, at the simulated world's 0.65 µm (data-analyst hunt). No frame is acquired:
    the recording is also one of no frames, complete at close."""
    cfg_text = SIMULATED_CFG.read_text(encoding="utf-8")
    rig = tmp_path / "uncal.cfg"
    rig.write_text("\n".join(x for x in cfg_text.splitlines() if "PixelSize" not in x),
                   encoding="utf-8")
    cfg = make_config(hardware={"config_file": str(rig)},
                      record={"enabled": True, "path": str(tmp_path / "rec")},
                      publish={"pub_address": f"ipc://{tmp_path}/pub",
                               "control_address": f"ipc://{tmp_path}/ctl"})
    with caplog.at_level(logging.WARNING, logger="livemask"):
        async with Service(cfg) as svc:
            assert svc.pixel_size_um == pytest.approx(0.65) and svc.pixel_size_known
    warnings = caplog.text
    assert "the core has no active pixel size (0 presets)" in warnings
    assert "stay in pixels" not in warnings and "no pixel size" not in warnings
    run = _run_dir(tmp_path / "rec")
    units = json.loads((run / "units.json").read_text(encoding="utf-8"))
    assert (units["pixel_size_um"], units["pixel_size_calibrated"]) == (0.65, True)
    attrs = zarr.open_group(run / IMAGES, mode="r").attrs.asdict()
    assert attrs["livemask"]["pixel_size_um"] == 0.65  # (no frames: no OME image, no scale)
    assert attrs["livemask"]["complete"] is True and attrs["livemask"]["frames_written"] == 0
