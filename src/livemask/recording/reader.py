"""Reading a recording back (zarr only; no livemask needed to read the data itself)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

import numpy as np

from livemask.errors import ReplayError
from livemask.recording.writer import IMAGES, LABELS_NAME, PIXEL_SIZE_CALIBRATED

__all__ = [
    "FrameRecords", "MappedSequence", "Recording", "find_recording", "open_recording",
    "read_frames_jsonl", "record_settings", "several_recordings",
]

log = logging.getLogger("livemask")


@dataclass
class Recording:
    """One run folder opened read-only."""

    path: Path
    images: Any  # zarr.Array (T, Y, X)
    labels: Any | None  # zarr.Array (T, Y, X) int32, or None when labels were not recorded
    #: per-frame records sorted by frame_id (frames.jsonl: a :class:`FrameRecords`, read
    #: from the file as they are asked for)
    frames: Sequence[dict[str, Any]]
    pixel_size_um: float | None
    attributes: dict[str, Any]
    #: False when the recording service had no pixel-size calibration: ``pixel_size_um``
    #: (the scale, 1.0) and each frame's are then placeholders, its µm values pixel values
    #: (older recordings do not say: True)
    pixel_size_calibrated: bool = True

    @property
    def complete(self) -> bool:
        """Whether the recorder was closed cleanly (final attributes written)."""
        return bool(self.attributes.get("livemask", {}).get("complete"))

    @property
    def measurements_csv(self) -> Path:
        """The per-object table (may be absent when measurements were not recorded)."""
        return self.path / "measurements.csv"


def _is_run(path: Path) -> bool:
    """Whether ``path`` is a run folder: its images.ome.zarr, or (a run stopped before its
    first frame by a recorder from before the group was made at start) its side files."""
    return (path / IMAGES).is_dir() or (
        (path / "frames.jsonl").is_file() and (path / "units.json").is_file())


def find_recording(path: Path) -> Path | None:
    """The run folder for ``path``: a run folder, its images.ome.zarr, or a folder of one run
    that recorded frames (runs stopped before their first frame do not count; where no run
    recorded any, a folder of one such run gives it)."""
    path = Path(path)
    if path.name == IMAGES and (path.parent / "frames.jsonl").is_file():
        return path.parent
    if _is_run(path):
        return path
    runs = _runs(path)
    return runs[-1] if len(runs) == 1 else None


def _runs(path: Path) -> list[Path]:
    """The run folders in the folder ``path`` that recorded frames (all of them where none
    did), sorted by name."""
    runs = sorted(p for p in path.glob("run-*") if _is_run(p)) if path.is_dir() else []
    return [p for p in runs if (p / IMAGES / "0").is_dir()] or runs  # "0": its first frame


#: Most run folders named in the error for a folder of several.
RUNS_NAMED = 5


def several_recordings(path: Path) -> str | None:
    """The error for a folder ``path`` of several runs (which one to read?), else None."""
    runs = [] if _is_run(Path(path)) else _runs(Path(path))
    if len(runs) < 2:
        return None
    names = ", ".join(p.name for p in runs[:RUNS_NAMED])
    more = f" and {len(runs) - RUNS_NAMED} more" if len(runs) > RUNS_NAMED else ""
    return (f"{path} holds {len(runs)} recordings ({names}{more}): give one of them, e.g. "
            f"{runs[-1]}")


def read_frames_jsonl(path: Path) -> list[dict[str, Any]]:
    """The frames.jsonl records sorted by frame_id.

    A line that is not a frame record (not JSON, or no integer ``frame_id``) is left out
    with a warning naming it; the others are all read. A torn last line (the recorder was
    killed mid-write) is expected and only noted."""
    records = [record for _, record in _scan(path)]
    return sorted(records, key=lambda r: r["frame_id"])


def record_settings(record: Mapping[str, Any]) -> dict[str, Any]:
    """A frame record's ``settings``: ``channel``, ``channel_group`` (text) and
    ``exposure_ms`` (a finite number > 0), None for each one it lacks or that is not one
    (recordings from before frames.jsonl held them have none); and a camera ROI frame's
    ``roi`` (``{"offset_x", "offset_y", "width", "height"}``, None where not one)."""
    given = record.get("settings")
    given = given if isinstance(given, Mapping) else {}
    out: dict[str, Any] = {}
    for key in ("channel", "channel_group"):
        value = given.get(key)
        out[key] = value if isinstance(value, str) and value else None
    exposure = given.get("exposure_ms")
    out["exposure_ms"] = None
    if (isinstance(exposure, int | float) and not isinstance(exposure, bool)
            and math.isfinite(exposure) and exposure > 0):
        out["exposure_ms"] = float(exposure)
    if "roi" in given:  # a camera ROI frame's; null (not known) where not one
        roi, keys = given["roi"], ("offset_x", "offset_y", "width", "height")
        box: list[Any] = [roi.get(k) for k in keys] if isinstance(roi, Mapping) else []
        ok = len(box) == 4 and all(type(v) is int and v >= 0 for v in box) and min(box[2:]) > 0
        out["roi"] = dict(zip(keys, box, strict=True)) if ok else None
    return out


T = TypeVar("T")


class MappedSequence(Sequence[T]):
    """``n`` items made by ``item(i)`` when asked for (nothing held per item)."""

    def __init__(self, n: int, item: Callable[[int], T]) -> None:
        self._n, self._item = n, item

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> T: ...

    @overload
    def __getitem__(self, i: slice) -> list[T]: ...

    def __getitem__(self, i: int | slice) -> T | list[T]:
        if isinstance(i, slice):
            return [self._item(k) for k in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._item(i % self._n)


class FrameRecords(MappedSequence[dict[str, Any]]):
    """The frames.jsonl records sorted by frame_id, each read from the file when asked for:
    in memory only where each line starts (8 bytes a frame, not ≈ 3 KB of dicts: a week at
    10 frames/s is 6 million frames)."""

    def __init__(self, path: Path, offsets: np.ndarray, frame_ids: np.ndarray) -> None:
        super().__init__(len(offsets), self._record)
        self.path = path
        self.offsets = offsets
        #: the frame_id of each record, in order (int64)
        self.frame_ids = frame_ids

    @classmethod
    def read(cls, path: Path) -> FrameRecords:
        """Index ``path`` (bad lines left out as :func:`read_frames_jsonl` does)."""
        offsets, ids = [], []
        for offset, record in _scan(path):
            offsets.append(offset)
            ids.append(record["frame_id"])
        order = np.argsort(np.asarray(ids, np.int64), kind="stable")
        return cls(path, np.asarray(offsets, np.int64)[order], np.asarray(ids, np.int64)[order])

    def _record(self, i: int) -> dict[str, Any]:
        with self.path.open("rb") as fh:
            return self._read(fh, int(self.offsets[i]))

    def __iter__(self) -> Iterator[dict[str, Any]]:  # one open file for them all
        with self.path.open("rb") as fh:
            for offset in self.offsets:
                yield self._read(fh, int(offset))

    @staticmethod
    def _read(fh: Any, offset: int) -> dict[str, Any]:
        fh.seek(offset)
        record: dict[str, Any] = json.loads(fh.readline())
        return record


def _scan(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(byte offset, record) of each frame record of frames.jsonl, in file order; the lines
    that are not frame records are counted and named in one warning at the end."""
    bad: list[int] = []
    lines = 0
    good = 0
    offset = 0
    with path.open("rb") as fh:
        for lines, line in enumerate(fh, 1):
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if isinstance(record, dict) and type(record.get("frame_id")) is int:
                good += 1
                yield offset, record
            elif line.strip():
                bad.append(lines)
            offset += len(line)
    if bad == [lines]:
        log.info("%s: its last line is torn (the recorder was stopped mid-write); left out",
                 path)
    elif bad:
        log.warning("%s: %d line(s) are not frame records and are left out (line %s); the "
                    "other %d frames are read", path, len(bad),
                    ", ".join(map(str, bad[:10])) + (", …" if len(bad) > 10 else ""), good)


