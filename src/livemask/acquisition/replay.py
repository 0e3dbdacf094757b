"""Replay: recorded or stored frames served to the pipeline as if they came from the camera.

:func:`open_stack` reads a livemask recording (run folder), any OME-Zarr image (NGFF 0.4 or
0.5) or zarr array, or a TIFF stack (tifffile, read with
:mod:`livemask.acquisition.tiff_stack`), lazily where the format allows.
:class:`ReplaySource` implements :class:`~livemask.acquisition.source.FrameSource`: one
frame per planned event, on its own thread, with the recorded MDA index and stage position
(or ``{"t": i}``), paced by ``interval_s`` or the recorded timing, and, in pipelined or
synchronized mode, waiting for analysis as the microscope does (the same :class:`EventFeed`).
A recording's frames carry their recorded pixel size (:attr:`RawFrame.pixel_size_um`,
relative to :attr:`ReplaySource.reference_pixel_size_um`, as a microscope's follow the
core's). A recording holds every acquisition of its service run: before the first frame of
another recorded acquisition the source calls the service's ``on_acquisition`` (given to
:meth:`ReplaySource.connect`), which finishes the running acquisition and begins the next,
so tracks and the cumulative grain statistics restart where they did in the recorded run.
A replay cannot move the stage or change the exposure: ``inject`` and
``set_exposure`` raise :class:`~livemask.errors.AcquisitionError`.

A frame that cannot be read (it is corrupt: a TIFF page that does not decode, a damaged
chunk; or, in a livemask recording, its zarr chunk file is missing, where zarr would silently
hand back a frame of zeros) is skipped with a warning; the others are replayed, and the
acquisition ends with an error that counts the skipped frames. A compressed TIFF is read a
page at a time as the frames play (not all at open); one whose compression has no decoder
here is refused at open, naming the package it needs; a TIFF cut short replays the frames
before the cut, with a warning. Other zarr arrays may leave out chunks that hold only the
fill value (zarr's default), so a missing chunk file there is read as the fill value, as zarr
intends.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import useq

from livemask.acquisition.feed import EventFeed
from livemask.acquisition.mode import Mode
from livemask.acquisition.pixel_size import check_square, tiff_pixel_size, um_per_unit
from livemask.acquisition.source import DoneCallback, FeedThreadSource, FrameCallback, RawFrame
from livemask.acquisition.tiff_stack import (
    TIFF_SUFFIXES,
    MinIsBlack,
    PositionSeries,
    TiffCut,
    TiffPlanes,
    decoder_problem,
    position_series,
    readable_frames,
    tiff_axes,
    tiff_cut,
    tiff_data,
    white_level,
)
from livemask.analysis.normalize import image_problem
from livemask.errors import AcquisitionError, ReplayError
from livemask.log import RepeatedErrors

log = logging.getLogger("livemask")

__all__ = ["FrameNotStored", "ReplaySource", "ReplayStack", "open_stack", "replay_pixel_size"]

#: Axes a replay steps through (everything but the last two, y and x, of each frame).
FRAME_AXES = ("t", "p", "c", "z")


@dataclass
class ReplayStack:
    """Frames to replay: ``plane(i)`` for i in range(frames), with their index and position."""

    path: Path
    kind: str  # "recording", "ome-zarr", "zarr", "tiff"
    frames: int
    shape: tuple[int, int]
    dtype: np.dtype[Any]
    plane: Callable[[int], np.ndarray]
    indices: Sequence[dict[str, int]] | None = None
    positions: Sequence[dict[str, float | None]] | None = None
    times: Sequence[float] | None = None  # seconds since the first frame
    pixel_size_um: float | None = None
    #: where ``pixel_size_um`` was found (for the log), e.g. "OME PhysicalSizeX"
    pixel_size_from: str = ""
    #: False: the file says that it has no pixel-size calibration (a recording of a rig
    #: without one; ``pixel_size_um`` is then None)
    pixel_size_calibrated: bool = True
    #: each frame's own pixel size (µm; a recording's, from frames.jsonl), None where unknown
    pixel_sizes: Sequence[float | None] | None = None
    #: each frame's recorded acquisition number (a recording's; None where a frame's record
    #: has none), else None
    acquisitions: Sequence[int | None] | None = None
    #: each frame's recorded channel and exposure (``RawFrame.settings``; a recording's,
    #: from frames.jsonl), else None
    settings: Sequence[dict[str, Any]] | None = None
    #: a recording's frames: where each comes from (:meth:`replayed_from`), else None (a
    #: file's frames are its planes in order)
    sources: Sequence[dict[str, Any]] | None = None
    close: Callable[[], None] = field(default=lambda: None)

    def __post_init__(self) -> None:
        px = self.pixel_size_um
        if px is not None and not (math.isfinite(px) and px > 0):
            log.warning("%s: its metadata gives a pixel size of %s µm, which is not a size; "
                        "ignored (set hardware.pixel_size_um in the config)", self.path, px)
            self.pixel_size_um = None

    def replayed_from(self, i: int) -> dict[str, Any]:
        """Where frame ``i`` comes from: its ``frame_id`` in the recording (a file's plane
        number) and ``time_s``, its recorded time there (a recording's: since it started, as
        its CSV's ``time_s``; a file's: since its first frame; None where it has none); a
        replay's recording gives its own frames' origin on. A re-analysis joins its results
        back to the original run with them, whatever its own timing."""
        if self.sources is not None:
            return dict(self.sources[i])
        return {"frame_id": i,
                "time_s": round(float(self.times[i]), 6) if self.times is not None else None}

    def index(self, i: int) -> dict[str, int]:
        """The MDA index of frame ``i``."""
        return dict(self.indices[i]) if self.indices is not None else {"t": i}

    def pixel_size(self, i: int) -> float | None:
        """Frame ``i``'s own pixel size (µm), None where the stack has none per frame."""
        if self.pixel_sizes is None:
            return None
        px = self.pixel_sizes[i]
        return px if px is not None and math.isfinite(px) and px > 0 else None

    def acquisition(self, i: int) -> int | None:
        """Frame ``i``'s recorded acquisition number, None where unknown."""
        return self.acquisitions[i] if self.acquisitions is not None else None

    def acquisition_frames(self, i: int) -> int:
        """How many frames from ``i`` on, in a row, belong to frame ``i``'s recorded
        acquisition (frames of no known number count to it)."""
        number, k = self.acquisition(i), i + 1
        while k < self.frames and self.acquisition(k) in (number, None):
            k += 1
        return k - i

    def position(self, i: int) -> dict[str, float | None]:
        """The stage position of frame ``i`` (None where unknown)."""
        if self.positions is not None:
            return dict(self.positions[i])
        return {"x_um": None, "y_um": None, "z_um": None}


