"""The process-wide state of the simulated microscope, shared by its Python devices.

pymmcore-plus instantiates the devices of the packaged ``simulated.cfg``
(``livemask.acquisition.simulated.SIMULATED_CFG``) itself (no arguments), so they find their
common state through :func:`get_world`. The service (or a test) calls
:func:`configure_world` *before* loading the config to choose the sample, seed and sensor;
calling it again replaces the world (devices look it up on every call, so already loaded
devices follow).

Conventions
-----------
- Stage coordinates are physical micrometres. Stage ``(x, y) = (0, 0)`` looks at the
  centre of the (periodic) virtual sample; ``+x`` moves the field of view to larger
  world columns, ``+y`` to larger world rows, so image content shifts left / up.
  The field of view's top-left world pixel (row, col) is
  ``(y / pixel_size + H_world / 2 - h / 2,  x / pixel_size + W_world / 2 - w / 2)``.
- Defocus is ``z - focus_z_um`` (µm); the sample is in focus at ``focus_z_um``.
- Time is snap-driven: each frame first advances the sample by ``steps_per_frame``
  steps, so a run is deterministic for a given seed and event order.
- Light reaching the camera is scaled by the channel gain (filter wheel position, see
  :data:`CHANNEL_GAINS`) and is zero while the shutter is closed. Without light the
  frame is camera offset plus read noise only (rendered with zero exposure).

Ground truth
------------
The camera records the instance labels of every frame it fills with
:meth:`SimulatedWorld.record_truth`. :meth:`SimulatedWorld.truth_for` pairs an image
with them: first by identity / data pointer with the last filled buffer (the snap
path: ``core.getImage()`` returns that very buffer, and the MDA ``frameReady``
callback runs in the runner thread right after the snap), then by a CRC-32
fingerprint of the pixels over the last ``truth_history`` frames (the sequenced
path: ``popNextImage`` hands out a *copy* of the ring-buffer slot).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from livemask.errors import ConfigError

from .grains import GrainParams, GrainSample
from .nuclei import NucleiParams, NucleiSample, RenderResult

log = logging.getLogger("livemask")

__all__ = [
    "CHANNEL_GAINS",
    "SAMPLES",
    "SimulatedWorld",
    "TruthRecord",
    "configure_world",
    "get_world",
]

#: Relative intensity of the nuclear stain seen through each filter position.
CHANNEL_GAINS: dict[str, float] = {"DAPI": 1.0, "GFP": 0.3, "Empty": 0.0}
#: Virtual samples :func:`configure_world` knows.
SAMPLES: tuple[str, ...] = ("nuclei", "grains")


@dataclass(frozen=True)
class TruthRecord:
    """Ground truth of one frame the camera filled."""

    labels: np.ndarray  # int32, read-only, 0 = background
    frame: int  # frame counter of the world (0 = first snap)
    step: int  # sample time step imaged
    origin_yx_px: tuple[float, float]  # top-left world pixel of the field of view
    stage_xy_um: tuple[float, float]
    z_um: float
    defocus_um: float
    exposure_ms: float
    channel: str
    light: float  # channel gain x shutter (0 = dark frame)
    fingerprint: int = field(repr=False)
    shape: tuple[int, ...] = field(repr=False)


@dataclass
class _Frame:
    """A rendered frame before it is recorded against the buffer that holds it."""

    result: RenderResult
    info: dict[str, Any]


def _data_pointer(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def _fingerprint(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).data)


class SimulatedWorld:
    """Sample, stage, shutter and filter state of the simulated microscope.

    All methods are thread-safe (one :class:`threading.Lock`); the MDA runner thread,
    the camera's acquisition thread and the service may call them concurrently.
    """

    def __init__(
        self,
        sample: NucleiSample | GrainSample,
        *,
        sensor_shape: tuple[int, int] = (512, 512),
        pixel_size_um: float = 0.65,
        focus_z_um: float = 0.0,
        steps_per_frame: int = 1,
        truth_history: int = 32,
        realtime: bool = False,
    ) -> None:
        self.sample = sample
        self.sensor_shape = (int(sensor_shape[0]), int(sensor_shape[1]))
        self.pixel_size_um = float(pixel_size_um)
        self.focus_z_um = float(focus_z_um)
        self.steps_per_frame = int(steps_per_frame)
        self.realtime = realtime
        #: record each frame's truth for ``truth_for`` (the service turns it off when
        #: ``simulation.truth`` is off: fingerprinting a 2048² frame costs ≈ 1 ms)
        self.keep_truth = True
        self.lock = threading.Lock()
        self.xy_um: tuple[float, float] = (0.0, 0.0)
        self.z_um: float = self.focus_z_um
        self.shutter_open = True  # no shutter device loaded = light always on
        self.channel = "DAPI"
        self.frames = 0
        self._last: tuple[np.ndarray, TruthRecord] | None = None
        self._wrap_said = False  # a field past the world's edge was reported
        self._history: deque[TruthRecord] = deque(maxlen=max(1, truth_history))

    # ------------------------------------------------------------- hardware
    def set_xy_um(self, x: float, y: float) -> None:
        """Move the physical XY stage (µm)."""
        with self.lock:
            self.xy_um = (float(x), float(y))

    def set_z_um(self, z: float) -> None:
        """Move the physical focus drive (µm)."""
        with self.lock:
            self.z_um = float(z)

    def set_shutter_open(self, is_open: bool) -> None:
        """Open or close the excitation shutter."""
        with self.lock:
            self.shutter_open = bool(is_open)

    def set_channel(self, channel: str) -> None:
        """Select the filter by name (a key of :data:`CHANNEL_GAINS`)."""
        if channel not in CHANNEL_GAINS:
            raise ValueError(f"unknown channel {channel!r}; known: {sorted(CHANNEL_GAINS)}")
        with self.lock:
            self.channel = channel

    def field_origin_px(self, shape: tuple[int, int] | None = None) -> tuple[float, float]:
        """Top-left world pixel (row, col) of the field of view at the current stage."""
        return self._origin(self.xy_um, shape or self.sensor_shape)

    def _origin(self, xy_um: tuple[float, float], shape: tuple[int, int]) -> tuple[float, float]:
        wh, ww = self.sample.params.world_shape_px
        x, y = xy_um
        return (
            y / self.pixel_size_um + wh / 2 - shape[0] / 2,
            x / self.pixel_size_um + ww / 2 - shape[1] / 2,
        )

    def _say_if_wrapped(self, origin: tuple[float, float]) -> None:
        """Warn once when a field reaches past the world's edge: the world wraps there, so
        the field shows features imaged elsewhere again (a scan wider than the world counts
        its grains or nuclei twice, silently)."""
        wh, ww = self.sample.params.world_shape_px
        sh, sw = self.sensor_shape
        slack = 0.5  # (a field exactly at the edge: float error, grains round to whole px)
        if -slack <= origin[0] <= wh - sh + slack and -slack <= origin[1] <= ww - sw + slack:
            return
        self._wrap_said = True
        px = self.pixel_size_um
        log.warning(
            "simulated microscope: the field at stage (%.1f, %.1f) um reaches past the edge of "
            "the simulated world (%.0f x %.0f um, centred on (0, 0): twice the sensor, at "
            "least 2048 px a side), which wraps there: it shows features imaged elsewhere "
            "again, and a scan wider than the world counts them twice. Keep stage positions "
            "within +/- %.1f um in x and %.1f um in y (said once)",
            self.xy_um[0], self.xy_um[1], ww * px, wh * px,
            math.floor((ww - sw) * px * 5) / 10, math.floor((wh - sh) * px * 5) / 10)

    # ------------------------------------------------------------- imaging
    def expose(self, exposure_ms: float) -> _Frame:
        """Advance sample time and image the field of view (full sensor)."""
        t0 = time.perf_counter()
        with self.lock:
            for _ in range(self.steps_per_frame):
                self.sample.step()
            light = CHANNEL_GAINS[self.channel] * float(self.shutter_open)
            defocus = self.z_um - self.focus_z_um
            origin = self._origin(self.xy_um, self.sensor_shape)
            if not self._wrap_said:
                self._say_if_wrapped(origin)
            result = self.sample.render(
                origin, self.sensor_shape, exposure_ms=exposure_ms * light, defocus_um=defocus
            )
            info = {
                "frame": self.frames,
                "step": result.step,
                "origin_yx_px": origin,
                "stage_xy_um": self.xy_um,
                "z_um": self.z_um,
                "defocus_um": defocus,
                "exposure_ms": float(exposure_ms),
                "channel": self.channel,
                "light": light,
            }
            self.frames += 1
        if self.realtime and (left := exposure_ms / 1000 - (time.perf_counter() - t0)) > 0:
            time.sleep(left)
        return _Frame(result, info)

    # ------------------------------------------------------------- truth
    def record_truth(
        self, buffer: np.ndarray, labels: np.ndarray, info: dict[str, Any] | None = None
    ) -> TruthRecord:
        """Remember ``labels`` as the truth of the (already filled) camera ``buffer``."""
        labels.flags.writeable = False
        info = info or {}
        record = TruthRecord(
            labels=labels,
            frame=int(info.get("frame", -1)),
            step=int(info.get("step", self.sample.step_count)),
            origin_yx_px=info.get("origin_yx_px", (0.0, 0.0)),
            stage_xy_um=info.get("stage_xy_um", self.xy_um),
            z_um=float(info.get("z_um", self.z_um)),
            defocus_um=float(info.get("defocus_um", 0.0)),
            exposure_ms=float(info.get("exposure_ms", 0.0)),
            channel=str(info.get("channel", self.channel)),
            light=float(info.get("light", 1.0)),
            fingerprint=_fingerprint(buffer),
            shape=buffer.shape,
        )
        with self.lock:
            self._last = (buffer, record)
            self._history.append(record)
        return record

    def truth_record_for(self, image: np.ndarray) -> TruthRecord | None:
        """The :class:`TruthRecord` of ``image``, or ``None`` if it is not a recent frame."""
        with self.lock:
            last = self._last
            history = list(self._history)
        if last is not None:
            buffer, record = last
            if image is buffer or (
                image.shape == buffer.shape and _data_pointer(image) == _data_pointer(buffer)
            ):
                return record
        if not history:
            return None
        fp = _fingerprint(image)
        for record in reversed(history):
            if record.fingerprint == fp and record.shape == image.shape:
                return record
        return None

    def truth_for(self, image: np.ndarray) -> np.ndarray | None:
        """Ground-truth labels of ``image``, or ``None`` if it is not a recent frame."""
        record = self.truth_record_for(image)
        return None if record is None else record.labels

    def clear_truth(self) -> None:
        """Forget all recorded truth."""
        with self.lock:
            self._last = None
            self._history.clear()


_world: SimulatedWorld | None = None
_default_lock = threading.Lock()


def configure_world(
    sample: str = "nuclei",
    *,
    seed: int = 0,
    params: NucleiParams | GrainParams | None = None,
    sensor_shape: tuple[int, int] = (512, 512),
    pixel_size_um: float = 0.65,
    focus_z_um: float = 0.0,
    steps_per_frame: int = 1,
    truth_history: int = 32,
    realtime: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> SimulatedWorld:
    """Create a fresh world and make it the one the simulated devices use.

    ``params`` default to :class:`NucleiParams` (``sample="nuclei"``) or
    :class:`~.grains.GrainParams` (``sample="grains"``: a static polycrystal for tile
    scans) with a world at least twice the sensor in each axis, and with ``overrides``
    (field name → value, e.g. ``{"division_rate_per_step": 0.001}``) applied; give
    ``params`` or ``overrides``, not both. ``truth_history`` is
    how many recent frames :meth:`~SimulatedWorld.truth_for` can still pair by
    fingerprint. ``realtime=True`` makes every snap last at least its exposure time
    (default: as fast as the CPU renders).
    """
    global _world
    if sample not in SAMPLES:
        raise ConfigError(f"unknown simulated sample {sample!r}; choose one of {list(SAMPLES)}")
    if steps_per_frame < 0 or pixel_size_um <= 0 or min(sensor_shape) <= 0:
        raise ConfigError(
            "simulated world needs steps_per_frame >= 0, pixel_size_um > 0 and a "
            f"positive sensor_shape (got {steps_per_frame}, {pixel_size_um}, {sensor_shape})"
        )
    kind = GrainParams if sample == "grains" else NucleiParams
    if params is not None and overrides:
        raise ValueError("configure_world: give params or overrides, not both")
    if params is None:
        base = kind()
        wh, ww = base.world_shape_px
        params = replace(
            base,
            world_shape_px=(max(wh, 2 * sensor_shape[0]), max(ww, 2 * sensor_shape[1])),
            **dict(overrides or {}),
        )
    if not isinstance(params, kind):
        raise ConfigError(f"sample {sample!r} needs {kind.__name__}, got {type(params).__name__}")
    wh, ww = params.world_shape_px
    if isinstance(params, GrainParams) and wh * ww >= 4096 * 4096:  # (8192²: a minute)
        log.info("building the simulated grains world, %d x %d px (rows x columns): this "
                 "takes a while at this size", wh, ww)
    world = SimulatedWorld(
        GrainSample(params, seed=seed)
        if isinstance(params, GrainParams)
        else NucleiSample(params, seed=seed),
        sensor_shape=sensor_shape,
        pixel_size_um=pixel_size_um,
        focus_z_um=focus_z_um,
        steps_per_frame=steps_per_frame,
        truth_history=truth_history,
        realtime=realtime,
    )
    _world = world  # a plain assignment is atomic; devices pick it up on their next call
    return world


def get_world() -> SimulatedWorld:
    """The current world; a default one (see :func:`configure_world`) is made on first use."""
    world = _world
    if world is None:
        with _default_lock:  # only one thread makes the default world
            world = _world or configure_world()
    return world
