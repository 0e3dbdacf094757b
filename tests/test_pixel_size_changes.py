"""A pixel size that changes during a run (binning, objective), binning while recording,
and z positions on a rig without a focus device."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import useq

from livemask.acquisition.simulated.devices import SimCamera
from livemask.acquisition.simulated.world import get_world
from livemask.acquisition.source import RawFrame
from livemask.client import AsyncSubscriber
from livemask.errors import ConfigError, ControlError
from livemask.feedback.context import FrameContext
from livemask.inference.models import ModelCard
from livemask.inference.segmenter import Segmenter
from livemask.service.app import Service
from livemask.service.pipeline import Pipeline
from livemask.transport.publisher import MemoryPublisher
from tests.conftest import make_config
from tests.test_pipeline import ThresholdBackend
from tests.test_service import control

SIM = "livemask.acquisition.simulated.devices"
BIN2 = ["Camera", "Binning", "2"]


class BinCamera(SimCamera):
    """The simulated camera with a writable ``Binning`` (the sum of b x b pixels, as a
    camera bins; the core scales its pixel size by it)."""

    def __init__(self) -> None:
        super().__init__()
        self._bin = 1

    def get_binning(self) -> int:
        return self._bin

    def set_binning(self, value: int) -> None:
        self._bin = int(value)

    def sensor_shape(self) -> tuple[int, int]:
        h, w = get_world().sensor_shape
        return (h // self._bin, w // self._bin)

    def snap(self, buffer: np.ndarray) -> Mapping[str, str]:
        b = self._bin
        if b == 1:
            return super().snap(buffer)
        full = np.empty(get_world().sensor_shape, np.uint16)
        meta = super().snap(full)
        h, w = buffer.shape
        buffer[:] = full[: h * b, : w * b].reshape(h, b, w, b).mean(axis=(1, 3))
        return meta


def _rig(tmp_path: Path, *, focus: bool = True) -> str:
    """A .cfg of the simulated rig with :class:`BinCamera` (and without a focus drive)."""
    lines = [
        "#py pyDevice,Camera,tests.test_pixel_size_changes,BinCamera",
        f"#py pyDevice,XY,{SIM},SimXYStage",
        f"#py pyDevice,Shutter,{SIM},SimShutter",
        f"#py pyDevice,Filter,{SIM},SimFilterWheel",
        *([f"#py pyDevice,Z,{SIM},SimZStage"] if focus else []),
        "#py Property,Core,Initialize,1",
        "#py Property,Core,Camera,Camera",
        "#py Property,Core,XYStage,XY",
        *(["#py Property,Core,Focus,Z"] if focus else []),
        "#py Property,Core,Shutter,Shutter",
        "#py Property,Core,AutoShutter,0",
        "#py ConfigGroup,Channel,DAPI,Filter,Label,DAPI",
        "#py Property,Core,ChannelGroup,Channel",
        "#py ConfigGroup,System,Startup,Shutter,State,1",
        "#py ConfigPixelSize,Res10x,Camera,Binning,1",
        "#py PixelSize_um,Res10x,0.65",
    ]
    path = tmp_path / ("bin.cfg" if focus else "nofocus.cfg")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _config(tmp_path: Path, *, focus: bool = True, **sections: Any) -> Any:
    hardware = {"config_file": _rig(tmp_path, focus=focus), **sections.pop("hardware", {})}
    simulation = {"truth": False, "seed": 3, "sensor_shape_px": [128, 128],
                  **sections.pop("simulation", {})}
    return make_config(hardware=hardware, simulation=simulation, **sections)


async def _enqueue_and_collect(
    svc: Service, events: list[dict[str, Any]], timeout_s: float = 30
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Enqueue ``events`` on an idle service: the measurements (by frame_id) and event
    headers published until its acquisition has finished and its frames are out."""
    meas: list[dict[str, Any]] = []
    published: list[dict[str, Any]] = []
    async with AsyncSubscriber(svc.publisher.bound_address, ("measurements", "event")) as sub:
        await asyncio.sleep(0.3)  # slow joiner
        assert (await control(svc, "enqueue", events=events))["started"] is True
        deadline, drain = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline and (drain is None or time.monotonic() < drain):
            msg = await sub.recv(timeout_s=0.1)
            if msg is not None:
                (meas if msg.topic == "measurements" else published).append(msg.header)
                if msg.topic == "event" and msg.header["kind"] == "acquisition_finished":
                    drain = time.monotonic() + 0.5
    return sorted(meas, key=lambda h: h["frame_id"]), published


# ------------------------------------------------------------------ 1: the frame's pixel size
@pytest.mark.parametrize(("override", "sizes"), [(None, [0.65, 1.3, 1.3]),
                                                 (0.5, [0.5, 1.0, 1.0])])
