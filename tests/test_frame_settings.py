"""Every frame says which channel preset and exposure it was taken with: in its headers, in
frames.jsonl and in measurements.csv (before, only the MDA index, which an enqueued or
feedback event does not give)."""

from __future__ import annotations

import asyncio
import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import useq
import zarr

from livemask.acquisition.source import RawFrame, frame_settings
from livemask.analysis.measure import UNITS
from livemask.client import AsyncSubscriber
from livemask.recording import CSV_COLUMNS, Recorder, open_recording
from livemask.recording.reader import record_settings
from livemask.service.app import Service
from livemask.service.frames import Frame
from tests.conftest import make_config
from tests.test_acquisition_end import control

TWO_CHANNELS = {"sequence": {
    "time_plan": {"interval": 0.15, "loops": 3},
    "channels": [{"config": "DAPI", "exposure": 10}, {"config": "GFP", "exposure": 30}],
}}
#: A time-lapse that sets no channel or exposure: its frames take what is in effect.
PLAIN = {"sequence": {"time_plan": {"interval": 0.15, "loops": 5}}}
TOPICS = ("frame", "measurements", "event")


def _config(tmp_path: Path, acquisition: dict[str, Any]) -> Any:
    return make_config(acquisition=acquisition, simulation={"sensor_shape_px": [256, 256]},
                       record={"enabled": True, "path": str(tmp_path)})


def _rig_per_frame(svc: Service) -> list[dict[str, Any]]:
    """The core's channel preset and exposure as each frame came (read on the runner
    thread, after the service's own frameReady handler)."""
    core = svc.source.core  # type: ignore[union-attr]
    seen: list[dict[str, Any]] = []

    def on_frame(image: Any, event: Any, meta: Any = None) -> None:
        seen.append({"channel": core.getCurrentConfig("Channel"),
                     "exposure_ms": core.getExposure()})

    core.mda.events.frameReady.connect(on_frame)
    return seen