class FrameNotStored(ReplayError):
    """A frame's data is not in the store (a zarr chunk file is missing)."""


#: Frames in a row that cannot be read after which a replay ends (the store looks broken).
MAX_UNREADABLE_IN_A_ROW = 50

#: Which chunk files of a zarr array hold the plane at a lead index, and are missing.
MissingChunks = Callable[[tuple[int, ...]], list[Path]]


def missing_chunks(data: Any) -> MissingChunks | None:
    """For a zarr array in a local folder: a function giving the chunk (or shard) files of
    the plane at a lead index that are not on disk; None for other arrays.

    zarr reads a missing chunk as its fill value, so without this check a frame lost from a
    recording that writes every chunk replays as a black frame. (Only for such arrays:
    zarr leaves out chunks of fill value by default.)"""
    store_path = getattr(data, "store_path", None)
    root = getattr(getattr(store_path, "store", None), "root", None)
    if store_path is None or root is None:
        return None
    folder = Path(root) / store_path.path
    grid = tuple(int(n) for n in (getattr(data, "shards", None) or data.chunks))
    rows = range(math.ceil(data.shape[-2] / grid[-2]))
    cols = range(math.ceil(data.shape[-1] / grid[-1]))
    encode = data.metadata.encode_chunk_key

    def missing(where: tuple[int, ...]) -> list[Path]:
        lead = tuple(w // g for w, g in zip(where, grid[:-2], strict=True))
        files = (folder / encode((*lead, r, c)) for r in rows for c in cols)
        return [f for f in files if not f.is_file()]

    return missing


def _read_plane(data: Any, where: tuple[int, ...], missing: MissingChunks | None,
                path: Path, frame: str) -> np.ndarray:
    """Plane ``where`` of ``data``; :class:`FrameNotStored`, naming ``frame``, when its chunk
    files are missing."""
    if missing is not None and (gone := missing(where)):
        raise FrameNotStored(
            f"{frame} of {path} is not stored: {len(gone)} chunk file(s) missing, e.g. "
            f"{gone[0]} (deleted, or never written by the recorder)"
        )
    return np.ascontiguousarray(np.asarray(data[where]))


# ------------------------------------------------------------------ readers
def open_stack(path: str | Path) -> ReplayStack:
    """Open ``path`` for replay; :class:`ReplayError` says what to change when it cannot."""
    p = Path(path)
    if not p.exists():
        raise ReplayError(f"{p} does not exist; give a recording folder, an OME-Zarr or a TIFF")
    from livemask.recording.reader import find_recording, several_recordings

    if find_recording(p) is not None:
        return _with_metadata_named(p, _open_recording)
    if p.is_dir():
        if (p / "zarr.json").is_file() or (p / ".zattrs").is_file() or (p / ".zarray").is_file():
            return _with_metadata_named(p, _open_zarr)
        several = several_recordings(p)
        if several is not None:
            raise ReplayError(several)
        raise ReplayError(
            f"{p} is a folder but neither a livemask recording (run-… with images.ome.zarr) "
            "nor a zarr group/array; give a run folder, an OME-Zarr or a TIFF file"
        )
    if p.suffix.lower() in TIFF_SUFFIXES:
        return _open_tiff(p)
    raise ReplayError(
        f"{p}: unknown file type {p.suffix!r}; replay reads TIFF stacks "
        f"({'/'.join(TIFF_SUFFIXES)}), OME-Zarr "
        "(.zarr folders) and livemask recordings"
    )


def _no_frames_listed(run: Path, on_axis: int, listed: int) -> str:
    """Why a recording whose frame records (``listed`` of them) name no stored frame cannot
    be replayed, and, where its images hold ``on_axis`` frames all the same, how to replay
    those."""
    if on_axis == 0:
        return f"recording {run} holds no frames"
    if listed:
        return (f"recording {run} lists {listed} frame(s), none of them stored (their "
                "frames.jsonl lines say stored: false: e.g. a full disk; see events.jsonl "
                "and the service's log)")
    listing = run / "frames.jsonl"
    why = ("has no frames.jsonl" if not listing.is_file()
           else "its frames.jsonl lists none of them")
    array = run / "images.ome.zarr" / "0"
    return (f"recording {run} holds {on_axis} frame(s) on its t axis, but {why} (a "
            "recorder stopped hard, e.g. a power cut, before writing it?): replay the "
            f"images alone with `livemask replay {array}` (without each frame's recorded "
            "index, stage position, timing and pixel size)")


def _with_metadata_named(path: Path, opener: Callable[[Path], ReplayStack]) -> ReplayStack:
    """``opener(path)``; damaged or unexpected zarr metadata becomes a ReplayError that
    names the folder (zarr and the OME keys raise KeyError, ValueError, ... without it)."""
    try:
        return opener(path)
    except ReplayError:
        raise
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, OSError) as exc:
        detail = f"{type(exc).__name__}: {exc}"
        raise ReplayError(
            f"{path}: it cannot be read as zarr ({detail}); give a complete, readable "
            "OME-Zarr, zarr array or livemask recording"
        ) from None


