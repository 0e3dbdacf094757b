"""Centring from a frame taken with a camera ROI: the target goes to the optical axis (the
sensor's centre), not to where the ROI's centre lies on the sensor.

Before: the offset was taken from the ROI frame's own centre, so a 160x160 ROI at the
sensor's corner moved the target to about (80, 80) of the next full frame, ~250 px off.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from livemask.acquisition.engine import camera_roi
from livemask.acquisition.source import frame_roi, sensor_at_open, sensor_shape_now
from livemask.client import AsyncSubscriber
from livemask.feedback import FeedbackConfig, RuleEngine
from livemask.feedback.actions import ActionError, Centre, EventPlanner, to_events
from livemask.feedback.context import FeatureTracker, FrameContext
from livemask.protocol import Message
from livemask.service.app import Service
from tests.conftest import ROOT, make_config
from tests.test_service import control

SENSOR = 512
#: the enqueued frame: a 160x160 ROI away from the sensor's centre (rows 40-199, cols 300-459)
ROI = {"offset_x": 300, "offset_y": 40, "width": 160, "height": 160}
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


async def run_with_roi_frame(svc: Service) -> dict[str, Any]:
    """Start the time-lapse, enqueue one ROI frame (index ``ext``) once it runs, and collect
    until the centring action's frame is in; then stop. Per topic: the headers (and truth
    arrays) by frame id, and the ``event`` headers."""
    got: dict[str, Any] = {"measurements": {}, "truth": {}, "event": []}
    topics = ("measurements", "truth", "event")
    async with AsyncSubscriber(svc.publisher.bound_address, topics) as sub:
        await asyncio.sleep(0.3)  # slow joiner
        await control(svc, "start")
        enqueued = False
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
                event = {"index": {"ext": 0}, "x_pos": 0.0, "y_pos": 0.0, "roi": ROI}
                assert (await control(svc, "enqueue", events=[event]))["enqueued"] == 1
                enqueued = True
            fb = [f for f, h in got["measurements"].items() if "fb" in h["index"]]
            if fb and fb[0] in got["truth"]:
                break
        await control(svc, "stop")
    return got


async def test_centring_from_a_roi_frame_puts_the_target_on_the_optical_axis() -> None:
    async with Service(roi_config()) as svc:
        got = await run_with_roi_frame(svc)
    meas, truth = got["measurements"], got["truth"]
    (roi_id,) = [f for f, h in meas.items() if "ext" in h["index"]]
    (fb_id,) = [f for f, h in meas.items() if "fb" in h["index"]]
    (action,) = [e for e in got["event"] if e["kind"] == "feedback_action"]
    assert action["frame_id"] == roi_id
    # the target (the simulator's nucleus under the target's centroid in the ROI frame) is
    # centred on the sensor in the action's full frame
    cy, cx = action["target"]["centroid_y"], action["target"]["centroid_x"]
    nucleus = truth[roi_id][round(cy), round(cx)]
    assert nucleus > 0
    rows, cols = np.nonzero(truth[fb_id] == nucleus)
    centre = (SENSOR - 1) / 2
    assert rows.mean() == pytest.approx(centre, abs=3)
    assert cols.mean() == pytest.approx(centre, abs=3)
    # the ROI frame says where it lies on the sensor; full frames say nothing
    settings = meas[roi_id]["settings"]
    assert settings["roi"] == ROI and settings["sensor_shape"] == [SENSOR, SENSOR]
    assert "roi" not in meas[fb_id]["settings"] and truth[fb_id].shape == (SENSOR, SENSOR)


# ------------------------------------------------------------------ the rules' side
#: the ROI frame above: the optical axis (the sensor's centre, 255.5) lies at row 215.5 and
#: column -44.5 of it
ROI_SETTINGS = {"roi": ROI, "sensor_shape": [SENSOR, SENSOR]}


def nucleus(label: int, y: float, x: float) -> dict[str, Any]:
    return {"label": label, "area_px": 250, "centroid_yx": [y, x], "mean_intensity": 600.0,
            "integrated_intensity": 600.0 * 250}


def roi_ctx(objects: list[dict[str, Any]], settings: dict[str, Any] | None) -> FrameContext:
    message = {
        "frame_id": 1, "index": {"ext": 0}, "t": {"acquired": 1000.0},
        "position": {"x_um": 100.0, "y_um": 200.0, "z_um": 0.0},
        "settings": {"channel": None, "channel_group": None, "exposure_ms": 10.0,
                     **(settings or {})},
        "pixel_size_um": 0.5, "summary": {"count": len(objects)}, "objects": objects,
    }
    return FrameContext.from_measurements(message, (160, 160))


def test_a_roi_frames_centre_distance_and_centring_are_on_the_sensor() -> None:
    """Before: measured from the ROI's own centre (80 px here), so the default target was the
    object nearest the ROI's middle, and centring moved it there."""
    middle, near_axis = nucleus(1, 79.5, 79.5), nucleus(2, 100.0, 20.0)
    c = roi_ctx([middle, near_axis], ROI_SETTINGS)
    f_middle, f_near = FeatureTracker().compute(c)
    assert f_near["centre_distance_px"] == pytest.approx(np.hypot(115.5, 64.5))
    assert f_middle["centre_distance_px"] == pytest.approx(np.hypot(136.0, 124.0))
    assert f_near["edge_distance_px"] == 20.0  # edges are the frame's own
    assert c.optical_centre_yx() == (215.5, -44.5)
    # the default target: the object nearest the optical axis
    rule = {"name": "c", "when": {"objects": {"where": {"area_px": {"gt": 100}}}},
            "action": {"centre": {}}}
    rules = RuleEngine(FeedbackConfig.model_validate({"rules": [rule]}),
                       planner=EventPlanner.for_pixel_size(0.5))
    (decision,) = rules.evaluate(roi_ctx([middle, near_axis], ROI_SETTINGS))
    assert decision.action.centre_yx == (100.0, 20.0)
    (ev,) = decision.events
    assert ev.x_pos == pytest.approx(100.0 + (20.0 + 44.5) * 0.5)
    assert ev.y_pos == pytest.approx(200.0 + (100.0 - 215.5) * 0.5)


