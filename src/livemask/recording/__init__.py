"""Recording runs to disk (OME-Zarr + tables) and reading them back. See docs/recording.md."""

from __future__ import annotations

from livemask.recording.reader import Recording, find_recording, open_recording
from livemask.recording.writer import (
    CSV_COLUMNS,
    IMAGES,
    Recorder,
    column_units,
    new_run_dir,
    ome_image_attributes,
)

__all__ = [
    "CSV_COLUMNS",
    "IMAGES",
    "Recorder",
    "Recording",
    "column_units",
    "find_recording",
    "new_run_dir",
    "ome_image_attributes",
    "open_recording",
]