def _check(path: Path, shape: tuple[int, ...], dtype: np.dtype[Any], axes: Sequence[str]) -> None:
    problem = image_problem(shape, dtype)
    if problem is not None:
        raise ReplayError(f"{path} {problem}")
    bad = [a for a in axes if a not in FRAME_AXES]
    if bad:
        raise ReplayError(
            f"{path} has axes {''.join(axes) or '-'} + (y, x); axis {bad[0]!r} is not supported: "
            f"replay steps through {', '.join(FRAME_AXES)} only (save the stack as (t, y, x) "
            "or split it)"
        )


def _planes(
    path: Path, kind: str, data: Any, axes: Sequence[str], pixel: float | None,
    pixel_from: str = "", readable: int | None = None,
) -> ReplayStack:
    """The frames of ``data`` (..., y, x); only the first ``readable`` when given (a
    truncated file's frames up to the first one cut off)."""
    shape = tuple(int(n) for n in data.shape)
    dtype = np.dtype(data.dtype)
    _check(path, shape, dtype, axes)
    lead = shape[:-2]
    frames = math.prod(lead) if lead else 1
    if frames == 0:
        raise ReplayError(f"{path} holds no frames (shape {shape})")
    if readable is not None:
        frames = min(frames, readable)

    def plane(i: int) -> np.ndarray:
        where = tuple(int(k) for k in np.unravel_index(i, lead)) if lead else ()
        return _read_plane(data, where, None, path, f"frame {i}")

    indices = None
    if lead:
        indices = [dict(zip(axes, (int(k) for k in np.unravel_index(i, lead)), strict=True))
                   for i in range(frames)]
    return ReplayStack(path, kind, frames, (shape[-2], shape[-1]), dtype, plane,
                       indices=indices, pixel_size_um=pixel, pixel_size_from=pixel_from)