@pytest.mark.parametrize("settings", [
    {"roi": None},  # the camera did not say where the ROI was
    {"roi": ROI},  # the sensor's size is not known
])
def test_centring_a_roi_frame_that_cannot_be_placed_on_the_sensor_is_refused(
    settings: dict[str, Any],
) -> None:
    """Before: centred on the ROI's middle, i.e. moved the stage to the wrong place."""
    c = roi_ctx([nucleus(1, 100.0, 20.0)], settings)
    with pytest.raises(ActionError, match=r"camera ROI whose place on the sensor") as err:
        to_events(Centre(centre_yx=(100.0, 20.0)), c, EventPlanner.for_pixel_size(0.5))
    assert err.value.reason == "unknown_roi"
    assert FeatureTracker().compute(c)[0]["centre_distance_px"] is None


def test_a_full_frame_still_centres_on_its_own_middle() -> None:
    c = roi_ctx([nucleus(1, 100.0, 20.0)], None)
    (ev,) = to_events(Centre(centre_yx=(100.0, 20.0)), c, EventPlanner.for_pixel_size(0.5))
    assert (ev.x_pos, ev.y_pos) == (pytest.approx(100.0 - 59.5 * 0.5),
                                    pytest.approx(200.0 + 20.5 * 0.5))


# ------------------------------------------------------------------ the source's side
def test_frame_roi_places_a_frame_on_the_sensor_at_its_binning() -> None:
    full = (SENSOR, SENSOR)
    assert frame_roi((512, 512), {"roi": (0, 0, 512, 512)}, full) == {}
    assert frame_roi((160, 160), {"roi": (300, 40, 160, 160)}, full) == ROI_SETTINGS
    assert frame_roi((160, 160), {"roi": (300, 40, 160, 160)}, None) == {"roi": ROI}
    # not known: no roi in the metadata, or one that is not this frame's size
    assert frame_roi((160, 160), {}, full) == {"roi": None}
    assert frame_roi((160, 160), {"roi": (300, 40, 100, 100)}, full) == {"roi": None}
    assert frame_roi((512, 512), {}, full) == {}
    # binning 2: the full image is 256 x 256
    binned = sensor_shape_now((SENSOR, SENSOR, 1), 2)
    assert binned == (256, 256) and sensor_shape_now((SENSOR, SENSOR, 1), None) == full
    assert frame_roi((256, 256), {"roi": (0, 0, 256, 256)}, binned) == {}
    assert frame_roi((64, 64), {"roi": (10, 20, 64, 64)}, binned)["sensor_shape"] == [256, 256]


def test_the_sensor_is_the_cameras_image_at_open_unless_a_roi_was_set() -> None:
    from livemask.acquisition.core import close_core, open_core

    core = open_core(ROOT / "hardware" / "simulated.cfg")
    try:
        assert sensor_at_open(core) == (SENSOR, SENSOR, 1)
        assert camera_roi(core) == (0, 0, SENSOR, SENSOR)
        core.setROI(300, 40, 160, 160)
        assert camera_roi(core) == (300, 40, 160, 160)
        assert sensor_at_open(core) is None  # a .cfg's ROI: the sensor's size is not known
    finally:
        close_core(core)
