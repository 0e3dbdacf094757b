"""The event that puts back what events enqueued into a running acquisition change."""

from __future__ import annotations

import logging
import math

import useq

from livemask.acquisition.source import FrameSource, MicroscopeSource
from livemask.feedback.actions import restore_event
from livemask.feedback.controller import SettingsInEffect, sets_binning
from livemask.service.hardware_calls import call_hardware

log = logging.getLogger("livemask")

#: The custom action of the events that put back what events enqueued into a run changed
#: (feedback actions' restore events have the same).
RESTORE_ACTION = "livemask-restore-settings"


async def restore_after(
    source: FrameSource | None, settings: SettingsInEffect, events: list[useq.MDAEvent]
) -> useq.MDAEvent | None:
    """An event that takes no image and puts back the exposure, channel, stage position
    (x, y, z) and camera ROI that ``events``, added to the running acquisition, change,
    as they will be before ``events`` run, once the restore events still queued (of
    earlier enqueues and feedback actions: :class:`SettingsInEffect`, shared with the
    feedback controller) have run (pymmcore-plus keeps an event's settings, its
    ROI too, for the following events that give none, and sets them also for an event
    that takes no image); None when they change none. A setting not known (e.g. a
    channel group with no preset set at the start) is not put back, nor a ROI where
    ``events`` change the binning (their ROI's pixels are not the old one's); their
    ``properties`` stay in effect (a property's old value is not known)."""
    if not isinstance(source, MicroscopeSource):
        return None
    known = settings.expected()
    axes = [a for a in ("x_pos", "y_pos", "z_pos")
            if any(getattr(e, a) is not None for e in events)]
    if missing := [a for a in axes if a not in known]:
        known.update(await _stage_now(source, missing))
    back_roi = any(e.roi is not None for e in events) and not any(
        sets_binning(e.properties) for e in events)
    if back_roi and "roi" not in known:
        known.update(await _roi_now(source))
    exposure, channel = known.get("exposure"), known.get("channel")
    changed = useq.MDAEvent(  # what restore_event is to put back: the known settings
        exposure=exposure if any(e.exposure is not None for e in events) else None,
        channel=channel if any(e.channel is not None for e in events) else None,
    )
    back = restore_event([changed], exposure, channel)
    if back is not None:  # not a feedback action's (no action_id to report)
        back = back.model_copy(update={"metadata": {}})
    position = {a: known[a] for a in axes if known.get(a) is not None}
    if back_roi and known.get("roi") is not None:
        position["roi"] = known["roi"]
    if back is None and not position:
        return None
    if back is None:
        back = useq.MDAEvent(action=useq.CustomAction(name=RESTORE_ACTION))
    return settings.tag(
        back.model_copy(update={**position, "index": events[0].index}))


async def _roi_now(source: MicroscopeSource) -> dict[str, useq.CameraROI]:
    """``{"roi": the camera's ROI}`` as read from the core now (its full image where none
    is set); empty where the read fails (logged). Read only for an ``enqueue`` with a
    ``roi`` into a run none of whose events has set one yet: then it is the run's."""
    def read() -> useq.CameraROI:
        x, y, width, height = (int(v) for v in source.core.getROI())
        return useq.CameraROI(offset_x=x, offset_y=y, width=width, height=height)

    try:
        return {"roi": await call_hardware(read, what="reading the camera's ROI")}
    except Exception as exc:  # the events still run; their ROI stays in effect after them
        log.warning("enqueue: the camera's ROI could not be read (%s); the enqueued "
                    "events' roi stays in effect after them", exc)
        return {}


async def _stage_now(source: MicroscopeSource, axes: list[str]) -> dict[str, float]:
    """The stage's ``axes`` (``x_pos``, ``y_pos``, ``z_pos``) as read from the core now,
    where it has those stages; none where the read fails (logged)."""
    core = source.core

    def read() -> dict[str, float]:
        out: dict[str, float] = {}
        if {"x_pos", "y_pos"} & set(axes) and core.getXYStageDevice():
            x, y = core.getXYPosition()
            out.update(x_pos=float(x), y_pos=float(y))
        if "z_pos" in axes and core.getFocusDevice():
            out["z_pos"] = float(core.getPosition())
        return {a: v for a, v in out.items() if a in axes and math.isfinite(v)}

    try:
        return await call_hardware(read, what="reading the stage position")
    except Exception as exc:  # the events still run; the stage stays where they leave it
        log.warning("enqueue: the stage position could not be read (%s); the enqueued "
                    "events' stage moves are not undone after them", exc)
        return {}