async def test_measurements_use_each_frames_pixel_size_after_binning(
    tmp_path: Path, override: float | None, sizes: list[float]
) -> None:
    """Before, the pixel size read when the rig opened measured every frame: at binning 2
    the areas were 4x too small, silently. An override of a calibrated core still follows
    binning (it scales the core's calibration)."""
    cfg = _config(tmp_path, hardware={"pixel_size_um": override})
    async with Service(cfg) as svc:
        meas, published = await _enqueue_and_collect(
            svc, [{}, {"properties": [BIN2]}, {}])
        status = await control(svc, "status")
    assert [m["pixel_size_um"] for m in meas] == pytest.approx(sizes)
    # each frame's own image size: a centroid is placed in the image it was found in
    assert [m["image_shape"] for m in meas] == [[128, 128], [64, 64], [64, 64]]
    for m in meas:
        obj = m["objects"][0]
        assert obj["area_um2"] == pytest.approx(obj["area_px"] * m["pixel_size_um"] ** 2,
                                                rel=1e-3)
    # the same nuclei: about the same µm² at either binning (4x off before)
    ratio = meas[1]["summary"]["mean_area_um2"] / meas[0]["summary"]["mean_area_um2"]
    assert 0.7 < ratio < 1.4
    (changed,) = [e for e in published if e["kind"] == "pixel_size_changed"]
    assert changed["from"] == pytest.approx(sizes[0])
    assert changed["to"] == pytest.approx(sizes[1])
    assert changed["frame_id"] == meas[1]["frame_id"]
    assert status["pixel_size_um"] == pytest.approx(sizes[-1])


async def test_grain_statistics_use_each_frames_pixel_size(tmp_path: Path) -> None:
    """Tile and cumulative grain statistics measured a binned tile with the old pixel size:
    its grains 4x too small, pooled with the others."""
    cfg = _config(tmp_path, simulation={"sample": "grains", "sensor_shape_px": [256, 256]},
                  model={"name": "grains"})
    async with Service(cfg) as svc:
        meas, _ = await _enqueue_and_collect(svc, [{}, {"properties": [BIN2]}])
    one, two = (m["grains"]["tile"]["mean_area_um2"] for m in meas)
    assert 0.6 < two / one < 1.6  # the same field (0.25 before)
    pooled = meas[1]["grains"]["cumulative"]
    assert pooled["tiles"] == 2
    assert min(one, two) <= pooled["mean_area_um2"] <= max(one, two)


def test_the_source_reads_the_frames_pixel_size_from_its_metadata() -> None:
    from livemask.acquisition.source import frame_pixel_size

    assert frame_pixel_size({"pixel_size_um": 1.3}) == 1.3
    for meta in (None, {}, {"pixel_size_um": 0.0}, {"pixel_size_um": float("nan")},
                 {"pixel_size_um": True}):
        assert frame_pixel_size(meta) is None


async def _frames_at_pixel_sizes(
    sizes: list[float | None], *, pixel_size_um: float
) -> tuple[Pipeline, MemoryPublisher]:
    """A pipeline (its pixel size ``pixel_size_um`` where the core said 0.65 at open) after
    one frame per core pixel size of ``sizes``, each with a 100 px object."""
    pub = MemoryPublisher()
    pipe = Pipeline(Segmenter(ModelCard(name="fake", file="none.onnx"), ThresholdBackend()),
                    pub, mode="synchronized", pixel_size_um=pixel_size_um,
                    core_pixel_size_um=0.65)
    pipe.start()
    image = np.full((64, 64), 100, np.uint16)
    image[10:20, 10:20] = 1000
    for i, core_px in enumerate(sizes):
        pipe.submit(RawFrame(image, useq.MDAEvent(index={"t": i}), time.time(), {}, None,
                             pixel_size_um=core_px))
    await pipe.drain(5.0)
    await pipe.close()
    return pipe, pub


async def test_the_pipeline_scales_the_cores_pixel_size_and_reports_changes() -> None:
    """An override (0.5 where the core said 0.65 at open) scales the core's value for each
    frame; a frame without one is measured with the pixel size at open; each change is
    one event."""
    pipe, pub = await _frames_at_pixel_sizes([0.65, 1.3, 1.3, None, 0.65], pixel_size_um=0.5)
    meas = [m.header for m in pub.by_topic("measurements")]
    assert [m["pixel_size_um"] for m in meas] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.5])
    assert meas[1]["objects"][0]["area_um2"] == pytest.approx(100 * 1.0)
    changes = [(e.header["from"], e.header["to"], e.header["frame_id"])
               for e in pub.by_topic("event") if e.header["kind"] == "pixel_size_changed"]
    assert changes == [(0.5, 1.0, 1), (1.0, 0.5, 3)]
    assert pipe.frame_pixel_size_um == 0.5


