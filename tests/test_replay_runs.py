"""Replaying a recording: each frame's recorded pixel size, and several acquisitions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import useq

from livemask.acquisition.replay import ReplaySource, open_stack
from livemask.acquisition.source import RawFrame
from livemask.recording import Recorder
from tests.test_recording import _frame, _wait


def _record(tmp_path: Path, pixel_sizes: list[float], acquisitions: list[int]) -> Path:
    """A closed recording, one frame per entry (scale: the first pixel size)."""
    rng = np.random.default_rng(4)
    rec = Recorder(tmp_path / "run", pixel_size_um=pixel_sizes[0]).start()
    for fid, (px, acq) in enumerate(zip(pixel_sizes, acquisitions, strict=True)):
        frame = _frame(fid, rng.integers(0, 4000, (24, 32)).astype(np.uint16), kind="skipped")
        frame.pixel_size_um, frame.acquisition = px, acq
        rec.on_frame(frame)
    rec.close(frames_acquired=len(pixel_sizes))
    return tmp_path / "run"


def play_all(source: ReplaySource) -> tuple[list[RawFrame], list[str | None]]:
    """Play ``source``'s whole stack: the frames it hands over and its end (error or None)."""
    got: list[RawFrame] = []
    done: list[str | None] = []
    source.connect(got.append)
    source.start([useq.MDAEvent()] * source.stack.frames, mode="free-run",
                 on_done=done.append)
    _wait(lambda: bool(done))
    source.close()
    return got, done


def _played(source: ReplaySource) -> list[RawFrame]:
    """Every frame ``source`` plays of its whole stack (which ends without an error)."""
    got, done = play_all(source)
    assert done == [None]
    return got


def test_each_replayed_frame_carries_its_recorded_pixel_size(tmp_path: Path) -> None:
    """Before, every replayed frame had no pixel size of its own: an objective change
    during the recorded run (0.5 -> 1.0 µm here) was measured with the size at open."""
    run = _record(tmp_path, [0.5, 0.5, 1.0, 1.0], [1, 1, 1, 1])
    stack = open_stack(run)
    assert stack.pixel_size_um == 0.5  # the scale: the size at open
    source = ReplaySource(stack, interval_s=0.0)
    assert [raw.pixel_size_um for raw in _played(source)] == [0.5, 0.5, 1.0, 1.0]
    assert source.reference_pixel_size_um == 0.5  # what the frames' sizes are relative to


def test_a_recording_without_per_frame_pixel_sizes_replays_at_its_scale(
    tmp_path: Path,
) -> None:
    """Recordings from before frames.jsonl had each frame's pixel size: none per frame,
    and no reference (the service measures every frame with the scale's)."""
    run = _record(tmp_path, [0.5, 0.5], [1, 1])
    path = run / "frames.jsonl"
    records = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "pixel_size_um"})
                            + "\n" for r in records), encoding="utf-8")
    source = ReplaySource(open_stack(run), interval_s=0.0)
    assert source.reference_pixel_size_um is None
    assert [raw.pixel_size_um for raw in _played(source)] == [None, None]


def _played_with_acquisitions(stack: Any) -> list[Any]:
    """What a replay of ``stack`` hands over, in order: ``("frame", t)`` for each frame and
    ``("acquisition", number, frames)`` for each call of ``on_acquisition``."""
    got: list[Any] = []
    done: list[str | None] = []

    def begin(number: int, frames: int) -> bool:
        got.append(("acquisition", number, frames))
        return True

    source = ReplaySource(stack, interval_s=0.0)
    source.connect(lambda raw: got.append(("frame", raw.event.index["t"])),
                   on_acquisition=begin)
    source.start([useq.MDAEvent()] * stack.frames, mode="free-run", on_done=done.append)
    _wait(lambda: bool(done))
    source.close()
    assert done == [None]
    return got


def test_a_replay_calls_on_acquisition_where_the_recorded_acquisition_changes(
    tmp_path: Path,
) -> None:
    """Before, a replay merged the recorded acquisitions into one (it only warned): tracks
    linked across their boundary and every replayed row said acquisition 1. Now the source
    asks the service to begin another acquisition before the first frame of each."""
    run = _record(tmp_path, [0.5] * 5, [1, 1, 2, 2, 3])
    stack = open_stack(run)
    assert stack.acquisitions is not None and list(stack.acquisitions) == [1, 1, 2, 2, 3]
    assert _played_with_acquisitions(stack) == [
        ("frame", 0), ("frame", 1), ("acquisition", 2, 2), ("frame", 2), ("frame", 3),
        ("acquisition", 3, 1), ("frame", 4)]
    # one acquisition (whatever its number), or a frame record without one: no call
    one = open_stack(_record(tmp_path / "one", [0.5] * 3, [2, 2, 2]))
    assert _played_with_acquisitions(one) == [("frame", 0), ("frame", 1), ("frame", 2)]
    path = _record(tmp_path / "unknown", [0.5] * 3, [1, 1, 1]) / "frames.jsonl"
    records = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    del records[1]["acquisition"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    unknown = open_stack(path.parent)
    assert list(unknown.acquisitions or ()) == [1, None, 1]
    assert _played_with_acquisitions(unknown) == [("frame", 0), ("frame", 1), ("frame", 2)]
    # a TIFF stack has no acquisitions
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((3, 16, 16), np.uint16),
                     photometric="minisblack", metadata={"axes": "TYX"})
    assert _played_with_acquisitions(open_stack(tmp_path / "s.tif")) == [
        ("frame", 0), ("frame", 1), ("frame", 2)]


