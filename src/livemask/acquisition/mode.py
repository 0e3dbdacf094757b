"""The acquisition modes, in one place for the config, the control commands and feedback."""

from __future__ import annotations

from typing import Literal

Mode = Literal["free-run", "pipelined", "synchronized"]
"""``free-run``: the camera never waits and frames skip analysis when it is ahead;
``pipelined``: every frame is analysed and the stages overlap: the next event waits while a
frame is still waiting for the model;
``synchronized``: each event waits until the previous frame is analysed and published."""
