"""Centring from a frame of a camera ROI aims at the centre of the ROI the action's frames
will be taken with (the one in effect after the events queued before them), placed in the
triggering frame's pixels by its ROI offset.

Before: a ROI frame enqueued into a full-frame plan centred its target on the ROI's middle
(176 px off in the full frames after it); then (0f66f8d) every ROI frame aimed at the
sensor's centre, which put the target outside the frame in a run of ROI frames, whose action
frames have that ROI too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
import useq

from livemask.acquisition.source import frame_roi
from livemask.client import AsyncSubscriber
from livemask.feedback import FeedbackConfig, RuleEngine
from livemask.feedback.actions import ActionError, Centre, EventPlanner, to_events
from livemask.feedback.context import FeatureTracker, FrameContext
from livemask.feedback.controller import roi_box
from livemask.protocol import Message
from livemask.recording.reader import record_settings
from livemask.service.app import Service
from tests.conftest import make_config
from tests.test_service import control

SENSOR = 512
FULL = (0, 0, SENSOR, SENSOR)
#: the ROI frames: 160x160 away from the sensor's centre (rows 40-199, cols 300-459)
ROI = {"offset_x": 300, "offset_y": 40, "width": 160, "height": 160}
ROI_BOX = (300, 40, 160, 160)
ROI_RULE = {
    "name": "roi-centre",
    "applies_to": "overview",
    "when": {
        "objects": {"where": {"area_px": {"gt": 100}, "edge_distance_px": {"gt": 15}}},
        "values": [{"path": "index.ext", "ge": 0}],
    },
    "max_fires": 1,
    "action": {"centre": {"frames": 1}},
}


def roi_config() -> Any:
    return make_config(
        simulation={"truth": True, "seed": 5, "sensor_shape_px": [SENSOR, SENSOR],
                    "steps_per_frame": 0},
        acquisition={"sequence": {
            "stage_positions": [{"x": 0.0, "y": 0.0, "z": 0.0}],
            "time_plan": {"interval": 0.05, "loops": 400},
            "channels": [{"config": "DAPI", "exposure": 10.0}],
        }},
        feedback={"rules": [ROI_RULE], "limits": {"stage_x_range_um": [-800, 800],
                                                   "stage_y_range_um": [-800, 800]}},
    )


def roi_event(i: int) -> dict[str, Any]:
    return {"index": {"ext": i}, "x_pos": 0.0, "y_pos": 0.0, "roi": ROI}


async def run_until_action_frame(svc: Service, *, plan: bool) -> dict[str, Any]:
    """Start the planned time-lapse and enqueue one ROI frame once it runs (``plan``), or
    enqueue a run of three ROI frames while idle; collect until the centring action's frame
    is in, then stop. Per topic: the headers (and truth arrays) by frame id, and the
    ``event`` headers."""
    got: dict[str, Any] = {"measurements": {}, "truth": {}, "event": []}
    topics = ("measurements", "truth", "event")
    async with AsyncSubscriber(svc.publisher.bound_address, topics) as sub:
        await asyncio.sleep(0.3)  # slow joiner
        if plan:
            await control(svc, "start")
        else:
            events = [roi_event(i) for i in range(3)]
            assert (await control(svc, "enqueue", events=events))["started"] is True
        enqueued = not plan
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg: Message | None = await sub.recv(timeout_s=0.1)
            if msg is None:
                continue
            if msg.topic == "event":
                got["event"].append(msg.header)
            elif msg.topic == "truth":
                got["truth"][msg.header["frame_id"]] = msg.arrays["labels"].copy()
            else:
                got["measurements"][msg.header["frame_id"]] = msg.header
            if not enqueued and got["measurements"]:
                assert (await control(svc, "enqueue", events=[roi_event(0)]))["enqueued"] == 1
                enqueued = True
            fb = [f for f, h in got["measurements"].items() if "fb" in h["index"]]
            if fb and fb[0] in got["truth"]:
                break
        await control(svc, "stop")
    return got


def target_in_action_frame(got: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows and columns of the target nucleus (the simulator's, under the target's centroid
    in the triggering frame) in the action's frame, and that frame's id."""
    meas, truth = got["measurements"], got["truth"]
    (action,) = [e for e in got["event"] if e["kind"] == "feedback_action"]
    (fb_id,) = [f for f, h in meas.items() if "fb" in h["index"]]
    src = action["frame_id"]
    assert "ext" in meas[src]["index"] and meas[src]["settings"]["roi"] == ROI
    cy, cx = action["target"]["centroid_y"], action["target"]["centroid_x"]
    nucleus = truth[src][round(cy), round(cx)]
    assert nucleus > 0
    rows, cols = np.nonzero(truth[fb_id] == nucleus)
    return rows, cols, fb_id


