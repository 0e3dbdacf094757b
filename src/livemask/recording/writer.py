"""The recorder: frames, labels, measurements and events written to disk as they arrive.

One run folder holds::

    images.ome.zarr/            OME-Zarr 0.5 (zarr v3) image, axes (t, y, x), µm pixel size
                                (the group made at start, with ``livemask.complete: false``;
                                its OME metadata added with the arrays, so a run of no
                                frames is a plain zarr group, not an image without data)
        0/                      the frames, shape (T, Y, X), one chunk (1, Y, X) per frame
                                (made with the first frame: a run of no frames has none)
        labels/masks/0/         instance labels of the same shape (0 = background; all 0 when
                                the frame was not analysed)
    frames.jsonl                one line per written frame: frame_id, acquisition, MDA index,
                                position, settings (channel, exposure), timestamps, analysed /
                                skipped / failed flags, summary, stored / rows_stored
    measurements.csv            one row per object of every analysed frame
    units.json                  the unit of every measurements.csv column, pixel size
    config.yaml                 the service configuration of the run
    events.jsonl                every message of the ``event`` topic

Frame ``frame_id`` is stored at index ``frame_id`` of the t axis (the service numbers frames
from 0 in acquisition order), so the t axis is acquisition order even though free-run mode
publishes skipped frames before older analysed ones. Frames of every stage position and
channel share the t axis; their MDA index is in ``frames.jsonl`` (and, after a clean close, in
the group attribute ``livemask.frames``).

:class:`Recorder` is a pipeline frame sink: :meth:`Recorder.on_frame` runs on the event loop
and only enqueues; a writer thread does the I/O. The queue is unbounded (a frame is never
dropped); when more than ``max_queue_mb`` wait, a warning is logged, and again each time the
backlog doubles. Each frame grows the
arrays (the zarr metadata with the new shape is rewritten at once, atomically; the labels
before the images, so the images are never longer than the labels), then its
chunks are written, then its CSV rows and its ``frames.jsonl`` line, each whole or not at all
(:class:`~livemask.recording.files.BlockFile`), so what a reader finds is always a valid
dataset and the counters say what is on disk. The line says whether the frame's rows were
written (``rows_stored``), and the frames whose rows were lost are counted.
:meth:`Recorder.close` writes everything still queued, then the final group attributes
(``livemask.complete: true``), a run of no frames too.

Write errors (a full disk, a folder made read-only) never stop the service: the frame is
counted as rejected, the first error of a run of them goes to ``on_error`` (the service
publishes it as an ``error`` event), and writing resumes by itself when the disk does. A run
of errors lasts, file by file, until the file that failed is written again; an
``events.jsonl`` line that could not be written waits (up to ``MAX_PENDING_EVENTS``) and is
written, in order, with the next event or after the next frame's line. A run
folder deleted or moved while recording stops the recording (zarr would silently re-create
its folders and the side files would be lost): the rest of the run is not recorded, and the
recording is not marked complete.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from livemask import __version__
from livemask.analysis.measure import units_in_pixels
from livemask.config import dump_yaml
from livemask.errors import RecordingError
from livemask.log import RepeatedErrors
from livemask.recording.files import BlockFile, folder_id, folder_lost
from livemask.service.frames import NO_SETTINGS

if TYPE_CHECKING:
    from livemask.service.frames import Frame

log = logging.getLogger("livemask")

__all__ = [
    "CSV_COLUMNS",
    "IMAGES",
    "LABELS_NAME",
    "Recorder",
    "column_units",
    "new_run_dir",
    "ome_image_attributes",
]

IMAGES = "images.ome.zarr"
LABELS_NAME = "masks"
#: The recording attribute (under ``livemask``) saying every stored frame's image chunk was
#: written, even an all-zero one: a missing chunk file is then a lost frame.
EVERY_CHUNK_WRITTEN = "every_chunk_written"
#: The recording attribute (under ``livemask``, and in units.json): false when the service
#: had no pixel-size calibration (the pixel size 1.0 is then a placeholder: µm values are
#: pixel values). Recordings without it were calibrated, or did not say.
PIXEL_SIZE_CALIBRATED = "pixel_size_calibrated"
OME_VERSION = "0.5"

#: Columns of measurements.csv; MDA index columns are empty when the event had no such axis.
#: ``fb`` (last, so that the older columns keep their positions) is the feedback action that
#: took the frame (``livemask.feedback.context.FEEDBACK_INDEX_KEY``), empty for planned ones;
#: after it (added later still) the channel preset and exposure the frame was taken with, then
#: (later again) the object's local background and background-corrected intensity, then
#: its saturated pixels (empty where the saturation level is unknown: float frames), and last
#: a replayed frame's frame id and time in the file replayed (empty for live frames).
CSV_COLUMNS: tuple[str, ...] = (
    "frame_id", "acquisition", "time_s", "t", "p", "c", "z", "g", "x_um", "y_um", "z_um",
    "label", "track_id", "parent_track_id", "area_px", "area_um2", "centroid_y", "centroid_x",
    "bbox_min_row", "bbox_min_col", "bbox_max_row", "bbox_max_col",
    "mean_intensity", "integrated_intensity", "equivalent_diameter_um", "eccentricity",
    "touches_edge", "fb", "channel", "exposure_ms", "local_background", "corrected_intensity",
    "saturated_px", "replayed_frame_id", "replayed_time_s",
)
_INDEX_AXES = ("t", "p", "c", "z", "g", "fb")
_SPLIT = {"centroid_yx": ("centroid_y", "centroid_x"),
          "bbox": ("bbox_min_row", "bbox_min_col", "bbox_max_row", "bbox_max_col")}


#: What an object's µm column holds in a recording without pixel-size calibration.


def column_units(units: Mapping[str, str], *, calibrated: bool = True) -> dict[str, str]:
    """The unit of every CSV column, from the per-object ``units`` of the measurements.

    Not ``calibrated`` (the pixel size is a placeholder): the objects' µm columns (area,
    diameter) hold pixel values and say so; the stage columns (``x_um``...) stay in µm."""
    out = {"frame_id": "1", "acquisition": "1 (number; MDA index and track_id restart with each)",
           "time_s": "s (since the recording started)",
           **{a: "1 (MDA index)" for a in _INDEX_AXES},
           "fb": "1 (MDA index: the action_id of the feedback action that took the frame; "
                 "empty for planned frames)",
           "x_um": "µm", "y_um": "µm", "z_um": "µm", "track_id": "1", "parent_track_id": "1",
           "channel": "text (the channel preset the frame was taken with; empty where unknown)",
           "exposure_ms": "ms (the camera exposure the frame was taken with; empty where "
                          "unknown)",
           "replayed_frame_id": "1 (a replayed frame's frame_id in the recording replayed, "
                                "or its plane number in a file; empty for live frames)",
           "replayed_time_s": "s (a replayed frame's time in the file replayed: a "
                              "recording's time_s, a file's since its first frame; empty "
                              "for live frames or no times)"}
    for key, unit in (units if calibrated else units_in_pixels(units)).items():
        for col in _SPLIT.get(key, (key,)):
            out[col] = unit
    return {c: out.get(c, "") for c in CSV_COLUMNS}


#: Most frames whose records are also listed in the final zarr attributes (``frames``): about
#: 400 B each in zarr.json, which every reader parses to open the dataset, and in memory.
MAX_ATTRIBUTE_FRAMES = 20_000


def _what_to_do(exc: OSError) -> str:
    """What a user does about a recording's write error ``exc``."""
    if exc.errno == errno.ENOSPC:
        return "free space on its disk, or choose a folder on another disk"
    if exc.errno == errno.EDQUOT:
        return "free space within your disk quota, or choose another folder"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable, or choose a writable folder"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):  # a file in the way
        return "choose a writable folder (a file is in the path's way)"
    return "check the disk and the folder, or choose another folder"


