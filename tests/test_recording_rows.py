"""The recorder's measurement rows: rows that could not be written are said per frame and
counted, the ``fb`` column, the reader's count of unlisted frames, the close-time log."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from livemask.analysis.measure import UNITS
from livemask.feedback.context import FEEDBACK_INDEX_KEY
from livemask.recording import CSV_COLUMNS, Recorder, open_recording
from livemask.recording.reader import read_frames_jsonl
from livemask.recording.writer import IMAGES
from tests.test_recording import (
    _csv_rows,
    _frame,
    _give_frames,
    _run_with_file_size_limit,
    _wait,
)

# ------------------------------------------------------------------ rows lost
_CSV_FULL_SCRIPT = r"""
import json, logging, resource, signal, sys
from pathlib import Path
import numpy as np
from livemask.analysis.measure import UNITS
from livemask.recording import Recorder
from tests.test_recording import _frame

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
path, limit = Path(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
rec = Recorder(path, pixel_size_um=0.65, units=UNITS).start()
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
rng = np.random.default_rng(0)
for fid in range(14):
    frame = _frame(fid, rng.integers(0, 4000, (24, 32)).astype(np.uint16),
                   kind="analysed" if fid < 10 else "skipped")
    if frame.objects:  # 45 objects: ~4 KB of rows a frame, against ~0.5 KB of frames.jsonl
        frame.objects = [dict(frame.objects[k % 2], label=k + 1) for k in range(45)]
    # every block of rows the same size (time_s "0.5"): once one does not fit, none does
    frame.t = {"acquired": rec.started_at + 0.5}
    rec.on_frame(frame)
while rec.report()["frames_written"] < 14:
    __import__("time").sleep(0.01)
failing = rec.report()["failing"]
rec.close(frames_acquired=14)
print(json.dumps({"report": rec.report(), "failing_before_close": failing}))
"""


def test_rows_that_cannot_be_written_are_said_per_frame_counted_and_logged(
    tmp_path: Path,
) -> None:
    """Before, a measurements.csv that could not grow (a file-size limit such as FAT32's,
    or a nearly full disk where the small frames.jsonl line fits but the rows do not) lost
    the rows silently: frames said ``stored: true`` with 45 objects and no rows, the final
    attributes said nothing, the closing line neither, and ``failing`` went false at the
    next frame without rows although the CSV still failed. Here the kernel stops every
    file at 16,000 bytes (RLIMIT_FSIZE): the CSV reaches it first."""
    run = tmp_path / "run"
    out, log = _run_with_file_size_limit(_CSV_FULL_SCRIPT, run, 16000)
    report = out["report"]
    records = read_frames_jsonl(run / "frames.jsonl")
    assert len(records) == 14 and all(r["stored"] for r in records)
    in_csv = {int(r["frame_id"]) for r in _csv_rows(run / "measurements.csv")}
    assert [r["rows_stored"] for r in records[10:]] == [None] * 4  # skipped: no rows
    stored = [r["frame_id"] for r in records[:10] if r["rows_stored"] is True]
    lost = [r["frame_id"] for r in records[:10] if r["rows_stored"] is False]
    assert len(stored) + len(lost) == 10 and stored and lost
    assert stored == list(range(len(stored)))  # the CSV filled up, then stayed full
    assert set(stored) == in_csv  # the line says where the rows are
    assert report["frames_rows_lost"] == len(lost) and report["frames_rejected"] == 0
    attrs = zarr.open_group(run / IMAGES, mode="r").attrs["livemask"]
    assert attrs["complete"] is True and attrs["frames_rows_lost"] == len(lost)
    assert [f["rows_stored"] for f in attrs["frames"]] == [r["rows_stored"] for r in records]
    # the frames without rows that followed did not end the run of CSV errors
    assert out["failing_before_close"] is True
    (closing,) = [line for line in log.splitlines() if "recording closed" in line]
    assert closing.startswith("WARNING")
    assert f"the measurement rows of {len(lost)} frame(s) could not be written" in closing


def test_failing_lasts_until_the_file_that_failed_is_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, any frame written without an error (a skipped frame has no rows) ended the
    run of errors while measurements.csv still failed."""
    from livemask.recording.files import BlockFile

    real_write = BlockFile.write
    csv_full = threading.Event()
    csv_full.set()

    def write(self: BlockFile, text: str) -> None:
        if self.path.name == "measurements.csv" and csv_full.is_set():
            raise OSError(27, "File too large")
        real_write(self, text)

    run = tmp_path / "run"
    rec = Recorder(run, pixel_size_um=0.65, units=UNITS).start()  # (header written)
    monkeypatch.setattr(BlockFile, "write", write)
    image = np.zeros((24, 32), np.uint16)
    for fid in range(3):
        rec.on_frame(_frame(fid, image))
    for fid in range(3, 6):
        rec.on_frame(_frame(fid, image, kind="skipped"))
    _wait(lambda: rec.report()["frames_written"] == 6)
    assert rec.report()["failing"] is True
    assert rec.report()["frames_rows_lost"] == 3
    csv_full.clear()
    with caplog.at_level("WARNING", logger="livemask"):
        rec.on_frame(_frame(6, image))
        _wait(lambda: rec.report()["frames_written"] == 7)
    assert rec.report()["failing"] is False
    assert "writing again" in caplog.text
    rec.close(frames_acquired=7)
    assert [r["rows_stored"] for r in read_frames_jsonl(run / "frames.jsonl")] == [
        False, False, False, None, None, None, True]


# ------------------------------------------------------------------ the fb column
def test_feedback_frames_are_told_apart_in_the_table_by_their_fb_column(
    tmp_path: Path,
) -> None:
    """Before, measurements.csv had no ``fb`` column: a frame taken by a feedback action
    (index ``{"t": 0, "p": 0, "fb": 1}``) had the same index columns as its trigger."""
    image = np.zeros((16, 16), np.uint16)
    rec = Recorder(tmp_path / "run", pixel_size_um=0.65, units=UNITS).start()
    trigger = _frame(0, image)
    trigger.index = {"t": 0, "p": 0}
    action = _frame(1, image)
    action.index = {"t": 0, "p": 0, FEEDBACK_INDEX_KEY: 1}
    rec.on_frame(trigger)
    rec.on_frame(action)
    rec.close(frames_acquired=2)
    rows = _csv_rows(tmp_path / "run" / "measurements.csv")
    assert [(r["frame_id"], r["t"], r["p"], r["fb"]) for r in rows] == [
        ("0", "0", "0", ""), ("0", "0", "0", ""), ("1", "0", "0", "1"), ("1", "0", "0", "1")]
    header = (tmp_path / "run" / "measurements.csv").read_text().splitlines()[0].split(",")
    # appended after touches_edge: the columns before it keep their positions
    assert header[27] == "fb" and header[:8] == ["frame_id", "acquisition", "time_s",
                                                 "t", "p", "c", "z", "g"]
    assert header == list(CSV_COLUMNS)
    units = json.loads((tmp_path / "run" / "units.json").read_text(encoding="utf-8"))
    assert "feedback action" in units["columns"]["fb"]


# ------------------------------------------------------------------ the reader's count
def _with_a_lost_line(tmp_path: Path) -> Path:
    """A closed recording of frames 0-5 on the t axis, frame 6 rejected (another shape:
    listed, not on the axis), and frame 2's frames.jsonl line gone."""
    rec = Recorder(tmp_path / "run", pixel_size_um=0.65, units=UNITS).start()
    _give_frames(rec, range(6))
    rec.on_frame(_frame(6, np.zeros((5, 5), np.uint16)))
    rec.close(frames_acquired=7)
    path = tmp_path / "run" / "frames.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(x for x in lines if json.loads(x)["frame_id"] != 2),
                    encoding="utf-8")
    return tmp_path / "run"


