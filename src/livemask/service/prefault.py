"""Touch a few frames' worth of memory when the service starts, not during the first frames.

Every frame allocates frame-sized arrays (probabilities, masks, int32 labels, host copies
from the GPU). numpy allocates arrays of this size with ``mmap`` and asks the kernel for
transparent huge pages, and returns them to the kernel when they are freed, so steady state
runs on memory the process has already used. The *first* touch of memory it has never used
can cost far more: on the 2-core development VM (Firecracker) a 16 MiB array took 25–40 ms
to copy into the first few times and 0.8–2 ms afterwards. At 2048² the first frames after the
service started paid for that, 27–43 ms per labels array, and the queue behind them took ≈ 30
frames to drain.

:func:`prefault_frame_memory` allocates and fills ``frames`` frame-sized int32 arrays
(4 bytes per pixel, the widest element type of the stages' per-pixel arrays) once, before
the camera starts, and frees them: the cost moves to start-up, where it is paid once
(≈ 0.2 s for 128 MiB on that VM). Where first touch is cheap (typically bare metal) it
costs little. Measured in ``docs/performance.md`` ("First frames").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("livemask")


@dataclass(frozen=True)
class Prefault:
    """What :func:`prefault_frame_memory` touched and how long it took."""

    frames: int
    bytes: int
    seconds: float


def prefault_frame_memory(
    shape: tuple[int, int], frames: int, *, limit_bytes: int | None = None
) -> Prefault:
    """Allocate, fill and free ``frames`` arrays of ``shape`` (4 bytes per pixel).

    All are alive at once (the stages hold several frames' arrays at a time), every page
    is written (``np.zeros`` would leave them untouched), then all are freed. With
    ``limit_bytes`` (the service passes half the machine's memory) fewer frames are touched
    where ``frames`` would take more, with a warning: a camera or a replayed image larger
    than the configured sensor must not take the machine's memory at start.
    """
    if frames < 0:
        raise ValueError(f"frames must be >= 0, got {frames}")
    rows, cols = (int(n) for n in shape)
    if rows <= 0 or cols <= 0:
        raise ValueError(f"shape must be positive, got {shape}")
    frame_bytes = rows * cols * np.dtype(np.int32).itemsize
    if limit_bytes is not None and frames * frame_bytes > limit_bytes:
        fitting = max(0, limit_bytes // frame_bytes)
        log.warning(
            "memory: %d frame-sized arrays of %d x %d px would take %.1f GiB, more than half "
            "of this machine's memory; touching %d at start (lower pipeline.prefault_frames "
            "to silence this)", frames, rows, cols, frames * frame_bytes / 2**30, fitting)
        frames = fitting
    started = time.perf_counter()
    arrays = [np.empty((rows, cols), dtype=np.int32) for _ in range(frames)]
    for array in arrays:
        array.fill(1)
    total = sum(array.nbytes for array in arrays)
    del arrays
    done = Prefault(frames=frames, bytes=total, seconds=time.perf_counter() - started)
    if frames:
        log.info("memory: %d frame-sized arrays (%.0f MiB) touched in %.0f ms",
                 frames, total / 2**20, done.seconds * 1e3)
    return done
