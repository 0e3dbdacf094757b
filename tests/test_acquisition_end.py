"""acquisition_finished follows the acquisition's last frames through the pipeline."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from livemask.client import AsyncSubscriber, ControlClient
from livemask.service.app import Service
from tests.conftest import make_config

FRAME_TOPICS = ("frame", "labels", "measurements")


async def control(svc: Service, cmd: str, **args: Any) -> Any:
    """One control request from a worker thread (the client is synchronous)."""

    def _call() -> Any:
        with ControlClient(svc.control.bound_address, timeout_s=3.0, retries=1) as client:
            return client.request(cmd, **args)

    return await asyncio.to_thread(_call)


def slow_model(svc: Service, delay_s: float, gate: threading.Event | None = None) -> None:
    """Make each inference take ``delay_s`` more (and wait for ``gate``, if given)."""
    segmenter = svc.pipeline.segmenter
    real = segmenter.infer

    def slow(image: np.ndarray) -> Any:
        if gate is not None:
            gate.wait(30)
        time.sleep(delay_s)
        return real(image)

    segmenter.infer = slow  # type: ignore[method-assign]


async def watch(
    svc: Service, begin: Callable[[], Any], finished: int = 1, timeout_s: float = 20
) -> list[tuple[str, dict[str, Any]]]:
    """(topic, header) of the frame topics and events in the order they arrive, from
    ``begin()`` until ``finished`` acquisition_finished events and 0.5 s more."""
    got: list[tuple[str, dict[str, Any]]] = []
    async with AsyncSubscriber(svc.publisher.bound_address, (*FRAME_TOPICS, "event")) as sub:
        await asyncio.sleep(0.3)  # let the subscription reach the publisher (slow joiner)
        result = begin()
        if asyncio.iscoroutine(result):
            await result
        deadline = time.monotonic() + timeout_s
        until: float | None = None
        while time.monotonic() < (until or deadline):
            msg = await sub.recv(timeout_s=0.05)
            if msg is None:
                continue
            got.append((msg.topic, msg.header))
            if msg.topic == "event" and msg.header["kind"] == "acquisition_finished":
                finished -= 1
                if finished == 0:
                    until = time.monotonic() + 0.5
    assert finished == 0, "the acquisition was not reported finished"
    return got


def kinds(got: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The arrival order: event kinds, and frame topics as 'topic:acquisition'."""
    return [h["kind"] if t == "event" else f"{t}:{h['acquisition']}" for t, h in got]


@pytest.mark.parametrize("mode", ["pipelined", "free-run"])
async def test_acquisition_finished_comes_after_the_last_frames(mode: str) -> None:
    """Before, the runner's end published acquisition_finished at once: the last 1-3
    frames, labels and measurements of the run came after it (and status said idle)."""
    cfg = make_config(acquisition={
        "mode": mode, "sequence": {"time_plan": {"interval": 0.0, "loops": 4}}})
    async with Service(cfg) as svc:
        slow_model(svc, 0.25)
        states: list[tuple[str, bool]] = []
        real_event = svc._event

        def event(kind: str, detail: dict[str, Any]) -> None:
            if kind == "acquisition_finished":
                states.append((svc.state, svc.pipeline.in_flight == 0))
            real_event(kind, detail)

        svc._event = event  # type: ignore[method-assign]
        got = await watch(svc, lambda: svc.start_acquisition(None))
        status = await control(svc, "status")
    order = kinds(got)
    end = order.index("acquisition_finished")
    assert [k for k in order[end:] if k.startswith(FRAME_TOPICS)] == []
    assert order[:end].count("frame:1") == 4  # every frame before it (skipped ones too)
    assert order[:end].count("measurements:1") == status["frames_analysed"]
    assert states == [("idle", True)]
    assert status["state"] == "idle" and status["acquisitions_finished"] == 1


async def test_a_stuck_model_does_not_hold_acquisition_finished_for_ever() -> None:
    """The wait for the last frames is bounded: none through for frame_timeout_s, the end
    is reported with the frames still in flight."""
    cfg = make_config(acquisition={
        "mode": "free-run", "frame_timeout_s": 0.5,
        "sequence": {"time_plan": {"interval": 0.0, "loops": 2}}})
    gate = threading.Event()
    async with Service(cfg) as svc:
        slow_model(svc, 0.0, gate)
        try:
            got = await watch(svc, lambda: svc.start_acquisition(None), timeout_s=10)
            assert svc.pipeline.in_flight > 0  # still stuck
            assert kinds(got).count("acquisition_finished") == 1
            assert svc.state == "idle"
        finally:
            gate.set()


async def test_a_start_while_the_last_frames_go_through_follows_their_end() -> None:
    """A start sent as the runner ends (its frames still in the pipeline) is accepted; the
    earlier acquisition's frames and acquisition_finished come before acquisition_started."""
    cfg = make_config(acquisition={
        "mode": "pipelined", "sequence": {"time_plan": {"interval": 0.0, "loops": 2}}})
    async with Service(cfg) as svc:
        slow_model(svc, 0.25)

        async def run_then_start_again() -> None:
            svc.start_acquisition(None)
            deadline = time.monotonic() + 10
            while svc.acquiring:  # the runner has taken its last event and ended
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            assert svc.pipeline.in_flight > 0 and svc.state == "running"
            assert (await control(svc, "start"))["started"] is True

        got = await watch(svc, run_then_start_again, finished=2)
    order = kinds(got)
    first_end = order.index("acquisition_finished")
    assert order.index("acquisition_started", first_end) > first_end
    assert [k for k in order[first_end:] if k.endswith(":1")] == []
    assert order[:first_end].count("measurements:1") == 2
    assert order.count("measurements:2") == 2
    finished = [h for t, h in got if t == "event" and h["kind"] == "acquisition_finished"]
    assert [h["acquisition"] for h in finished] == [1, 2]