def _open_recording(path: Path) -> ReplayStack:
    from livemask.recording.reader import MappedSequence, open_recording, record_settings
    from livemask.recording.writer import EVERY_CHUNK_WRITTEN

    rec = open_recording(path)
    if not rec.complete:
        log.warning("recording %s is not marked complete (still being written, or its "
                    "service stopped abruptly): replaying the frames stored so far", rec.path)
    # one pass over the records, keeping arrays (a long recording has millions of frames);
    # each frame's index and position are read from its record when it is replayed
    kept, ids_list, acquired, numbers = [], [], [], []
    # recordings from before frames.jsonl had each frame's pixel size: the scale for all
    per_frame_px = False
    for k, r in enumerate(rec.frames):
        if r.get("stored", True) and int(r["frame_id"]) < rec.images.shape[0]:
            per_frame_px = per_frame_px or "pixel_size_um" in r
            kept.append(k)
            ids_list.append(int(r["frame_id"]))
            a = r.get("t", {}).get("acquired", r.get("acquired"))
            acquired.append(float(a) if isinstance(a, int | float) else np.nan)
            n = r.get("acquisition")
            numbers.append(n if type(n) is int and n >= 0 else -1)  # -1: not recorded
    if not kept:
        raise ReplayError(_no_frames_listed(rec.path, int(rec.images.shape[0]),
                                            len(rec.frames)))
    images = rec.images
    # a recording of a rig without calibration: its scale and frame sizes are placeholders
    calibrated = rec.pixel_size_calibrated
    per_frame_px = per_frame_px and calibrated
    ids = np.asarray(ids_list, np.int64)
    at = np.asarray(acquired, np.float64)
    times = None if np.isnan(at).any() else MappedSequence(len(at), lambda i: float(at[i] - at[0]))
    acquisitions = np.asarray(numbers, np.int64)
    records = _LastRecord(lambda i: rec.frames[kept[i]])
    begun = rec.attributes.get("livemask", {}).get("started_at")  # the CSV's time_s origin
    started = float(begun) if isinstance(begun, int | float) else float(at[0])

    # recordings made before every chunk was written (an all-zero frame had none) unchecked
    every_chunk = bool(rec.attributes.get("livemask", {}).get(EVERY_CHUNK_WRITTEN))
    missing = missing_chunks(images) if every_chunk else None

    def plane(i: int) -> np.ndarray:
        return _read_plane(images, (int(ids[i]),), missing, rec.path,
                           f"frame_id {ids[i]} (replayed as frame {i})")

    return ReplayStack(
        rec.path, "recording", len(kept), tuple(images.shape[1:]), np.dtype(images.dtype),
        plane,
        indices=MappedSequence(len(kept), lambda i: {
            k: int(v) for k, v in records(i).get("index", {}).items()}),
        positions=MappedSequence(len(kept), lambda i: dict(records(i).get("position") or {})),
        times=times, pixel_size_um=rec.pixel_size_um if calibrated else None,
        pixel_size_from="the recording's scale", pixel_size_calibrated=calibrated,
        pixel_sizes=MappedSequence(len(kept), lambda i: _size(records(i).get("pixel_size_um")))
        if per_frame_px else None,
        acquisitions=MappedSequence(
            len(kept), lambda i: int(acquisitions[i]) if acquisitions[i] >= 0 else None),
        settings=MappedSequence(len(kept), lambda i: record_settings(records(i))),
        sources=MappedSequence(len(kept), lambda i: _source(records(i), int(ids[i]),
                                                            float(at[i]) - started)),
    )


def _source(record: dict[str, Any], frame_id: int, time_s: float) -> dict[str, Any]:
    """Where a recorded frame comes from: the frame of the run it was replayed from, where
    the recording is of a replay (its record's ``replayed_from``), else itself (its
    ``frame_id``, its ``time_s`` since the recording started; None where not recorded)."""
    earlier = record.get("replayed_from")
    if isinstance(earlier, dict):
        return {"frame_id": earlier.get("frame_id"), "time_s": earlier.get("time_s")}
    return {"frame_id": frame_id, "time_s": round(time_s, 6) if math.isfinite(time_s) else None}


class _LastRecord:
    """``record(i)``: the frame record ``i``, read once for the index, position and pixel
    size asked for in a row (each read from frames.jsonl)."""

    def __init__(self, read: Callable[[int], dict[str, Any]]) -> None:
        self._read = read
        self._last: tuple[int, dict[str, Any]] | None = None

    def __call__(self, i: int) -> dict[str, Any]:
        if self._last is None or self._last[0] != i:
            self._last = (i, self._read(i))
        return self._last[1]


