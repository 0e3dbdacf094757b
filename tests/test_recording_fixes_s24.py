"""Recordings a hard stop left without their frame list (recording hunt)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from livemask.acquisition.replay import open_stack
from livemask.errors import ReplayError
from livemask.recording import Recorder
from tests.test_recording import _frame


def _hard_stopped_run(tmp_path: Path, frames: int = 3, *, listing: bool = False) -> Path:
    """A recording of ``frames`` frames as a power cut leaves it: images on disk, but no
    frames.jsonl (``listing``: an empty one, as the recorder makes it at start) and no
    closing attributes (which hold the records of a closed run)."""
    run = tmp_path / "run"
    rec = Recorder(run, pixel_size_um=0.5).start()
    for i in range(frames):
        rec.on_frame(_frame(i, np.full((16, 16), i + 1, np.uint16), kind="skipped"))
    rec.close(frames_acquired=frames)
    (run / "frames.jsonl").unlink()
    if listing:
        (run / "frames.jsonl").write_text("", encoding="utf-8")
    root = zarr.open_group(run / "images.ome.zarr", mode="r+")
    attrs = dict(root.attrs["livemask"])  # type: ignore[arg-type]
    attrs.pop("frames", None)
    attrs["complete"] = False
    root.attrs["livemask"] = attrs
    return run


@pytest.mark.parametrize(("listing", "why"), [
    (False, "has no frames.jsonl"), (True, "its frames.jsonl lists none of them")])
def test_a_run_without_its_frame_list_says_how_to_replay_its_images(
    tmp_path: Path, listing: bool, why: str
) -> None:
    """Before: "recording ... holds no frames", although its images hold them. (A first
    version pointed at images.ome.zarr, which with an empty frames.jsonl beside it is read
    as the recording again: review.)"""
    run = _hard_stopped_run(tmp_path, listing=listing)
    with pytest.raises(ReplayError) as err:
        open_stack(run)
    message = str(err.value)
    assert f"holds 3 frame(s) on its t axis, but {why}" in message
    array = run / "images.ome.zarr" / "0"
    assert f"livemask replay {array}`" in message
    images = open_stack(array)  # which the message points to
    assert images.frames == 3
    assert [int(images.plane(i)[0, 0]) for i in range(3)] == [1, 2, 3]


def test_a_run_whose_frames_were_none_stored_says_so(tmp_path: Path) -> None:
    run = _hard_stopped_run(tmp_path, listing=True)
    lines = [{"frame_id": i, "stored": False, "index": {"t": i}} for i in range(3)]
    (run / "frames.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    with pytest.raises(ReplayError, match=r"lists 3 frame\(s\), none of them stored"):
        open_stack(run)


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


def test_a_replay_records_where_each_frame_came_from(tmp_path: Path) -> None:
    """Re-analysing a time-lapse as fast as the model goes (``--interval 0``) renumbered the
    stored frames and gave them the replay's clock: nothing in the new recording led back to
    the original frame or its time (recording hunt). Now every frame says both: headers,
    frames.jsonl and measurements.csv."""
    import asyncio
    import csv

    from typer.testing import CliRunner

    from livemask.cli import app
    from livemask.recording import open_recording
    from livemask.service.app import Service
    from tests.conftest import make_config
    from tests.test_recording import _run_dir, _run_to_end

    async def live() -> Path:
        cfg = make_config(
            simulation={"sensor_shape_px": [128, 128], "truth": False},
            record={"enabled": True, "path": str(tmp_path / "live")},
            acquisition={"mode": "free-run",
                         "sequence": {"time_plan": {"interval": 0.4, "loops": 4}}})
        async with Service(cfg) as svc:
            svc.start_acquisition(None)
            await _run_to_end(svc)
        return _run_dir(tmp_path / "live")

    def replay(of: Path, into: Path) -> Path:
        result = CliRunner().invoke(app, [
            "replay", str(of), "--interval", "0", "--exit-when-done", "--mode",
            "synchronized", "--pub", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
            "--record", str(into)])
        assert result.exit_code == 0, result.output
        return _run_dir(into)

    def csv_rows(of: Path) -> list[dict[str, str]]:
        with (of / "measurements.csv").open(encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    run = asyncio.run(live())
    original = open_recording(run).frames
    again_run = replay(run, tmp_path / "again")
    again = [json.loads(line) for line in (again_run / "frames.jsonl").open()]
    assert [f["replayed_from"]["frame_id"] for f in again] == [
        f["frame_id"] for f in original]
    assert original[-1]["t"]["acquired"] - original[0]["t"]["acquired"] > 1.1  # 3 × 0.4 s
    assert again[-1]["t"]["acquired"] - again[0]["t"]["acquired"] < 1.0  # replayed faster
    # on the original run's time axis: its CSV's time_s (since that recording started)
    live_time = {int(r["frame_id"]): float(r["time_s"]) for r in csv_rows(run)}
    rows = csv_rows(again_run)
    assert rows and {int(r["replayed_frame_id"]) for r in rows} == set(live_time)
    for r in rows:
        assert float(r["replayed_time_s"]) == pytest.approx(
            live_time[int(r["replayed_frame_id"])], abs=2e-4)
    assert all(r["replayed_frame_id"] == "" for r in csv_rows(run))  # live rows: empty
    # a replay of the replay still leads back to the original run (review)
    third = [json.loads(line) for line in (replay(again_run, tmp_path / "third")
                                           / "frames.jsonl").open()]
    assert [f["replayed_from"] for f in third] == [f["replayed_from"] for f in again]


def test_the_rows_of_a_frame_whose_line_was_lost_are_taken_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A disk that takes the rows but not the frame's frames.jsonl line: the frame is not
    in the recording, and neither are its rows now (before, they stayed as rows of no frame,
    counted in measurement_rows), and the closing line's "rows_stored: false in frames.jsonl"
    counts only frames whose line says so (before: 97 counted, 3 lines had it)."""
    import csv

    from livemask.recording.files import BlockFile
    from tests.test_recording import _wait

    real_write = BlockFile.write
    lines_fail = [False]

    def no_room_for_lines(self: BlockFile, text: str) -> None:
        refused = self.path.name == "frames.jsonl" or (  # frame 0's rows are taken
            self.path.name == "measurements.csv" and not text.startswith("0,"))
        if lines_fail[0] and refused:
            raise OSError(28, "No space left on device")
        real_write(self, text)

    monkeypatch.setattr(BlockFile, "write", no_room_for_lines)
    run = tmp_path / "run"
    rec = Recorder(run, pixel_size_um=0.5).start()
    image = np.ones((16, 16), np.uint16)
    lines_fail[0] = True
    rec.on_frame(_frame(0, image))  # rows written, line refused
    rec.on_frame(_frame(1, image))  # rows and line refused
    _wait(lambda: rec.counts.written + rec.counts.rejected == 2)
    lines_fail[0] = False
    rec.on_frame(_frame(2, image))
    _wait(lambda: rec.counts.written + rec.counts.rejected == 3)
    c = rec.counts
    assert (c.written, c.rejected, c.rows, c.rows_lost) == (1, 2, 2, 0)
    with caplog.at_level("WARNING", logger="livemask"):
        rec.close(frames_acquired=3)
    with (run / "measurements.csv").open(encoding="utf-8") as fh:
        assert [r["frame_id"] for r in csv.DictReader(fh)] == ["2", "2"]
    assert "rows_stored: false" not in caplog.text
    assert "2 rejected" in caplog.text