async def test_the_service_measures_each_replayed_frame_at_its_recorded_pixel_size(
    tmp_path: Path,
) -> None:
    """Before, the service measured every replayed frame with the recording's scale: an
    objective change (0.5 -> 1.0 µm) in the recorded run replayed with areas 4x too small."""
    from livemask.recording import open_recording
    from livemask.service.app import Service
    from tests.conftest import make_config
    from tests.test_recording import _nuclei_frames, _run_dir, _run_to_end

    images = _nuclei_frames(4)
    original = Recorder(tmp_path / "orig", pixel_size_um=0.5).start()
    for i, img in enumerate(images):
        frame = _frame(i, img, kind="skipped")
        frame.pixel_size_um = 0.5 if i < 2 else 1.0
        original.on_frame(frame)
    original.close()
    stack = open_stack(tmp_path / "orig")
    cfg = make_config(record={"enabled": True, "path": str(tmp_path / "replayed")},
                      hardware={"pixel_size_um": stack.pixel_size_um},
                      acquisition={"sequence": {"time_plan": {"interval": 0, "loops": 4}}})
    async with Service(cfg, source=ReplaySource(stack, interval_s=0.0)) as svc:
        svc.start_acquisition(None)
        await _run_to_end(svc)
    rec = open_recording(_run_dir(tmp_path / "replayed"))
    assert [f["pixel_size_um"] for f in rec.frames] == [0.5, 0.5, 1.0, 1.0]
    for f in rec.frames:
        s, px = f["summary"], f["pixel_size_um"]
        assert s["count"] > 5
        assert s["mean_area_um2"] == pytest.approx(s["mean_area_px"] * px * px, rel=1e-3)


def _two_acquisitions(tmp_path: Path) -> Path:
    """A recording of two acquisitions at position p 0, as the recorded service made them:
    frames 0-2 of one field in acquisition 1, then frames 3-5 of another field (the stage
    moved 128 µm) in acquisition 2, whose t restarts at 0."""
    from livemask.acquisition.simulated.nuclei import NucleiSample

    sample = NucleiSample(seed=5)
    original = Recorder(tmp_path / "orig", pixel_size_um=0.5).start()
    for i in range(6):
        acquisition = 1 + i // 3
        origin = 256.0 * (acquisition - 1)  # px: the second field lies beside the first
        frame = _frame(i, sample.render((origin, origin), (256, 256)).image, kind="skipped")
        frame.acquisition, frame.index = acquisition, {"t": i % 3, "p": 0}
        frame.position = {"x_um": origin * 0.5, "y_um": origin * 0.5, "z_um": None}
        frame.pixel_size_um = 0.5
        original.on_frame(frame)
        sample.step()
    original.close(frames_acquired=6)
    return tmp_path / "orig"


async def _until_finished(svc: Any, acquisitions: int) -> None:
    """Wait until ``svc`` has finished ``acquisitions`` and has no frame in flight."""
    import asyncio
    import time

    deadline = time.monotonic() + 30.0
    while svc.acquiring or svc.acquisitions_finished < acquisitions or svc.pipeline.in_flight:
        assert time.monotonic() < deadline, "the replay did not finish"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("mode", ["synchronized", "pipelined", "free-run"])