async def _run_and_enqueue(svc: Service, events: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Start the configured sequence, enqueue ``events`` once its first frame came, and
    collect the headers published until it has finished."""
    got: dict[str, list[Any]] = {t: [] for t in TOPICS}
    async with AsyncSubscriber(svc.publisher.bound_address, TOPICS) as sub:
        await asyncio.sleep(0.3)  # let the subscription reach the publisher (slow joiner)
        assert (await control(svc, "start"))["started"] is True
        deadline = time.monotonic() + 30
        while svc.pipeline.counters.counts["acquired"] < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert (await control(svc, "enqueue", events=events))["started"] is False
        finished = False
        while not (finished and svc.pipeline.in_flight == 0):
            assert time.monotonic() < deadline, "the acquisition did not finish"
            msg = await sub.recv(timeout_s=0.1)
            if msg is not None:
                got[msg.topic].append(msg.header)
                finished |= msg.topic == "event" and msg.header["kind"] == "acquisition_finished"
        while (msg := await sub.recv(timeout_s=0.3)) is not None:  # the last ones in flight
            got[msg.topic].append(msg.header)
    return got


def _run(parent: Path) -> Path:
    (run,) = parent.glob("run-*")
    return run


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _check_everywhere(
    run: Path, got: dict[str, list[Any]], expected: dict[int, tuple[str, float]]
) -> None:
    """Every header, frames.jsonl line and CSV row has its frame's (channel, exposure)."""
    for topic in ("frame", "measurements"):
        assert {h["frame_id"] for h in got[topic]} == set(expected), topic
        for h in got[topic]:
            channel, exposure = expected[h["frame_id"]]
            assert h["settings"] == {"channel": channel, "channel_group": "Channel",
                                     "exposure_ms": pytest.approx(exposure)}, h["index"]
    rec = open_recording(run)
    assert [f["frame_id"] for f in rec.frames] == sorted(expected)
    attrs = zarr.open_group(run / "images.ome.zarr", mode="r").attrs["livemask"]
    assert [f["frame_id"] for f in attrs["frames"]] == sorted(expected)
    for f in attrs["frames"]:  # the zarr attribute records say so too
        channel, exposure = expected[f["frame_id"]]
        assert record_settings(f) == {"channel": channel, "channel_group": "Channel",
                                      "exposure_ms": pytest.approx(exposure)}
    for f in rec.frames:
        channel, exposure = expected[f["frame_id"]]
        assert record_settings(f) == {"channel": channel, "channel_group": "Channel",
                                      "exposure_ms": pytest.approx(exposure)}
    rows = _csv_rows(rec.measurements_csv)
    assert rows and {int(r["frame_id"]) for r in rows} == set(expected)
    for r in rows:
        channel, exposure = expected[int(r["frame_id"])]
        assert (r["channel"], float(r["exposure_ms"])) == (channel, pytest.approx(exposure))


async def test_a_two_channel_run_and_an_enqueued_event_say_their_channel_and_exposure(
    tmp_path: Path,
) -> None:
    """DAPI 10 ms / GFP 30 ms planned, GFP 50 ms enqueued (its index is {}: before, nothing
    recorded that it was GFP at 50 ms)."""
    async with Service(_config(tmp_path, TWO_CHANNELS)) as svc:
        seen = _rig_per_frame(svc)
        got = await _run_and_enqueue(svc, [{"channel": {"config": "GFP"}, "exposure": 50}])
    by_index = {0: ("DAPI", 10.0), 1: ("GFP", 30.0), None: ("GFP", 50.0)}
    frames = {h["frame_id"]: h["index"] for h in got["frame"]}
    expected = {fid: by_index[index.get("c")] for fid, index in frames.items()}
    assert len(expected) == 7 and sum("c" not in i for i in frames.values()) == 1, frames
    # what the rig was at (read back from the core) agrees
    assert [(s["channel"], s["exposure_ms"]) for s in seen] == [
        (c, pytest.approx(e)) for _, (c, e) in sorted(expected.items())]
    _check_everywhere(_run(tmp_path), got, expected)


async def test_events_that_set_no_channel_take_the_one_in_effect(tmp_path: Path) -> None:
    """A plan that sets none runs with the preset the rig is at; an enqueued GFP event and
    the event that puts the settings back after it change it: each frame says the one the
    core was at when it was taken."""
    async with Service(_config(tmp_path, PLAIN)) as svc:
        seen = _rig_per_frame(svc)
        got = await _run_and_enqueue(svc, [{"channel": {"config": "GFP"}, "exposure": 50}])
    expected = {fid: (s["channel"], s["exposure_ms"]) for fid, s in enumerate(seen)}
    assert [s[0] for s in expected.values()].count("GFP") == 1, expected
    assert expected[0][0] == "DAPI" and expected[len(seen) - 1][0] == "DAPI"
    _check_everywhere(_run(tmp_path), got, expected)


def test_the_frame_metadata_exposure_is_preferred_and_a_failed_preset_is_unknown() -> None:
    gfp = useq.MDAEvent(channel={"config": "GFP"}, exposure=50)
    # pymmcore-plus' frame metadata has the exposure the camera really had
    assert frame_settings(gfp, {"exposure_ms": 49.5}) == {
        "channel": "GFP", "channel_group": "Channel", "exposure_ms": 49.5}
    assert frame_settings(gfp, {})["exposure_ms"] == 50.0  # no metadata: the event's
    plain = useq.MDAEvent()
    assert frame_settings(plain, None, ("Channel", "DAPI")) == {
        "channel": "DAPI", "channel_group": "Channel", "exposure_ms": None}
    assert frame_settings(gfp, {"exposure_ms": 50.0}, channel_failed=True)["channel"] is None


def test_a_frame_without_settings_publishes_and_records_nulls(tmp_path: Path) -> None:
    """A replayed frame (an event without channel or exposure) and an older recording's
    lines without ``settings`` read as null; the CSV's older columns keep their places."""
    raw = RawFrame(np.zeros((4, 4), np.uint16), useq.MDAEvent(index={"t": 0}), 0.0, {}, None)
    assert raw.settings == {"channel": None, "channel_group": None, "exposure_ms": None}
    frame = Frame(frame_id=0, image=np.zeros((8, 8), np.uint16), index={"t": 0},
                  t={"acquired": time.time()})
    assert frame.header()["settings"] == raw.settings
    frame.labels = np.ones((8, 8), np.int32)
    frame.objects, frame.summary = [{"label": 1, "area_px": 64}], {"count": 1}
    rec = Recorder(tmp_path / "run", pixel_size_um=1.0, units=UNITS).start()
    rec.on_frame(frame)
    rec.close(frames_acquired=1)
    (line,) = (tmp_path / "run" / "frames.jsonl").read_text().splitlines()
    assert json.loads(line)["settings"] == raw.settings
    (row,) = _csv_rows(tmp_path / "run" / "measurements.csv")
    assert (row["channel"], row["exposure_ms"]) == ("", "")
    assert CSV_COLUMNS[27:30] == ("fb", "channel", "exposure_ms")
    assert CSV_COLUMNS.index("touches_edge") == 26
    units = json.loads((tmp_path / "run" / "units.json").read_text(encoding="utf-8"))
    assert units["columns"]["exposure_ms"].startswith("ms")
    assert record_settings({"frame_id": 0}) == raw.settings
    assert record_settings({"settings": {"channel": "", "exposure_ms": True}}) == raw.settings


async def test_a_feedback_frame_says_the_channel_and_exposure_its_action_gave() -> None:
    """A rule's ``channel`` action takes a frame in GFP at 80 ms (its index is the trigger's
    plus ``fb``, with the planned ``c``: before, nothing said it was not DAPI at 10 ms)."""
    from tests.test_service import collect_run

    rule = {"name": "gfp", "max_fires": 1, "when": {"values": [{"path": "index.t", "eq": 1}]},
            "action": {"channel": {"channel": "GFP", "frames": 1, "exposure_ms": 80.0}}}
    cfg = make_config(
        acquisition={"sequence": {"time_plan": {"interval": 0.0, "loops": 3},
                                  "channels": [{"config": "DAPI", "exposure": 10.0}]}},
        simulation={"sensor_shape_px": [256, 256]}, feedback={"rules": [rule]})
    async with Service(cfg) as svc:
        got = await collect_run(svc, ("frame", "event"))
    frames = sorted((m.header for m in got["frame"]), key=lambda h: h["frame_id"])
    taken = [("fb" in h["index"], h["settings"]["channel"], h["settings"]["exposure_ms"])
             for h in frames]
    assert taken == [(False, "DAPI", 10.0), (False, "DAPI", 10.0), (True, "GFP", 80.0),
                     (False, "DAPI", 10.0)]


async def test_an_event_setting_a_preset_property_leaves_the_channel_unknown(
    tmp_path: Path,
) -> None:
    """An event's ``properties`` that turn the filter wheel change the channel without a
    preset name: from it on, frames that set no channel say null, not the stale preset."""
    async with Service(_config(tmp_path, PLAIN)) as svc:
        seen = _rig_per_frame(svc)
        got = await _run_and_enqueue(svc, [{"properties": [["Filter", "Label", "GFP"]]}])
    frames = sorted(got["frame"], key=lambda h: h["frame_id"])
    turned = [s["channel"] == "GFP" for s in seen]  # the wheel stays turned (not put back)
    assert turned[0] is False and turned[-1] is True
    assert [h["settings"]["channel"] for h in frames] == [None if t else "DAPI" for t in turned]
