"""Plain Python devices for tests that need a rig unlike the simulated microscope."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from pymmcore_plus.experimental.unicore import SimpleCameraDevice

if TYPE_CHECKING:
    from numpy.typing import DTypeLike


class WideCamera(SimpleCameraDevice):
    """A 16-bit camera of 48 x 80 pixels (unlike any configured simulated sensor) that
    images a flat field: a rig whose frame size is known only once it is open."""

    SHAPE = (48, 80)

    def __init__(self) -> None:
        super().__init__()
        self._exposure_ms = 10.0

    def sensor_shape(self) -> tuple[int, int]:
        return self.SHAPE

    def dtype(self) -> DTypeLike:
        return np.uint16

    def get_exposure(self) -> float:
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        self._exposure_ms = float(exposure)

    def snap(self, buffer: np.ndarray) -> Mapping[str, str]:
        buffer[:] = 100
        return {}