def new_run_dir(parent: Path, now: float | None = None) -> Path:
    """Create and return a new, empty ``parent/run-YYYYmmdd-HHMMSS`` folder (``-2``, ``-3``,
    ... if taken). Created at once, so two services recording into ``parent`` in the same
    second get a folder each; ``RecordingError`` if ``parent`` cannot hold one."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    if parent.exists() and not parent.is_dir():
        raise RecordingError(
            f"cannot record to {parent}: it is a file, not a folder; give a folder (record.path "
            "or --record)"
        )
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            path = parent / (f"run-{stamp}" if n == 1 else f"run-{stamp}-{n}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return path
    except OSError as exc:
        raise RecordingError(
            f"cannot record to {parent}: {exc}; {_what_to_do(exc)} (record.path or --record)"
        ) from None
    raise RecordingError(f"cannot record to {parent}: 10,000 runs started in one second")


def _multiscales(name: str, pixel_size_um: float, calibrated: bool) -> list[dict[str, Any]]:
    # without calibration the scale is a placeholder: no unit (NGFF allows none)
    unit = {"unit": "micrometer"} if calibrated else {}
    return [{
        "name": name,
        "axes": [
            {"name": "t", "type": "time"},  # acquisition order; frame times in frames.jsonl
            {"name": "y", "type": "space", **unit},
            {"name": "x", "type": "space", **unit},
        ],
        "datasets": [{
            "path": "0",
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, pixel_size_um, pixel_size_um]}
            ],
        }],
    }]


def ome_image_attributes(
    pixel_size_um: float, name: str = "images", *, calibrated: bool = True
) -> dict[str, Any]:
    """Group attributes of an OME-NGFF 0.5 (t, y, x) image with one resolution level; the
    y and x axes have no unit when the pixel size is not ``calibrated``."""
    return {"ome": {"version": OME_VERSION,
                    "multiscales": _multiscales(name, pixel_size_um, calibrated)}}


@dataclass
class _FrameItem:
    record: dict[str, Any]
    image: np.ndarray
    labels: np.ndarray | None
    objects: list[dict[str, Any]] | None
    nbytes: int


@dataclass
class _Counts:
    written: int = 0
    analysed: int = 0
    skipped: int = 0
    failed: int = 0
    rejected: int = 0
    events: int = 0
    rows: int = 0
    rows_lost: int = 0  # frames whose measurement rows could not be written
    events_lost: int = 0  # events.jsonl lines not kept while it could not be written
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=5))  # the last ones
    errors_total: int = 0


#: While writes keep failing, a summary line is logged every this many errors.
ERROR_LOG_EVERY = 100

#: Frames still queued at close are announced as a warning (else at INFO) when writing them
#: should take longer than this (at the writer's recent pace) ...
CLOSE_BACKLOG_WARN_S = 2.0
#: ... or when they are more than this many MB.
CLOSE_BACKLOG_WARN_MB = 256.0


#: Most events.jsonl lines kept while the file cannot be written (a full disk), to be written
#: when it can again (≈ 300 B each); later ones are counted, and one line says how many.
MAX_PENDING_EVENTS = 10_000
#: The ``kind`` of that line.
EVENTS_NOT_RECORDED = "events_not_recorded"


@dataclass
class _EventGap:
    """In the events.jsonl backlog: where ``count`` lines were not kept."""

    count: int = 0


_STOP = object()


class Recorder:
    """Writes every frame it is given to ``path`` (a new folder) on a writer thread.

    ``on_frame`` and ``on_event`` never block and never raise for I/O problems: those are
    logged and counted (``report()["errors"]``), and the first of a run of them is handed to
    ``on_error`` (called on the writer thread), the end of the run to ``on_resumed`` (with
    the write errors so far). Use ``start()`` before and ``close()`` after.
    """

    def __init__(
        self,
        path: Path,
        *,
        pixel_size_um: float,
        pixel_size_calibrated: bool = True,
        config: Mapping[str, Any] | None = None,
        units: Mapping[str, str] | None = None,
        labels: bool = True,
        measurements: bool = True,
        max_queue_mb: float = 2048.0,
        on_error: Callable[[str], None] | None = None,
        on_resumed: Callable[[int], None] | None = None,
    ) -> None:
        if pixel_size_um <= 0:
            raise RecordingError(f"pixel_size_um must be > 0, got {pixel_size_um}")
        self.path = Path(path)
        self.pixel_size_um = float(pixel_size_um)
        self.pixel_size_calibrated = pixel_size_calibrated
        self.config = dict(config) if config is not None else None
        self.units = dict(units or {})
        self.labels = labels
        self.measurements = measurements
        self.max_queue_bytes = int(max_queue_mb * 2**20)
        self.started_at = time.time()
        self.counts = _Counts()
        self.frames_acquired: int | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued_frames = 0
        self._queued_bytes = 0
        self._over_limit = False
        self._warned_at = 0  # queued bytes when "behind" was last logged
        self._thread: threading.Thread | None = None
        self._closed = False
        self._on_error = on_error
        self._on_resumed = on_resumed
        # the parts (files) whose last write failed; on_error was told when the first failed
        self._failing: set[str] = set()
        self._frame_write_s: float | None = None  # recent seconds per frame written
        self._logged_errors = RepeatedErrors(log, every=ERROR_LOG_EVERY)
        self._lost: str | None = None  # why the run folder can no longer be written to
        self._folder_id: tuple[int, int] | None = None  # (device, inode) of the run folder
        # per-frame records for the final zarr attributes; None once the run is too long for
        # them (frames.jsonl has every frame in any case)
        self._records: list[dict[str, Any]] | None = []
        self._root: Any = None
        self._images: Any = None
        self._masks: Any = None
        self._frames_fh: BlockFile | None = None
        self._events_fh: BlockFile | None = None
        self._csv_fh: BlockFile | None = None
        # events.jsonl lines not written yet (a write failed), oldest first
        self._pending_events: deque[str | _EventGap] = deque()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> Recorder:
        """Create the folder and the side files, start the writer thread; returns ``self``."""
        try:
            if self.path.exists() and any(self.path.iterdir()):
                raise RecordingError(
                    f"recording folder {self.path} exists and is not empty; choose another "
                    "folder (record.path or --record)"
                )
            self.path.mkdir(parents=True, exist_ok=True)
            if self.config is not None:
                (self.path / "config.yaml").write_text(dump_yaml(self.config),
                                                       encoding="utf-8")
            (self.path / "units.json").write_text(json.dumps(
                self._units_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            self._frames_fh = BlockFile(self.path / "frames.jsonl")
            self._events_fh = BlockFile(self.path / "events.jsonl")
            if self.measurements:
                self._csv_fh = BlockFile(self.path / "measurements.csv", "w")
                header = io.StringIO()
                csv.DictWriter(header, CSV_COLUMNS).writeheader()
                self._csv_fh.write(header.getvalue())
            self._root = self._create_group()
        except OSError as exc:
            self._close_files()
            raise RecordingError(
                f"cannot record to {self.path}: {exc}; {_what_to_do(exc)} (record.path or "
                "--record)"
            ) from None
        self._folder_id = folder_id(self.path)
        self._thread = threading.Thread(target=self._run, name="livemask-recorder", daemon=True)
        self._thread.start()
        return self

    def close(self, *, frames_acquired: int | None = None, timeout_s: float = 120.0) -> None:
        """Write everything queued, finish the metadata and close the files (idempotent).

        Waits as long as the writer gets through the queue (a large backlog on a slow disk
        is written, however long it takes); gives up only when no queued frame was handled
        for ``timeout_s`` (a disk that hangs)."""
        if self._closed:
            return
        self._closed = True
        self.frames_acquired = frames_acquired
        if self._thread is None:
            return
        if self._queued_frames:
            self._log_backlog_at_close()
        self._queue.put(_STOP)
        left, since = self._queued_frames, time.monotonic()
        while self._thread.is_alive() and time.monotonic() - since < timeout_s:
            self._thread.join(min(1.0, timeout_s))
            if self._queued_frames != left:  # progress: wait on
                left, since = self._queued_frames, time.monotonic()
        if self._thread.is_alive():
            log.error("recorder: %d frames still unwritten, none handled in the last %g s "
                      "(a hung disk?); giving up on them (%s)",
                      self._queued_frames, timeout_s, self.path)
            return
        c = self.counts
        rows_lost = (f"; the measurement rows of {c.rows_lost} frame(s) could not be written "
                     "(rows_stored: false in frames.jsonl)" if c.rows_lost else "")
        lost = c.events_lost + self._events_waiting()
        events_lost = f"; {lost} event(s) not in events.jsonl" if lost else ""
        log.log(
            logging.WARNING if c.rejected or c.errors_total or c.rows_lost else logging.INFO,
            "recording closed: %d frames written (%d analysed, %d skipped, %d failed, "
            "%d rejected) of %s acquired, %d measurement rows, in %s%s%s",
            c.written, c.analysed, c.skipped, c.failed, c.rejected,
            "?" if frames_acquired is None else frames_acquired, c.rows, self.path, rows_lost,
            events_lost,
        )

    def _log_backlog_at_close(self) -> None:
        """Say how much is still queued at close: a warning only when it is large or slow
        (a few frames queued at a clean shutdown are normal)."""
        frames, mb = self._queued_frames, self._queued_bytes / 2**20
        per_frame = self._frame_write_s
        eta_s = None if per_frame is None else frames * per_frame
        slow = mb > CLOSE_BACKLOG_WARN_MB or (eta_s is not None and eta_s > CLOSE_BACKLOG_WARN_S)
        log.log(logging.WARNING if slow else logging.INFO,
                "recorder: writing the %d queued frames (%.0f MB%s) to %s before closing",
                frames, mb, "" if eta_s is None else f", about {eta_s:.1f} s", self.path)

    def _units_json(self) -> dict[str, Any]:
        """units.json: the columns' units and the pixel size (a placeholder when the
        service had no calibration: ``pixel_size_calibrated`` false)."""
        axis = ("µm per px = pixel_size_um" if self.pixel_size_calibrated else
                "px (no pixel-size calibration: pixel_size_um is a placeholder)")
        return {
            "columns": column_units(self.units, calibrated=self.pixel_size_calibrated),
            "pixel_size_um": self.pixel_size_um,
            PIXEL_SIZE_CALIBRATED: self.pixel_size_calibrated,
            "started_at": self.started_at,
            "images": {"axes": ["t", "y", "x"], "t": "frame_id (acquisition order)",
                       "y": axis, "x": axis},
        }

    # ------------------------------------------------------------ sink interface
    def on_frame(self, frame: Frame) -> None:
        """Queue one published frame (any outcome) for writing; never blocks."""
        if self._closed:
            log.warning("recorder closed: frame %d not recorded", frame.frame_id)
            return
        analysed = not frame.skipped and frame.error is None and frame.labels is not None
        record = {
            "frame_id": frame.frame_id,
            "acquisition": frame.acquisition,
            "index": dict(frame.index),
            "position": dict(frame.position),
            "settings": {**NO_SETTINGS, **frame.settings},  # channel, channel_group, exposure_ms
            "pixel_size_um": frame.pixel_size_um,  # each frame's (the zarr's scale: at open)
            "t": dict(frame.t),
            **({"replayed_from": dict(frame.replayed_from)}
               if frame.replayed_from is not None else {}),
            "analysed": analysed,
            "skipped": frame.skipped,
            "failed": frame.error is not None,
            "error": frame.error,
            "objects": len(frame.objects) if analysed and frame.objects is not None else None,
            "summary": frame.summary if analysed else None,
        }
        if analysed and frame.grains is not None:  # a grains model: the tile's and the scan's
            record["grains"] = frame.grains
        labels = frame.labels if analysed and self.labels else None
        objects = frame.objects if analysed and self.measurements else None
        nbytes = frame.image.nbytes + (labels.nbytes if labels is not None else 0)
        with self._lock:
            self._queued_frames += 1
            self._queued_bytes += nbytes
            over = self._queued_bytes > self.max_queue_bytes
            # warned on crossing the limit, and again each time the backlog doubles
            warn = over and (not self._over_limit or self._queued_bytes >= 2 * self._warned_at)
            if warn:
                self._warned_at = self._queued_bytes
            self._over_limit = over
        if warn:
            log.warning(
                "recorder is behind: %.0f MB (%d frames) wait to be written to %s; nothing is "
                "dropped, memory grows (faster disk, or record.labels: false)",
                self._queued_bytes / 2**20, self._queued_frames, self.path,
            )
        self._queue.put(_FrameItem(record, frame.image, labels, objects, nbytes))

    def on_event(self, header: Mapping[str, Any]) -> None:
        """Queue one ``event`` topic message for events.jsonl."""
        if not self._closed:
            self._queue.put(dict(header))

    def report(self) -> dict[str, Any]:
        """Counters for the status message."""
        c = self.counts
        return {
            "path": str(self.path),
            "frames_written": c.written,
            "frames_analysed": c.analysed,
            "frames_skipped": c.skipped,
            "frames_failed": c.failed,
            "frames_rejected": c.rejected,
            "frames_queued": self._queued_frames,
            "queued_mb": round(self._queued_bytes / 2**20, 1),
            "measurement_rows": c.rows,
            "frames_rows_lost": c.rows_lost,
            "errors": list(c.errors),
            "errors_total": c.errors_total,
            "failing": bool(self._failing),
            "stopped": self._lost,
        }

    # ------------------------------------------------------------ writer thread
    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < 64:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._check_folder()
            frames = [b for b in batch if isinstance(b, _FrameItem)]
            try:
                if self._lost is None:
                    self._grow(frames)
            except Exception as exc:
                self._error("growing the arrays failed", exc, part="images")
            for item in batch:
                try:
                    if item is _STOP:
                        stop = True
                    elif isinstance(item, _FrameItem):
                        started = time.perf_counter()
                        self._write_frame(item)
                        self._took(time.perf_counter() - started)
                    else:
                        self._write_event(item)
                except Exception as exc:  # never let the writer thread die
                    self._error("writing", exc)
        self._finish()

    def _took(self, seconds: float) -> None:
        """Note how long a frame took to write (a moving average, for close's estimate)."""
        before = self._frame_write_s
        self._frame_write_s = seconds if before is None else 0.8 * before + 0.2 * seconds

    def _check_folder(self) -> None:
        """Stop recording if the run folder was deleted or moved (once per batch)."""
        if self._lost is not None:
            return
        lost = folder_lost(self.path, self._side_files(), self._folder_id)
        if lost is not None:
            self._lost = lost
            self._failing.clear()  # announced even during a run of write errors
            self._error("recording stopped", RecordingError(
                f"{lost}; the rest of the run is not recorded"), part="folder")

    def _side_files(self) -> list[BlockFile]:
        return [f for f in (self._frames_fh, self._events_fh, self._csv_fh) if f is not None]

    def _error(self, what: str, exc: BaseException, *, part: str | None = None) -> None:
        """Count and log a write error (a traceback once per kind, then a line every
        ``ERROR_LOG_EVERY``); tell ``on_error`` about the first of a run of them. ``part``
        (default ``what``): what failed, e.g. a file; the run lasts until every part that
        failed was written again (:meth:`_wrote`)."""
        msg = f"{what}: {type(exc).__name__}: {exc}"
        c = self.counts
        if isinstance(exc, OSError) and part != "folder":  # (a lost folder stops it)
            msg += (f"; {_what_to_do(exc)}: until it can write, the recording loses what "
                    "it cannot write (counted in status.recording) and goes on by itself "
                    "once it can (event recording_resumed)")
        c.errors.append(msg)
        c.errors_total += 1
        errno = f"errno {getattr(exc, 'errno', '')}"  # a full disk and a lost folder differ
        self._logged_errors.error(errno, f"recorder ({self.path}): {what}", exc)
        was_failing = bool(self._failing)
        self._failing.add(part or what)
        if not was_failing and self._on_error is not None:
            try:
                self._on_error(msg)
            except Exception:
                log.exception("recorder: reporting a write error failed")

    def _wrote(self, *parts: str) -> None:
        """``parts`` were written: a run of errors, if any, is over once every part that
        failed was (a frame with no rows to write says nothing about measurements.csv)."""
        if not self._failing:
            return
        self._failing.difference_update(parts)
        if not self._failing:
            log.warning("recorder (%s): writing again (%d write errors so far)",
                        self.path, self.counts.errors_total)
            if self._on_resumed is not None:
                try:
                    self._on_resumed(self.counts.errors_total)
                except Exception:
                    log.exception("recorder: reporting that it writes again failed")

    def _create_group(self) -> Any:
        """The image group, with its ``livemask`` attributes (``complete: false``), made at
        start: a run that stops before its first frame is still a recording. Its OME
        attributes come with the arrays (:meth:`_create_arrays`): OME-Zarr tools would find
        an image whose data is missing."""
        import zarr

        return zarr.open_group(self.path / IMAGES, mode="w", zarr_format=3, attributes={
            "livemask": self._summary_attrs(complete=False)})

    def _create_arrays(self, image: np.ndarray) -> None:
        from zarr.codecs import BloscCodec

        root = self._root
        if root is None:
            raise RecordingError("the image group was not created")
        shape = (0, *image.shape)
        chunks = (1, *image.shape)
        # blosc zstd level 1 with bit-shuffle: ~4x cheaper than zarr's default zstd level 3
        # on camera frames, and smaller (measured on simulated 512x512 nuclei frames)
        codec = BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")
        # every frame gets its chunk file, even an all-zero one (zarr skips those by
        # default): a missing file then always means a lost frame, which replay reports
        # (overwrite: what a failed attempt before left behind)
        images = root.create_array("0", shape=shape, chunks=chunks, dtype=image.dtype,
                                   fill_value=0, dimension_names=("t", "y", "x"),
                                   compressors=codec, config={"write_empty_chunks": True},
                                   overwrite=True)
        masks_array = None
        if self.labels:
            lab = root.create_group("labels", overwrite=True, attributes={
                "ome": {"version": OME_VERSION, "labels": [LABELS_NAME]}})
            masks = lab.create_group(LABELS_NAME, attributes={"ome": {
                "version": OME_VERSION,
                "multiscales": _multiscales(LABELS_NAME, self.pixel_size_um,
                                            self.pixel_size_calibrated),
                "image-label": {"source": {"image": "../../"}},
            }})
            masks_array = masks.create_array("0", shape=shape, chunks=chunks, dtype="int32",
                                             fill_value=0, dimension_names=("t", "y", "x"),
                                             compressors=codec)
        # the image's OME metadata once its data is there (a reader takes the pixel size
        # from livemask.pixel_size_um in a recording killed before this)
        root.update_attributes(ome_image_attributes(
            self.pixel_size_um, calibrated=self.pixel_size_calibrated))
        # all or nothing: a failure above leaves them unset, and the next frame tries again
        # (before, a failed labels array left images written without labels, never complete)
        self._images, self._masks = images, masks_array

    def _grow(self, frames: list[_FrameItem]) -> None:
        """Grow the t axis once for a batch, so that every frame_id in it fits."""
        if not frames:
            return
        if self._images is None:
            self._create_arrays(frames[0].image)
        arr = self._images
        ids = [f.record["frame_id"] for f in frames if f.image.shape == arr.shape[1:]]
        self._extend(max(ids, default=-1) + 1)

    def _extend(self, n: int) -> None:
        """Make the t axis ``n`` frames long (if shorter): the labels first, so that a kill
        between the two metadata writes never leaves the images longer than the labels
        (a reader looping over the images' t axis would index past the labels' end)."""
        arr = self._images
        if n <= arr.shape[0]:
            return
        if self._masks is not None and self._masks.shape[0] < n:
            self._masks.resize((n, *self._masks.shape[1:]))
        arr.resize((n, *arr.shape[1:]))

    def _write_frame(self, item: _FrameItem) -> None:
        rec = item.record
        fid = int(rec["frame_id"])
        stored = False
        self._check_folder()  # (one stat: zarr would re-create a folder moved meanwhile)
        if self._lost is not None:  # nowhere to write to
            self.counts.rejected += 1
            self._dequeued(item)
            return
        try:
            arr = self._images
            image = item.image
            if arr is None:
                raise RecordingError("the image array was not created")
            if image.shape != arr.shape[1:]:
                raise RecordingError(
                    f"frame shape {image.shape} differs from the recording's {arr.shape[1:]}; "
                    "one recording holds frames of one shape (change the camera ROI/binning "
                    "between runs, not during one)"
                )
            if image.dtype != arr.dtype:
                if not np.can_cast(image.dtype, arr.dtype, "safe"):
                    raise RecordingError(
                        f"frame dtype {image.dtype} does not fit the recording's {arr.dtype}"
                    )
                image = image.astype(arr.dtype)
            self._extend(fid + 1)  # a frame the batch's growth did not cover
            arr[fid] = image
            if self._masks is not None and item.labels is not None:
                self._masks[fid] = item.labels.astype(np.int32, copy=False)
            stored = True
            self._wrote("images")
        except Exception as exc:
            self._error(f"frame {fid} not stored", exc, part="images")
            self.counts.rejected += 1
            rec["error"] = rec["error"] or str(exc)
        rec["stored"] = stored
        if not stored:
            self._write_event({"kind": "frame_not_stored", "frame_id": fid,
                               "detail": rec["error"], "t": rec["t"]})
        # its measurements stand, even if its image could not be stored; written before its
        # line, which says whether they were (None: the frame has no rows to write)
        before = (self._csv_size(), self.counts.rows, self.counts.rows_lost)
        rec["rows_stored"] = None if item.objects is None else self._write_rows(rec, item.objects)
        line = False
        try:
            assert self._frames_fh is not None
            self._frames_fh.write(json.dumps(rec, default=_jsonable) + "\n")
            line = True
            self._wrote("frames.jsonl", "writing")
        except Exception as exc:  # the reader knows a frame by its line: it is lost
            self._error(f"frames.jsonl line of frame {fid}", exc, part="frames.jsonl")
            if stored:
                self.counts.rejected += 1
            stored = rec["stored"] = False
            self._take_back_rows(rec, *before)
        if line and self._pending_events:  # the disk took a line: the events waiting may fit
            self._write_pending_events()
        if stored:
            c = self.counts
            c.written += 1
            c.analysed += bool(rec["analysed"])
            c.skipped += bool(rec["skipped"])
            c.failed += bool(rec["failed"])
        if self._records is not None:
            self._records.append({k: rec[k] for k in (
                "frame_id", "acquisition", "index", "position", "settings", "analysed",
                "skipped", "failed", "stored", "rows_stored")}
                | {"acquired": rec["t"].get("acquired")})
            if len(self._records) > MAX_ATTRIBUTE_FRAMES:
                self._records = None  # a long time-lapse: memory and zarr.json stay small
        if rec["failed"]:
            self._write_event({"kind": "frame_failed", "frame_id": fid,
                               "detail": rec["error"], "t": rec["t"]})
        self._dequeued(item)

    def _dequeued(self, item: _FrameItem) -> None:
        with self._lock:
            self._queued_frames -= 1
            self._queued_bytes -= item.nbytes

    def _csv_size(self) -> int | None:
        """The size of measurements.csv now (None: not written)."""
        return self._csv_fh.size if self._csv_fh is not None else None

    def _take_back_rows(self, rec: dict[str, Any], csv_size: int | None, rows: int,
                        rows_lost: int) -> None:
        """A frame whose frames.jsonl line could not be written is not in the recording
        (counted in ``rejected``): its rows, written before, are taken back out of
        measurements.csv (else they would be rows of no frame), and it is no frame whose
        rows alone were lost (``rows_lost`` counts frames whose line says so). ``csv_size``,
        ``rows``, ``rows_lost``: as before its rows were written."""
        self.counts.rows_lost = rows_lost
        if self._csv_fh is None or csv_size is None or self.counts.rows == rows:
            return
        try:
            self._csv_fh.cut(csv_size)
        except OSError as exc:  # the rows stay: counted, and said
            log.warning("recorder (%s): the measurement rows of frame %s, whose frames.jsonl "
                        "line could not be written, stay in measurements.csv (%s)",
                        self.path, rec["frame_id"], exc)
            return
        self.counts.rows = rows
        rec["rows_stored"] = False  # (the closing attributes' record of it)

    def _write_rows(self, rec: dict[str, Any], objects: list[dict[str, Any]]) -> bool:
        """A frame's measurement rows, written as one block (all of them or none); whether
        they were (lost ones are counted in ``rows_lost``)."""
        if not objects:
            return True  # nothing to write: nothing lost
        if self._csv_fh is None:
            return False
        acquired = rec["t"].get("acquired")
        base: dict[str, Any] = {
            "frame_id": rec["frame_id"],
            "acquisition": rec["acquisition"],
            "time_s": round(acquired - self.started_at, 4) if acquired is not None else "",
            **{a: rec["index"].get(a, "") for a in _INDEX_AXES},
            **{k: ("" if v is None else v) for k, v in rec["position"].items()},
            **{k: ("" if v is None else v) for k, v in rec["settings"].items()
               if k in ("channel", "exposure_ms")},
            **{f"replayed_{k}": ("" if v is None else v)
               for k, v in (rec.get("replayed_from") or {}).items()},
        }
        try:
            block = io.StringIO()
            writer = csv.DictWriter(block, CSV_COLUMNS, extrasaction="ignore")
            for obj in objects:
                row = {**base, **obj}
                for key, cols in _SPLIT.items():
                    values = obj.get(key)
                    if values is not None:
                        row.update(zip(cols, values, strict=False))
                writer.writerow(row)
            self._csv_fh.write(block.getvalue())
        except Exception as exc:
            self._error(f"measurement rows of frame {rec['frame_id']}", exc,
                        part="measurements.csv")
            self.counts.rows_lost += 1
            return False
        self.counts.rows += len(objects)
        self._wrote("measurements.csv")
        return True

    def _write_event(self, header: dict[str, Any]) -> None:
        """Write an events.jsonl line after those still waiting (a line that cannot be
        written waits, and is tried again with the next event or frame)."""
        if self._lost is not None or self._events_fh is None:
            return
        if self._pending_events:  # the waiting lines first: the disk may take them now
            self._write_pending_events()
        self._keep_event(json.dumps(header, default=_jsonable) + "\n")
        self._write_pending_events()

    def _keep_event(self, line: str) -> None:
        """Add ``line`` to the events waiting; past ``MAX_PENDING_EVENTS`` only count it."""
        pending = self._pending_events
        if len(pending) < MAX_PENDING_EVENTS:
            pending.append(line)
            return
        gap = pending[-1]
        if not isinstance(gap, _EventGap):
            gap = _EventGap()
            pending.append(gap)
            log.warning("recorder (%s): %d events wait for events.jsonl; later ones are "
                        "counted, not kept, until it can be written again",
                        self.path, MAX_PENDING_EVENTS)
        gap.count += 1
        self.counts.events_lost += 1

    def _events_waiting(self) -> int:
        """How many event lines wait to be written (those not kept not counted)."""
        return sum(isinstance(item, str) for item in self._pending_events)

    def _write_pending_events(self) -> None:
        """Write the events waiting, oldest first, until one fails (it and the later ones
        wait for the next try)."""
        pending, fh = self._pending_events, self._events_fh
        if self._lost is not None or fh is None:
            return
        while pending:
            item = pending[0]
            line = item if isinstance(item, str) else _gap_line(item.count)
            try:
                fh.write(line)
            except Exception as exc:
                self._error(f"events.jsonl ({len(pending)} event line(s) wait)", exc,
                            part="events.jsonl")
                return
            pending.popleft()
            if isinstance(item, str):
                self.counts.events += 1
            else:
                log.warning("recorder (%s): %d event(s) that came while events.jsonl could not "
                            "be written are not recorded (an %r line marks where)",
                            self.path, item.count, EVENTS_NOT_RECORDED)
        self._wrote("events.jsonl")

    def _summary_attrs(self, *, complete: bool) -> dict[str, Any]:
        c = self.counts
        out: dict[str, Any] = {
            "version": __version__,
            "complete": complete,
            "pixel_size_um": self.pixel_size_um,
            PIXEL_SIZE_CALIBRATED: self.pixel_size_calibrated,
            "started_at": self.started_at,
            "frame_axis": "t = frame_id (acquisition order; all positions and channels)",
            "frames_file": "../frames.jsonl",
            # every stored frame has its image chunk file (write_empty_chunks), so replay
            # can tell a lost frame from an all-zero one
            EVERY_CHUNK_WRITTEN: True,
        }
        if complete:
            out.update({
                "frames_written": c.written, "frames_analysed": c.analysed,
                "frames_skipped": c.skipped, "frames_failed": c.failed,
                "frames_rejected": c.rejected, "frames_acquired": self.frames_acquired,
                "frames_rows_lost": c.rows_lost, "measurement_rows": c.rows,
                "closed_at": time.time(),
            })
            if self._records is not None:
                out["frames"] = sorted(self._records, key=lambda r: r["frame_id"])
            else:
                out["frames_omitted"] = (
                    f"more than {MAX_ATTRIBUTE_FRAMES} frames: the per-frame records are in "
                    "frames.jsonl only"
                )
        return out

    def _finish(self) -> None:
        self._check_folder()
        self._write_pending_events()
        if self._pending_events and self._lost is None:
            log.warning("recorder (%s): %d event line(s) could not be written to events.jsonl "
                        "and are lost", self.path, self._events_waiting())
        synced = True
        for fh in self._side_files():
            try:
                fh.sync()
            except OSError as exc:
                synced = False
                self._error(f"putting {fh.path.name} on disk", exc)
        if self._root is not None and self._lost is None and synced:  # else: not complete
            try:
                self._root.update_attributes({"livemask": self._summary_attrs(complete=True)})
            except Exception as exc:
                self._error("final attributes", exc)
        self._close_files()

    def _close_files(self) -> None:
        for fh in self._side_files():
            try:
                fh.close()
            except Exception as exc:
                self._error("closing", exc)
        self._frames_fh = self._events_fh = self._csv_fh = None


def _gap_line(count: int) -> str:
    """The events.jsonl line standing for ``count`` events that were not kept."""
    return json.dumps({
        "kind": EVENTS_NOT_RECORDED, "count": count,
        "detail": f"{count} event(s) are missing here: they came while events.jsonl could not "
                  f"be written and {MAX_PENDING_EVENTS} others already waited",
    }) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