@pytest.mark.parametrize("matrix", [None, ((0.0, -0.65), (0.65, 0.0))])
def test_centring_uses_the_frames_pixel_size(matrix: Any) -> None:
    """The service's planner was built with the pixel size at open: at binning 2 a
    centring move went half the way (also with feedback.pixel_to_stage, a rotated camera)."""
    from livemask.feedback.controller import FeedbackController
    from livemask.feedback.spec import FeedbackConfig

    config = FeedbackConfig.model_validate({"pixel_to_stage": matrix})
    ctx = FrameContext(frame_id=1, index={}, position={"x_um": 100.0, "y_um": 50.0}, t={},
                       summary={}, objects=[], image_shape=(65, 65), pixel_size_um=1.3)
    controller = FeedbackController(config, pixel_size_um=0.65, inject=lambda e: len(e),
                                    publish=lambda kind, fields: None)
    target = (32.0, 42.0) if matrix is None else (22.0, 32.0)  # 10 px along +x
    assert controller.engine.planner.centred(ctx, target) == pytest.approx((113.0, 50.0))
    # an uncalibrated rig still refuses centring (no_pixel_size)
    unknown = FeedbackController(FeedbackConfig(), pixel_size_um=None, inject=lambda e: len(e),
                                 publish=lambda kind, fields: None)
    assert unknown.engine.planner.stage_matrix(ctx) is None


# ------------------------------------------------------------------ 2: binning while recording
async def test_binning_is_refused_while_recording(tmp_path: Path) -> None:
    """Before, the event was accepted and the recorder rejected every later frame (another
    shape)."""
    cfg = _config(tmp_path, record={"enabled": True, "path": str(tmp_path / "rec")})
    async with Service(cfg) as svc:
        with pytest.raises(ControlError, match=r"'Binning' of camera 'Camera'.*between runs"):
            await control(svc, "enqueue", events=[{}, {"properties": [BIN2]}])
        seq = {"stage_positions": [{"x": 0.0, "y": 0.0, "properties": [BIN2]}]}
        with pytest.raises(ControlError, match=r"\] sequence: property 'Binning'"):
            await control(svc, "start", sequence=seq)
        assert (await control(svc, "status"))["acquisitions_finished"] == 0
        # other properties still go; each frame's pixel size is in frames.jsonl
        await _enqueue_and_collect(svc, [{"properties": [["Camera", "Exposure", 5]]}])
        path = svc.recorder.path  # type: ignore[union-attr]
    records = [json.loads(line) for line in (path / "frames.jsonl").read_text().splitlines()]
    assert [r["pixel_size_um"] for r in records] == [0.65]


# ------------------------------------------------------------------ 3: no focus device
async def test_z_positions_are_refused_on_a_rig_without_a_focus_device(tmp_path: Path) -> None:
    """pymmcore-plus skipped the z moves silently (a z-stack published one plane as five);
    the engine now fails them at run time, and these are refused before anything runs."""
    async with Service(_config(tmp_path, focus=False)) as svc:
        for args in ({"sequence": {"z_plan": {"range": 4, "step": 1}}},
                     {"sequence": {"stage_positions": [{"x": 0, "y": 0, "z": 3.0}]}}):
            with pytest.raises(ControlError, match=r"invalid_args.*(z_plan|\.z): the rig has "
                               r"no focus device.*Core-Focus"):
                await control(svc, "start", **args)
        with pytest.raises(ControlError, match=r"events\[1\]\.z_pos: the rig has no focus"):
            await control(svc, "enqueue", events=[{}, {"z_pos": 2.0}])
        assert (await control(svc, "status"))["acquisitions_finished"] == 0
    cfg = _config(tmp_path, focus=False,
                  acquisition={"sequence": {"z_plan": {"range": 4, "step": 1}}})
    with pytest.raises(ConfigError, match=r"acquisition\.sequence\.z_plan: the rig has no"):
        async with Service(cfg):
            pass


async def test_a_wobbling_pixel_size_is_no_change_but_a_drift_past_one_percent_is() -> None:
    """A zoom's reading that wobbles in its last digits sent a pixel_size_changed event (and
    a warning) at nearly every frame (changes of 1e-9 counted); now a change is announced
    once it is more than 1 % from the size announced last, and every frame is still
    measured with its own size."""
    wobble = [0.65 * f for f in (1 + 1e-6, 1 - 1e-6, 1 + 4e-3, 1 - 4e-3, 1 + 1e-9)]
    drift = [0.65 * 1.004**k for k in range(1, 5)]  # 1.2 %, 1.6 % past the start at k = 3, 4
    sizes = [*wobble, *drift, 1.3, 1.3 * (1 + 1e-7)]
    pipe, pub = await _frames_at_pixel_sizes(sizes, pixel_size_um=0.65)
    meas = [m.header for m in pub.by_topic("measurements")]
    assert [m["pixel_size_um"] for m in meas] == pytest.approx(sizes, rel=1e-12)
    changes = [(e.header["from"], e.header["to"], e.header["frame_id"])
               for e in pub.by_topic("event") if e.header["kind"] == "pixel_size_changed"]
    assert changes == [(0.65, pytest.approx(drift[2]), 7),
                       (pytest.approx(drift[2]), 1.3, 9)]
    assert pipe.frame_pixel_size_um == pytest.approx(sizes[-1], rel=1e-12)