async def test_a_replay_starts_an_acquisition_where_the_recorded_run_did(
    tmp_path: Path, mode: str
) -> None:
    """Before, a recording of two acquisitions replayed as one: tracks of acquisition 1 ran
    on into acquisition 2 (same p: nuclei of the other field were linked to them, the rest
    got ids after theirs) and every replayed row said acquisition 1. Now the replay
    finishes acquisition 1 (its frames through the pipeline, even in free-run) and begins
    acquisition 2 where the recorded run did."""
    from livemask.recording import open_recording
    from livemask.service.app import Service
    from tests.conftest import make_config
    from tests.test_recording import _csv_rows, _run_dir

    stack = open_stack(_two_acquisitions(tmp_path))
    cfg = make_config(record={"enabled": True, "path": str(tmp_path / "replayed")},
                      hardware={"pixel_size_um": 0.5}, tracking={"enabled": True},
                      acquisition={"mode": mode,
                                   "sequence": {"time_plan": {"interval": 0, "loops": 6}}})
    async with Service(cfg, source=ReplaySource(stack, interval_s=0.0)) as svc:
        svc.start_acquisition(None)
        await _until_finished(svc, 2)
        assert svc.pipeline.acquisition == 2
    rec = open_recording(_run_dir(tmp_path / "replayed"))
    assert [f["acquisition"] for f in rec.frames] == [1, 1, 1, 2, 2, 2]
    rows = _csv_rows(rec.measurements_csv)
    assert rows and {r["acquisition"] for r in rows} == {"1", "2"}
    by_frame = {f["frame_id"]: [r for r in rows if r["frame_id"] == str(f["frame_id"])]
                for f in rec.frames if f["analysed"]}
    first = min(fid for fid in by_frame if fid >= 3)  # acquisition 2's first analysed frame
    ids = sorted(int(r["track_id"]) for r in by_frame[first])
    assert ids == list(range(1, len(ids) + 1))  # all new tracks, numbered afresh
    assert all(r["parent_track_id"] == "" for r in by_frame[first])  # no division across
    events = [json.loads(x) for x in (rec.path / "events.jsonl").read_text().splitlines()]
    runs = [(e["kind"], e["acquisition"]) for e in events
            if e["kind"] in ("acquisition_started", "acquisition_finished")]
    assert runs == [("acquisition_started", 1), ("acquisition_finished", 1),
                    ("acquisition_started", 2), ("acquisition_finished", 2)]
    assert [e.get("replayed_acquisition") for e in events
            if e["kind"] == "acquisition_started"] == [None, 2]
    assert [e["events"] for e in events if e["kind"] == "acquisition_started"] == [6, 3]
    assert all(e["error"] is None for e in events if e["kind"] == "acquisition_finished")
    # acquisition 1 finished once its frames were through, and 2 began before its first
    finished, started = (next(e["t"]["sent"] for e in events if e["kind"] == kind
                              and e["acquisition"] == n)
                         for kind, n in (("acquisition_finished", 1), ("acquisition_started", 2)))
    assert max(f["t"]["published"] for f in rec.frames[:3]) <= finished <= started
    assert started <= rec.frames[3]["t"]["received"]


async def test_a_stop_while_the_replay_waits_at_a_recorded_boundary_ends_it_there(
    tmp_path: Path,
) -> None:
    """The replay waits at the boundary for acquisition 1's frames (here held in the model);
    a stop meanwhile ends the replay there: acquisition 2 is not begun, none of its frames
    is played (before, free-run played all six as one acquisition), and acquisition 1
    finishes once, as a stopped one does."""
    import threading

    from livemask.recording import open_recording
    from livemask.service.app import Service
    from tests.conftest import make_config
    from tests.test_recording import _run_dir

    source = ReplaySource(open_stack(_two_acquisitions(tmp_path)), interval_s=0.0)
    cfg = make_config(record={"enabled": True, "path": str(tmp_path / "replayed")},
                      hardware={"pixel_size_um": 0.5},
                      acquisition={"mode": "free-run",
                                   "sequence": {"time_plan": {"interval": 0, "loops": 6}}})
    gate, at_boundary = threading.Event(), threading.Event()
    async with Service(cfg, source=source) as svc:
        real, begin = svc.pipeline.segmenter.predict, source.on_acquisition
        assert begin is not None

        def held(image: np.ndarray) -> np.ndarray:
            gate.wait(10)
            return real(image)

        def reached(number: int, frames: int) -> bool:
            at_boundary.set()
            return begin(number, frames)

        svc.pipeline.segmenter.predict = held  # type: ignore[method-assign]
        source.on_acquisition = reached
        svc.start_acquisition(None)
        _wait(at_boundary.is_set)
        await svc.stop_acquisition()
        assert not svc.acquiring and not source.running
        gate.set()
        await _until_finished(svc, 1)
        assert svc.pipeline.acquisition == 1
    rec = open_recording(_run_dir(tmp_path / "replayed"))
    assert [f["acquisition"] for f in rec.frames] == [1, 1, 1]
    events = [json.loads(x) for x in (rec.path / "events.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["acquisition"]) for e in events if e["kind"].startswith(
        "acquisition_")] == [("acquisition_started", 1), ("acquisition_finished", 1)]


def test_replayed_frames_carry_their_recorded_channel_and_exposure(tmp_path: Path) -> None:
    """Before, replayed frames had no settings of their own (every one said channel and
    exposure null) although frames.jsonl recorded them."""
    rng = np.random.default_rng(5)
    given = [{"channel": "DAPI", "channel_group": "Channel", "exposure_ms": 10.0},
             {"channel": "GFP", "channel_group": "Channel", "exposure_ms": 30.0}]
    rec = Recorder(tmp_path / "run", pixel_size_um=0.5).start()
    for fid, settings in enumerate(given):
        frame = _frame(fid, rng.integers(0, 4000, (24, 32)).astype(np.uint16), kind="skipped")
        frame.pixel_size_um, frame.settings = 0.5, dict(settings)
        rec.on_frame(frame)
    rec.close(frames_acquired=2)
    played = _played(ReplaySource(open_stack(tmp_path / "run"), interval_s=0.0))
    assert [raw.settings for raw in played] == given
