"""Recordings a hard stop left without their frame list (recording hunt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from livemask.acquisition.replay import open_stack
from livemask.errors import ReplayError
from livemask.recording import Recorder
from tests.test_recording import _frame


def _hard_stopped_run(tmp_path: Path, frames: int = 3) -> Path:
    """A recording of ``frames`` frames as a power cut leaves it: images on disk, but no
    frames.jsonl and no closing attributes (which hold the records of a closed run)."""
    run = tmp_path / "run"
    rec = Recorder(run, pixel_size_um=0.5).start()
    for i in range(frames):
        rec.on_frame(_frame(i, np.full((16, 16), i + 1, np.uint16), kind="skipped"))
    rec.close(frames_acquired=frames)
    (run / "frames.jsonl").unlink()
    root = zarr.open_group(run / "images.ome.zarr", mode="r+")
    attrs = dict(root.attrs["livemask"])  # type: ignore[arg-type]
    attrs.pop("frames", None)
    attrs["complete"] = False
    root.attrs["livemask"] = attrs
    return run


def test_a_run_without_its_frame_list_says_how_to_replay_its_images(tmp_path: Path) -> None:
    """Before: "recording ... holds no frames", although its images hold them."""
    run = _hard_stopped_run(tmp_path)
    with pytest.raises(ReplayError) as err:
        open_stack(run)
    message = str(err.value)
    assert "holds 3 frame(s) on its t axis, but has no frames.jsonl" in message
    assert f"livemask replay {run / 'images.ome.zarr'}" in message
    images = open_stack(run / "images.ome.zarr")  # which the message points to
    assert images.frames == 3
    assert [int(images.plane(i)[0, 0]) for i in range(3)] == [1, 2, 3]


def test_a_full_disk_says_what_to_do_and_its_end_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the error said only "No space left on device", and that the recording went
    on once there was room again was in the log alone: a dashboard showed the error on."""
    from livemask.analysis.measure import UNITS
    from livemask.recording.files import BlockFile
    from tests.test_recording import _wait

    real_write = BlockFile.write
    full = [False]

    def disk_full(self: BlockFile, text: str) -> None:
        if full[0]:
            raise OSError(28, "No space left on device")
        real_write(self, text)

    monkeypatch.setattr(BlockFile, "write", disk_full)
    errors: list[str] = []
    resumed: list[int] = []
    rec = Recorder(tmp_path / "run", pixel_size_um=0.65, units=UNITS, on_error=errors.append,
                   on_resumed=resumed.append).start()
    full[0] = True  # the disk fills once the run has started
    image = np.ones((24, 32), np.uint16)
    rec.on_frame(_frame(0, image))
    _wait(lambda: rec.counts.written + rec.counts.rejected == 1)
    assert rec.report()["failing"] is True and resumed == []
    (error,) = errors
    assert "No space left on device; free space on its disk, or choose a folder on another" in (
        error)
    assert "goes on by itself once it can (event recording_resumed)" in error
    full[0] = False
    rec.on_frame(_frame(1, image))
    _wait(lambda: rec.counts.written + rec.counts.rejected == 2)
    assert rec.report()["failing"] is False
    assert resumed == [rec.counts.errors_total] and resumed[0] >= 1
    rec.close(frames_acquired=2)
