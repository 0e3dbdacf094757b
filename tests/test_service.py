"""Integration tests: the real service on loopback sockets with the simulated UniMMCore."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from livemask.analysis.metrics import aggregate, match_instances
from livemask.client import AsyncSubscriber, ControlClient
from livemask.config import ServiceConfig
from livemask.errors import ControlError
from livemask.protocol import Message
from livemask.service import commands
from livemask.service.app import Service
from livemask.transport.control_server import MAX_REQUEST_BYTES
from tests.conftest import make_config

ALL = ("frame", "labels", "measurements", "status", "event", "truth")


@pytest.fixture
async def service(service_config: ServiceConfig) -> AsyncIterator[Service]:
    svc = Service(service_config)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()


async def control(svc: Service, cmd: str, **args: Any) -> Any:
    """Send one control request from a worker thread (the client is synchronous)."""

    def _call() -> Any:
        with ControlClient(svc.control.bound_address, timeout_s=3.0, retries=1) as client:
            return client.request(cmd, **args)

    return await asyncio.to_thread(_call)


async def enqueue_and_watch(
    svc: Service, events: list[dict[str, Any]], timeout_s: float = 20
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Enqueue ``events`` on an idle service; the ``frame`` and ``event`` headers published
    until the acquisition they started has finished (the last event header then)."""
    frames: list[dict[str, Any]] = []
    published: list[dict[str, Any]] = []
    async with AsyncSubscriber(svc.publisher.bound_address, ("frame", "event")) as sub:
        await asyncio.sleep(0.3)  # let the subscription reach the publisher (slow joiner)
        assert (await control(svc, "enqueue", events=events))["started"] is True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = await sub.recv(timeout_s=0.1)
            if msg is None:
                continue
            (frames if msg.topic == "frame" else published).append(msg.header)
            if msg.topic == "event" and msg.header["kind"] == "acquisition_finished":
                break
    return frames, published


async def collect_run(
    svc: Service, topics: tuple[str, ...] = ALL, *, start: bool = True, timeout_s: float = 60
) -> dict[str, list[Message]]:
    """Subscribe, start the configured sequence, and collect until it has finished."""
    got: dict[str, list[Message]] = defaultdict(list)
    async with AsyncSubscriber(svc.publisher.bound_address, topics) as sub:
        await asyncio.sleep(0.3)  # let the subscription reach the publisher (slow joiner)
        if start:
            await control(svc, "start")
        deadline = time.monotonic() + timeout_s
        finished = False
        drain_until: float | None = None
        while time.monotonic() < deadline:
            msg = await sub.recv(timeout_s=0.1)
            if msg is not None:
                got[msg.topic].append(msg)
                finished |= msg.topic == "event" and msg.header["kind"] == "acquisition_finished"
            if drain_until is None and finished and svc.pipeline.in_flight == 0:
                drain_until = time.monotonic() + 0.5  # everything is sent; let it arrive
            if drain_until is not None and time.monotonic() > drain_until:
                break
        assert finished, "acquisition did not finish in time"
    return got


async def test_end_to_end_topics_and_headers(service: Service) -> None:
    got = await collect_run(service)
    frames, labels, meas, truth = (got[t] for t in ("frame", "labels", "measurements", "truth"))
    assert len(frames) == len(labels) == len(meas) == len(truth) == 12
    for topic in ("frame", "labels", "measurements", "truth"):
        seqs = [m.header["seq"] for m in got[topic]]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    for f, lab, m in zip(frames, labels, meas, strict=True):
        assert f.header["v"] == 1 and f.header["frame_id"] == lab.header["frame_id"]
        image = f.arrays["image"]
        assert image.dtype == np.uint16 and image.shape == (512, 512)
        assert lab.arrays["labels"].shape == image.shape
        assert lab.arrays["labels"].dtype == np.int32
        t = m.header["t"]
        assert t["acquired"] <= t["inferred"] <= t["analysed"] <= t["published"]
        assert "t" in m.header["index"]
        assert set(m.header["position"]) == {"x_um", "y_um", "z_um"}
        summary, objects = m.header["summary"], m.header["objects"]
        assert summary["count"] == len(objects) == len(np.unique(lab.arrays["labels"])) - 1
        for o in objects[:5]:
            assert {"label", "area_px", "centroid_yx", "bbox", "mean_intensity"} <= set(o)
    assert [m.header["index"]["t"] for m in meas] == list(range(12))
    status = got["status"][-1].header
    assert status["frames_acquired"] == 12 and status["frames_skipped"] == 0


async def test_live_labels_match_ground_truth(service: Service) -> None:
    got = await collect_run(service, ("labels", "truth", "event"))
    truth = {m.header["frame_id"]: m.arrays["labels"] for m in got["truth"]}
    results = [
        match_instances(truth[m.header["frame_id"]], m.arrays["labels"]) for m in got["labels"]
    ]
    total = aggregate(results)
    assert total.n_true > 500
    assert total.f1 >= 0.8, total


async def test_synchronized_mode_analyses_every_frame() -> None:
    cfg = make_config(acquisition={"mode": "synchronized"})
    async with Service(cfg) as svc:
        got = await collect_run(svc, ("measurements", "frame", "event"))
        assert len(got["measurements"]) == 12
        assert not any(f.header["skipped"] for f in got["frame"])
        # each event was released only after the previous frame was published
        acquired = [m.header["t"]["acquired"] for m in got["measurements"]]
        published = [m.header["t"]["published"] for m in got["measurements"]]
        assert all(a_next >= p for p, a_next in zip(published, acquired[1:], strict=False))


async def test_pipelined_mode_analyses_every_frame_while_the_camera_runs_ahead() -> None:
    cfg = make_config(acquisition={"mode": "pipelined"})
    async with Service(cfg) as svc:
        seg = svc.pipeline.segmenter
        real_predict = seg.predict

        def slow_predict(image: np.ndarray) -> np.ndarray:  # the model is the slow stage
            time.sleep(0.1)
            return real_predict(image)

        seg.predict = slow_predict  # type: ignore[method-assign]
        got = await collect_run(svc, ("measurements", "frame", "event"))
    assert [m.header["frame_id"] for m in got["measurements"]] == list(range(12))
    assert not any(f.header["skipped"] for f in got["frame"])
    t = [m.header["t"] for m in got["measurements"]]
    # the camera acquires the next frame while the model runs (not synchronized) ...
    assert any(nxt["acquired"] < cur["inferred"] for cur, nxt in itertools.pairwise(t))
    # ... but never two frames ahead of it: frame k + 2 waits until the model took k + 1
    assert all(t[k + 2]["acquired"] >= t[k]["inferred"] for k in range(len(t) - 2))


async def test_free_run_skips_frames_when_analysis_is_slow(service: Service) -> None:
    await control(service, "set", mode="free-run")
    seg = service.pipeline.segmenter
    real_predict = seg.predict

    def slow_predict(image: np.ndarray) -> np.ndarray:
        time.sleep(0.15)
        return real_predict(image)

    seg.predict = slow_predict  # type: ignore[method-assign]
    got = await collect_run(service, ("frame", "measurements", "event"))
    counts = service.pipeline.counters.snapshot()
    assert counts["frames_acquired"] == 12
    assert counts["frames_skipped"] > 0
    assert counts["frames_analysed"] + counts["frames_skipped"] == 12
    skipped = [f for f in got["frame"] if f.header["skipped"]]
    assert len(skipped) == counts["frames_skipped"]
    assert len(got["measurements"]) == counts["frames_analysed"]


