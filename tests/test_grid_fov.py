"""MicroscopeSource on the real core: grid plans step by one camera field; a stop waits for
the snap in progress."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import useq
from pymmcore_plus import CMMCorePlus

from livemask.acquisition.core import close_core, open_core
from livemask.acquisition.sequence import iter_events, with_field_of_view
from livemask.acquisition.simulated import SIMULATED_CFG
from livemask.acquisition.simulated.world import configure_world
from livemask.acquisition.source import MicroscopeSource, RawFrame

CFG = SIMULATED_CFG


@pytest.fixture
def core() -> Iterator[CMMCorePlus]:
    configure_world(seed=3, sensor_shape=(64, 96))
    mmc = open_core(CFG)
    yield mmc
    close_core(mmc)


def _run(core: CMMCorePlus, sequence: dict[str, Any]) -> tuple[list[RawFrame], str | None]:
    """Run ``sequence`` through a MicroscopeSource as the service does (the camera's field
    filled in first); frames and error."""
    frames: list[RawFrame] = []
    ended = threading.Event()
    result: list[str | None] = []
    source = MicroscopeSource(core, frames.append)
    try:
        seq = with_field_of_view(useq.MDASequence.model_validate(sequence),
                                 source.field_of_view())
        source.start(iter_events(seq), mode="free-run",
                     on_done=lambda error: (result.append(error), ended.set()))
        assert ended.wait(30), "the acquisition did not end"
    finally:
        source.stop()
        core.mda.events.frameReady.disconnect(source._frame_ready)
    return frames, result[0]


def _field_um(core: CMMCorePlus) -> tuple[float, float]:
    px = core.getPixelSizeUm()
    assert px > 0
    return core.getImageWidth() * px, core.getImageHeight() * px


def test_tiles_of_a_grid_without_fov_are_one_camera_field_apart(core: CMMCorePlus) -> None:
    width, height = _field_um(core)
    assert width != pytest.approx(height)  # a 96 x 64 px camera: x and y told apart
    frames, error = _run(core, {
        "grid_plan": {"rows": 2, "columns": 2, "mode": "row_wise"},
        "stage_positions": [{"x": 100.0, "y": 50.0, "z": 0.0}],
    })
    assert error is None
    xs = sorted({f.event.x_pos for f in frames})
    ys = sorted({f.event.y_pos for f in frames})
    # before: useq's 1 µm fallback put the tiles at 99.5 and 100.5
    assert xs == pytest.approx([100 - width / 2, 100 + width / 2])
    assert ys == pytest.approx([50 - height / 2, 50 + height / 2])


def test_a_positions_own_grid_gets_the_camera_field_too(core: CMMCorePlus) -> None:
    width, _ = _field_um(core)
    frames, error = _run(core, {
        "stage_positions": [
            {"x": 0, "y": 0, "z": 0},
            {"x": 50, "y": 20, "z": 0, "sequence": {"grid_plan": {"rows": 1, "columns": 2}}},
        ],
    })
    assert error is None
    assert [f.event.x_pos for f in frames] == pytest.approx([0, 50 - width / 2, 50 + width / 2])


def test_a_given_fov_is_kept(core: CMMCorePlus) -> None:
    _, height = _field_um(core)
    frames, error = _run(core, {
        "grid_plan": {"rows": 2, "columns": 1, "fov_width": 10, "mode": "row_wise"},
    })
    assert error is None
    ys = sorted(f.event.y_pos for f in frames)
    assert ys[1] - ys[0] == pytest.approx(height)  # the missing one from the camera
    frames, error = _run(core, {
        "grid_plan": {"rows": 1, "columns": 2, "fov_width": 10, "fov_height": 10},
    })
    assert error is None
    assert sorted(f.event.x_pos for f in frames) == pytest.approx([-5, 5])


def test_a_grid_without_fov_on_a_core_without_pixel_size_is_an_error(
    core: CMMCorePlus,
) -> None:
    for preset in core.getAvailablePixelSizeConfigs():
        core.deletePixelSizeConfig(preset)
    assert core.getPixelSizeUm() == 0
    with pytest.raises(ValueError, match=r"fov_width.*PixelSize_um"):
        _run(core, {"grid_plan": {"rows": 1, "columns": 2}})
    # a grid that gives its field runs
    frames, error = _run(core, {"grid_plan": {"rows": 1, "columns": 2, "fov_width": 8,
                                              "fov_height": 8}})
    assert error is None
    assert sorted(f.event.x_pos for f in frames) == pytest.approx([-4, 4])


def test_the_field_sizes_grids_sized_by_it() -> None:
    # a grid from edges has as many tiles as the field needs to cover it
    seq = useq.MDASequence(grid_plan={"top": 0, "left": 0, "bottom": -100, "right": 300})
    filled = with_field_of_view(seq, (100.0, 50.0))
    assert seq.grid_plan is not None and seq.grid_plan.fov_width is None  # not changed
    events = list(iter_events(filled))
    assert len(events) == len(list(filled)) == 3 * 2
    assert sorted({e.x_pos for e in events}) == pytest.approx([50, 150, 250])
    # without a field filled in (a replay, a test) useq's own 1 µm is kept
    assert len(list(iter_events(seq))) == len(list(seq))


async def test_the_service_steps_a_grid_by_the_cameras_field() -> None:
    """End to end: before, the tiles of a grid without fov_width were 1 µm apart."""
    from livemask.service.app import Service
    from tests.conftest import make_config
    from tests.test_service import collect_run

    cfg = make_config(acquisition={"mode": "synchronized", "sequence": {
        "grid_plan": {"rows": 1, "columns": 2},
        "stage_positions": [{"x": 100.0, "y": 0.0, "z": 0.0}]}})
    async with Service(cfg) as svc:
        got = await collect_run(svc, ("measurements", "event"))
        source = svc.source
        assert isinstance(source, MicroscopeSource)
        field = source.field_of_view()
        started = [e.header for e in got["event"] if e.header["kind"] == "acquisition_started"]
    assert field is not None
    xs = sorted(m.header["position"]["x_um"] for m in got["measurements"])
    assert xs == pytest.approx([100 - field[0] / 2, 100 + field[0] / 2])
    assert started[0]["sequence"]["grid_plan"]["fov_width"] == pytest.approx(field[0])


async def test_a_grid_the_field_cannot_size_is_refused_when_the_run_starts() -> None:
    from livemask.errors import ConfigError
    from livemask.service.app import Service
    from tests.conftest import make_config

    cfg = make_config(acquisition={"autostart": False})
    async with Service(cfg) as svc:
        source = svc.source
        assert isinstance(source, MicroscopeSource)
        for preset in source.core.getAvailablePixelSizeConfigs():
            source.core.deletePixelSizeConfig(preset)
        seq = useq.MDASequence(grid_plan={"rows": 1, "columns": 2})
        with pytest.raises(ConfigError, match=r"fov_width.*PixelSize_um"):
            svc.start_acquisition(seq)
        assert not svc.acquiring


async def test_a_grid_the_field_makes_too_large_is_refused_when_the_run_starts() -> None:
    """The cap on events per time point was checked only on the runner thread for a grid
    sized by the camera's field: `start` said started, then the run failed (review)."""
    from livemask.errors import ConfigError
    from livemask.service.app import Service
    from tests.conftest import make_config

    cfg = make_config(acquisition={"autostart": False})
    async with Service(cfg) as svc:
        seq = useq.MDASequence(grid_plan={"top": 0, "left": 0, "bottom": -400_000,
                                          "right": 400_000})
        with pytest.raises(ConfigError, match=r"events per time point \(sequence.grid_plan"):
            svc.start_acquisition(seq)
        assert not svc.acquiring


def test_a_stop_waits_for_the_first_long_snap_of_a_run(core: CMMCorePlus) -> None:
    """The wait took the last frame's exposure (none yet: 0), so a run's first 2.5 s snap
    was taken for a hung runner (`still_running`, "stuck" at close; control hunt)."""
    from livemask.acquisition.simulated.world import get_world

    get_world().realtime = True  # a snap lasts its exposure
    ended = threading.Event()
    source = MicroscopeSource(core, lambda frame: None)
    try:
        events = [useq.MDAEvent(exposure=2500.0, index={"t": t}) for t in range(3)]
        source.start(iter(events), mode="free-run", on_done=lambda error: ended.set())
        deadline = time.monotonic() + 10
        while source._feed is None or source._feed.issued == 0:  # the snap has begun
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        source.stop(timeout_s=1.0)
        assert not source.running  # joined: it waited for the snap, not 1 s
        assert not source._stuck
    finally:
        get_world().realtime = False
        source.stop()
        core.mda.events.frameReady.disconnect(source._frame_ready)