async def test_a_roi_frame_enqueued_into_a_full_frame_plan_centres_in_the_full_frames() -> None:
    """The original bug: the action's frames are full frames (the enqueue's restore event
    puts the full image back), so the target goes to the full frame's centre."""
    async with Service(roi_config()) as svc:
        got = await run_until_action_frame(svc, plan=True)
    rows, cols, fb_id = target_in_action_frame(got)
    assert got["truth"][fb_id].shape == (SENSOR, SENSOR)
    assert "roi" not in got["measurements"][fb_id]["settings"]  # the opening geometry
    centre = (SENSOR - 1) / 2
    assert rows.mean() == pytest.approx(centre, abs=3)
    assert cols.mean() == pytest.approx(centre, abs=3)


async def test_in_a_run_of_roi_frames_the_target_is_centred_in_the_roi() -> None:
    """The action's frames keep the run's ROI (pymmcore-plus keeps it; they set none).
    0f66f8d aimed at the sensor's centre: the target left the imaged area."""
    async with Service(roi_config()) as svc:
        got = await run_until_action_frame(svc, plan=False)
    rows, cols, fb_id = target_in_action_frame(got)
    assert got["truth"][fb_id].shape == (160, 160)
    assert got["measurements"][fb_id]["settings"]["roi"] == ROI
    assert rows.size > 0, "the target is not in the action's frame"
    assert rows.mean() == pytest.approx(79.5, abs=3)
    assert cols.mean() == pytest.approx(79.5, abs=3)


# ------------------------------------------------------------------ the aim, unit by unit
def nucleus(label: int, y: float, x: float) -> dict[str, Any]:
    return {"label": label, "area_px": 250, "centroid_yx": [y, x], "mean_intensity": 600.0,
            "integrated_intensity": 600.0 * 250}


def ctx_of(objects: list[dict[str, Any]], settings: dict[str, Any] | None,
           action_roi: tuple[int, int, int, int] | None,
           shape: tuple[int, int] = (160, 160)) -> FrameContext:
    message = {
        "frame_id": 1, "index": {"ext": 0}, "t": {"acquired": 1000.0},
        "position": {"x_um": 100.0, "y_um": 200.0, "z_um": 0.0},
        "settings": {"channel": None, "channel_group": None, "exposure_ms": 10.0,
                     **(settings or {})},
        "pixel_size_um": 0.5, "summary": {"count": len(objects)}, "objects": objects,
    }
    ctx = FrameContext.from_measurements(message, shape)
    ctx.action_roi = action_roi
    return ctx


@pytest.mark.parametrize(("settings", "action_roi", "shape", "aim"), [
    ({"roi": ROI}, FULL, (160, 160), (215.5, -44.5)),  # ROI frame, full action frames
    ({"roi": ROI}, ROI_BOX, (160, 160), (79.5, 79.5)),  # ROI frame, ROI action frames
    (None, ROI_BOX, (512, 512), (119.5, 379.5)),  # full frame, ROI action frames
    ({"roi": ROI}, None, (160, 160), (79.5, 79.5)),  # not known: every frame has the ROI
    ({"roi": None}, None, (160, 160), (79.5, 79.5)),
    (None, None, (512, 512), (255.5, 255.5)),
])
def test_the_aim_is_the_action_rois_centre_in_the_frames_pixels(
    settings: dict[str, Any] | None, action_roi: Any, shape: tuple[int, int],
    aim: tuple[float, float],
) -> None:
    assert ctx_of([], settings, action_roi, shape).aim_yx() == aim


