"""The acquisition modes, in one place for the config, the control commands and feedback."""

from __future__ import annotations

from typing import Literal

Mode = Literal["free-run", "synchronized"]
"""``free-run``: the camera never waits and frames skip analysis when it is ahead;
``synchronized``: each event waits until the previous frame is analysed and published."""