async def test_the_service_publishes_and_records_a_recordings_error_and_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's side of a full disk that frees up (session 24 checked it by hand): one
    ``error`` event naming the recording, then one ``recording_resumed``, both published and
    in events.jsonl, and the frames before and after it recorded."""
    from livemask.recording import open_recording
    from livemask.recording.files import BlockFile
    from livemask.service.app import Service
    from tests.conftest import make_config
    from tests.test_service import collect_run

    real_write = BlockFile.write
    lost = tuple(f'{{"frame_id": {i},' for i in (3, 4, 5))  # the disk is full for these

    def frames_on_a_full_disk(self: BlockFile, text: str) -> None:
        if self.path.name == "frames.jsonl" and text.startswith(lost):
            raise OSError(28, "No space left on device")
        real_write(self, text)

    monkeypatch.setattr(BlockFile, "write", frames_on_a_full_disk)
    cfg = make_config(record={"enabled": True, "path": str(tmp_path)},
                      acquisition={"sequence": {"time_plan": {"interval": 0.0, "loops": 9}}})
    async with Service(cfg) as svc:
        got = await collect_run(svc, ("event",))
        await asyncio.sleep(0.5)  # the writer thread's last lines
    kinds = [m.header["kind"] for m in got["event"]]
    errors = [m.header for m in got["event"] if m.header["kind"] == "error"]
    assert len(errors) == 1 and "recording to" in errors[0]["detail"]
    assert kinds.count("recording_resumed") == 1
    assert kinds.index("error") < kinds.index("recording_resumed")
    run = next(tmp_path.glob("run-*"))
    recorded = [json.loads(line)["kind"]
                for line in (run / "events.jsonl").read_text().splitlines()]
    assert "error" in recorded and "recording_resumed" in recorded
    assert open_recording(run).images.shape[0] == 9
