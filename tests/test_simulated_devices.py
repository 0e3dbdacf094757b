"""The simulated microscope through a real pymmcore-plus UniMMCore and the packaged .cfg."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import useq
from pymmcore_plus import CMMCorePlus
from pymmcore_plus.experimental.unicore import UniMMCore
from scipy import ndimage

from livemask.acquisition.core import close_core, describe_core, open_core
from livemask.acquisition.simulated import SIMULATED_CFG
from livemask.acquisition.simulated.devices import SimZStage
from livemask.acquisition.simulated.world import SimulatedWorld, configure_world, get_world
from livemask.errors import AcquisitionError, ConfigError

CFG = SIMULATED_CFG
PIXEL_UM = 0.65
OFFSET_ADU = 100.0

OpenSim = Callable[..., tuple[UniMMCore, SimulatedWorld]]


@pytest.fixture
def open_sim() -> Iterator[OpenSim]:
    """Factory: configure a fresh world (keyword arguments), then load the simulated cfg."""
    cores: list[CMMCorePlus] = []

    def _open(**world_kwargs: Any) -> tuple[UniMMCore, SimulatedWorld]:
        world = configure_world(**{"seed": 3, **world_kwargs})
        core = open_core(CFG)
        cores.append(core)
        assert isinstance(core, UniMMCore)
        return core, world

    yield _open
    for core in cores:
        close_core(core)


@pytest.fixture
def sim(open_sim: OpenSim) -> tuple[UniMMCore, SimulatedWorld]:
    return open_sim()


@pytest.fixture
def static_sim(open_sim: OpenSim) -> tuple[UniMMCore, SimulatedWorld]:
    """Sample time frozen (steps_per_frame=0): frames differ only by noise and settings."""
    return open_sim(steps_per_frame=0)


def _snap(core: CMMCorePlus) -> np.ndarray:
    core.snapImage()
    return core.getImage()


def _truth(world: SimulatedWorld, image: np.ndarray) -> np.ndarray:
    labels = world.truth_for(image)
    assert labels is not None
    return labels


def _band_energy(image: np.ndarray) -> float:
    image = image.astype(np.float64)
    band = ndimage.gaussian_filter(image, 1) - ndimage.gaussian_filter(image, 3)
    return float(np.mean(band**2))


# ------------------------------------------------------------------ loading


def test_cfg_loads_into_unicore(sim: tuple[UniMMCore, SimulatedWorld]) -> None:
    core, _ = sim
    info = describe_core(core)
    assert info["core"] == "UniMMCore"
    assert info["camera"] == "Camera"
    assert info["image_shape"] == [512, 512]
    assert info["pixel_size_um"] == pytest.approx(PIXEL_UM)
    assert (info["xy_stage"], info["focus"], info["shutter"]) == ("XY", "Z", "Shutter")
    assert info["channel_group"] == "Channel"
    assert info["channels"] == ["DAPI", "GFP"]
    assert info["channel"] == "DAPI"
    assert info["auto_shutter"] is False and core.getShutterOpen()
    assert set(info["python_devices"]) == {"Camera", "XY", "Z", "Shutter", "Filter"}
    assert core.getPixelSizeAffine() == pytest.approx((PIXEL_UM, 0, 0, 0, PIXEL_UM, 0))


class _SettlingStage(SimZStage):
    """A focus drive that reports busy for its first ``busy_polls`` busy() calls."""

    def __init__(self, busy_polls: int) -> None:
        super().__init__()
        self.polls = 0
        self.busy_polls = busy_polls

    def busy(self) -> bool:
        self.polls += 1
        return self.polls <= self.busy_polls


def test_wait_for_system_waits_for_busy_python_devices_without_threads(
    sim: tuple[UniMMCore, SimulatedWorld], monkeypatch: pytest.MonkeyPatch
) -> None:
    core, _ = sim
    stage = _SettlingStage(busy_polls=3)
    core.loadPyDevice("Settling", stage)
    core.initializeDevice("Settling")
    started: list[threading.Thread] = []
    real_start = threading.Thread.start

    def counting_start(self: threading.Thread) -> None:
        started.append(self)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    core.waitForSystem()  # the MDA engine calls this before every event
    assert stage.polls == 4  # asked until it settled
    assert started == []  # pymmcore-plus 0.18 starts a thread pool here on every call


def test_missing_cfg_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.cfg"
    with pytest.raises(ConfigError, match=r"nope\.cfg.*hardware\.config_file"):
        open_core(missing)


def test_unknown_core_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"hardware\.core"):
        open_core(CFG, core="pycore")  # type: ignore[arg-type]


def test_bad_python_device_is_an_acquisition_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.cfg"
    cfg.write_text("#py pyDevice,Camera,livemask.no_such_module,SimCamera\n")
    with pytest.raises(AcquisitionError, match=r"no_such_module.*check hardware\.config_file"):
        open_core(cfg)


def test_a_colour_camera_is_refused_with_what_to_change(monkeypatch: pytest.MonkeyPatch) -> None:
    from livemask.acquisition import core as core_module

    class ColourCameraCore(core_module.PythonDeviceCore):
        """The simulated rig, its camera reporting RGBA images as a colour camera does."""

        def getNumberOfComponents(self) -> int:
            return 4

    monkeypatch.setattr(core_module, "PythonDeviceCore", ColourCameraCore)
    before = set(core_module._OPEN_CORES)
    with pytest.raises(AcquisitionError, match=r"'Camera' delivers 4-component \(colour\).*"
                       r"PixelType property\) in hardware\.config_file"):
        open_core(CFG)
    assert set(core_module._OPEN_CORES) == before  # the refused core was closed again


def test_missing_cpp_adapter_is_an_acquisition_error(tmp_path: Path) -> None:
    cfg = tmp_path / "rig.cfg"
    cfg.write_text("Device,Camera,NoSuchAdapterLibrary,DCam\nProperty,Core,Initialize,1\n")
    with pytest.raises(AcquisitionError, match=r"check hardware\.config_file"):
        open_core(cfg)


def test_auto_picks_cmmcore_without_py_lines(tmp_path: Path) -> None:
    from livemask.acquisition.core import _choose_kind

    cfg = tmp_path / "rig.cfg"
    cfg.write_text("Device,Camera,DemoCamera,DCam\n")
    assert _choose_kind(cfg, "auto") == "cmmcore"
    assert _choose_kind(CFG, "auto") == "unicore"


def test_a_rig_without_camera_is_refused(tmp_path: Path) -> None:
    from livemask.acquisition import core as core_module

    cfg = tmp_path / "empty.cfg"
    cfg.write_text("# a rig without devices\n")
    before = set(core_module._OPEN_CORES)
    # before: it opened, and each event of an acquisition "ran" without a frame, the only
    # trace a pymmcore-plus warning
    with pytest.raises(AcquisitionError, match=r"empty\.cfg.*sets no camera.*Core,Camera"):
        open_core(cfg)
    assert set(core_module._OPEN_CORES) == before


# ------------------------------------------------------------------ camera


def test_snap_shape_and_dtype(sim: tuple[UniMMCore, SimulatedWorld]) -> None:
    core, world = sim
    image = _snap(core)
    assert image.shape == (512, 512) == world.sensor_shape
    assert image.dtype == np.uint16
    assert (core.getImageHeight(), core.getImageWidth(), core.getBytesPerPixel()) == (512, 512, 2)
    assert image.mean() > OFFSET_ADU + 5


def test_exposure_property(static_sim: tuple[UniMMCore, SimulatedWorld]) -> None:
    core, _ = static_sim
    core.setProperty("Camera", "Exposure", "20")
    assert core.getExposure() == pytest.approx(20.0)
    short = _snap(core).mean()
    core.setExposure(40.0)
    assert float(core.getProperty("Camera", "Exposure")) == pytest.approx(40.0)
    long = _snap(core).mean()
    assert (long - OFFSET_ADU) / (short - OFFSET_ADU) == pytest.approx(2.0, rel=0.05)
    with pytest.raises(Exception, match="range"):
        core.setProperty("Camera", "Exposure", "-1")


def test_xy_move_shifts_the_image(static_sim: tuple[UniMMCore, SimulatedWorld]) -> None:
    core, world = static_sim
    core.setXYPosition(0.0, 0.0)
    before = _truth(world, _snap(core))
    dx_px, dy_px = 40, 24
    core.setXYPosition(dx_px * PIXEL_UM, dy_px * PIXEL_UM)
    assert core.getXYPosition() == pytest.approx((dx_px * PIXEL_UM, dy_px * PIXEL_UM))
    after = _truth(world, _snap(core))
    # +x / +y on the stage move the content left / up by the move in pixels
    same = after[: 512 - dy_px, : 512 - dx_px] == before[dy_px:, dx_px:]
    assert same.mean() > 0.995
    assert not np.array_equal(after, before)


def test_xy_origin_zeroes_coordinates_without_moving(
    static_sim: tuple[UniMMCore, SimulatedWorld],
) -> None:
    core, world = static_sim
    core.setXYPosition(100.0, -50.0)
    core.setOriginXY()
    assert core.getXYPosition() == pytest.approx((0.0, 0.0))
    assert world.xy_um == pytest.approx((100.0, -50.0))
    core.setXYPosition(10.0, 10.0)
    assert world.xy_um == pytest.approx((110.0, -40.0))


def test_z_defocus_blurs(static_sim: tuple[UniMMCore, SimulatedWorld]) -> None:
    core, world = static_sim
    core.setPosition(0.0)
    sharp = _snap(core)
    sharp_truth = _truth(world, sharp)
    core.setPosition(5.0)
    assert core.getPosition() == pytest.approx(5.0)
    blurred = _snap(core)
    record = world.truth_record_for(blurred)
    assert record is not None and record.defocus_um == pytest.approx(5.0)
    np.testing.assert_array_equal(record.labels, sharp_truth)
    assert _band_energy(blurred) < 0.3 * _band_energy(sharp)


def test_closed_shutter_gives_a_dark_frame(sim: tuple[UniMMCore, SimulatedWorld]) -> None:
    core, world = sim
    core.setShutterOpen(False)
    assert not core.getShutterOpen()
    assert core.getProperty("Shutter", "State") in ("0", 0)
    dark = _snap(core)
    assert float(dark.mean()) == pytest.approx(OFFSET_ADU, abs=1.0)
    assert float(dark.std()) < 5.0  # read noise only
    record = world.truth_record_for(dark)
    assert record is not None and record.light == 0.0
    core.setShutterOpen(True)
    assert _snap(core).mean() > OFFSET_ADU + 5


def test_channel_group_scales_intensity(static_sim: tuple[UniMMCore, SimulatedWorld]) -> None:
    core, world = static_sim
    core.setConfig("Channel", "DAPI")
    dapi = _snap(core).mean() - OFFSET_ADU
    core.setConfig("Channel", "GFP")
    assert core.getCurrentConfig("Channel") == "GFP"
    assert world.channel == "GFP"
    gfp = _snap(core).mean() - OFFSET_ADU
    assert gfp / dapi == pytest.approx(0.3, rel=0.1)
    core.setProperty("Filter", "Label", "Empty")
    assert _snap(core).mean() == pytest.approx(OFFSET_ADU, abs=1.0)


def test_roi_crops_image_and_truth(static_sim: tuple[UniMMCore, SimulatedWorld]) -> None:
    core, world = static_sim
    full_truth = _truth(world, _snap(core))
    core.setROI(10, 20, 100, 50)  # x, y, width, height
    image = _snap(core)
    assert image.shape == (50, 100)
    np.testing.assert_array_equal(_truth(world, image), full_truth[20:70, 10:110])


# ------------------------------------------------------------------ truth


def test_truth_for_get_image(sim: tuple[UniMMCore, SimulatedWorld]) -> None:
    core, world = sim
    image = _snap(core)
    labels = _truth(world, image)
    assert labels.shape == image.shape and labels.dtype == np.int32
    assert labels.max() > 0
    assert not labels.flags.writeable  # shared truth is read-only
    assert world.truth_for(core.getImage()) is labels
    # a copy is found by its fingerprint, a foreign image is not
    assert world.truth_for(image.copy()) is labels
    assert world.truth_for(np.zeros_like(image)) is None


def test_truth_is_not_recorded_when_switched_off(sim: tuple[UniMMCore, SimulatedWorld]) -> None:
    core, world = sim
    world.keep_truth = False  # the service does this when simulation.truth is off
    image = _snap(core)
    assert world.truth_for(image) is None
    world.keep_truth = True
    assert _truth(world, _snap(core)).max() > 0


def test_truth_of_earlier_frames_is_kept(sim: tuple[UniMMCore, SimulatedWorld]) -> None:
    core, world = sim
    first = _snap(core).copy()
    first_truth = _truth(world, first)
    for _ in range(3):
        _snap(core)
    assert world.truth_for(first) is first_truth


def test_sample_time_advances_per_snap(open_sim: OpenSim) -> None:
    core, world = open_sim(steps_per_frame=2)
    steps = []
    for _ in range(3):
        record = world.truth_record_for(_snap(core))
        assert record is not None
        steps.append(record.step)
    assert steps == [2, 4, 6]


def test_same_seed_same_frames(open_sim: OpenSim) -> None:
    core, _ = open_sim(seed=11)
    first = [_snap(core).copy() for _ in range(2)]
    close_core(core)
    core, _ = open_sim(seed=11)
    second = [_snap(core).copy() for _ in range(2)]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ MDA


@pytest.mark.parametrize("interval_s", [0.0, 0.001], ids=["sequenced", "snapped"])
def test_mda_frames_have_truth(sim: tuple[UniMMCore, SimulatedWorld], interval_s: float) -> None:
    """interval 0 runs as one hardware sequence (frames are copies), > 0 as single snaps."""
    core, world = sim
    frames: list[tuple[np.ndarray, np.ndarray | None]] = []

    def on_frame(image: np.ndarray, event: useq.MDAEvent, meta: dict) -> None:
        frames.append((image, world.truth_for(image)))

    core.mda.events.frameReady.connect(on_frame)
    try:
        plan = {"interval": interval_s, "loops": 5}
        core.mda.run(useq.MDASequence.model_validate({"time_plan": plan}))
    finally:
        core.mda.events.frameReady.disconnect(on_frame)
    assert len(frames) == 5
    for image, labels in frames:
        assert labels is not None and labels.shape == image.shape
    assert len({id(labels) for _, labels in frames}) == 5


def test_queue_fed_mda(sim: tuple[UniMMCore, SimulatedWorld]) -> None:
    core, world = sim
    stop = object()
    events: queue.Queue[Any] = queue.Queue()
    records: list[Any] = []

    def on_frame(image: np.ndarray, event: useq.MDAEvent, meta: dict) -> None:
        records.append((event, world.truth_record_for(image)))

    core.mda.events.frameReady.connect(on_frame)
    runner = threading.Thread(target=core.mda.run, args=(iter(events.get, stop),), daemon=True)
    runner.start()
    try:
        positions = [(0.0, 0.0), (65.0, 0.0), (0.0, -32.5), (13.0, 13.0)]
        for i, (x, y) in enumerate(positions):
            channel = "GFP" if i == 3 else "DAPI"
            event = {"index": {"t": i}, "x_pos": x, "y_pos": y, "channel": channel}
            events.put(useq.MDAEvent.model_validate(event))
    finally:
        events.put(stop)
        runner.join(timeout=30)
        core.mda.events.frameReady.disconnect(on_frame)
    assert not runner.is_alive()
    assert len(records) == len(positions)
    for (event, record), (x, y) in zip(records, positions, strict=True):
        assert record is not None
        assert record.stage_xy_um == pytest.approx((x, y))
        assert record.channel == (event.channel.config if event.channel else "DAPI")
    assert records[-1][1].channel == "GFP"


# ------------------------------------------------------------------ world


def test_configure_world_replaces_the_world() -> None:
    first = configure_world(seed=1)
    assert get_world() is first
    second = configure_world(seed=2, sensor_shape=(128, 256))
    assert get_world() is second and second.sensor_shape == (128, 256)


def test_configure_world_rejects_unknown_sample() -> None:
    with pytest.raises(ConfigError, match="marbles"):
        configure_world("marbles")


def test_snap_time(sim: tuple[UniMMCore, SimulatedWorld]) -> None:
    """Measured, not asserted: one 512x512 snap + getImage through the core."""
    core, _ = sim
    _snap(core)
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        _snap(core)
    per_frame_ms = (time.perf_counter() - t0) / n * 1000
    print(f"\nsimulated 512x512 snap through UniMMCore: {per_frame_ms:.1f} ms/frame")


def test_a_python_autofocus_error_does_not_end_the_acquisition(open_sim: OpenSim) -> None:
    """pymmcore-plus goes on after a hardware autofocus that raises RuntimeError (what the
    C++ core raises) but ends the run on anything else, e.g. UniMMCore's TimeoutError."""
    from livemask.acquisition.engine import FocusTolerantEngine

    core, _ = open_sim()
    core.register_mda_engine(FocusTolerantEngine(core))

    def focus_times_out() -> None:
        raise TimeoutError("Wait for device 'AF' timed out after 5000 ms")

    core.getAutoFocusDevice = lambda: "AF"  # type: ignore[method-assign]
    core.enableContinuousFocus = lambda enable: None  # type: ignore[method-assign]
    core.fullFocus = focus_times_out  # type: ignore[method-assign]
    frames: list[useq.MDAEvent] = []
    core.mda.events.frameReady.connect(lambda image, event, meta: frames.append(event))
    events = [
        useq.MDAEvent(index={"t": 0}),
        useq.MDAEvent(index={"t": 1}, action=useq.HardwareAutofocus(max_retries=1)),
        useq.MDAEvent(index={"t": 1}),
    ]
    core.mda.run(events)
    assert [e.index["t"] for e in frames] == [0, 1]


