"""Recording fixes: a full disk that recovers, runs of no frames as OME-Zarr, folders of
several runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from livemask.acquisition.replay import open_stack
from livemask.analysis.measure import UNITS
from livemask.cli import app
from livemask.errors import ReplayError
from livemask.recording import IMAGES, Recorder, open_recording
from livemask.recording import writer as writer_module
from livemask.recording.files import BlockFile
from tests.test_recording import _frame, _run_with_file_size_limit, _wait

runner = CliRunner()


def _events(run: Path) -> list[dict[str, Any]]:
    lines = (run / "events.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


# ------------------------------------------------------------------ a full disk recovers
# The disk fills (every write fails: the kernel's file-size limit of 1 byte), frees, fills
# again and frees again, while frames keep coming and no other event is published.
_TWO_FULL_DISKS_SCRIPT = r"""
import json, resource, signal, sys
from pathlib import Path
import numpy as np
from livemask.analysis.measure import UNITS
from livemask.recording import Recorder
from tests.test_recording import _frame, _wait

path = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
errors = []
rec = Recorder(path, pixel_size_um=0.65, units=UNITS, on_error=errors.append).start()
rng = np.random.default_rng(0)
reports = []

def frames(ids, full):
    limit = 1 if full else resource.RLIM_INFINITY
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    for fid in ids:
        rec.on_frame(_frame(fid, rng.integers(0, 4000, (24, 32)).astype(np.uint16)))
        c = rec.counts
        _wait(lambda: c.written + c.rejected == fid + 1)
    reports.append(rec.report())

frames(range(0, 3), full=False)
frames(range(3, 6), full=True)
frames(range(6, 9), full=False)
frames(range(9, 12), full=True)
frames(range(12, 15), full=False)
rec.close(frames_acquired=15)
print(json.dumps({"reports": reports, "errors": errors}))
"""


def test_a_disk_that_fills_twice_is_announced_twice_and_events_catch_up(
    tmp_path: Path,
) -> None:
    """Before, the frame_not_stored lines that failed left events.jsonl "failing" until an
    event was written again, which a steady time-lapse never publishes: status said
    ``failing: true`` after the disk recovered, and the second full disk was not announced
    (hunter, 4 MB tmpfs). Now those lines wait and are written after the next frame's."""
    run = tmp_path / "run"
    out, log_text = _run_with_file_size_limit(_TWO_FULL_DISKS_SCRIPT, run, 0)
    reports, errors = out["reports"], out["errors"]
    assert [r["failing"] for r in reports] == [False, True, False, True, False]
    assert [r["frames_written"] for r in reports] == [3, 3, 6, 6, 9]
    assert len(errors) == 2, errors  # each full disk announced once
    assert all("File too large" in e for e in errors)
    assert log_text.count("writing again") == 2
    events = _events(run)
    assert [(e["kind"], e["frame_id"]) for e in events] == [
        ("frame_not_stored", fid) for fid in (3, 4, 5, 9, 10, 11)]  # every one, in order
    stored = [r["stored"] for r in map(json.loads, (run / "frames.jsonl").open())]
    assert stored == [True] * 9  # the frames written while the disk had room
    assert len(open_recording(run).frames) == 9


