"""A ``set exposure_ms`` that comes while the camera snaps waits for the snap: the frame keeps
the exposure it was taken with (before, pymmcore-plus read the new one back just after the
snap and labelled the frame with it: an auto-exposure client reacting to each frame
mislabelled most of its frames), and a set that lands before the snap is no failed setting."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import useq
from pymmcore_plus import CMMCorePlus

from livemask.acquisition.core import close_core, open_core
from livemask.acquisition.engine import FocusTolerantEngine
from livemask.acquisition.simulated import SIMULATED_CFG
from livemask.acquisition.simulated.devices import SimCamera
from livemask.acquisition.simulated.world import configure_world
from livemask.acquisition.source import MicroscopeSource, RawFrame
from livemask.client import AsyncSubscriber
from livemask.errors import ControlError
from livemask.service.app import Service
from tests.conftest import make_config
from tests.test_acquisition_end import control


@pytest.fixture
def core() -> Iterator[CMMCorePlus]:
    configure_world(seed=3, sensor_shape=(64, 96))
    mmc = open_core(SIMULATED_CFG)
    yield mmc
    close_core(mmc)


class _Run:
    """A MicroscopeSource on ``core`` collecting its frames and mismatches."""

    def __init__(self, core: CMMCorePlus) -> None:
        self.frames: list[RawFrame] = []
        self.mismatches: list[tuple[str, dict[str, Any]]] = []
        self.on_frame: Any = None  # called on the runner thread with each frame
        self.source = MicroscopeSource(
            core, self._frame, on_mismatch=lambda kind, _, off: self.mismatches.append((kind, off)))

    def _frame(self, frame: RawFrame) -> None:
        self.frames.append(frame)
        if self.on_frame is not None:
            self.on_frame(frame)

    def run(self, events: list[useq.MDAEvent]) -> list[float | None]:
        """Run ``events`` to the end; the exposure each frame is labelled with."""
        ended = threading.Event()
        try:
            self.source.start(iter(events), mode="free-run", on_done=lambda _: ended.set())
            assert ended.wait(30), "the acquisition did not end"
        finally:
            self.source.stop()
            self.source.core.mda.events.frameReady.disconnect(self.source._frame_ready)
            self.source.core.mda.events.eventStarted.disconnect(self.source._event_started)
        return [f.settings["exposure_ms"] for f in self.frames]


def _events(*exposures: float | None) -> list[useq.MDAEvent]:
    return [useq.MDAEvent.model_validate({"index": {"t": t}, "exposure": e})
            for t, e in enumerate(exposures)]


def test_a_set_right_after_a_snap_waits_for_its_read_back(
    core: CMMCorePlus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the set landed between the snap (10 ms) and pymmcore-plus' read-back, which
    labelled the frame 40 ms and reported a failed setting."""
    run = _Run(core)
    setter: list[threading.Thread] = []
    real_read_back = FocusTolerantEngine.get_frame_metadata

    def read_back(self: FocusTolerantEngine, event: useq.MDAEvent, *a: Any, **kw: Any) -> Any:
        if not setter:  # a client's set comes as the first snap ends
            setter.append(threading.Thread(target=run.source.set_exposure, args=(40.0,)))
            setter[0].start()
            setter[0].join(0.5)  # before: it returned at once; now it waits for the snap
        return real_read_back(self, event, *a, **kw)

    monkeypatch.setattr(FocusTolerantEngine, "get_frame_metadata", read_back)
    run.on_frame = lambda frame: setter[0].join(10)  # the set lands before the next snap
    assert run.run(_events(10.0, None)) == [10.0, 40.0]
    assert run.mismatches == []