def test_centre_distance_the_default_target_and_the_move_use_the_aim() -> None:
    """A ROI frame whose action frames are full: the object nearest the full frame's centre
    is the default target, and centring puts it there."""
    middle, near_axis = nucleus(1, 79.5, 79.5), nucleus(2, 100.0, 20.0)
    c = ctx_of([middle, near_axis], {"roi": ROI}, FULL)
    f_middle, f_near = FeatureTracker().compute(c)
    assert f_near["centre_distance_px"] == pytest.approx(np.hypot(115.5, 64.5))
    assert f_middle["centre_distance_px"] == pytest.approx(np.hypot(136.0, 124.0))
    assert f_near["edge_distance_px"] == 20.0  # edges are the frame's own
    rule = {"name": "c", "when": {"objects": {"where": {"area_px": {"gt": 100}}}},
            "action": {"centre": {}}}
    rules = RuleEngine(FeedbackConfig.model_validate({"rules": [rule]}),
                       planner=EventPlanner.for_pixel_size(0.5))
    (decision,) = rules.evaluate(ctx_of([middle, near_axis], {"roi": ROI}, FULL))
    assert decision.action.centre_yx == (100.0, 20.0)
    (ev,) = decision.events
    assert ev.x_pos == pytest.approx(100.0 + (20.0 + 44.5) * 0.5)
    assert ev.y_pos == pytest.approx(200.0 + (100.0 - 215.5) * 0.5)
    # the same frame in a run of ROI frames: its own middle
    (ev,) = to_events(Centre(centre_yx=(100.0, 20.0)), ctx_of([], {"roi": ROI}, ROI_BOX),
                      EventPlanner.for_pixel_size(0.5))
    assert (ev.x_pos, ev.y_pos) == (pytest.approx(100.0 - 59.5 * 0.5),
                                    pytest.approx(200.0 + 20.5 * 0.5))


def test_a_roi_frame_whose_roi_is_not_known_is_refused_only_when_the_aim_is_known() -> None:
    c = ctx_of([nucleus(1, 100.0, 20.0)], {"roi": None}, FULL)
    with pytest.raises(ActionError, match=r"camera ROI the camera did not give") as err:
        to_events(Centre(centre_yx=(100.0, 20.0)), c, EventPlanner.for_pixel_size(0.5))
    assert err.value.reason == "unknown_roi"
    assert FeatureTracker().compute(c)[0]["centre_distance_px"] is None
    # no ROI known for the action: the run's frames all have this one
    c = ctx_of([nucleus(1, 100.0, 20.0)], {"roi": None}, None)
    (ev,) = to_events(Centre(centre_yx=(100.0, 20.0)), c, EventPlanner.for_pixel_size(0.5))
    assert ev.x_pos == pytest.approx(100.0 - 59.5 * 0.5)


def test_the_controller_takes_the_roi_in_effect_as_a_box() -> None:
    assert roi_box(useq.CameraROI(offset_x=300, offset_y=40, width=160, height=160)) == ROI_BOX
    assert roi_box(None) is None
    assert roi_box(useq.CameraROI(offset_x=0, offset_y=0, width=0, height=0)) is None


# ------------------------------------------------------------------ the source's side
def test_frames_away_from_the_opening_geometry_carry_their_roi() -> None:
    at_open = (SENSOR, SENSOR)
    assert frame_roi((512, 512), {"roi": FULL}, at_open) == {}
    assert frame_roi((160, 160), {"roi": ROI_BOX}, at_open) == {"roi": ROI}
    assert frame_roi((160, 160), {"roi": ROI_BOX}, None) == {"roi": ROI}
    # not known: no roi in the metadata, or one that is not this frame's size
    assert frame_roi((160, 160), {}, at_open) == {"roi": None}
    assert frame_roi((160, 160), {"roi": (300, 40, 100, 100)}, at_open) == {"roi": None}
    assert frame_roi((512, 512), {}, at_open) == {}
    # binning 2: the full image is a 256 x 256 frame at offset (0, 0), not the opening one
    binned = {"roi": {"offset_x": 0, "offset_y": 0, "width": 256, "height": 256}}
    assert frame_roi((256, 256), {"roi": (0, 0, 256, 256)}, at_open) == binned
    # a corner ROI set in the .cfg (rows 0-255 of the sensor) is the opening geometry
    assert frame_roi((256, 512), {"roi": (0, 0, 512, 256)}, (256, 512)) == {}
    part = {"roi": {"offset_x": 100, "offset_y": 40, "width": 100, "height": 100}}
    assert frame_roi((100, 100), {"roi": (100, 40, 100, 100)}, (256, 512)) == part


def test_a_replayed_recordings_frames_keep_their_roi() -> None:
    rec = {"settings": {"channel": "DAPI", "channel_group": "Channel", "exposure_ms": 10.0,
                        "roi": ROI}}
    assert record_settings(rec)["roi"] == ROI
    assert record_settings({"settings": {"roi": None}})["roi"] is None
    assert record_settings({"settings": {"roi": {**ROI, "width": True}}})["roi"] is None
    assert "roi" not in record_settings({"settings": {"exposure_ms": 10.0}})