def test_frames_without_a_line_are_counted_on_the_t_axis_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the count was the axis length less every listed id, those beyond the axis
    too: here 6 - 6 = 0, and the lost line of frame 2 went without a warning."""
    run = _with_a_lost_line(tmp_path)
    with caplog.at_level("WARNING", logger="livemask"):
        rec = open_recording(run)
    assert rec.images.shape[0] == 6
    assert "1 frame(s) on the t axis have no readable line" in caplog.text


def test_an_unfinished_recording_with_a_gap_names_a_hard_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A gap mid-run in a recording not marked complete (a SIGKILL with frames written out
    of order) was blamed on a full disk or a damaged line only."""
    run = _with_a_lost_line(tmp_path)
    root = zarr.open_group(run / IMAGES, mode="r+")
    root.update_attributes({"livemask": {**root.attrs["livemask"], "complete": False}})
    with caplog.at_level("WARNING", logger="livemask"):
        open_recording(run)
    assert "1 frame(s) on the t axis have no readable line" in caplog.text
    assert "stopped hard (SIGKILL" in caplog.text


# ------------------------------------------------------------------ close-time log
class _Gate(logging.Handler):
    """Opens (``event``) when the recorder says at close what is still queued."""

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()
        self.levels: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "queued frames" in record.getMessage():
            self.levels.append(record.levelno)
            self.event.set()


