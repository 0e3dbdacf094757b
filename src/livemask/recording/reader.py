"""Reading a recording back (zarr only; no livemask needed to read the data itself)."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livemask.errors import ReplayError
from livemask.recording.writer import IMAGES, LABELS_NAME

__all__ = ["Recording", "find_recording", "open_recording", "read_frames_jsonl"]

log = logging.getLogger("livemask")


@dataclass
class Recording:
    """One run folder opened read-only."""

    path: Path
    images: Any  # zarr.Array (T, Y, X)
    labels: Any | None  # zarr.Array (T, Y, X) int32, or None when labels were not recorded
    frames: list[dict[str, Any]]  # per-frame records sorted by frame_id (frames.jsonl)
    pixel_size_um: float | None
    attributes: dict[str, Any]

    @property
    def complete(self) -> bool:
        """Whether the recorder was closed cleanly (final attributes written)."""
        return bool(self.attributes.get("livemask", {}).get("complete"))

    @property
    def measurements_csv(self) -> Path:
        """The per-object table (may be absent when measurements were not recorded)."""
        return self.path / "measurements.csv"


def find_recording(path: Path) -> Path | None:
    """The run folder for ``path``: a run folder, its images.ome.zarr, or a folder of one run."""
    path = Path(path)
    if path.name == IMAGES and (path.parent / "frames.jsonl").is_file():
        return path.parent
    if (path / IMAGES).is_dir():
        return path
    runs = sorted(p for p in path.glob("run-*") if (p / IMAGES).is_dir()) if path.is_dir() else []
    return runs[-1] if len(runs) == 1 else None


def read_frames_jsonl(path: Path) -> list[dict[str, Any]]:
    """The frames.jsonl records sorted by frame_id.

    A line that is not a frame record (not JSON, or no integer ``frame_id``) is left out
    with a warning naming it; the others are all read. A torn last line (the recorder was
    killed mid-write) is expected and only noted."""
    out: list[dict[str, Any]] = []
    bad: list[int] = []
    lines = 0
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lines, line in enumerate(fh, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and type(record.get("frame_id")) is int:
                out.append(record)
            elif line.strip():
                bad.append(lines)
    if bad == [lines]:
        log.info("%s: its last line is torn (the recorder was stopped mid-write); left out",
                 path)
    elif bad:
        log.warning("%s: %d line(s) are not frame records and are left out (line %s); the "
                    "other %d frames are read", path, len(bad),
                    ", ".join(map(str, bad[:10])) + (", …" if len(bad) > 10 else ""), len(out))
    return sorted(out, key=lambda r: r["frame_id"])


def open_recording(path: str | Path) -> Recording:
    """Open a run folder written by :class:`~livemask.recording.Recorder`."""
    import zarr

    run = find_recording(Path(path))
    if run is None:
        raise ReplayError(
            f"{path} is not a livemask recording (no {IMAGES} with frames.jsonl beside it); "
            "give the run folder (…/run-YYYYmmdd-HHMMSS)"
        )
    root = zarr.open_group(run / IMAGES, mode="r")
    attrs: dict[str, Any] = dict(root.attrs.asdict())
    images: Any = root["0"]
    labels = None
    with contextlib.suppress(KeyError):
        labels = root[f"labels/{LABELS_NAME}/0"]
    frames = read_frames_jsonl(run / "frames.jsonl") if (run / "frames.jsonl").is_file() else []
    if not frames:
        frames = list(attrs.get("livemask", {}).get("frames", []))
    listed = {f.get("frame_id") for f in frames}
    unrecorded = int(images.shape[0]) - len(listed)
    complete = bool(attrs.get("livemask", {}).get("complete"))
    if unrecorded > 0 and not complete and all(
            i in listed for i in range(int(images.shape[0]) - unrecorded)):
        log.warning("%s: the last %d frame(s) on the t axis have no readable line in "
                    "frames.jsonl and are not read: the recording is still being written, or "
                    "its recorder could not write them (e.g. a full disk: see its log)",
                    run, unrecorded)
    elif unrecorded > 0:
        log.warning("%s: %d frame(s) on the t axis have no readable line in frames.jsonl "
                    "(the recorder could not write it, e.g. a full disk: see its log; or the "
                    "line is damaged) and are not read", run, unrecorded)
    scale = attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]
    pixel = float(scale["scale"][-1]) if scale.get("type") == "scale" else None
    return Recording(run, images, labels, frames, pixel, attrs)