def _warn_unlisted(run: Path, frames: int, ids: Any, complete: bool) -> None:
    """Warn about frames on the t axis (``frames`` long) that no frames.jsonl line lists
    (``ids``: the listed frame ids; ids of frames not on the axis do not count)."""
    if not isinstance(ids, np.ndarray):  # the zarr attributes' records: any JSON
        ids = [i for i in ids if type(i) is int]
    listed = np.unique(np.asarray(ids, np.int64))
    on_axis = listed[(listed >= 0) & (listed < frames)]
    missing = frames - len(on_axis)  # (numpy, not a set: millions of frames)
    if missing <= 0:
        return
    # only the last ones are missing: the listed ones on the axis are 0, 1, ... in a row
    tail = len(on_axis) == 0 or int(on_axis[-1]) == len(on_axis) - 1
    if tail and not complete:
        log.warning("%s: the last %d frame(s) on the t axis have no readable line in "
                    "frames.jsonl and are not read: the recording is still being written, or "
                    "its recorder was stopped hard (SIGKILL, crash, power cut) before writing "
                    "them, or could not write them or its closing attributes (e.g. a full "
                    "disk: see its log)",
                    run, missing)
    elif not complete:
        log.warning("%s: %d frame(s) on the t axis have no readable line in frames.jsonl "
                    "and are not read: the recording is not marked complete, so its recorder "
                    "was stopped hard (SIGKILL, crash, power cut) before writing them, or it "
                    "could not write them and its closing attributes (e.g. a full disk: see "
                    "its log), or a line is damaged", run, missing)
    else:
        log.warning("%s: %d frame(s) on the t axis have no readable line in frames.jsonl "
                    "(the recorder could not write it, e.g. a full disk: see its log; or the "
                    "line is damaged) and are not read", run, missing)


