"""Hardware faults pymmcore-plus' engine only logs, or lets end the run (session 25's hunt):
an XY stage that can neither move nor be read placed its frames at the commanded position
with no ``stage_mismatch``; a position that gives x or y only, on such a stage, ended the
whole acquisition; an event property the device refused was only logged."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import useq
from pymmcore_plus import CMMCorePlus

from livemask.acquisition.core import close_core, open_core
from livemask.acquisition.engine import FocusTolerantEngine
from livemask.acquisition.simulated import SIMULATED_CFG
from livemask.acquisition.simulated.devices import SimCamera, SimXYStage
from livemask.acquisition.simulated.world import configure_world
from livemask.acquisition.source import frame_position
from livemask.service.app import Service
from tests.conftest import make_config
from tests.test_rig_checks import _config, _rig
from tests.test_service import collect_run, enqueue_and_watch


def _offline(*args: Any) -> Any:
    raise RuntimeError("XY stage: controller offline")


@pytest.fixture
def dead_xy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulated XY stage's controller is offline: moves and reads raise."""
    monkeypatch.setattr(SimXYStage, "set_position_um", _offline)
    monkeypatch.setattr(SimXYStage, "get_position_um", _offline)


@pytest.fixture
def sim_core() -> Iterator[CMMCorePlus]:
    """The simulated rig's real UniMMCore with livemask's engine."""
    configure_world(seed=3, sensor_shape=(64, 64))
    core = open_core(SIMULATED_CFG)
    core.register_mda_engine(FocusTolerantEngine(core))
    try:
        yield core
    finally:
        close_core(core)


def _sequence_config(sequence: dict[str, Any]) -> Any:
    return make_config(simulation={"truth": False, "seed": 3, "sensor_shape_px": [128, 128]},
                       acquisition={"sequence": sequence})


# ------------------------------------------------------------------ 1: dead XY stage
@pytest.mark.usefixtures("dead_xy")
async def test_frames_of_a_dead_xy_stage_are_placed_nowhere_and_reported() -> None:
    """Before: published and recorded at x 500, y 500 (where the stage never went), no
    ``stage_mismatch``, error null."""
    seq = {"stage_positions": [{"x": 0.0, "y": 0.0}, {"x": 500.0, "y": 500.0}],
           "time_plan": {"interval": 0.0, "loops": 2}}
    async with Service(_sequence_config(seq)) as svc:
        got = await collect_run(svc, ("frame", "event"))
    frames = [m.header for m in got["frame"]]
    events = [m.header for m in got["event"]]
    assert [f["index"]["p"] for f in frames] == [0, 1, 0, 1]
    for frame in frames:  # the stage cannot say where it is: no place, not the commanded one
        assert (frame["position"]["x_um"], frame["position"]["y_um"]) == (None, None)
    mismatches = [e for e in events if e["kind"] == "stage_mismatch"]
    assert [m["commanded"] for m in mismatches] == [  # once per position
        {"x_um": 0.0, "y_um": 0.0}, {"x_um": 500.0, "y_um": 500.0}]
    assert all(m["read"] == {"x_um": None, "y_um": None} for m in mismatches)
    (done,) = [e for e in events if e["kind"] == "acquisition_finished"]
    assert done["error"] is None


def test_frame_position_after_a_failed_xy_move() -> None:
    """A failed move with a read-back keeps the existing path (the read-back position where
    more than 2 µm off, nothing within); without one, x/y are unknown."""
    event = useq.MDAEvent(x_pos=500.0, y_pos=500.0)
    stayed = {"position": {"x": 0.0, "y": 0.0}}
    assert frame_position(event, stayed, xy_failed=True) == (
        {"x_um": 0.0, "y_um": 0.0, "z_um": None},
        {"commanded": {"x_um": 500.0, "y_um": 500.0}, "read": {"x_um": 0.0, "y_um": 0.0}})
    there = {"position": {"x": 500.5, "y": 500.0}}
    assert frame_position(event, there, xy_failed=True) == (
        {"x_um": 500.0, "y_um": 500.0, "z_um": None}, None)
    assert frame_position(event, {"position": {"z": 1.0}}, xy_failed=True) == (
        {"x_um": None, "y_um": None, "z_um": None},
        {"commanded": {"x_um": 500.0, "y_um": 500.0}, "read": {"x_um": None, "y_um": None}})
    # no failed move (a sequenced frame without a read-back): the commanded position
    assert frame_position(event, {}) == ({"x_um": 500.0, "y_um": 500.0, "z_um": None}, None)


