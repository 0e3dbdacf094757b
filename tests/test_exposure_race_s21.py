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


def test_a_set_during_the_set_up_of_an_event_with_its_own_exposure_waits_for_its_snap(
    core: CMMCorePlus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event that sets its own exposure (an ``enqueue``d event's, a feedback action's)
    keeps it: a set that comes between the event's exposure and its snap waits for the snap.
    Before, it landed there and the frame was taken with the set exposure (a concurrent
    client took 21 of 177 enqueued frames at its exposure). A setting that does fail (a
    later event's exposure the camera refuses) is still a mismatch."""
    run = _Run(core)
    real_wait = core.waitForSystem  # the end of each event's set-up, before its snap
    setter: list[threading.Thread] = []

    def wait_for_system() -> None:
        if not setter:
            setter.append(threading.Thread(target=run.source.set_exposure, args=(40.0,)))
            setter[0].start()
            setter[0].join(0.3)
            assert setter[0].is_alive(), "the set did not wait for the snap"
        real_wait()

    real_set = SimCamera.set_exposure

    def refuse_25(self: SimCamera, exposure: float) -> None:
        if exposure == 25.0:
            raise ValueError("the camera refuses 25 ms")
        real_set(self, exposure)

    monkeypatch.setattr(core, "waitForSystem", wait_for_system)
    monkeypatch.setattr(SimCamera, "set_exposure", refuse_25)
    run.on_frame = lambda frame: setter[0].join(10)  # the set lands before the next event
    assert run.run(_events(10.0, 25.0)) == [10.0, 40.0]
    assert run.mismatches == [("settings", {"exposure_ms": {"commanded": 25.0, "read": 40.0}})]


def test_a_failed_set_up_releases_the_snap_lock(
    core: CMMCorePlus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A set-up that raises (here: the run's end) must not leave the lock held: a later
    set would wait forever."""
    engine = FocusTolerantEngine(core)

    def broken(*_: Any) -> None:
        raise RuntimeError("stage fault")

    monkeypatch.setattr(engine, "setup_single_event", broken)
    with pytest.raises(RuntimeError, match="stage fault"):
        engine.setup_event(_events(10.0)[0])
    taken = threading.Thread(target=lambda: engine.snap_lock.acquire() and
                             engine.snap_lock.release())
    taken.start()
    taken.join(5)
    assert not taken.is_alive()


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