def _size(value: Any) -> float | None:
    """A recorded pixel size (µm), None when it is not a size."""
    if isinstance(value, int | float) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _open_zarr(path: Path) -> ReplayStack:
    import zarr

    try:
        node = zarr.open(path, mode="r")
    except Exception as exc:
        raise ReplayError(f"{path} cannot be opened as zarr: {exc}") from None
    if isinstance(node, zarr.Array):
        axes = {2: [], 3: ["t"]}.get(node.ndim)
        if axes is None:
            raise ReplayError(
                f"{path} is a {node.ndim}-D zarr array without OME axes metadata; give an "
                "OME-Zarr image or a (t, y, x) array"
            )
        return _planes(path, "zarr", node, axes, None)
    attrs: dict[str, Any] = dict(node.attrs.asdict())
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales")
    if not multiscales:
        raise ReplayError(
            f"{path} is a zarr group without OME-NGFF 'multiscales' metadata; give an OME-Zarr "
            "image (the folder with the multiscales group) or a zarr array"
        )
    ms = multiscales[0]
    dataset = ms["datasets"][0]
    names = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", [])]
    data = node[dataset["path"]]
    if not isinstance(data, zarr.Array):
        raise ReplayError(f"{path}: dataset {dataset['path']!r} is not an array")
    if len(names) != data.ndim:
        raise ReplayError(f"{path}: {len(names)} axes in the metadata for a {data.ndim}-D array")
    livemask = attrs.get("livemask")
    calibrated = not (isinstance(livemask, dict)
                      and livemask.get("pixel_size_calibrated") is False)
    # a recording of a rig without a calibration: its scale (1.0) is a placeholder
    pixel = _zarr_pixel_size(path, ms, dataset) if calibrated else None
    stack = _planes(path, "ome-zarr", data, [n.lower() for n in names[:-2]], pixel,
                    "OME-Zarr scale")
    stack.pixel_size_calibrated = calibrated
    return stack


def _zarr_pixel_size(path: Path, ms: dict[str, Any], dataset: dict[str, Any]) -> float | None:
    """The x pixel size (µm) of an OME-Zarr dataset: its scale times the multiscale's own
    (``multiscales[0].coordinateTransformations``, applied after every dataset's), None
    where neither has one or its x axis has no unit (NGFF allows none: the scale is then
    not known to be a size, as livemask writes an uncalibrated recording's); warns where
    its y size differs (measurements assume square pixels)."""
    axes = [a if isinstance(a, dict) else {} for a in ms.get("axes", [])]
    scale, overall = _scale_of(dataset), _scale_of(ms)
    if scale is None:  # (NGFF requires one per dataset)
        scale, overall = overall, None
    if scale is None:
        return None
    if overall is not None and len(overall) == len(scale):
        scale = [d * m for d, m in zip(scale, overall, strict=True)]
    if not axes or "unit" not in axes[-1]:
        raw = scale[-1]
        if not (math.isfinite(raw) and raw > 0):
            return raw  # not a size at all: ReplayStack warns so
        log.info("%s: its OME-Zarr x axis has no unit: its scale is not taken as a pixel "
                 "size", path)
        return None
    unit = str(axes[-1]["unit"])
    factor = um_per_unit(unit, path, "OME-Zarr scale")
    if factor is None:
        return None
    pixel = scale[-1] * factor
    if len(scale) >= 2 and math.isfinite(pixel) and pixel > 0:
        y_unit = str(axes[-2].get("unit", unit)) if len(axes) >= 2 else unit
        y_factor = um_per_unit(y_unit, path, "OME-Zarr scale (y)")
        if y_factor is not None:
            check_square(path, pixel, scale[-2] * y_factor, "OME-Zarr scale")
    return pixel


def _scale_of(node: dict[str, Any]) -> list[float] | None:
    """The ``scale`` of the first scale transform in ``node``'s ``coordinateTransformations``
    (an NGFF dataset or multiscale), None where it has none."""
    for tr in node.get("coordinateTransformations") or []:
        if tr.get("type") == "scale":
            return [float(v) for v in tr["scale"]]
    return None