async def test_a_stage_that_refuses_moves_but_reads_back_gives_the_read_position(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The existing read-back path still decides where the move failed but the stage can
    be read: the frame is where the stage stayed."""
    monkeypatch.setattr(SimXYStage, "set_position_um", _offline)
    async with Service(_sequence_config({})) as svc:
        frames, events = await enqueue_and_watch(svc, [{"x_pos": 300.0, "y_pos": 200.0}] * 2)
    assert [(f["position"]["x_um"], f["position"]["y_um"]) for f in frames] == [
        (pytest.approx(0.0), pytest.approx(0.0))] * 2
    (mismatch,) = [e for e in events if e["kind"] == "stage_mismatch"]
    assert mismatch["read"] == {"x_um": pytest.approx(0.0), "y_um": pytest.approx(0.0)}


# ------------------------------------------------------------------ 2: x only, unreadable
@pytest.mark.usefixtures("dead_xy")
async def test_x_only_positions_on_an_unreadable_stage_do_not_end_the_acquisition() -> None:
    """pymmcore-plus reads the stage (for the y to keep) outside its ``try``: the run ended
    with ``RuntimeError: XY stage: controller offline`` and no frame."""
    seq = {"stage_positions": [{"x": 0.0}, {"x": 500.0}],
           "time_plan": {"interval": 0.0, "loops": 3}}
    async with Service(_sequence_config(seq)) as svc:
        got = await collect_run(svc, ("frame", "event"))
    frames = [m.header for m in got["frame"]]
    events = [m.header for m in got["event"]]
    (done,) = [e for e in events if e["kind"] == "acquisition_finished"]
    assert done["error"] is None
    assert [(f["index"]["t"], f["index"]["p"]) for f in frames] == [
        (t, p) for t in range(3) for p in range(2)]
    assert all(f["position"]["x_um"] is None for f in frames)
    mismatches = [e for e in events if e["kind"] == "stage_mismatch"]
    assert [(m["commanded"], m["read"]) for m in mismatches] == [
        ({"x_um": 0.0}, {"x_um": None}), ({"x_um": 500.0}, {"x_um": None})]


def test_failed_xy_moves_are_counted_and_logged_at_1_10_100_times(
    sim_core: CMMCorePlus, caplog: pytest.LogCaptureFixture
) -> None:
    """As failed Z moves: each frame knows its move failed; the warning backs off."""
    core = sim_core
    engine = core.mda.engine
    assert isinstance(engine, FocusTolerantEngine)
    core.getXYPosition = _offline  # type: ignore[method-assign,assignment]
    failed: list[bool] = []
    core.mda.events.frameReady.connect(lambda image, event, meta: failed.append(engine.xy_failed))
    events = [useq.MDAEvent(index={"t": t}, y_pos=float(t)) for t in range(12)]
    with caplog.at_level(logging.WARNING, logger="livemask"):
        core.mda.run([*events, useq.MDAEvent(index={"t": 12})])
    assert failed == [True] * 12 + [False]  # an event without x/y moves nothing
    assert engine.xy_failures == 12
    assert caplog.text.count("Failed to set XY position") == 2  # the 1st and the 10th


# ------------------------------------------------------------------ 3: refused property
class GainCamera(SimCamera):
    """The simulated camera with an EM gain the device refuses above 1 (EM mode off)."""

    def __init__(self) -> None:
        super().__init__()
        self._gain = 1
        self.register_property("EMGain", default_value=1, limits=(1, 300),
                               getter=GainCamera._get_gain, setter=GainCamera._set_gain)

    def _get_gain(self) -> int:
        return self._gain

    def _set_gain(self, value: Any) -> None:
        if float(value) > 1:
            raise RuntimeError("EMGain: EM output amplifier not selected")
        self._gain = int(float(value))


async def test_an_event_property_the_device_refuses_is_reported_once(tmp_path: Path) -> None:
    """Before: only pymmcore-plus' log said so; no event, error null."""
    cfg = _config(_rig(tmp_path, camera="tests.test_engine_faults_s25,GainCamera"))
    gain = [["Camera", "EMGain", value] for value in ("200", "250", "1")]
    async with Service(cfg) as svc:
        frames, events = await enqueue_and_watch(svc, [{"properties": [g]} for g in gain])
        now = svc.source.core.getProperty("Camera", "EMGain")  # type: ignore[union-attr]
    assert len(frames) == 3 and float(now) == 1.0
    assert events[-1]["kind"] == "acquisition_finished" and events[-1]["error"] is None
    (mismatch,) = [e for e in events if e["kind"] == "settings_mismatch"]  # once per property
    assert mismatch["properties"] == {"Camera-EMGain": {
        "commanded": "200", "error": "EMGain: EM output amplifier not selected"}}
    assert "property" in mismatch["detail"]


def test_the_engine_keeps_each_refused_property_for_its_events_frames(
    sim_core: CMMCorePlus,
) -> None:
    """A property set and a stage ``Position`` (set by a move) alike; an event whose
    properties the devices take has none."""
    core = sim_core
    engine = core.mda.engine
    assert isinstance(engine, FocusTolerantEngine)
    real_set = core.setProperty

    def shutter_jammed(device: str, prop: str, value: Any) -> None:
        if (device, prop, str(value)) == ("Shutter", "State", "0"):
            raise RuntimeError("shutter jammed open")
        real_set(device, prop, value)

    def drive_offline(*args: Any) -> None:
        raise RuntimeError("Z: controller offline")

    core.setProperty = shutter_jammed  # type: ignore[method-assign,assignment]
    core.setPosition = drive_offline  # type: ignore[method-assign,assignment]
    seen: list[dict[tuple[str, str], tuple[Any, str]]] = []
    core.mda.events.frameReady.connect(
        lambda image, event, meta: seen.append(engine.property_errors))
    core.mda.run([
        useq.MDAEvent(properties=[("Shutter", "State", "0"), ("Z", "Position", 3.0)]),
        useq.MDAEvent(properties=[("Shutter", "State", "1")]),
        useq.MDAEvent(),
    ])
    assert seen == [{("Shutter", "State"): ("0", "shutter jammed open"),
                     ("Z", "Position"): (3.0, "Z: controller offline")}, {}, {}]
