"""A ``set exposure_ms`` between the time points of a time-lapse takes the next time point,
although the runner took that event (and its planned exposure) before waiting for its start
time: before, the next frame was still taken at the old exposure and only the one after at
the new one (a whole interval late; feedback hunt)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from livemask.client import AsyncSubscriber
from livemask.service.app import Service
from tests.conftest import make_config
from tests.test_acquisition_end import control

INTERVAL_S = 0.8


def _config(mode: str) -> Any:
    return make_config(simulation={"truth": False, "sensor_shape_px": [64, 64]}, acquisition={
        "mode": mode, "autostart": False,
        "sequence": {"time_plan": {"interval": INTERVAL_S, "loops": 4},
                     "channels": [{"config": "DAPI", "exposure": 10.0}]}})


@pytest.mark.parametrize("mode", ["synchronized", "free-run"])
async def test_a_set_between_time_points_takes_the_next_one(mode: str) -> None:
    async with Service(_config(mode)) as svc:
        core = svc.source.core  # type: ignore[union-attr]
        rig: list[float] = []  # the camera's exposure as each frame came
        core.mda.events.frameReady.connect(lambda *_: rig.append(core.getExposure()))
        headers: dict[str, list[dict[str, Any]]] = {"measurements": [], "event": []}
        async with AsyncSubscriber(svc.publisher.bound_address, tuple(headers)) as sub:
            await asyncio.sleep(0.3)  # the subscription reaches the publisher
            assert (await control(svc, "start"))["started"] is True
            deadline = time.monotonic() + 30
            while svc.pipeline.counters.counts["published"] < 2:  # t = 0 and 1
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            # the runner has taken t = 2 and waits for its start time, INTERVAL_S after t = 1's
            assert (await control(svc, "set", exposure_ms=20.0)) == {"exposure_ms": 20.0}
            finished = False
            while not (finished and svc.pipeline.in_flight == 0):
                assert time.monotonic() < deadline, "the acquisition did not finish"
                msg = await sub.recv(timeout_s=0.1)
                if msg is not None:
                    headers[msg.topic].append(msg.header)
                    finished |= (msg.topic == "event"
                                 and msg.header["kind"] == "acquisition_finished")
    assert rig == [pytest.approx(e) for e in (10.0, 10.0, 20.0, 20.0)]
    said = {h["index"]["t"]: h["settings"]["exposure_ms"] for h in headers["measurements"]}
    assert said == {0: 10.0, 1: 10.0, 2: 20.0, 3: 20.0}
    kinds = [h["kind"] for h in headers["event"]]
    assert "settings_mismatch" not in kinds, headers["event"]