def _no_frames(run: Path, complete: bool) -> str:
    """Why a recording without an image array cannot be read."""
    why = ("its run ended before the first frame arrived" if complete else
           "its recorder was stopped (or killed) before the first frame, or it is still "
           "waiting for one")
    return (f"recording {run} holds no frames: {why}; give the run folder of a run that "
            "recorded frames")


def _pixel_size(attrs: Mapping[str, Any]) -> float | None:
    """The recording's pixel size: its OME scale, or (a recorder killed between making the
    arrays and adding their OME metadata) the ``livemask`` attribute; ``KeyError`` when
    it has neither (damaged metadata)."""
    value = attrs.get("livemask", {}).get("pixel_size_um")
    if "ome" not in attrs and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    scale = attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]
    return float(scale["scale"][-1]) if scale.get("type") == "scale" else None


def open_recording(path: str | Path) -> Recording:
    """Open a run folder written by :class:`~livemask.recording.Recorder`; ``ReplayError``
    when it is none, holds no frames (a run stopped before its first frame), or is a folder
    of several runs."""
    import zarr

    run = find_recording(Path(path))
    several = several_recordings(Path(path)) if run is None else None
    if several is not None:
        raise ReplayError(several)
    if run is None:
        raise ReplayError(
            f"{path} is not a livemask recording (no {IMAGES} with frames.jsonl beside it); "
            "give the run folder (…/run-YYYYmmdd-HHMMSS)"
        )
    if not (run / IMAGES).is_dir():
        raise ReplayError(_no_frames(run, complete=False))
    root = zarr.open_group(run / IMAGES, mode="r")
    attrs: dict[str, Any] = dict(root.attrs.asdict())
    if not (run / IMAGES / "0").is_dir():  # the arrays are made with the first frame
        raise ReplayError(_no_frames(run, bool(attrs.get("livemask", {}).get("complete"))))
    images: Any = root["0"]
    labels = None
    with contextlib.suppress(KeyError):
        labels = root[f"labels/{LABELS_NAME}/0"]
    frames: Sequence[dict[str, Any]] = []
    ids: Any = []
    if (run / "frames.jsonl").is_file():
        frames = FrameRecords.read(run / "frames.jsonl")
        ids = frames.frame_ids
    if not frames:
        frames = list(attrs.get("livemask", {}).get("frames", []))
        ids = [f.get("frame_id") for f in frames]
    _warn_unlisted(run, int(images.shape[0]), ids,
                   bool(attrs.get("livemask", {}).get("complete")))
    pixel = _pixel_size(attrs)
    calibrated = attrs.get("livemask", {}).get(PIXEL_SIZE_CALIBRATED) is not False
    return Recording(run, images, labels, frames, pixel, attrs, calibrated)