async def test_model_failure_is_reported_and_service_goes_on(service: Service) -> None:
    seg = service.pipeline.segmenter
    real_predict = seg.predict
    calls = {"n": 0}

    def flaky(image: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("injected model fault")
        return real_predict(image)

    seg.predict = flaky  # type: ignore[method-assign]
    got = await collect_run(service, ("measurements", "event"))
    failed = [e for e in got["event"] if e.header["kind"] == "frame_failed"]
    assert failed and "injected model fault" in failed[0].header["detail"]
    assert len(got["measurements"]) + len(failed) == 12
    status = await control(service, "status")
    assert status["frames_failed"] == len(failed)
    last = failed[-1].header
    assert status["last_frame_error"] == f"frame {last['frame_id']}: {last['detail']}"


async def test_subscriber_that_stops_reading_does_not_stall(service: Service) -> None:
    ctx = zmq.Context.instance()
    stalled = ctx.socket(zmq.SUB)
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.setsockopt(zmq.RCVHWM, 2)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.connect(service.publisher.bound_address)
    try:
        service.config.acquisition.sequence = {"time_plan": {"interval": 0, "loops": 60}}
        got = await collect_run(service, ("measurements", "event"))
        assert len(got["measurements"]) == 60
        assert service.pipeline.counters.snapshot()["frames_published"] == 60
    finally:
        stalled.close(linger=0)


async def test_enqueue_snapshot_and_set(service: Service) -> None:
    service.config.acquisition.sequence = {"time_plan": {"interval": 0.05, "loops": 30}}
    async with AsyncSubscriber(service.publisher.bound_address, ("measurements",)) as sub:
        await asyncio.sleep(0.3)
        await control(service, "start")
        reply = await control(service, "enqueue", events=[{"x_pos": 100.0, "y_pos": 50.0}])
        assert reply == {"enqueued": 1, "started": False}
        changed = await control(service, "set", exposure_ms=20.0, mode="synchronized")
        assert changed == {"exposure_ms": 20.0, "mode": "synchronized"}
        moved = None
        for _ in range(200):
            msg = await sub.recv(timeout_s=1.0)
            assert msg is not None
            if msg.header["position"]["x_um"] == 100.0:
                moved = msg
                break
        assert moved is not None, "the enqueued event never produced a frame"
    snap = await control(service, "snapshot", arrays=True)
    assert snap["latest"]["measurements"]["frame_id"] >= moved.header["frame_id"]
    assert snap["next_seq"]["measurements"] >= 1
    assert snap["arrays"]["labels"]["dtype"] == "<i4"
    assert snap["status"]["mode"] == "synchronized"
    await control(service, "stop")
    assert (await control(service, "status"))["acquiring"] is False


async def test_snapshot_arrays_are_the_last_frame_encoded_once(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded: list[tuple[int, ...]] = []
    real_encode = commands._encode_array

    def counting_encode(array: np.ndarray) -> dict[str, Any]:
        encoded.append(array.shape)
        return real_encode(array)

    monkeypatch.setattr(commands, "_encode_array", counting_encode)
    service.config.acquisition.sequence = {"time_plan": {"interval": 0, "loops": 3}}
    await control(service, "start")
    counts = service.pipeline.counters.snapshot
    while (await control(service, "status"))["acquiring"] or counts()["frames_acquired"] > sum(
        counts()[f"frames_{k}"] for k in ("analysed", "skipped", "failed")
    ):
        await asyncio.sleep(0.05)
    snaps = [await control(service, "snapshot", arrays=True) for _ in range(3)]
    assert len(encoded) == 2  # image and labels, once for three clients' requests
    last = service.pipeline.last_analysed
    assert last is not None
    for snap in snaps:
        arrays = snap["arrays"]
        assert arrays["frame_id"] == last.frame_id
        for name in ("image", "labels"):
            got = np.frombuffer(
                base64.b64decode(arrays[name]["data_b64"]), dtype=arrays[name]["dtype"]
            ).reshape(arrays[name]["shape"])
            np.testing.assert_array_equal(got, getattr(last, name))
    service.pipeline.last_analysed = replace(last, frame_id=last.frame_id + 1)
    newer = await control(service, "snapshot", arrays=True)  # a new frame is encoded anew
    assert newer["arrays"]["frame_id"] == last.frame_id + 1 and len(encoded) == 4


@pytest.mark.parametrize(
    ("cmd", "args", "code", "needle"),
    [
        ("launch", {}, "unknown_command", "launch"),
        ("set", {"mode": "fast"}, "invalid_args", "mode"),
        ("set", {"exposure_ms": -1}, "invalid_args", "exposure_ms"),
        ("set", {"gain": 2}, "invalid_args", "gain"),
        ("start", {"sequence": {"time_plan": {"interval": "soon"}}}, "invalid_args", "sequence"),
        ("start", {"sequence": {"time_plan": {"interval": -1, "loops": 3}}}, "invalid_args",
         "interval must be >= 0 s"),
        ("enqueue", {"events": []}, "invalid_args", "events"),
        ("enqueue", {"events": [{"x_pos": "left"}]}, "invalid_args", "x_pos"),
        ("enqueue", {"events": [{"x_pos": 1.0}] * 10_001}, "invalid_args", "at most 10000"),
        # useq ignores unknown keys: a typo used to start an empty acquisition, or image at
        # the current stage position instead of the one asked for
        ("start", {"sequence": {"time_pan": {"interval": 0.1, "loops": 5}}}, "invalid_args",
         "sequence.time_pan: unknown field"),
        ("enqueue", {"events": [{"x_pos": 1.0}, {"xpos": 1.0}]}, "invalid_args",
         "events[1].xpos: unknown field"),
        ("set", {"exposure_ms": True}, "invalid_args", "exposure_ms"),
        # pydantic's lax booleans: "no" and "false" read as false, "yes" and 1 sent megabytes
        ("snapshot", {"arrays": "no"}, "invalid_args", "arrays"),
        ("snapshot", {"arrays": 1}, "invalid_args", "arrays"),
        ("rules", {"enabled": {"x": "off"}}, "invalid_args", "enabled.x"),
        ("set", {"exposure_ms": "20"}, "invalid_args", "exposure_ms"),
        ("set", {"exposure_ms": 20_000}, "invalid_args", "refused exposure 20000 ms"),
        # pymmcore-plus would warn and acquire with the current preset: the wrong channel
        ("start", {"sequence": {"channels": ["NOPE"]}}, "invalid_args",
         "channel 'NOPE' is not a preset of group 'Channel' (presets: DAPI, GFP)"),
        ("enqueue", {"events": [{"channel": {"config": "GFP", "group": "Filters"}}]},
         "invalid_args", "channel group 'Filters' is not defined"),
        ("enqueue", {"events": [{"exposure": 1e6}]}, "invalid_args",
         "exposure 1e+06 ms is outside the range of camera 'Camera': 0..10000 ms"),
        ("start", {"sequence": {"channels": [{"config": "GFP", "exposure": 20000}]}},
         "invalid_args", "exposure 20000 ms is outside"),
        # pymmcore-plus runs a setup event only for a whole MDASequence: it was ignored
        ("start", {"sequence": {"setup": {"exposure": 50.0}, "time_plan": {"interval": 0,
                                                                            "loops": 2}}},
         "invalid_args", "sequence.setup is not run by livemask"),
        # pymmcore-plus would warn and acquire with the old value
        ("enqueue", {"events": [{"properties": [["Cam", "Exposure", 5]]}]}, "invalid_args",
         "property 'Exposure' of device 'Cam': no such device is loaded (devices: Camera, "),
        ("enqueue", {"events": [{"properties": [["Filter", "Lable", "GFP"]]}]},
         "invalid_args", "device 'Filter' has no property 'Lable' (its properties: Label, "),
        ("enqueue", {"events": [{"properties": [["Camera", "Binning", 2]]}]}, "invalid_args",
         "property 'Binning' of device 'Camera' is read-only"),
        ("enqueue", {"events": [{"properties": [["Filter", "Label", "RFP"]]}]},
         "invalid_args", "'RFP' is not an allowed value of property 'Label' of device "
         "'Filter' (allowed: DAPI, GFP, Empty)"),
        ("enqueue", {"events": [{"properties": [["Camera", "Exposure", 5e4]]}]},
         "invalid_args", "50000.0 is outside the limits of property 'Exposure' of device "
         "'Camera': 0..10000"),
        ("enqueue", {"events": [{"properties": [["Shutter", "State", "open"]]}]},
         "invalid_args", "'open' is outside the limits of property 'State'"),
        # pymmcore-plus only logged the core's error and imaged the old region
        ("enqueue", {"events": [{"roi": [400, 0, 200, 100]}]}, "invalid_args",
         "events[0].roi (offset_x 400, offset_y 0, width 200, height 100) goes beyond the "
         "camera's 512x512"),
        ("enqueue", {"events": [{"roi": [0, 0, 0, 100]}]}, "invalid_args", "is empty"),
        # strings pydantic reads as floats: the acquisition used to die with OverflowError
        ("enqueue", {"events": [{"x_pos": "Infinity", "y_pos": 0}]}, "invalid_args",
         "events[0].x_pos: inf is not a finite number"),
        ("enqueue", {"events": [{"min_start_time": "NaN"}]}, "invalid_args",
         "events[0].min_start_time: nan is not a finite number"),
        ("start", {"sequence": {"stage_positions": [{"x": "-inf", "y": 0}]}}, "invalid_args",
         "stage_positions[0].x: -inf is not a finite number"),
        # a wrong type inside the sequence used to answer `internal` (TypeError)
        ("start", {"sequence": {"time_plan": {"interval": {"a": 1}, "loops": 2}}},
         "invalid_args", "invalid sequence: time_plan: a value has the wrong type or size ("
         "'a' is an invalid keyword argument"),
        # OverflowError named no argument; useq's axis error passed on pydantic's prefix and
        # enum reprs: "axis_order: Value error, ... (<Axis.TIME: 't'>, ...)" (client hunt)
        ("start", {"sequence": {"time_plan": {"interval": {"days": 1e10}, "loops": 1}}},
         "invalid_args", "invalid sequence: time_plan: a value has the wrong type or size"),
        ("start", {"sequence": {"time_plan": {"interval": 0, "loops": 1},
                                "axis_order": "tpxyz"}},
         "invalid_args", "invalid sequence: axis_order: Can only iterate over axes: ('t', 'p', "
         "'g', 'c', 'z')"),
    ],
)
async def test_bad_control_requests_get_error_replies(
    service: Service, cmd: str, args: dict[str, Any], code: str, needle: str
) -> None:
    with pytest.raises(ControlError) as info:
        await control(service, cmd, **args)
    assert info.value.code == code
    assert needle in info.value.message
    assert (await control(service, "status"))["state"] == "idle"


async def test_malformed_json_gets_bad_json_reply(service: Service) -> None:
    def _raw() -> dict[str, Any]:
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 3000)
        sock.connect(service.control.bound_address)
        try:
            sock.send(b"{not json")
            return json.loads(sock.recv())
        finally:
            sock.close(linger=0)

    reply = await asyncio.to_thread(_raw)
    assert reply["ok"] is False and reply["error"]["code"] == "bad_json"
    assert (await control(service, "status"))["state"] == "idle"


async def test_an_oversized_request_is_dropped_and_the_service_goes_on(service: Service) -> None:
    def _send_oversized() -> bytes | None:
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 1000)
        sock.connect(service.control.bound_address)
        try:
            sock.send(b" " * (MAX_REQUEST_BYTES + 1))
            return sock.recv()
        except zmq.Again:
            return None
        finally:
            sock.close(linger=0)

    assert await asyncio.to_thread(_send_oversized) is None  # libzmq cut that peer off
    assert service.control.requests == 0
    assert (await control(service, "status"))["state"] == "idle"


