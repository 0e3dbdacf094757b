"""pymmcore-plus Python devices of the simulated microscope.

The packaged ``simulated.cfg`` (``livemask.acquisition.simulated.SIMULATED_CFG``) loads
these into a ``UniMMCore`` with ``#py pyDevice`` lines; pymmcore-plus instantiates them
without arguments, so they share state through
:func:`~livemask.acquisition.simulated.world.get_world` (looked up on every call, so
:func:`~livemask.acquisition.simulated.world.configure_world` takes effect at once).

- :class:`SimCamera`: renders the world's sample at the stage position, focus, exposure,
  channel and shutter state; records each frame's ground truth in the world.
- :class:`SimXYStage`, :class:`SimZStage`: write the physical stage position (µm) into
  the world; ``set_origin*`` zero the reported coordinates without moving.
- :class:`SimShutter`: gates the excitation light (closed = dark frame).
- :class:`SimFilterWheel`: positions ``DAPI`` (gain 1.0), ``GFP`` (0.3, bleed-through of
  the nuclear stain) and ``Empty`` (0.0); see :data:`~.world.CHANNEL_GAINS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from pymmcore_plus.core._constants import FocusDirection, Keyword
from pymmcore_plus.experimental.unicore import (
    ShutterDevice,
    SimpleCameraDevice,
    StageDevice,
    StateDevice,
    XYStageDevice,
)

from .world import get_world

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

    from .world import _Frame

__all__ = ["FILTERS", "SimCamera", "SimFilterWheel", "SimShutter", "SimXYStage", "SimZStage"]

#: Filter wheel positions (index = state); names are keys of ``CHANNEL_GAINS``.
FILTERS: tuple[str, ...] = ("DAPI", "GFP", "Empty")
_MAX_EXPOSURE_MS = 10_000.0


class SimCamera(SimpleCameraDevice):
    """Simulated 16-bit camera imaging the virtual sample of the simulated world."""

    def __init__(self) -> None:
        super().__init__()
        self._exposure_ms = 10.0
        self._frame: _Frame | None = None
        self.set_property_limits(Keyword.Exposure, (0.0, _MAX_EXPOSURE_MS))

    def sensor_shape(self) -> tuple[int, int]:
        """Full sensor (height, width) in pixels, from the world."""
        return get_world().sensor_shape

    def dtype(self) -> DTypeLike:
        """Pixel type: 16-bit unsigned."""
        return np.uint16

    def get_exposure(self) -> float:
        """Exposure time in ms (also the ``Exposure`` property)."""
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        """Set the exposure time in ms (0 to 10 s)."""
        exposure = float(exposure)
        if not 0.0 <= exposure <= _MAX_EXPOSURE_MS:
            raise ValueError(f"exposure must be within 0..{_MAX_EXPOSURE_MS} ms, got {exposure}")
        self._exposure_ms = exposure

    def snap(self, buffer: np.ndarray) -> Mapping[str, str]:
        """Advance sample time, render the field of view into ``buffer``, return metadata."""
        frame = get_world().expose(self._exposure_ms)
        buffer[:] = frame.result.image
        self._frame = frame
        info = frame.info
        return {
            "SimFrame": str(info["frame"]),
            "SimStep": str(info["step"]),
            "SimChannel": str(info["channel"]),
            "SimDefocus_um": f"{info['defocus_um']:.3f}",
        }

    def start_sequence(
        self, n: int | None, get_buffer: Callable[[Sequence[int], DTypeLike], np.ndarray]
    ) -> Iterator[Mapping]:
        """Snap ``n`` frames (base class), recording each frame's truth for the output buffer.

        The truth is recorded against the buffer handed to the core (ROI-cropped if a
        ROI is set), before the frame is yielded, so it is there when the core sees it.
        """
        out: list[np.ndarray] = []

        def _get_buffer(shape: Sequence[int], dtype: DTypeLike) -> np.ndarray:
            out[:] = [get_buffer(shape, dtype)]
            return out[0]

        for meta in super().start_sequence(n, _get_buffer):
            self._record_truth(out[0])
            yield meta

    def _record_truth(self, buffer: np.ndarray) -> None:
        """Record the last rendered labels (cropped to the ROI) as truth of ``buffer``."""
        world = get_world()
        if self._frame is None or not world.keep_truth:  # snap always sets _frame
            return
        labels = self._frame.result.labels
        if self._roi is not None:
            x, y, w, h = self._roi
            labels = labels[y : y + h, x : x + w]
        world.record_truth(buffer, labels, self._frame.info)


class SimXYStage(XYStageDevice):
    """Simulated motorised XY stage (µm); moves the field of view over the sample."""

    def __init__(self) -> None:
        super().__init__()
        self._origin_um = [0.0, 0.0]  # physical position of the user's (0, 0)

    def get_position_um(self) -> tuple[float, float]:
        """Current (x, y) in µm, relative to the user origin."""
        x, y = get_world().xy_um
        return (x - self._origin_um[0], y - self._origin_um[1])

    def set_position_um(self, x: float, y: float) -> None:
        """Move to (x, y) µm (instantly)."""
        get_world().set_xy_um(x + self._origin_um[0], y + self._origin_um[1])
        self.core.events.XYStagePositionChanged.emit(self.get_label(), float(x), float(y))

    def set_origin_x(self) -> None:
        """Make the current X position the new X = 0."""
        self._origin_um[0] = get_world().xy_um[0]

    def set_origin_y(self) -> None:
        """Make the current Y position the new Y = 0."""
        self._origin_um[1] = get_world().xy_um[1]

    def home(self) -> None:
        """Move to the physical home (0, 0) and reset the user origin."""
        self._origin_um = [0.0, 0.0]
        self.set_position_um(0.0, 0.0)

    def stop(self) -> None:
        """Stop moving (moves are instant: nothing to do)."""


class SimZStage(StageDevice):
    """Simulated focus drive (µm); the sample is in focus at the world's ``focus_z_um``."""

    def __init__(self) -> None:
        super().__init__()
        self._origin_um = 0.0

    def get_position_um(self) -> float:
        """Current Z in µm, relative to the user origin."""
        return get_world().z_um - self._origin_um

    def set_position_um(self, val: float) -> None:
        """Move to Z = ``val`` µm (instantly)."""
        get_world().set_z_um(val + self._origin_um)
        self.core.events.stagePositionChanged.emit(self.get_label(), float(val))

    def set_origin(self) -> None:
        """Make the current Z the new Z = 0."""
        self._origin_um = get_world().z_um

    def home(self) -> None:
        """Move to the physical home (Z = 0) and reset the user origin."""
        self._origin_um = 0.0
        self.set_position_um(0.0)

    def stop(self) -> None:
        """Stop moving (moves are instant: nothing to do)."""

    def get_focus_direction(self) -> FocusDirection:
        """Positive Z moves the objective towards the sample."""
        return FocusDirection.TowardSample