def test_opening_the_simulated_rig_logs_no_missing_micro_manager_error() -> None:
    """Python devices need no Micro-Manager; pymmcore-plus still logged an ERROR telling the
    user to run `mmcore install` to anyone who opened the simulated rig (docs check)."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    mm = logging.getLogger("pymmcore-plus")
    mm.addHandler(handler)
    try:
        core = open_core(CFG)
        close_core(core)
    finally:
        mm.removeHandler(handler)
    assert not [r for r in records if "Micro-Manager installation" in r.getMessage()]


def test_a_z_drive_failing_at_every_event_warns_at_1_10_100_times(
    open_sim: OpenSim, caplog: pytest.LogCaptureFixture
) -> None:
    """A warning per event (about 1.2 GB of log over a week at 10 frames/s; long-run hunt)."""
    import logging

    from livemask.acquisition.engine import FocusTolerantEngine

    core, _ = open_sim()
    engine = FocusTolerantEngine(core)
    core.register_mda_engine(engine)

    def stuck(*args: object) -> None:
        raise RuntimeError("Z drive does not answer")

    core.setZPosition = stuck  # type: ignore[method-assign]
    core.setPosition = stuck  # type: ignore[method-assign]
    frames: list[useq.MDAEvent] = []
    core.mda.events.frameReady.connect(lambda image, event, meta: frames.append(event))
    with caplog.at_level(logging.WARNING, logger="livemask"):
        core.mda.run([useq.MDAEvent(index={"t": t}, z_pos=float(t)) for t in range(12)])
    assert len(frames) == 12 and engine.z_failures == 12
    assert caplog.text.count("Failed to set Z position") == 2  # the 1st and the 10th
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="livemask"):  # a new acquisition: anew
        core.mda.run([useq.MDAEvent(index={"t": 0}, z_pos=1.0)])
    assert engine.z_failures == 1 and caplog.text.count("Failed to set Z position") == 1


def test_z_positions_without_a_focus_device_are_failed_moves(
    open_sim: OpenSim, caplog: pytest.LogCaptureFixture
) -> None:
    """pymmcore-plus skips the move without a word when no focus device is set: a z-stack
    gave five copies of one plane published at z -2..2 (hardware hunt)."""
    import logging

    from livemask.acquisition.engine import FocusTolerantEngine

    core, _ = open_sim()
    engine = FocusTolerantEngine(core)
    core.register_mda_engine(engine)
    core.getFocusDevice = lambda: ""  # type: ignore[method-assign]  # (a .cfg without one)
    failed: list[bool] = []
    core.mda.events.frameReady.connect(lambda image, event, meta: failed.append(engine.z_failed))
    with caplog.at_level(logging.WARNING, logger="livemask"):
        core.mda.run([useq.MDAEvent(index={"z": i}, z_pos=float(i)) for i in range(3)]
                     + [useq.MDAEvent(index={"t": 1})])
    assert failed == [True, True, True, False]  # a frame without a z position is fine
    assert "no focus device (Core-Focus)" in caplog.text and engine.z_failures == 3


def test_the_engine_sets_the_exposure_only_where_it_changes(open_sim: OpenSim) -> None:
    """pymmcore-plus set the camera's exposure at every event that has one: each frame of a
    sequence whose channel sets one, and a feedback action's frames and the event that
    restores after them, although it was in effect already (on some cameras a set stops and
    re-arms the acquisition); the frames still say what they were taken with."""
    from livemask.acquisition.engine import FocusTolerantEngine

    core, _ = open_sim()
    # (events that hardware sequencing merges set their exposure once anyway)
    core.register_mda_engine(FocusTolerantEngine(core, use_hardware_sequencing=False))
    core.setExposure(5.0)
    real_set = core.setExposure
    sets: list[float] = []

    def counting_set(*args: Any) -> None:
        sets.append(float(args[-1]))
        real_set(*args)

    core.setExposure = counting_set  # type: ignore[method-assign,assignment]
    taken: list[float] = []
    core.mda.events.frameReady.connect(
        lambda image, event, meta: taken.append(float(meta["exposure_ms"])))
    plan = [10.0, 10.0, 10.0, 20.0, 20.0, 10.0]
    core.mda.run([useq.MDAEvent(index={"t": t}, exposure=ms) for t, ms in enumerate(plan)])
    assert sets == [10.0, 20.0, 10.0, 5.0]  # (and 5.0: the state before the run, put back)
    assert taken == plan

    def unreadable() -> float:
        raise RuntimeError("camera does not answer")

    core.getExposure = unreadable  # type: ignore[method-assign]
    sets.clear()
    engine = core.mda.engine
    assert isinstance(engine, FocusTolerantEngine)
    engine.setup_single_event(useq.MDAEvent(exposure=10.0))
    assert sets == [10.0]  # not known to be in effect: set, as before


@pytest.mark.parametrize("sequencing", [False, True])
def test_an_events_exposure_wins_over_its_channel_presets(
    open_sim: OpenSim, sequencing: bool
) -> None:
    """The first version of the check above read the exposure before the channel preset
    was set: a preset that carries an exposure (``Camera,Exposure``) then won over the
    event's own, and every GFP frame was taken at the preset's 40 ms (review)."""
    from livemask.acquisition.engine import FocusTolerantEngine

    core, _ = open_sim()
    core.defineConfig("Channel", "DAPI", "Camera", "Exposure", "20")
    core.defineConfig("Channel", "GFP", "Camera", "Exposure", "40")
    core.register_mda_engine(FocusTolerantEngine(core, use_hardware_sequencing=sequencing))
    taken: list[tuple[str, float]] = []
    core.mda.events.frameReady.connect(
        lambda image, event, meta: taken.append((event.channel.config,
                                                 float(meta["exposure_ms"]))))
    core.mda.run(useq.MDASequence(time_plan={"interval": 0, "loops": 2},
                                  channels=[{"config": "DAPI", "exposure": 50},
                                            {"config": "GFP", "exposure": 50}]))
    assert taken == [("DAPI", 50.0), ("GFP", 50.0)] * 2


@pytest.mark.parametrize("sample", ["grains", "nuclei"])
def test_a_field_past_the_simulated_worlds_edge_is_reported_once(
    sample: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The world wraps at its edges: a 3x3 scan of 2048² tiles showed five tiles twice and
    pooled their grains again, without a word (hunt). Now the first such field warns."""
    import logging

    world = configure_world(sample, seed=1, sensor_shape=(64, 64))
    half_um = (world.sample.params.world_shape_px[1] - 64) * world.pixel_size_um / 2
    with caplog.at_level(logging.WARNING, logger="livemask"):
        for x in (0.0, half_um - 1, -half_um + 1):  # inside: silent
            world.set_xy_um(x, 0.0)
            world.expose(1.0)
        assert "past the edge" not in caplog.text
        for x in (half_um + 50, half_um + 100):
            world.set_xy_um(x, 0.0)
            world.expose(1.0)
    assert caplog.text.count("past the edge of the simulated world") == 1