def _open_tiff(path: Path) -> ReplayStack:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise ReplayError(f"{path} cannot be read as TIFF: {exc}") from None
    try:
        undecodable = decoder_problem(tif)  # e.g. LZW without imagecodecs: every frame
        if undecodable is not None:
            raise ReplayError(f"{path} is {undecodable}")
        cut = tiff_cut(tif, path)  # tifffile's series may then be one plane of a stack
        if cut is not None and cut.images == 1:
            stack = _open_cut_tiff(tif, path, cut)
            stack.close = tif.close
            return stack
        all_series = list(tif.series)
        if not all_series:
            raise ReplayError(f"{path} holds no image series")
        series = all_series[0]
        letters = series.axes.upper()
        shape = tuple(series.shape)
        if "S" in letters:
            raise ReplayError(
                f"{path} is an RGB/multi-sample image (axes {letters}); give grayscale frames"
            )
        if letters[-2:] != "YX":
            raise ReplayError(f"{path} has axes {letters}; frames must be (…, Y, X)")
        n_series = len(all_series)
        all_series, shapes = position_series(all_series)
        if cut is not None and len(all_series) == 1:
            raise ReplayError(f"{path} is {cut.why('planes')}, of {cut.images} image series "
                              "(positions); a multi-position file cut short is not replayed "
                              "where its series cannot be told apart: copy it again or give "
                              "the complete file")
        if shapes is not None:  # e.g. a slide scanner's label or overview image beside the data
            log.warning("%s holds %d image series of different shapes or types (%s); only "
                        "the first is replayed (series of one shape play as positions): save "
                        "the others as files of their own to replay them", path,
                        n_series, shapes)
        axes = tiff_axes(path, letters[:-2], shape)
        _check(path, shape, np.dtype(series.dtype), axes)
        found = tiff_pixel_size(tif, path=path)  # as `livemask segment` reads it
        pixel, pixel_from = found if found is not None else (None, "")
        # a MinIsWhite file: read inverted, as segment does (not an ImageJ one: a LUT)
        white = white_level(getattr(series, "keyframe", None) or tif.pages.first, path,
                            imagej=bool(tif.is_imagej))
        arrays = [tiff_data(tif, path, k, shape, white) for k in range(len(all_series))]
        data: Any = arrays[0]
        if len(arrays) > 1:  # an OME-TIFF of several positions: one series each
            at = 1 if axes[:1] == ["t"] else 0  # the time points outermost, as acquired
            data = PositionSeries(arrays, at)
            axes = [*axes[:at], "p", *axes[at:]]
            log.info("%s: its %d image series are replayed as positions (p)", path,
                     len(arrays))
        readable = readable_frames(path, data)
        stack = _planes(path, "tiff", data, axes, pixel, pixel_from, readable)
    except ReplayError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise ReplayError(f"{path} cannot be read as a TIFF stack (is it corrupt or cut "
                          f"short?): {exc}") from None
    stack.close = tif.close
    return stack


def _open_cut_tiff(tif: Any, path: Path, cut: TiffCut) -> ReplayStack:
    """The complete frames of a TIFF cut short (warned), as its metadata shapes them."""
    if cut.complete == 0:
        raise ReplayError(f"{path} is {cut.why()}: not one frame can be replayed; copy it "
                          "again or give the complete file")
    first = tif.pages.first
    shape = (*cut.lead, int(first.imagelength), int(first.imagewidth))
    dtype = np.dtype(first.dtype)
    planes: Any = TiffPlanes("the file's", shape, dtype, cut.read, cut.complete)
    white = white_level(first, path, imagej=bool(tif.is_imagej))
    if white is not None:  # a MinIsWhite file: read inverted, as segment does
        planes = MinIsBlack(planes, white)
    axes = tiff_axes(path, cut.letters, shape)
    found = tiff_pixel_size(tif, path=path)
    pixel, pixel_from = found if found is not None else (None, "")
    log.warning("%s is %s; replaying those", path, cut.why())
    unknown = cut.axes_unknown()
    if unknown is not None:  # e.g. OME-XML written at the end: channels, z, positions?
        log.warning("%s: %s; its planes are replayed as time points, one stream: where they "
                    "are channels, z planes or positions, they are mixed in it (tracks and "
                    "per-frame results across them mean nothing): copy it again or give the "
                    "complete file", path, unknown)
    return _planes(path, "tiff", planes, axes, pixel, pixel_from, cut.complete)


def replay_pixel_size(stack: ReplayStack, configured: float | None) -> float | None:
    """The pixel size (µm) a replay of ``stack`` measures with: ``configured``
    (``hardware.pixel_size_um``), else the stack's, logged with where it came from; None,
    with a warning, when neither gives one (the replay then measures in pixels)."""
    if configured is not None:
        return configured
    if stack.pixel_size_um is not None:
        log.info("%s: pixel size %g µm/px, from %s", stack.path, stack.pixel_size_um,
                 stack.pixel_size_from or "its metadata")
        return stack.pixel_size_um
    why = ("was recorded on a rig without a pixel-size calibration"
           if not stack.pixel_size_calibrated else "has no pixel size in its metadata")
    log.warning("no pixel size: %s %s and hardware.pixel_size_um is not set. Measurements "
                "stay in pixels (the *_um values and grain sizes are at 1 µm/px) and grain "
                "tiles are pooled without the overlap check. Set hardware.pixel_size_um in "
                "the config (--config) to measure in µm", stack.path, why)
    return None