class SimShutter(ShutterDevice):
    """Simulated excitation shutter; closed means the camera sees a dark frame."""

    def __init__(self) -> None:
        super().__init__()
        self.register_property(
            "State",
            default_value=1,
            limits=(0, 1),  # int allowed_values would reject the string "1" of a cfg line
            getter=SimShutter._get_state_property,
            setter=SimShutter._set_state_property,
        )

    def get_open(self) -> bool:
        """True if light reaches the sample."""
        return get_world().shutter_open

    def set_open(self, open: bool) -> None:
        """Open (True) or close (False) the shutter."""
        get_world().set_shutter_open(open)

    def _get_state_property(self) -> int:
        """``State`` property: 1 = open, 0 = closed (as Micro-Manager shutters)."""
        return int(self.get_open())

    def _set_state_property(self, value: int) -> None:
        self.set_open(bool(round(float(value))))


class SimFilterWheel(StateDevice):
    """Simulated emission filter wheel with positions ``DAPI``, ``GFP``, ``Empty``."""

    def __init__(self) -> None:
        super().__init__(dict(enumerate(FILTERS)))
        self._state = 0

    def initialize(self) -> None:
        """Put the world's channel in line with the wheel's position."""
        get_world().set_channel(FILTERS[self._state])

    def get_state(self) -> int:
        """Current position index."""
        return self._state

    def set_state(self, position: int) -> None:
        """Turn to ``position`` (0 = DAPI, 1 = GFP, 2 = Empty)."""
        position = int(position)
        if not 0 <= position < len(FILTERS):
            raise ValueError(f"filter position must be 0..{len(FILTERS) - 1}, got {position}")
        self._state = position
        get_world().set_channel(FILTERS[position])