def _close_with_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    frames: int,
) -> _Gate:
    """Close a recorder whose writer waits until close has logged what is queued."""
    gate = _Gate()
    logger = logging.getLogger("livemask")
    logger.addHandler(gate)
    real = Recorder._write_frame

    def gated(self: Recorder, item: Any) -> None:
        gate.event.wait(10)
        real(self, item)

    monkeypatch.setattr(Recorder, "_write_frame", gated)
    try:
        rec = Recorder(tmp_path / "run", pixel_size_um=0.5).start()
        _give_frames(rec, range(frames))
        with caplog.at_level("INFO", logger="livemask"):
            rec.close(frames_acquired=frames)
    finally:
        logger.removeHandler(gate)
    assert rec.report()["frames_written"] == frames
    return gate


def test_a_few_frames_queued_at_close_are_logged_at_info(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, every clean shutdown with a frame or two in flight logged a warning."""
    gate = _close_with_queued(tmp_path, monkeypatch, caplog, 3)
    assert gate.levels == [logging.INFO]


def test_a_large_backlog_at_close_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from livemask.recording import writer

    monkeypatch.setattr(writer, "CLOSE_BACKLOG_WARN_MB", 0.001)  # 3 frames: ~7 KB
    gate = _close_with_queued(tmp_path, monkeypatch, caplog, 3)
    assert gate.levels == [logging.WARNING]


def test_a_slow_backlog_at_close_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Slow: the frames written so far took long each (here 0.1 s), and the ones left
    would take longer than CLOSE_BACKLOG_WARN_S (here 0.3 s) in all."""
    import time

    from livemask.recording import writer

    real = Recorder._write_frame

    def slow(self: Recorder, item: Any) -> None:
        time.sleep(0.1)
        real(self, item)

    monkeypatch.setattr(Recorder, "_write_frame", slow)
    monkeypatch.setattr(writer, "CLOSE_BACKLOG_WARN_S", 0.3)
    rec = Recorder(tmp_path / "run", pixel_size_um=0.5).start()
    _give_frames(rec, range(10))
    _wait(lambda: rec.report()["frames_written"] >= 1)
    with caplog.at_level("INFO", logger="livemask"):
        rec.close(frames_acquired=10)
    assert rec.report()["frames_queued"] == 0
    (line,) = [r for r in caplog.records if "queued frames" in r.getMessage()]
    assert line.levelno == logging.WARNING and "s) to" in line.getMessage()
