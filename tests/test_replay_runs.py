"""Replaying a recording: each frame's recorded pixel size, and several acquisitions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import useq

from livemask.acquisition.replay import ReplaySource, open_stack
from livemask.acquisition.source import RawFrame
from livemask.recording import Recorder
from tests.test_recording import _frame, _wait


def _record(tmp_path: Path, pixel_sizes: list[float], acquisitions: list[int]) -> Path:
    """A closed recording, one frame per entry (scale: the first pixel size)."""
    rng = np.random.default_rng(4)
    rec = Recorder(tmp_path / "run", pixel_size_um=pixel_sizes[0]).start()
    for fid, (px, acq) in enumerate(zip(pixel_sizes, acquisitions, strict=True)):
        frame = _frame(fid, rng.integers(0, 4000, (24, 32)).astype(np.uint16), kind="skipped")
        frame.pixel_size_um, frame.acquisition = px, acq
        rec.on_frame(frame)
    rec.close(frames_acquired=len(pixel_sizes))
    return tmp_path / "run"


def _played(source: ReplaySource) -> list[RawFrame]:
    """Every frame ``source`` plays of its whole stack."""
    got: list[RawFrame] = []
    done: list[str | None] = []
    source.connect(got.append)
    source.start([useq.MDAEvent()] * source.stack.frames, mode="free-run",
                 on_done=done.append)
    _wait(lambda: bool(done))
    source.close()
    assert done == [None]
    return got


def test_each_replayed_frame_carries_its_recorded_pixel_size(tmp_path: Path) -> None:
    """Before, every replayed frame had no pixel size of its own: an objective change
    during the recorded run (0.5 -> 1.0 µm here) was measured with the size at open."""
    run = _record(tmp_path, [0.5, 0.5, 1.0, 1.0], [1, 1, 1, 1])
    stack = open_stack(run)
    assert stack.pixel_size_um == 0.5  # the scale: the size at open
    source = ReplaySource(stack, interval_s=0.0)
    assert [raw.pixel_size_um for raw in _played(source)] == [0.5, 0.5, 1.0, 1.0]
    assert source.reference_pixel_size_um == 0.5  # what the frames' sizes are relative to


def test_a_recording_without_per_frame_pixel_sizes_replays_at_its_scale(
    tmp_path: Path,
) -> None:
    """Recordings from before frames.jsonl had each frame's pixel size: none per frame,
    and no reference (the service measures every frame with the scale's)."""
    run = _record(tmp_path, [0.5, 0.5], [1, 1])
    path = run / "frames.jsonl"
    records = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "pixel_size_um"})
                            + "\n" for r in records), encoding="utf-8")
    source = ReplaySource(open_stack(run), interval_s=0.0)
    assert source.reference_pixel_size_um is None
    assert [raw.pixel_size_um for raw in _played(source)] == [None, None]


def test_a_recording_of_several_acquisitions_says_they_replay_as_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, a replay silently merged the recorded acquisitions into one: tracks linked
    across their boundary and every replayed row said acquisition 1. A replay cannot start
    a new acquisition of the service (see docs/recording.md): it says so, and keeps each
    frame's recorded number."""
    run = _record(tmp_path, [0.5] * 5, [1, 1, 2, 2, 3])
    with caplog.at_level("WARNING", logger="livemask"):
        stack = open_stack(run)
    assert "holds 3 acquisitions (the next begins at replayed frame 2, 4)" in caplog.text
    assert "plays them as ONE acquisition" in caplog.text
    assert stack.acquisitions is not None and list(stack.acquisitions) == [1, 1, 2, 2, 3]
    caplog.clear()
    with caplog.at_level("WARNING", logger="livemask"):
        open_stack(_record(tmp_path / "one", [0.5] * 3, [2, 2, 2]))
    assert "acquisitions" not in caplog.text


async def test_the_service_measures_each_replayed_frame_at_its_recorded_pixel_size(
    tmp_path: Path,
) -> None:
    """Before, the service measured every replayed frame with the recording's scale: an
    objective change (0.5 -> 1.0 µm) in the recorded run replayed with areas 4x too small."""
    from livemask.recording import open_recording
    from livemask.service.app import Service
    from tests.conftest import make_config
    from tests.test_recording import _nuclei_frames, _run_dir, _run_to_end

    images = _nuclei_frames(4)
    original = Recorder(tmp_path / "orig", pixel_size_um=0.5).start()
    for i, img in enumerate(images):
        frame = _frame(i, img, kind="skipped")
        frame.pixel_size_um = 0.5 if i < 2 else 1.0
        original.on_frame(frame)
    original.close()
    stack = open_stack(tmp_path / "orig")
    cfg = make_config(record={"enabled": True, "path": str(tmp_path / "replayed")},
                      hardware={"pixel_size_um": stack.pixel_size_um},
                      acquisition={"sequence": {"time_plan": {"interval": 0, "loops": 4}}})
    async with Service(cfg, source=ReplaySource(stack, interval_s=0.0)) as svc:
        svc.start_acquisition(None)
        await _run_to_end(svc)
    rec = open_recording(_run_dir(tmp_path / "replayed"))
    assert [f["pixel_size_um"] for f in rec.frames] == [0.5, 0.5, 1.0, 1.0]
    for f in rec.frames:
        s, px = f["summary"], f["pixel_size_um"]
        assert s["count"] > 5
        assert s["mean_area_um2"] == pytest.approx(s["mean_area_px"] * px * px, rel=1e-3)