def _events_disk_full(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Make events.jsonl writes fail as on a full disk while ``flag[0]`` is True (returned,
    True at first); other files write as usual."""
    real_write = BlockFile.write
    full = [True]

    def events_full(self: BlockFile, text: str) -> None:
        if self.path.name == "events.jsonl" and full[0]:
            raise OSError(28, "No space left on device")
        real_write(self, text)

    monkeypatch.setattr(BlockFile, "write", events_full)
    return full


def test_events_past_the_cap_are_counted_in_one_line_in_their_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What waits for events.jsonl is bounded: past the cap, events are counted and one
    line says how many are missing, where they were; the order of the others is kept."""
    monkeypatch.setattr(writer_module, "MAX_PENDING_EVENTS", 3)
    full = _events_disk_full(monkeypatch)
    errors: list[str] = []
    run = tmp_path / "run"
    rec = Recorder(run, pixel_size_um=0.65, units=UNITS, on_error=errors.append).start()
    image = np.ones((24, 32), np.uint16)
    for n in range(6):
        rec.on_event({"kind": "test", "n": n})
    rec.on_frame(_frame(0, image))
    _wait(lambda: rec.counts.written == 1)
    assert rec.report()["failing"] is True
    full[0] = False
    rec.on_frame(_frame(1, image))  # its frames.jsonl line written: the events follow
    _wait(lambda: rec.counts.written == 2)
    assert rec.report()["failing"] is False
    with caplog.at_level("WARNING", logger="livemask"):
        rec.on_event({"kind": "test", "n": 6})
        rec.close(frames_acquired=2)
    kinds = [(e["kind"], e.get("n", e.get("count"))) for e in _events(run)]
    assert kinds == [("test", 0), ("test", 1), ("test", 2), ("events_not_recorded", 3),
                     ("test", 6)]
    assert len(errors) == 1
    assert "3 event(s) not in events.jsonl" in caplog.text


def test_an_event_after_the_disk_recovered_is_written_although_the_backlog_was_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the backlog exactly full, the next event came after the disk had room again:
    it was counted as lost before the waiting lines were tried (review)."""
    monkeypatch.setattr(writer_module, "MAX_PENDING_EVENTS", 3)
    full = _events_disk_full(monkeypatch)
    run = tmp_path / "run"
    rec = Recorder(run, pixel_size_um=0.65, units=UNITS).start()
    for n in range(3):
        rec.on_event({"kind": "test", "n": n})
    _wait(lambda: rec.counts.errors_total >= 3)  # the writer tried each: three wait
    full[0] = False
    rec.on_event({"kind": "test", "n": 3})
    rec.close(frames_acquired=0)
    assert [(e["kind"], e.get("n")) for e in _events(run)] == [("test", n) for n in range(4)]
    assert rec.counts.events_lost == 0


def test_events_still_waiting_at_close_are_written_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No frame after the disk recovered: close writes what waits."""
    full = _events_disk_full(monkeypatch)
    run = tmp_path / "run"
    rec = Recorder(run, pixel_size_um=0.65, units=UNITS).start()
    rec.on_event({"kind": "test", "n": 0})
    _wait(lambda: rec.report()["failing"])
    full[0] = False
    rec.close(frames_acquired=0)
    assert [e["n"] for e in _events(run)] == [0]
    assert rec.report()["failing"] is False


# ------------------------------------------------------------------ OME-Zarr validity
def test_a_run_of_no_frames_is_no_broken_ome_image_and_one_with_frames_validates(
    tmp_path: Path,
) -> None:
    """Before, the group said at start that it was an image whose dataset "0" is made with
    the first frame: until then (and for good in a run of no frames) OME-Zarr validators
    refused it (yaozarrs: "Dataset path '0' not found"). Now the OME metadata comes with the
    arrays; livemask reads the group as before."""
    import yaozarrs  # (comes with pymmcore-plus)
    run = tmp_path / "run"
    rec = Recorder(run, pixel_size_um=0.65, units=UNITS).start()
    try:
        assert "ome" not in zarr.open_group(run / IMAGES, mode="r").attrs
        with pytest.raises(ValueError, match=r"Is this an OME-Zarr group"):
            yaozarrs.validate_zarr_store(str(run / IMAGES))  # not an image (yet): no claim
        with pytest.raises(ReplayError, match=r"holds no frames: its recorder was stopped"):
            open_recording(run)
        rec.on_frame(_frame(0, np.ones((24, 32), np.uint16)))
        _wait(lambda: rec.counts.written == 1)
        yaozarrs.validate_zarr_store(str(run / IMAGES))  # a live recording with frames
    finally:
        rec.close(frames_acquired=1)
    yaozarrs.validate_zarr_store(str(run / IMAGES))
    done: dict[str, Any] = zarr.open_group(run / IMAGES, mode="r").attrs.asdict()
    ms = done["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.65, 0.65]

    empty = tmp_path / "empty"
    Recorder(empty, pixel_size_um=0.65, units=UNITS).start().close(frames_acquired=0)
    attrs: dict[str, Any] = zarr.open_group(empty / IMAGES, mode="r").attrs.asdict()
    assert "ome" not in attrs and attrs["livemask"]["complete"] is True
    with pytest.raises(ValueError, match=r"Is this an OME-Zarr group"):
        yaozarrs.validate_zarr_store(str(empty / IMAGES))
    with pytest.raises(ReplayError, match=r"holds no frames: its run ended before the first"):
        open_stack(empty)


def test_a_recording_killed_before_its_ome_metadata_reads_its_pixel_size(
    tmp_path: Path,
) -> None:
    """Arrays made, the OME attributes not yet (a kill between the two): read with the
    ``livemask`` pixel size."""
    run = tmp_path / "run"
    rec = Recorder(run, pixel_size_um=0.5, units=UNITS).start()
    rec.on_frame(_frame(0, np.ones((24, 32), np.uint16)))
    rec.close(frames_acquired=1)
    meta = run / IMAGES / "zarr.json"
    doc = json.loads(meta.read_text(encoding="utf-8"))
    del doc["attributes"]["ome"]
    meta.write_text(json.dumps(doc), encoding="utf-8")
    assert open_recording(run).pixel_size_um == 0.5
    assert open_stack(run).frames == 1


# ------------------------------------------------------------------ several runs
def _record(run: Path, frames: int) -> None:
    rec = Recorder(run, pixel_size_um=0.5, units=UNITS).start()
    for fid in range(frames):
        rec.on_frame(_frame(fid, np.ones((24, 32), np.uint16)))
    rec.close(frames_acquired=frames)


def test_a_folder_of_several_runs_says_which_to_give(tmp_path: Path) -> None:
    """Before, open_recording said "is not a livemask recording" and replay "neither a
    livemask recording … nor a zarr group" for a folder of two runs with frames."""
    for name in ("run-20260101-000000", "run-20260101-000100"):
        _record(tmp_path / name, 1)
    want = (r"holds 2 recordings \(run-20260101-000000, run-20260101-000100\): give one of "
            r"them")
    with pytest.raises(ReplayError, match=want):
        open_recording(tmp_path)
    with pytest.raises(ReplayError, match=want):
        open_stack(tmp_path)
    result = runner.invoke(app, ["replay", str(tmp_path)])
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and "holds 2 recordings" in flat, result.output


def test_a_folder_of_many_runs_names_five(tmp_path: Path) -> None:
    """(Runs of no frames, none with frames: they all count.)"""
    for k in range(7):
        Recorder(tmp_path / f"run-2026010{k}-000000", pixel_size_um=0.5,
                 units=UNITS).start().close(frames_acquired=0)
    with pytest.raises(ReplayError, match=r"holds 7 recordings \(run-20260100-000000, .*"
                                          r"run-20260104-000000 and 2 more\): give one"):
        open_stack(tmp_path)
