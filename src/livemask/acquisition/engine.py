"""The MDA engine livemask runs: pymmcore-plus' own, with a failed Z move not fatal.

pymmcore-plus' ``MDAEngine`` logs a failed XY move, channel or exposure change and snaps
anyway, but lets a Z stage that raises end the whole acquisition: one serial time-out of the
focus drive would stop a night-long time-lapse. :class:`FocusTolerantEngine` treats a failed
Z move like a failed XY move: logged, the frame taken anyway, and the failure remembered so
that the frame is placed at the Z read back and a ``stage_mismatch`` is reported (see
:func:`livemask.acquisition.source.frame_position`). A device still busy after its time-out
(``waitForSystem``, after every event's set-up) still ends the acquisition.
"""

from __future__ import annotations

import logging

import useq
from pymmcore_plus.mda import MDAEngine

log = logging.getLogger("livemask")

__all__ = ["FocusTolerantEngine"]


class FocusTolerantEngine(MDAEngine):
    """``MDAEngine`` whose failed Z moves are logged instead of ending the acquisition."""

    #: Whether the Z move of the event set up last raised (read it for that event's
    #: frames: the runner emits them before it sets up the next event).
    z_failed: bool = False

    def setup_event(self, event: useq.MDAEvent) -> None:
        self.z_failed = False
        super().setup_event(event)

    def _set_event_z(self, event: useq.MDAEvent) -> None:  # pymmcore-plus 0.18.1
        try:
            super()._set_event_z(event)
        except Exception as exc:  # the device's error (CMMError, RuntimeError, ...)
            log.warning("Failed to set Z position to %s um (the frame is taken anyway, at the "
                        "Z the stage reads back): %s", event.z_pos, exc)
            self.z_failed = True