async def test_start_while_running_is_refused(service: Service) -> None:
    service.config.acquisition.sequence = {"time_plan": {"interval": 0.05, "loops": 40}}
    await control(service, "start")
    with pytest.raises(ControlError) as info:
        await control(service, "start")
    assert info.value.code == "invalid_state"
    await control(service, "stop")


@pytest.mark.usefixtures("short_time_walks")
async def test_an_endless_time_lapse_starts_at_once_and_stops(service: Service) -> None:
    # "run until I stop it": useq alone would list 10**12 time points before the first
    # frame (hours, terabytes); the service iterates it in chunks
    endless = {"time_plan": {"interval": 0, "loops": 10**12}}
    async with AsyncSubscriber(service.publisher.bound_address, ("measurements",)) as sub:
        await asyncio.sleep(0.3)  # slow joiner
        reply = await control(service, "start", sequence=endless)
        assert reply == {"started": True, "events": 10**12, "acquisition": 1}
        got = [await sub.recv(timeout_s=10.0) for _ in range(3)]
    assert [m.header["index"]["t"] for m in got if m is not None] == [0, 1, 2]
    assert (await control(service, "stop")) == {"stopped": True, "still_running": False}
    assert (await control(service, "status"))["state"] == "idle"


async def test_missing_model_fails_cleanly_and_frees_the_ports(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livemask.errors import ModelError
    from tests.conftest import free_tcp_address

    pub = free_tcp_address()
    cfg = make_config(model={"path": str(tmp_path / "missing.yaml")},
                      publish={"pub_address": pub})
    opened: list[bool] = []
    with monkeypatch.context() as patch:
        real_open = Service._open_microscope
        patch.setattr(Service, "_open_microscope",
                      lambda svc: opened.append(True) or real_open(svc))
        with pytest.raises(ModelError, match=r"model\.path"):
            async with Service(cfg):
                pass
    assert not opened  # a wrong model fails before the hardware is touched
    # the port is released (zmq closes sockets in its I/O thread: allow it a moment)
    from livemask.errors import ConfigError

    for _ in range(50):
        try:
            async with Service(make_config(publish={"pub_address": pub})) as svc:
                assert svc.publisher.bound_address == pub
            break
        except ConfigError:
            await asyncio.sleep(0.1)
    else:
        pytest.fail(f"{pub} still bound after the failed start")


async def test_a_camera_that_never_delivers_ends_the_acquisition_with_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from livemask.acquisition.simulated.devices import SimCamera

    def broken_snap(self: SimCamera, buffer: Any) -> Any:
        raise RuntimeError("camera not responding")

    monkeypatch.setattr(SimCamera, "snap", broken_snap)
    async with Service(make_config()) as svc:
        got = await collect_run(svc, ("event",))
        status = await control(svc, "status")
    (done,) = [m.header for m in got["event"] if m.header["kind"] == "acquisition_finished"]
    # pymmcore-plus logs each failed snap as a warning and goes on: before, this acquisition
    # "finished" with error null and no frame
    assert done["error"] is not None and "delivered no frame" in done["error"]
    assert "hardware.config_file" in done["error"]
    assert [m for m in got["event"] if m.header["kind"] == "error"]
    assert status["frames_acquired"] == 0 and status["last_error"] == done["error"]


@pytest.mark.parametrize("mode", ["synchronized", "free-run"])
async def test_failed_snaps_are_announced_and_counted(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """pymmcore-plus logs a failed snap and goes on; before, a camera failing every fourth
    snap finished its acquisition with error null and nothing on the wire."""
    from livemask.acquisition.simulated.devices import SimCamera

    snaps = itertools.count()
    real_snap = SimCamera.snap

    def flaky_snap(self: SimCamera, buffer: Any) -> Any:
        if next(snaps) % 4 == 3:
            raise RuntimeError("camera link lost")
        return real_snap(self, buffer)

    monkeypatch.setattr(SimCamera, "snap", flaky_snap)
    async with Service(make_config(acquisition={"mode": mode})) as svc:
        got = await collect_run(svc, ("event",))
        status = await control(svc, "status")
    events = [m.header for m in got["event"]]
    missing = [e["index"]["t"] for e in events if e["kind"] == "frame_missing"]
    assert missing == [3, 7, 11]
    (done,) = [e for e in events if e["kind"] == "acquisition_finished"]
    assert done["frames_missing"] == 3
    assert done["error"] is not None and "3 of 12 imaging event(s)" in done["error"]
    assert status["frames_missing"] == 3 and status["frames_acquired"] == 9


async def test_a_stage_that_failed_to_move_is_reported_and_the_frame_placed_truly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pymmcore-plus logs a failed move and snaps anyway; before, the frame was published
    (and recorded, and fed to feedback) at the commanded position the stage never reached."""
    from livemask.acquisition.simulated.devices import SimXYStage

    def stuck(self: SimXYStage, x: float, y: float) -> None:
        raise RuntimeError("limit switch hit")

    monkeypatch.setattr(SimXYStage, "set_position_um", stuck)
    async with Service(make_config()) as svc:
        frames, events = await enqueue_and_watch(svc, [{"x_pos": 300.0, "y_pos": 200.0}] * 3)
    mismatches = [e for e in events if e["kind"] == "stage_mismatch"]
    assert len(frames) == 3
    for frame in frames:  # where the stage stayed
        assert frame["position"]["x_um"] == pytest.approx(0.0)
        assert frame["position"]["y_um"] == pytest.approx(0.0)
    (mismatch,) = mismatches  # once, not once per frame
    assert mismatch["commanded"] == {"x_um": 300.0, "y_um": 200.0}
    assert mismatch["read"] == {"x_um": pytest.approx(0.0), "y_um": pytest.approx(0.0)}


async def test_status_core_shows_the_cameras_roi_exposure_and_channel_now() -> None:
    """Before, ``status.core`` described the camera as opened, whatever events changed.
    After the run it shows what pymmcore-plus restored (the settings from before it)."""
    async with Service(make_config()) as svc:
        opened = (await control(svc, "status"))["core"]
        assert opened["image_shape"] == [512, 512] and opened["channel"] == "DAPI"
        await control(svc, "set", exposure_ms=12.5)  # between acquisitions
        assert (await control(svc, "status"))["core"]["exposure_ms"] == 12.5
        roi = {"offset_x": 0, "offset_y": 0, "width": 256, "height": 200}
        first = {"roi": roi, "exposure": 20.0, "channel": {"group": "Channel", "config": "GFP"}}
        events = [first] + [{"exposure": 20.0}] * 100  # no channel: the preset stays GFP
        during = None
        async with AsyncSubscriber(svc.publisher.bound_address, ("frame", "event")) as sub:
            await asyncio.sleep(0.3)
            await control(svc, "enqueue", events=events)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                msg = await sub.recv(timeout_s=0.1)
                if msg is not None and msg.topic == "frame" and during is None:
                    during = (await control(svc, "status"))["core"]
                    await control(svc, "stop")
                if msg is not None and msg.header.get("kind") == "acquisition_finished":
                    break
        after = (await control(svc, "status"))["core"]
        core = svc.source.core  # type: ignore[union-attr]
        restored = [core.getImageHeight(), core.getImageWidth()], core.getExposure()
    assert during is not None
    assert during["image_shape"] == [200, 256]
    assert during["exposure_ms"] == pytest.approx(20.0)
    assert during["channel"] == "GFP"
    assert during["camera"] == opened["camera"]  # the rest as opened
    assert restored == ([512, 512], 12.5)  # pymmcore-plus put back the settings from before
    assert (after["image_shape"], after["exposure_ms"]) == restored
    assert after["channel"] == "DAPI"


async def test_event_properties_the_rig_takes_are_applied() -> None:
    """The check refuses what the rig cannot take, not what it can: a filter label, a
    number given for an allowed value, a stage position, a Core property."""
    events = [
        {"properties": [["Filter", "Label", "GFP"], ["Core", "AutoShutter", 0]]},
        {"properties": [["Filter", "State", 0.0], ["Z", "Position", 3.0]]},
    ]
    async with Service(make_config()) as svc:
        core = svc.source.core  # type: ignore[union-attr]
        changes: list[tuple[str, str, Any]] = []
        core.events.propertyChanged.connect(lambda *change: changes.append(change))
        core.events.stagePositionChanged.connect(lambda *moved: changes.append(moved))
        frames, published = await enqueue_and_watch(svc, events)
    assert published[-1]["kind"] == "acquisition_finished" and published[-1]["error"] is None
    assert len(frames) == 2
    assert ("Filter", "Label", "GFP") in changes  # (the Core property: accepted above)
    assert ("Filter", "State", 0.0) in changes
    assert ("Z", 3.0) in changes


async def test_a_focus_drive_that_failed_to_move_does_not_end_the_acquisition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pymmcore-plus lets a Z stage that raises end the whole acquisition (a failed XY move
    it only logs); before, one focus-drive time-out stopped a time-lapse with an error."""
    from livemask.acquisition.simulated.devices import SimZStage

    moves = itertools.count()
    real_move = SimZStage.set_position_um

    def flaky(self: SimZStage, z: float) -> None:
        if next(moves) == 1:  # the second move fails: the drive stays at the first's Z
            raise RuntimeError("focus drive timed out")
        real_move(self, z)

    monkeypatch.setattr(SimZStage, "set_position_um", flaky)
    async with Service(make_config()) as svc:
        frames, events = await enqueue_and_watch(svc, [{"z_pos": z} for z in (1.0, 6.0, 11.0)])
    mismatches = [e for e in events if e["kind"] == "stage_mismatch"]
    assert events[-1]["kind"] == "acquisition_finished" and events[-1]["error"] is None
    assert [f["position"]["z_um"] for f in frames] == [
        pytest.approx(1.0), pytest.approx(1.0), pytest.approx(11.0)]
    (mismatch,) = mismatches
    assert mismatch["commanded"] == {"z_um": 6.0}
    assert mismatch["read"] == {"z_um": pytest.approx(1.0)}


async def test_a_device_busy_past_its_time_out_does_not_end_the_acquisition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pymmcore-plus' engine waits for the devices after each event's set-up and lets the
    core's time-out end the whole acquisition; before, the rest of a time-lapse was lost
    with ``TimeoutError: Wait for device 'Z' timed out``."""
    from livemask.acquisition.simulated.devices import SimZStage

    stuck_at: list[float] = []
    real_move = SimZStage.set_position_um

    def move(self: SimZStage, z: float) -> None:
        real_move(self, z)
        stuck_at[:] = [z] if z in (6.0, 7.0) else []  # the drive reports busy after these

    monkeypatch.setattr(SimZStage, "set_position_um", move)
    monkeypatch.setattr(SimZStage, "busy", lambda self: bool(stuck_at), raising=False)
    async with Service(make_config()) as svc:
        svc.source.core.setTimeoutMs(200)  # type: ignore[union-attr]
        frames, events = await enqueue_and_watch(
            svc, [{"z_pos": z} for z in (1.0, 6.0, 7.0, 11.0)]
        )
    assert events[-1]["kind"] == "acquisition_finished" and events[-1]["error"] is None
    assert [f["position"]["z_um"] for f in frames] == [1.0, 6.0, 7.0, 11.0]
    (busy,) = [e for e in events if e["kind"] == "device_busy"]  # one message: sent once
    assert "Wait for device 'Z' timed out after 200 ms" in busy["error"]


async def test_a_filter_wheel_that_stopped_turning_is_reported_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, the GFP frames taken through the DAPI filter were labelled GFP with no sign
    but a log warning."""
    from livemask.acquisition.simulated.devices import SimFilterWheel

    def stuck(self: SimFilterWheel, position: int) -> None:
        raise RuntimeError("filter wheel jammed")

    monkeypatch.setattr(SimFilterWheel, "set_state", stuck)
    seq = {"channels": ["DAPI", "GFP"], "time_plan": {"interval": 0.0, "loops": 3}}
    async with Service(make_config(acquisition={"sequence": seq})) as svc:
        got = await collect_run(svc, ("event",))
    mismatches = [m.header for m in got["event"] if m.header["kind"] == "settings_mismatch"]
    (gfp,) = mismatches  # three GFP frames through the DAPI filter: reported once
    assert gfp["channel"]["commanded"] == "GFP" and gfp["index"]["c"] == 1
    assert gfp["channel"]["read"] == {"Filter-Label": "DAPI"}


async def test_a_hung_camera_leaves_control_answering_and_the_service_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A snap that never returns holds the camera's lock. Before, ``set exposure_ms`` waited
    on it forever (the control channel, one request at a time, with it), an ``enqueue`` with
    an exposure blocked the event loop, and closing waited forever in unloadAllDevices."""
    import threading

    import livemask.service.hardware_calls as hardware_calls
    from livemask.acquisition.core import devices_left_loaded
    from livemask.acquisition.simulated.devices import SimCamera

    release, hung = threading.Event(), threading.Event()
    snaps = itertools.count()
    real_snap = SimCamera.snap

    def hanging_snap(self: SimCamera, buffer: Any) -> Any:
        if next(snaps) >= 3:
            hung.set()
            release.wait(60)
        return real_snap(self, buffer)

    monkeypatch.setattr(SimCamera, "snap", hanging_snap)
    monkeypatch.setattr(hardware_calls, "HARDWARE_TIMEOUT_S", 1.0)
    cfg = make_config(acquisition={"sequence": {"time_plan": {"interval": 0.0, "loops": 50}}})
    svc = Service(cfg)
    await svc.start()
    try:
        await control(svc, "start")
        deadline = time.monotonic() + 20
        while svc.pipeline.counters.counts["acquired"] < 3:
            assert time.monotonic() < deadline, "the first frames never came"
            await asyncio.sleep(0.05)
        # the fourth snap hangs now (synchronized: it starts once frame 3 is published)
        assert await asyncio.to_thread(hung.wait, 20), "the fourth snap never started"
        with pytest.raises(ControlError, match=r"did not return within 1 s") as info:
            await control(svc, "set", exposure_ms=20)
        assert info.value.code == "invalid_state"
        reply = await control(svc, "enqueue", events=[{"exposure": 20}])
        assert reply == {"enqueued": 1, "started": False}  # the limits were read at start-up

        def stop() -> Any:
            with ControlClient(svc.control.bound_address, timeout_s=15, retries=1) as client:
                return client.request("stop")

        assert await asyncio.to_thread(stop) == {"stopped": True, "still_running": True}
        # a second stop does not wait in vain again: it answers within the client's 3 s
        assert await control(svc, "stop") == {"stopped": True, "still_running": True}
        assert (await control(svc, "status"))["acquiring"] is True
    finally:
        try:
            await asyncio.wait_for(svc.close(), 30)  # before: forever
            # left loaded: `livemask serve` then exits with os._exit, as Python's exit
            # would wait forever in UniMMCore's finalizer to unload the hung camera
            assert devices_left_loaded()
        finally:
            release.set()
    assert svc.state == "closed"


async def test_events_that_take_no_image_are_not_a_camera_fault() -> None:
    async with Service(make_config()) as svc, AsyncSubscriber(
        svc.publisher.bound_address, ("event",)
    ) as sub:
        await asyncio.sleep(0.3)
        await control(svc, "enqueue", events=[{"action": {"type": "custom", "name": "m"}}])
        done = None
        deadline = time.monotonic() + 20
        while done is None and time.monotonic() < deadline:
            msg = await sub.recv(timeout_s=0.1)
            if msg is not None and msg.header["kind"] == "acquisition_finished":
                done = msg.header
    assert done is not None and done["error"] is None


async def test_a_configured_channel_the_rig_lacks_fails_at_start_up() -> None:
    from livemask.errors import ConfigError

    cfg = make_config(acquisition={"autostart": False, "sequence": {"channels": ["NOPE"]}})
    with pytest.raises(ConfigError, match="channel 'NOPE' is not a preset of group 'Channel'"):
        async with Service(cfg):
            pass


async def test_the_simulated_pixel_size_is_the_one_measured_with() -> None:
    # before: the world rendered at simulation.pixel_size_um while measurements used the
    # .cfg's 0.65 um, with only a warning naming a Python call
    cfg = make_config(simulation={"truth": False, "seed": 3, "pixel_size_um": 1.3})
    async with Service(cfg) as svc:
        got = await collect_run(svc, ("measurements", "event"))
        status = await control(svc, "status")
    assert status["pixel_size_um"] == pytest.approx(1.3)
    obj = got["measurements"][0].header["objects"][0]
    assert obj["area_um2"] == pytest.approx(obj["area_px"] * 1.3**2, rel=1e-3)


async def test_missing_hardware_config_is_a_clear_error(tmp_path: Any) -> None:
    from livemask.errors import ConfigError

    cfg = make_config(hardware={"config_file": str(tmp_path / "rig.cfg")})
    with pytest.raises(ConfigError, match=r"rig\.cfg"):
        async with Service(cfg):
            pass


async def test_grain_tile_scan_publishes_tile_and_cumulative_statistics() -> None:
    cfg = make_config(
        simulation={"sample": "grains", "truth": True},
        model={"name": "grains"},
        acquisition={"sequence": {"grid_plan": {"rows": 2, "columns": 2, "overlap": 0,
                                                "fov_width": 332.8, "fov_height": 332.8}}},
    )
    async with Service(cfg) as svc:
        got = await collect_run(svc, ("measurements", "truth", "event"))
    meas = got["measurements"]
    assert len(meas) == 4
    positions = {(m.header["position"]["x_um"], m.header["position"]["y_um"]) for m in meas}
    assert len(positions) == 4
    tiles = [m.header["grains"]["cumulative"]["tiles"] for m in meas]
    assert tiles == [1, 2, 3, 4]
    last = meas[-1].header["grains"]
    tile_counts = sum(m.header["grains"]["tile"]["count"] for m in meas)
    assert last["cumulative"]["count"] == tile_counts
    assert last["cumulative"]["astm_g_planimetric"] is not None
    assert sum(last["cumulative"]["histogram"]["counts"]) == last["cumulative"]["count_inside"]
    # the live grain size agrees with the ground truth's (mean area within 10 %)
    from livemask.analysis.grains import CumulativeGrainStats

    truth_stats = CumulativeGrainStats()
    for t in got["truth"]:
        truth_stats.add(t.arrays["labels"], meas[0].header["pixel_size_um"])
    true_area = truth_stats.summary()["mean_area_um2"]
    assert abs(last["cumulative"]["mean_area_um2"] - true_area) / true_area < 0.10


async def test_overlapping_grain_tiles_are_left_out_of_the_cumulative_statistics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before, a tile seen twice was pooled twice: its grains counted again, and the
    interval the smart-grains rule stops on narrowed falsely."""
    cfg = make_config(
        simulation={"sample": "grains"},
        model={"name": "grains"},
        acquisition={"sequence": {"grid_plan": {"rows": 1, "columns": 3, "overlap": 40,
                                                "fov_width": 332.8, "fov_height": 332.8}}},
    )
    with caplog.at_level("WARNING", logger="livemask"):
        async with Service(cfg) as svc:
            got = await collect_run(svc, ("measurements", "event"))
    cumulative = [m.header["grains"]["cumulative"] for m in got["measurements"]]
    # tiles at 0, 0.6 and 1.2 fields: the middle one overlaps both others by 40 %
    assert [(c["tiles"], c["tiles_overlapping"]) for c in cumulative] == [(1, 0), (1, 1), (2, 1)]
    first, third = (got["measurements"][i].header["grains"]["tile"] for i in (0, 2))
    assert cumulative[-1]["count"] == first["count"] + third["count"]
    assert "overlaps a tile already pooled" in caplog.text and "overlap 0" in caplog.text


async def test_grain_tiles_are_pooled_without_the_overlap_check_when_the_pixel_size_is_unknown(
) -> None:
    """The review found a rig without calibration (pixel size 1.0, not the grid's 0.65)
    leaving 12 of 16 touching tiles out: their footprints in µm were wrong."""
    from livemask.acquisition.replay import ReplaySource, ReplayStack
    from livemask.acquisition.simulated.grains import GrainSample

    sample = GrainSample(seed=2)
    tiles = [sample.render((0.0, 0.0), (128, 128)).image for _ in range(2)]
    xs = [0.0, 83.2]  # touching at 0.65 µm/px; the replay has no pixel size
    stack = ReplayStack(
        Path("tiles"), "tiff", 2, (128, 128), np.dtype(tiles[0].dtype), lambda i: tiles[i],
        positions=[{"x_um": x, "y_um": 0.0, "z_um": None} for x in xs])
    cfg = make_config(simulation={"sample": "grains"}, model={"name": "grains"},
                      acquisition={"sequence": {"time_plan": {"interval": 0, "loops": 2}}})
    async with Service(cfg, source=ReplaySource(stack, interval_s=0.0)) as svc:
        assert svc.pixel_size_known is False and svc.pipeline.pixel_size_known is False
        got = await collect_run(svc, ("measurements", "event"))
    last = got["measurements"][-1].header["grains"]["cumulative"]
    assert (last["tiles"], last["tiles_overlapping"]) == (2, 0)


# ------------------------------------------------------------------ control traffic races
ONE_FRAME = {"sequence": {"time_plan": {"interval": 0.0, "loops": 1}}}


async def test_an_enqueue_while_the_acquisition_ends_runs_in_a_new_one() -> None:
    """Before, an enqueue accepted after the runner had taken the last event (the
    acquisition not yet reported finished) answered started: false and never ran."""
    import useq

    async with Service(make_config(acquisition=ONE_FRAME)) as svc, AsyncSubscriber(
        svc.publisher.bound_address, ("frame",)
    ) as sub:
        await asyncio.sleep(0.3)
        report_done = svc._on_acquisition_done
        held: list[str | None] = []
        svc._on_acquisition_done = held.append  # type: ignore[method-assign]
        svc.start_acquisition(None)
        deadline = time.monotonic() + 10
        while not held:  # the runner took the last event and ended; not reported yet
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert svc.acquiring
        enqueue = asyncio.create_task(svc.enqueue([useq.MDAEvent(x_pos=5.0)]))
        await asyncio.sleep(0.1)
        assert not enqueue.done()  # waits for the end
        svc._on_acquisition_done = report_done  # type: ignore[method-assign]
        report_done(held[0])
        assert await asyncio.wait_for(enqueue, 10) == {
            "enqueued": 1, "started": True, "acquisition": svc.pipeline.acquisition}
        frames = []
        while len(frames) < 2 and time.monotonic() < deadline:
            msg = await sub.recv(timeout_s=0.1)
            if msg is not None:
                frames.append(msg.header)
    assert [f["position"]["x_um"] for f in frames] == [None, 5.0]
    assert [f["acquisition"] for f in frames] == [1, 2]  # which acquisition each is of


async def test_start_right_after_an_acquisition_ended_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, a start sent as soon as an acquisition was reported finished, while its
    thread was still exiting, got an internal error (and reset the feedback state and the
    acquisition number on the way)."""
    from livemask.acquisition.source import FeedThreadSource

    real_end = FeedThreadSource._end

    def lingering_exit(
        self: FeedThreadSource, feed: Any, on_done: Any, error: str | None
    ) -> None:
        real_end(self, feed, on_done, error)
        time.sleep(0.3)  # the thread has reported the end and not exited yet

    monkeypatch.setattr(FeedThreadSource, "_end", lingering_exit)
    async with Service(make_config(acquisition=ONE_FRAME)) as svc:
        for _ in range(3):
            assert (await control(svc, "start"))["started"] is True
            deadline = time.monotonic() + 10
            while svc.acquiring:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
        assert svc.pipeline.acquisition == 3
        svc.start_acquisition(None)
        with pytest.raises(ControlError, match="running") as info:
            await control(svc, "start")
        assert info.value.code == "invalid_state"
        assert svc.pipeline.acquisition == 4  # the refused start reset nothing


async def test_a_start_after_a_stuck_exit_is_refused_without_holding_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The review found a second 2 s join, on the event loop, after the first off it."""
    import useq

    from livemask.acquisition.source import FeedThreadSource
    from livemask.errors import AcquisitionError

    real_end = FeedThreadSource._end
    release = asyncio.Event()

    def stuck_exit(self: FeedThreadSource, feed: Any, on_done: Any, error: str | None) -> None:
        real_end(self, feed, on_done, error)
        time.sleep(3.0)  # longer than the 2 s the service waits

    monkeypatch.setattr(FeedThreadSource, "_end", stuck_exit)
    async with Service(make_config(acquisition=ONE_FRAME)) as svc:
        svc.start_acquisition(None)
        while svc.acquiring:
            await asyncio.sleep(0.005)
        gaps: list[float] = []

        async def ticks() -> None:
            last = time.monotonic()
            while not release.is_set():
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        ticker = asyncio.create_task(ticks())
        with pytest.raises(AcquisitionError, match="has not exited yet"):
            await svc.enqueue([useq.MDAEvent()])
        release.set()
        await ticker
        assert max(gaps) < 0.6, max(gaps)  # before: the loop was held 2 s more
        await asyncio.sleep(1.2)  # let the thread exit before the service closes


async def test_a_start_waits_for_the_last_runs_thread_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, the start joined the exiting thread on the event loop: publishing, the
    heartbeat and every other request stalled for as long as it took (up to 2 s)."""
    import useq

    from livemask.acquisition.source import FeedThreadSource

    real_end = FeedThreadSource._end

    def slow_exit(self: FeedThreadSource, feed: Any, on_done: Any, error: str | None) -> None:
        real_end(self, feed, on_done, error)
        time.sleep(1.2)  # e.g. pymmcore-plus restoring the settings from before the run

    monkeypatch.setattr(FeedThreadSource, "_end", slow_exit)
    async with Service(make_config(acquisition=ONE_FRAME)) as svc:
        for starting in ("start", "enqueue"):
            svc.start_acquisition(None)
            while svc.acquiring:
                await asyncio.sleep(0.005)
            gaps: list[float] = []

            async def ticks(gaps: list[float] = gaps) -> None:
                last = time.monotonic()
                while True:
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            ticker = asyncio.create_task(ticks())
            if starting == "start":
                assert (await control(svc, "start"))["started"] is True
            else:
                assert (await svc.enqueue([useq.MDAEvent()]))["started"] is True
            ticker.cancel()
            assert max(gaps) < 0.6, (starting, max(gaps))  # the loop was not held ~1.2 s
            while svc.acquiring:
                await asyncio.sleep(0.005)


async def test_the_model_is_warmed_up_at_the_opened_cameras_frame_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real camera's size is known only once the rig is open: the model is built and
    warmed up at it (not at simulation.sensor_shape_px), so its first frame pays for no
    new shape, and a TensorRT engine's optimum is that frame."""
    from livemask.inference.segmenter import Segmenter
    from livemask.service import app
    from tests.rig_devices import WideCamera

    cfg_file = tmp_path / "wide.cfg"
    cfg_file.write_text(
        "#py pyDevice,Camera,tests.rig_devices,WideCamera\n"
        "#py Property,Core,Initialize,1\n"
        "#py Property,Core,Camera,Camera\n"
    )
    built: list[Any] = []
    warmed: list[tuple[int, int]] = []
    real_build, real_warmup = app.build_segmenter, Segmenter.warmup

    def build(config: ServiceConfig, frame_shape: Any = None, card: Any = None) -> Segmenter:
        built.append(frame_shape)
        return real_build(config, frame_shape, card)

    def warmup(self: Segmenter, shape: tuple[int, int]) -> None:
        warmed.append(shape)
        real_warmup(self, shape)

    monkeypatch.setattr(app, "build_segmenter", build)
    monkeypatch.setattr(Segmenter, "warmup", warmup)
    cfg = make_config(hardware={"config_file": str(cfg_file)},
                      simulation={"sensor_shape_px": [64, 64]},
                      acquisition={"sequence": {"time_plan": {"interval": 0.0, "loops": 2}}})
    async with Service(cfg) as svc:
        assert built == warmed == [WideCamera.SHAPE]
        assert svc.prefault is not None and svc.prefault.bytes == (
            cfg.pipeline.prefault_frames * 48 * 80 * 4)
        got = await collect_run(svc, timeout_s=20)
    assert len(got["measurements"]) == 2


def _raw_request(address: str, payload: bytes) -> dict[str, Any]:
    """One raw JSON request over a REQ socket (the client cannot encode a 65-bit integer)."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(address)
    try:
        sock.send(payload)
        return json.loads(sock.recv())
    finally:
        sock.close(linger=0)


async def test_integers_beyond_64_bits_are_refused_before_anything_starts(
    service: Service,
) -> None:
    """Before, `start` with loops 10**20 answered `internal` while the acquisition ran,
    with no acquisition_started; an enqueued index of 2**64 was counted as published
    though nothing went out; and an id of 2**64 got no reply at all."""
    address = service.control.bound_address
    async with AsyncSubscriber(service.publisher.bound_address, ("event", "frame")) as sub:
        await asyncio.sleep(0.3)  # slow joiner
        replies = [await asyncio.to_thread(_raw_request, address, raw) for raw in (
            b'{"id": 1, "cmd": "start", "args": {"sequence": {"time_plan": '
            b'{"interval": 0.2, "loops": 100000000000000000000}}}}',
            b'{"id": 2, "cmd": "enqueue", "args": {"events": [{"index": '
            b'{"t": 18446744073709551616}}, {"index": {"t": 1}}]}}',
            # 2 channels x 2**62 time points: 2**63 events, which no reply could count
            b'{"id": 3, "cmd": "start", "args": {"sequence": {"time_plan": {"interval": 0.2, '
            b'"loops": 4611686018427387904}, "channels": ["DAPI", "GFP"]}}}',
            b'{"id": 18446744073709551616, "cmd": "status"}',
        )]
        await asyncio.sleep(0.5)
        got = []
        while (msg := await sub.recv(timeout_s=0.1)) is not None:
            got.append(msg)
    assert [(r["id"], r["error"]["code"]) for r in replies] == [
        (1, "invalid_args"), (2, "invalid_args"), (3, "invalid_args"), (None, "bad_request")]
    messages = [r["error"]["message"] for r in replies]
    assert messages[0].startswith(
        "start: args.sequence.time_plan.loops: 100000000000000000000 does not fit 64 bits")
    assert messages[1].startswith(
        "enqueue: args.events.0.index.t: 18446744073709551616 does not fit 64 bits")
    assert "plans 9223372036854775808 events, more than 2**63 - 1" in messages[2]
    assert messages[3].startswith("id: 18446744073709551616 does not fit 64 bits")
    assert got == [] and not service.acquiring
    assert service.pipeline.counters.snapshot()["frames_published"] == 0


async def test_an_acquisition_started_that_json_cannot_carry_still_goes_out(
    service: Service,
) -> None:
    """Before, the event's ProtocolError escaped start_acquisition after the acquisition
    had started: the caller saw a failure, subscribers no acquisition_started."""
    import useq

    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 2}, metadata={"big": 2**64})
    async with AsyncSubscriber(service.publisher.bound_address, ("event",)) as sub:
        await asyncio.sleep(0.3)  # slow joiner
        assert service.start_acquisition(seq) == 2
        kinds: dict[str, dict[str, Any]] = {}
        while "acquisition_finished" not in kinds:
            msg = await sub.recv(timeout_s=20)
            assert msg is not None, "acquisition_finished never came"
            kinds[msg.header["kind"]] = msg.header
    started = kinds["acquisition_started"]
    assert started["sequence"] is None and started["not_encoded"] == ["sequence"]
    assert started["events"] == 2 and started["acquisition"] == 1


async def test_a_frame_that_cannot_be_published_is_not_counted_as_published(
    service: Service,
) -> None:
    """Before, a publish error was logged and the frame counted in frames_published."""
    seg = service.pipeline.segmenter
    real_analyse = seg.analyse

    def analyse(*args: Any, **kwargs: Any) -> Any:
        labels, objects, summary = real_analyse(*args, **kwargs)
        if service.pipeline.counters.counts["analysed"] == 3:  # one frame: no JSON for it
            summary = {**(summary or {}), "huge": 2**64}
        return labels, objects, summary

    seg.analyse = analyse  # type: ignore[method-assign]
    got = await collect_run(service, ("measurements", "labels", "frame", "event"))
    status = await control(service, "status")
    assert len(got["measurements"]) == 11
    assert status["frames_acquired"] == 12 and status["frames_analysed"] == 12
    assert status["frames_published"] == 11 and status["frames_publish_failed"] == 1
    assert status["last_frame_error"].startswith("frame 3: publish failed: ProtocolError")
    # its image and labels still went out, although measurements now go first
    assert [m.header["frame_id"] for m in got["labels"]] == list(range(12))
    assert [m.header["frame_id"] for m in got["frame"]] == list(range(12))


async def test_measurements_arrive_before_the_frames_image_and_labels(
    service: Service,
) -> None:
    """Each analysed frame's measurements are sent first: on one connection they used to
    wait behind the image and labels buffers (12-14 ms at 2048² on loopback), which is
    latency a feedback client or a dashboard plot did not need."""
    order: list[tuple[str, int]] = []
    async with AsyncSubscriber(service.publisher.bound_address,
                               ("frame", "labels", "measurements", "truth", "event")) as sub:
        await asyncio.sleep(0.3)  # slow joiner
        await control(service, "start")
        while True:
            msg = await sub.recv(timeout_s=30)
            assert msg is not None, "acquisition_finished never came"
            if msg.topic == "event":
                if msg.header["kind"] == "acquisition_finished":
                    break
                continue
            order.append((msg.topic, int(msg.header["frame_id"])))
    ids = sorted({fid for _, fid in order})
    assert len(ids) == 12
    for fid in ids:
        topics = [topic for topic, f in order if f == fid]
        assert topics == ["measurements", "frame", "truth", "labels"], (fid, topics)


async def test_a_graceful_close_lets_a_lagging_subscriber_get_the_last_messages() -> None:
    """Before, the PUB socket closed with LINGER 0 after the final drain: a subscriber
    still behind lost the last measurements, acquisition_finished and the final status."""
    cfg = make_config(simulation={"truth": False, "sensor_shape_px": [1024, 1024]},
                      acquisition={"sequence": {"time_plan": {"interval": 0.0, "loops": 6}}},
                      pipeline={"prefault_frames": 0})
    svc = Service(cfg)
    await svc.start()
    ctx = zmq.asyncio.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 2)  # it falls behind: the rest waits in the PUB's queue
    for topic in ALL:
        sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
    sub.connect(svc.publisher.bound_address)
    try:
        while not await sub.poll(100):  # a status heartbeat: subscribed
            pass
        await control(svc, "start")
        while svc.acquiring or not svc.acquisitions_finished or svc.pipeline.in_flight:
            await asyncio.sleep(0.05)

        async def read_all() -> list[tuple[str, Any]]:
            got = []
            while await sub.poll(3000):
                parts = await sub.recv_multipart()
                header = json.loads(parts[1])
                got.append((parts[0].decode(), header.get("kind") or header.get("state")
                            or header.get("frame_id")))
            return got

        reader = asyncio.create_task(read_all())  # it reads as the service closes
        await svc.close()
        got = await reader
    finally:
        sub.close(linger=0)
        await svc.close(graceful=False)
    assert [m for t, m in got if t == "measurements"] == list(range(6))
    assert ("event", "acquisition_finished") in got
    assert got[-1] == ("status", "stopping")  # the last status, published at shutdown


async def test_close_releases_the_model_backend(service_config: ServiceConfig) -> None:
    """Before, the backend (GPU memory) was released only when the GC broke a cycle."""
    svc = Service(service_config)
    await svc.start()
    backend = svc.pipeline.segmenter.backend
    real_close = backend.close
    closed: list[bool] = []

    def spy() -> None:
        closed.append(True)
        real_close()

    backend.close = spy  # type: ignore[method-assign]
    await svc.close()
    assert closed == [True]
    await svc.close()  # idempotent: once only
    assert closed == [True]


async def test_a_warm_up_that_fails_still_releases_the_model_backend(
    service_config: ServiceConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livemask.inference.segmenter import Segmenter
    from livemask.service import app

    closed: list[str] = []
    real_build = app.build_segmenter

    def build(*args: Any, **kwargs: Any) -> Segmenter:
        seg = real_build(*args, **kwargs)
        seg.backend.close = lambda: closed.append(seg.backend.name)  # type: ignore[method-assign]
        return seg

    def warmup(self: Segmenter, shape: tuple[int, int]) -> None:
        raise RuntimeError("injected warm-up fault")

    monkeypatch.setattr(app, "build_segmenter", build)
    monkeypatch.setattr(Segmenter, "warmup", warmup)
    with pytest.raises(RuntimeError, match=r"injected warm-up fault"):
        async with Service(service_config):
            pass
    assert len(closed) == 1


async def test_a_stop_requested_during_start_up_skips_the_autostart(
    service_config: ServiceConfig,
) -> None:
    """Before, a Ctrl-C during start-up still started the acquisition (light, stage,
    snaps) once start-up had finished, only to stop it again."""
    service_config.acquisition.autostart = True
    stop = asyncio.Event()
    stop.set()  # as `livemask serve` does on SIGINT while the service is starting
    async with Service(service_config, stop=stop) as svc:
        assert svc.state == "idle" and not svc.acquiring
        assert svc.pipeline.acquisition == 0  # no acquisition begun
    async with Service(service_config, stop=asyncio.Event()) as svc:
        assert svc.pipeline.acquisition == 1  # without a stop it autostarts


async def test_set_exposure_during_a_run_holds_for_the_rest_of_it() -> None:
    """Before: pymmcore-plus set the next event's channel exposure again, so the reply said
    50 ms and the camera was back at 10 ms a frame later (bug hunt)."""
    cfg = make_config(simulation={"truth": False}, acquisition={
        "mode": "synchronized", "autostart": False,
        "sequence": {"time_plan": {"interval": 0.05, "loops": 12},
                     "channels": [{"config": "DAPI", "exposure": 10.0}]}})
    async with Service(cfg) as svc:
        assert (await control(svc, "start"))["started"] is True
        while svc.pipeline.counters.counts["published"] < 3:
            await asyncio.sleep(0.01)
        assert (await control(svc, "set", exposure_ms=30.0)) == {"exposure_ms": 30.0}
        while svc.pipeline.counters.counts["published"] < 8:
            await asyncio.sleep(0.01)
        assert svc.acquiring  # (at the end pymmcore-plus puts back the settings from before)
        assert svc.status()["core"]["exposure_ms"] == 30.0  # the last frame's


async def test_set_exposure_is_refused_while_channels_set_their_own() -> None:
    cfg = make_config(simulation={"truth": False}, acquisition={
        "autostart": False,
        "sequence": {"time_plan": {"interval": 0.1, "loops": 50},
                     "channels": [{"config": "DAPI", "exposure": 10.0},
                                  {"config": "GFP", "exposure": 40.0}]}})
    async with Service(cfg) as svc:
        await control(svc, "start")
        with pytest.raises(ControlError, match=r"set their own exposures \(10, 40 ms\)"):
            await control(svc, "set", exposure_ms=20.0)
        await control(svc, "stop")
        assert (await control(svc, "set", exposure_ms=20.0)) == {"exposure_ms": 20.0}


async def test_set_exposure_is_refused_for_a_run_enqueued_with_several_exposures() -> None:
    """Review: an enqueue-started run's events are its plan; their exposures were merged."""
    cfg = make_config(simulation={"truth": False}, acquisition={"autostart": False})
    async with Service(cfg) as svc:
        events = [{"exposure": 10.0 if i % 2 else 40.0, "min_start_time": 0.2 * i}
                  for i in range(20)]
        assert (await control(svc, "enqueue", events=events))["started"] is True
        with pytest.raises(ControlError, match=r"set their own exposures \(10, 40 ms\)"):
            await control(svc, "set", exposure_ms=20.0)
        await control(svc, "stop")


async def test_a_refused_start_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A start refused because the last run's thread had not exited used up an acquisition
    number (started 1, 3) and armed the feedback rules while idle (control hunt)."""
    import useq

    from livemask.acquisition.source import FeedThreadSource
    from livemask.errors import AcquisitionError

    real_end = FeedThreadSource._end

    def slow_exit(self: FeedThreadSource, feed: Any, on_done: Any, error: str | None) -> None:
        real_end(self, feed, on_done, error)
        time.sleep(2.5)  # longer than the 2 s the service waits

    monkeypatch.setattr(FeedThreadSource, "_end", slow_exit)
    cfg = make_config(acquisition=ONE_FRAME, feedback={"rules": [
        {"name": "b", "when": {"values": [{"path": "summary.count", "ge": 0}]},
         "action": {"burst": {"frames": 2, "centre": False}}, "max_fires": 1}]})
    async with Service(cfg) as svc:
        svc.start_acquisition(None)
        while svc.acquiring:
            await asyncio.sleep(0.005)
        number = svc.pipeline.acquisition
        assert svc.feedback is not None and not svc.feedback._running
        with pytest.raises(AcquisitionError, match="has not exited yet"):
            await svc.enqueue([useq.MDAEvent()])
        assert svc.pipeline.acquisition == number  # before: number + 1, never announced
        assert not svc.feedback._running  # before: rules armed while idle
        await asyncio.sleep(1.0)  # let the thread exit before the service closes


async def test_start_checks_stage_position_properties_and_names_the_argument(
    service: Service,
) -> None:
    """Before, a start took a position's property value the rig refuses (pymmcore-plus
    only warned, and imaged with the filter wheel where it was), which enqueue refused; and
    its errors named the config path acquisition.sequence for the control argument."""
    seq = {"stage_positions": [{"x": 0, "y": 0, "properties": [["Filter", "Label", "Cy5"]]}]}
    with pytest.raises(ControlError, match=r"^\[invalid_args\] sequence: 'Cy5' is not an "
                       r"allowed value of property 'Label'"):
        await control(service, "start", sequence=seq)
    with pytest.raises(ControlError, match=r"^\[invalid_args\] sequence: channel 'NOPE'"):
        await control(service, "start", sequence={"channels": ["NOPE"]})
    assert not service.acquiring and service.pipeline.acquisition == 0
    ok = [{"x": 0, "y": 0, "properties": [["Filter", "Label", "GFP"]]}]
    assert (await control(service, "start", sequence={"stage_positions": ok}))["started"]


async def test_snapshot_lists_every_topics_next_seq(service: Service) -> None:
    """Before, next_seq had only the topics sent so far: a late joiner's
    next_seq["frame"] was a KeyError before the first frame."""
    from livemask.protocol import TOPICS

    snap = await control(service, "snapshot")
    assert set(snap["next_seq"]) == set(TOPICS)
    assert snap["next_seq"]["frame"] == snap["next_seq"]["measurements"] == 0
    assert snap["next_seq"]["event"] >= 1  # service_started
    assert snap["latest"] == {}


async def test_a_metrics_port_in_use_fails_before_the_hardware_and_the_recording(
    tmp_path: Path,
) -> None:
    """Before, the metrics server was bound last: a port clash was found after the rig,
    the model warm-up and the recording had started, leaving an empty recording folder."""
    import socket

    from livemask.errors import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = make_config(
            metrics={"enabled": True, "port": taken.getsockname()[1]},
            record={"enabled": True, "path": str(tmp_path / "rec")},
        )
        svc = Service(cfg)
        with pytest.raises(ConfigError, match=r"metrics\.port"):
            async with svc:
                pass
    assert svc.source is None  # the rig was not opened
    assert not (tmp_path / "rec").exists() or not any((tmp_path / "rec").iterdir())


async def test_status_heartbeats_go_out_while_the_service_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The heartbeat began only once start-up had finished: a slow model warm-up (or a
    TensorRT engine build of minutes) looked like a service that is gone, and the
    documented state ``starting`` never reached a client (hunt)."""
    from livemask.inference.segmenter import Segmenter

    real_warmup = Segmenter.warmup

    def slow_warmup(self: Segmenter, shape: tuple[int, int]) -> None:
        time.sleep(1.5)
        real_warmup(self, shape)

    monkeypatch.setattr(Segmenter, "warmup", slow_warmup)
    cfg = make_config(acquisition={"autostart": False}, publish={"heartbeat_s": 0.2})
    svc = Service(cfg)
    starting = asyncio.create_task(svc.start())
    try:
        while not svc.publisher.started:  # bound at the very start of start-up
            await asyncio.sleep(0.01)
        states: list[str] = []
        async with AsyncSubscriber(svc.publisher.bound_address, ("status",)) as sub:
            while "idle" not in states:
                msg = await sub.recv(timeout_s=5.0)
                assert msg is not None, states
                states.append(msg.header["state"])
        await starting
    finally:
        if not starting.done():
            starting.cancel()
        await svc.close()
    assert states.count("starting") >= 3, states  # 1.5 s of warm-up at 0.2 s heartbeats
    assert states[-1] == "idle"


async def test_a_start_up_that_fails_says_why_to_subscribers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Subscribers saw ``starting`` heartbeats that just stopped when start-up failed (e.g.
    a model that fails its warm-up): now an ``error`` event and a last status with the
    reason reach them before the sockets close (review)."""
    from livemask.errors import ModelError
    from livemask.inference.segmenter import Segmenter

    def failing_warmup(self: Segmenter, shape: tuple[int, int]) -> None:
        time.sleep(0.8)  # (the subscriber joins meanwhile)
        raise ModelError("the model returned logits, not probabilities")

    monkeypatch.setattr(Segmenter, "warmup", failing_warmup)
    cfg = make_config(acquisition={"autostart": False}, publish={"heartbeat_s": 0.2})
    svc = Service(cfg)
    entering = asyncio.create_task(svc.__aenter__())
    got: list[Message] = []
    while not svc.publisher.started:
        await asyncio.sleep(0.01)
    async with AsyncSubscriber(svc.publisher.bound_address, ("status", "event")) as sub:
        with pytest.raises(ModelError, match="logits"):
            await entering
        while (msg := await sub.recv(timeout_s=1.0)) is not None:
            got.append(msg)
    errors = [m.header for m in got if m.topic == "event" and m.header["kind"] == "error"]
    assert [e["detail"] for e in errors] == [
        "start-up failed: ModelError: the model returned logits, not probabilities"]
    last_status = [m.header for m in got if m.topic == "status"][-1]
    assert last_status["last_error"] == errors[0]["detail"]
    assert last_status["state"] == "starting"