# ------------------------------------------------------------------ the source
#: ``on_acquisition(number, frames)``: called on the replay thread before the first frame of
#: another recorded acquisition (its recorded ``number``; ``frames`` of it follow in a row);
#: returns once the service has begun it, so that the frame is counted to it: True, or False
#: when the service will not (it is stopping): the replay then ends there.
AcquisitionCallback = Callable[[int, int], bool]


class ReplaySource(FeedThreadSource):
    """A :class:`FrameSource` that plays a :class:`ReplayStack` (see the module docstring)."""

    def __init__(
        self,
        stack: ReplayStack,
        on_frame: FrameCallback | None = None,
        *,
        interval_s: float | None = None,
        sync_timeout_s: float = 10.0,
    ) -> None:
        self.stack = stack
        self.on_frame = on_frame
        self.on_acquisition: AcquisitionCallback | None = None
        self.interval_s = interval_s
        self.sync_timeout_s = sync_timeout_s
        self.emitted = 0
        #: Frames of the last run that could not be read (skipped), and the first reason.
        self.unreadable = 0
        self.first_unreadable: Exception | None = None
        self._in_a_row = 0
        self._played = 0
        self._read_errors = RepeatedErrors(log)
        self._feed: EventFeed | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def reference_pixel_size_um(self) -> float | None:
        """The pixel size (µm) the frames' own sizes are relative to (a recording's scale),
        as the core's at open is for a microscope's frames; None when frames have none."""
        return self.stack.pixel_size_um if self.stack.pixel_sizes is not None else None

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(rows, columns) of the replayed frames."""
        return self.stack.shape

    def connect(
        self, on_frame: FrameCallback, on_acquisition: AcquisitionCallback | None = None
    ) -> None:
        """Send frames to ``on_frame``, and where the recorded acquisition changes, call
        ``on_acquisition`` first (the service calls this when given this source; without
        ``on_acquisition`` the recorded acquisitions play on as one)."""
        self.on_frame = on_frame
        self.on_acquisition = on_acquisition

    def start(
        self,
        events: Iterable[useq.MDAEvent],
        *,
        mode: Mode,
        on_done: DoneCallback,
    ) -> None:
        """Replay one frame per event of ``events`` (at most the stack's length)."""
        if self.on_frame is None:
            raise AcquisitionError("ReplaySource has no frame callback; call connect() first")
        self.ready_to_start()
        self._stop.clear()
        self._feed = EventFeed(events, mode=mode,
                               sync_timeout_s=self.sync_timeout_s)
        self._thread = threading.Thread(target=self._run, args=(self._feed, on_done),
                                        name="livemask-replay", daemon=True)
        self._thread.start()

    def _due(self, i: int) -> float:
        if self.interval_s is not None:
            return i * self.interval_s
        if self.stack.times is not None:
            return self.stack.times[i]
        return 0.0

    def _run(self, feed: EventFeed, on_done: DoneCallback) -> None:
        error: str | None = None
        stack = self.stack
        t0 = time.monotonic()
        self.unreadable, self.first_unreadable, self._in_a_row = 0, None, 0
        self._played = 0  # frames of this run handed over
        playing: int | None = None  # the recorded acquisition of the frames played
        try:
            for i, _event in enumerate(feed):
                if i >= stack.frames or self._stop.is_set():
                    break
                delay = t0 + self._due(i) - time.monotonic()
                if delay > 0 and self._stopped_within(delay):
                    break
                try:  # (a recording's position and index are read from frames.jsonl)
                    image = stack.plane(i)
                    pos = stack.position(i)
                    index: Any = stack.index(i)
                    pixel_size = stack.pixel_size(i)
                    settings = stack.settings[i] if stack.settings is not None else None
                except Exception as exc:  # one lost or corrupt frame: skip it, play the rest
                    self._skip(i, exc)
                    if self._in_a_row >= MAX_UNREADABLE_IN_A_ROW or not stack.path.exists():
                        error = self._gone_error(i)
                        break
                    continue
                self._in_a_row = 0
                number = stack.acquisition(i)
                if number is not None and playing not in (None, number):
                    if not self._begin_acquisition(i, number):
                        break
                    # the wait there makes this frame late at most, not the later ones
                    t0 = max(t0, time.monotonic() - self._due(i))
                playing = number if number is not None else playing
                event = useq.MDAEvent(index=index, x_pos=pos.get("x_um"),
                                      y_pos=pos.get("y_um"), z_pos=pos.get("z_um"))
                assert self.on_frame is not None
                feed.frame_delivered()
                self.on_frame(RawFrame(image, event, time.time(), pos, None, origin=feed,
                                       pixel_size_um=pixel_size, settings=settings,
                                       replayed_from=stack.replayed_from(i)))
                self.emitted += 1
                self._played += 1
        except Exception as exc:  # any other fault ends the replay like a camera fault
            log.exception("replay of %s failed", stack.path)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self._end(feed, on_done, error or self._unreadable_error())

    def _stopped_within(self, delay_s: float) -> bool:
        """Whether :meth:`stop` came within ``delay_s`` seconds, waited in slices that a
        thread's wait takes (at most ``threading.TIMEOUT_MAX``, about 292 years on Linux: a
        longer one raised OverflowError)."""
        end = time.monotonic() + delay_s
        while delay_s > 0:
            if self._stop.wait(min(delay_s, threading.TIMEOUT_MAX)):
                return True
            delay_s = end - time.monotonic()
        return False

    def _begin_acquisition(self, i: int, number: int) -> bool:
        """Frame ``i`` is the first of the recorded acquisition ``number``: have the service
        begin another acquisition (it waits for the last one's frames); False when the replay
        is to end here (stopped)."""
        if self.on_acquisition is not None and not self.on_acquisition(
                number, self.stack.acquisition_frames(i)):
            return False
        return not self._stop.is_set()

    def _skip(self, i: int, exc: Exception) -> None:
        """Count and log frame ``i``, which could not be read."""
        self.unreadable += 1
        self._in_a_row += 1
        known = isinstance(exc, ReplayError)  # the reader says why: no traceback
        why = str(exc) if known else f"{type(exc).__name__}: {exc}"
        error = exc if isinstance(exc, FrameNotStored) else ReplayError(
            f"frame {i} of {self.stack.path} cannot be read: {why}")
        if self.first_unreadable is None:
            self.first_unreadable = error
        if known:
            if self.unreadable <= 5 or self.unreadable % 100 == 0:
                log.warning("%s; skipped (%d frame(s) skipped so far)", error, self.unreadable)
        else:
            self._read_errors.error("replay read", f"frame {i} of {self.stack.path} skipped",
                                    exc)

    def _gone_error(self, i: int) -> str:
        """The error that ends a replay whose store is gone or no longer reads."""
        why = ("it no longer exists" if not self.stack.path.exists() else
               f"{self._in_a_row} frames in a row could not be read")
        return (f"replay of {self.stack.path} ended at frame {i} of {self.stack.frames}: {why} "
                f"({self.unreadable} frame(s) skipped in all). First: {self.first_unreadable}")

    def _unreadable_error(self) -> str | None:
        """The acquisition's error when frames were skipped, else None."""
        if not self.unreadable:
            return None
        if not self._played:
            return (f"none of its frames could be read: {self.unreadable} of "
                    f"{self.stack.frames} frame(s) were skipped and none was replayed. First: "
                    f"{self.first_unreadable}")
        return (f"{self.unreadable} of {self.stack.frames} frame(s) could not be read and were "
                f"skipped; the others were replayed. First: {self.first_unreadable}")

    #: Why a replay takes no new events (feedback refuses its acquiring actions with it).
    cannot_acquire = (
        "a replay plays recorded frames and cannot acquire new events (stage moves, "
        "bursts, skipped visits); run feedback against the microscope, or turn feedback off"
    )

    def inject(self, events: Iterable[useq.MDAEvent], *, timed_from_first: bool = False) -> int:
        """A replay cannot acquire new events."""
        raise AcquisitionError(self.cannot_acquire)

    def set_exposure(self, exposure_ms: float) -> None:
        """A replay has no camera."""
        raise AcquisitionError("a replay has no camera: the exposure cannot be changed")

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the replay and join its thread."""
        self._stop.set()
        if self._feed is not None:
            self._feed.close()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("replay thread did not stop within %.1f s", timeout_s)

    def close(self) -> None:
        """Stop and close the file."""
        self.stop()
        try:
            self.stack.close()
        except Exception:
            log.debug("closing %s failed", self.stack.path, exc_info=True)