def test_an_event_keeps_its_own_exposure_when_a_set_lands_during_its_set_up(
    core: CMMCorePlus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event that sets its own exposure (an ``enqueue``d event's, a feedback action's)
    keeps it: a set that lands between the event's exposure and its snap does not wait for
    the idle camera (no lock through set-ups, moves or autofocus), and the event's exposure
    is set again before its snap. Before, its frame was taken with the set exposure (a
    concurrent client took 21 of 177 enqueued frames at its exposure). A setting that does
    fail (a later event's exposure the camera refuses) is still a mismatch."""
    run = _Run(core)
    real_wait = core.waitForSystem  # the end of each event's set-up, before its snap
    setter: list[threading.Thread] = []

    def wait_for_system() -> None:
        if not setter:
            setter.append(threading.Thread(target=run.source.set_exposure, args=(40.0,)))
            setter[0].start()
            setter[0].join(5)
            assert not setter[0].is_alive(), "the set waited although no snap ran"
        real_wait()

    real_set = SimCamera.set_exposure

    def refuse_25(self: SimCamera, exposure: float) -> None:
        if exposure == 25.0:
            raise ValueError("the camera refuses 25 ms")
        real_set(self, exposure)

    monkeypatch.setattr(core, "waitForSystem", wait_for_system)
    monkeypatch.setattr(SimCamera, "set_exposure", refuse_25)
    assert run.run(_events(10.0, 25.0)) == [10.0, 10.0]
    assert run.mismatches == [("settings", {"exposure_ms": {"commanded": 25.0, "read": 10.0}})]


def test_a_set_during_an_event_without_its_own_exposure_takes_its_frame(
    core: CMMCorePlus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event that sets no exposure (a planned frame of a plan without channels) is taken
    with a set that lands during its set-up, and says so: the set is not undone."""
    run = _Run(core)
    real_wait = core.waitForSystem
    done: list[None] = []

    def wait_for_system() -> None:
        if not done:
            done.append(None)
            run.source.set_exposure(40.0)
        real_wait()

    monkeypatch.setattr(core, "waitForSystem", wait_for_system)
    assert run.run(_events(None, None)) == [40.0, 40.0]


async def test_a_set_during_a_long_snap_times_out_lands_late_and_labels_truly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The service's path: a set during a long snap is answered with the timeout, lands once
    the snap is read back (``setting_changed`` with ``late``), and only the later frames
    say its exposure. Before, it landed before the read-back: frame 0 said 5 ms."""
    import livemask.service.hardware_calls as hardware_calls

    monkeypatch.setattr(hardware_calls, "HARDWARE_TIMEOUT_S", 0.3)
    seq = {"time_plan": {"interval": 0.0, "loops": 3}}
    cfg = make_config(simulation={"truth": False}, acquisition={"sequence": seq})
    snapping, answered, landed = threading.Event(), threading.Event(), threading.Event()
    real_snap, real_read_back = SimCamera.snap, FocusTolerantEngine.get_frame_metadata

    def snap(self: SimCamera, buffer: Any) -> Any:
        frame = real_snap(self, buffer)
        if not snapping.is_set():  # the first snap lasts until the set was answered
            snapping.set()
            answered.wait(10)
        return frame

    def read_back(self: FocusTolerantEngine, event: useq.MDAEvent, *a: Any, **kw: Any) -> Any:
        if event.index.get("t") == 0:
            landed.wait(0.5)  # before: the late set landed here
        return real_read_back(self, event, *a, **kw)

    monkeypatch.setattr(SimCamera, "snap", snap)
    monkeypatch.setattr(FocusTolerantEngine, "get_frame_metadata", read_back)
    async with Service(cfg) as svc, AsyncSubscriber(
        svc.publisher.bound_address, ("frame", "event")
    ) as sub:
        source = svc.source
        assert isinstance(source, MicroscopeSource)
        real_set = source.set_exposure

        def set_exposure(exposure_ms: float) -> None:
            real_set(exposure_ms)
            landed.set()

        def first_frame_waits_for_the_set(image: Any, event: Any, meta: Any = None) -> None:
            if event.index.get("t") == 0:
                landed.wait(10)

        monkeypatch.setattr(source, "set_exposure", set_exposure)
        await control(svc, "set", exposure_ms=20.0)
        landed.clear()
        source.core.mda.events.frameReady.connect(first_frame_waits_for_the_set)
        try:
            await asyncio.sleep(0.3)  # the subscription reaches the publisher
            await control(svc, "start")
            assert await asyncio.to_thread(snapping.wait, 10), "no snap began"
            with pytest.raises(ControlError, match=r"did not return within 0\.3 s"):
                await control(svc, "set", exposure_ms=5.0)
            answered.set()
            frames, late = await _frames_and_late_sets(sub)
        finally:
            answered.set()
            source.core.mda.events.frameReady.disconnect(first_frame_waits_for_the_set)
    assert frames == [20.0, 5.0, 5.0]
    assert late == [5.0]


async def _frames_and_late_sets(sub: AsyncSubscriber) -> tuple[list[float], list[float]]:
    """The frames' exposures and the late ``setting_changed`` exposures, until the run ends."""
    frames: list[float] = []
    late: list[float] = []
    deadline = time.monotonic() + 30
    while len(frames) < 3 or not late:
        assert time.monotonic() < deadline, (frames, late)
        msg = await sub.recv(timeout_s=0.1)
        if msg is None:
            continue
        if msg.topic == "frame":
            frames.append(msg.header["settings"]["exposure_ms"])
        elif msg.header["kind"] == "setting_changed" and msg.header.get("late"):
            late.append(msg.header["exposure_ms"])
    return frames, late


def test_a_stop_while_frames_flow_ends_the_run_without_an_error(core: CMMCorePlus) -> None:
    """The snap lock's wrapper once delegated with ``yield from`` to a list: the runner's
    ``send("cancel")`` on a stop reached the list's iterator, and every stop ended the run
    with ``AttributeError: 'list_iterator' object has no attribute 'send'``."""
    run = _Run(core)
    done: list[BaseException | None] = []
    ended = threading.Event()
    three = threading.Event()
    run.on_frame = lambda _: three.set() if len(run.frames) >= 3 else None
    events = (useq.MDAEvent.model_validate({"index": {"t": t}}) for t in range(100_000))
    run.source.start(events, mode="free-run",
                     on_done=lambda error: (done.append(error), ended.set()))
    try:
        assert three.wait(30), "no frames came"
        run.source.stop()
        assert ended.wait(30), "the acquisition did not end"
    finally:
        run.source.stop()
    assert done == [None]


async def test_a_stop_is_tried_while_earlier_device_calls_are_stuck() -> None:
    """Sets that wait for a long snap are given up on after their timeout and count as
    stuck calls; at four of them every call was refused, ``stop`` included, so a stop
    during a long exposure did nothing. A call that bounds its own wait (``bounded``) is
    tried."""
    from livemask.errors import HardwareTimeout
    from livemask.service.hardware_calls import MAX_STUCK_CALLS, call_hardware

    release = threading.Event()
    try:
        for _ in range(MAX_STUCK_CALLS):
            with pytest.raises(HardwareTimeout, match="did not return"):
                await call_hardware(release.wait, 30, what="a set", timeout_s=0.05)
        with pytest.raises(HardwareTimeout, match="not tried"):
            await call_hardware(lambda: "set", what="another set")
        assert await call_hardware(lambda: "stopped", what="a stop", bounded=True) == "stopped"
    finally:
        release.set()
