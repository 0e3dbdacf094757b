"""The unit of work that travels through the pipeline."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: A frame's ``settings`` where nothing is known (e.g. a replayed frame): the keys every
#: header's ``settings`` has.
NO_SETTINGS: dict[str, Any] = {"channel": None, "channel_group": None, "exposure_ms": None}


@dataclass
class Frame:
    """One camera frame and everything the stages add to it."""

    frame_id: int
    image: np.ndarray
    index: dict[str, int] = field(default_factory=dict)  # MDA event index, e.g. {"t": 3}
    position: dict[str, float | None] = field(default_factory=dict)  # x_um, y_um, z_um
    t: dict[str, float] = field(default_factory=dict)  # stage timestamps, epoch seconds
    truth: np.ndarray | None = None
    skipped: bool = False
    #: Whether ``publish.frame_every`` publishes its image (decided at intake, in frame order)
    image_due: bool = True
    probabilities: Any = None  # model output: ndarray, or DeviceProbabilities on a GPU
    labels: np.ndarray | None = None
    objects: list[dict[str, Any]] | None = None
    summary: dict[str, Any] | None = None
    grains: dict[str, Any] | None = None  # grain statistics: this tile and cumulative
    error: str | None = None
    origin: object | None = None  # RawFrame.origin: handed back with frame_done
    acquisition: int = 0  # Pipeline.acquisition when the frame arrived
    #: frames of its acquisition that skipped analysis before it (free-run grain tiles;
    #: counted when inference takes it)
    skipped_before: int = 0
    pixel_size_um: float = 1.0  # µm per pixel of this frame (its measurements use it)
    #: what the camera took it with: channel (preset), channel_group, exposure_ms
    settings: dict[str, Any] = field(default_factory=dict)
    #: a replayed frame's ``frame_id`` and ``time_s`` in the file it came from; None: live
    replayed_from: dict[str, Any] | None = None

    def stamp(self, stage: str) -> None:
        """Record the time at which ``stage`` finished with this frame."""
        self.t[stage] = time.time()

    def header(self) -> dict[str, Any]:
        """Header fields shared by every topic published for this frame."""
        return {
            "frame_id": self.frame_id,
            "acquisition": self.acquisition,
            "t": dict(self.t),
            "index": dict(self.index),
            "position": dict(self.position),
            "settings": self.settings_fields(),
            **({"replayed_from": dict(self.replayed_from)}
               if self.replayed_from is not None else {}),
        }

    def settings_fields(self) -> dict[str, Any]:
        """``channel``, ``channel_group`` and ``exposure_ms`` (None where not known)."""
        return {**NO_SETTINGS, **self.settings}
