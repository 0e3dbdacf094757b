"""Recording (OME-Zarr + tables, never dropping a frame) and replay through the service."""

from __future__ import annotations

import asyncio
import csv
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import useq
import zarr
from typer.testing import CliRunner

from livemask.acquisition.replay import ReplaySource, open_stack
from livemask.acquisition.simulated.nuclei import NucleiSample
from livemask.analysis.measure import UNITS
from livemask.cli import app
from livemask.client import Subscriber
from livemask.errors import ConfigError, RecordingError, ReplayError
from livemask.recording import Recorder, new_run_dir, open_recording
from livemask.recording.reader import read_frames_jsonl
from livemask.service.app import Service
from livemask.service.frames import Frame
from tests.conftest import ROOT, free_tcp_address, make_config

runner = CliRunner()


def _frame(fid: int, image: np.ndarray, *, kind: str = "analysed", p: int = 0) -> Frame:
    frame = Frame(frame_id=fid, image=image, index={"t": fid, "p": p},
                  position={"x_um": 10.0 * p, "y_um": -5.0, "z_um": None},
                  t={"acquired": time.time()})
    if kind == "skipped":
        frame.skipped = True
    elif kind == "failed":
        frame.error = "inference failed: RuntimeError: injected"
    else:
        labels = np.zeros(image.shape, np.int32)
        labels[2:6, 3:9] = 1
        labels[10:12, 10:15] = 2
        frame.labels = labels
        frame.objects = [
            {"label": 1, "area_px": 24, "centroid_yx": [3.5, 5.5], "bbox": [2, 3, 6, 9],
             "mean_intensity": 1.0},
            {"label": 2, "area_px": 10, "centroid_yx": [10.5, 12.0], "bbox": [10, 10, 12, 15],
             "mean_intensity": 2.0},
        ]
        frame.summary = {"count": 2}
    return frame


def _run_dir(parent: Path) -> Path:
    runs = sorted(parent.glob("run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _wait(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ------------------------------------------------------------------ (1) the writer
def test_writer_round_trip_with_standard_zarr(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 4000, (24, 32)).astype(np.uint16) for _ in range(7)]
    kinds = ["analysed", "skipped", "analysed", "failed", "skipped", "analysed", "analysed"]
    rec = Recorder(tmp_path / "run", pixel_size_um=0.65, config={"x": 1}, units=UNITS).start()
    order = [0, 2, 1, 3, 4, 5]  # free-run publishes skipped frames before older ones
    for fid in order:
        rec.on_frame(_frame(fid, images[fid], kind=kinds[fid], p=fid % 2))
    rec.on_event({"kind": "acquisition_started", "seq": 0})
    # readable while recording, before close(): shape, chunks and the frames.jsonl lines
    _wait(lambda: rec.report()["frames_written"] == 6)
    live = zarr.open_group(tmp_path / "run" / "images.ome.zarr", mode="r")
    assert live["0"].shape == (6, 24, 32)
    np.testing.assert_array_equal(live["0"][5], images[5])
    assert len(read_frames_jsonl(tmp_path / "run" / "frames.jsonl")) == 6
    rec.on_frame(_frame(6, images[6]))
    rec.on_frame(_frame(7, np.zeros((5, 5), np.uint16)))  # another shape: rejected, marked
    rec.close(frames_acquired=8)

    root = zarr.open_group(tmp_path / "run" / "images.ome.zarr", mode="r")
    ome = root.attrs["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["t", "y", "x"]
    assert ms["axes"][1]["unit"] == "micrometer"
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.65, 0.65]
    data, masks = root["0"], root["labels/masks/0"]
    assert data.shape == masks.shape == (7, 24, 32) and data.chunks == (1, 24, 32)
    assert root["labels"].attrs["ome"]["labels"] == ["masks"]
    for fid in range(7):
        np.testing.assert_array_equal(data[fid], images[fid])
        assert (masks[fid].max() == 2) == (kinds[fid] == "analysed")
    frames = root.attrs["livemask"]["frames"]
    assert [f["frame_id"] for f in frames] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert [f["skipped"] for f in frames[:7]] == [k == "skipped" for k in kinds]
    assert [f["failed"] for f in frames[:7]] == [k == "failed" for k in kinds]
    assert [f["analysed"] for f in frames[:7]] == [k == "analysed" for k in kinds]
    assert frames[3]["index"] == {"t": 3, "p": 1} and frames[3]["position"]["x_um"] == 10.0
    assert frames[7]["stored"] is False and all(f["stored"] for f in frames[:7])
    assert root.attrs["livemask"]["complete"] is True
    assert root.attrs["livemask"]["frames_acquired"] == 8
    # tables beside the images
    rows = _csv_rows(tmp_path / "run" / "measurements.csv")
    # frame 7's image could not be stored, but its measurements stand (before: dropped too)
    assert len(rows) == 2 * (kinds.count("analysed") + 1)
    assert {r["frame_id"] for r in rows} == {"0", "2", "5", "6", "7"}
    assert rows[0]["centroid_y"] == "3.5" and rows[0]["bbox_max_col"] == "9"
    units = json.loads((tmp_path / "run" / "units.json").read_text(encoding="utf-8"))
    assert units["columns"]["area_um2"] == "µm²" and units["pixel_size_um"] == 0.65
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events].count("frame_failed") == 1
    (not_stored,) = [e for e in events if e["kind"] == "frame_not_stored"]
    assert not_stored["frame_id"] == 7 and "differs from the recording's" in not_stored["detail"]
    assert (tmp_path / "run" / "config.yaml").read_text().strip() == "x: 1"
    # a validating OME-Zarr reader accepts it (yaozarrs comes with pymmcore-plus)
    yaozarrs = pytest.importorskip("yaozarrs")
    yaozarrs.validate_zarr_store(str(tmp_path / "run" / "images.ome.zarr"))


def test_every_row_and_frame_record_names_its_acquisition(tmp_path: Path) -> None:
    """A recording spans the service run: MDA indices and track ids restart with each
    acquisition, so (acquisition, track_id) is what identifies a track in the tables."""
    image = np.zeros((16, 16), np.uint16)
    rec = Recorder(tmp_path / "run", pixel_size_um=0.65, units=UNITS).start()
    for fid, acquisition in enumerate([1, 1, 2, 2]):
        frame = _frame(fid, image)
        frame.acquisition = acquisition
        frame.index = {"t": fid % 2, "p": 0}  # the second acquisition's t restarts at 0
        rec.on_frame(frame)
    rec.close(frames_acquired=4)
    rows = _csv_rows(tmp_path / "run" / "measurements.csv")
    assert list(rows[0])[:3] == ["frame_id", "acquisition", "time_s"]
    assert [(r["acquisition"], r["t"]) for r in rows[::2]] == [
        ("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
    lines = read_frames_jsonl(tmp_path / "run" / "frames.jsonl")
    assert [r["acquisition"] for r in lines] == [1, 1, 2, 2]
    root = zarr.open_group(tmp_path / "run" / "images.ome.zarr", mode="r")
    assert [f["acquisition"] for f in root.attrs["livemask"]["frames"]] == [1, 1, 2, 2]
    units = json.loads((tmp_path / "run" / "units.json").read_text(encoding="utf-8"))
    assert units["columns"]["acquisition"].startswith("1 (number")


def test_recorder_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    from livemask.errors import RecordingError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    with pytest.raises(RecordingError, match="--record"):
        Recorder(tmp_path / "run", pixel_size_um=1.0).start()


# ------------------------------------------------------------------ (2) the service
async def _run_to_end(svc: Service, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while svc.acquiring or not svc.acquisitions_finished or svc.pipeline.in_flight:
        assert time.monotonic() < deadline, "acquisition did not finish"
        await asyncio.sleep(0.05)


async def test_service_records_every_frame_in_free_run(tmp_path: Path) -> None:
    cfg = make_config(
        record={"enabled": True, "path": str(tmp_path)},
        acquisition={"mode": "free-run",
                     "sequence": {"time_plan": {"interval": 0.02, "loops": 20}}},
    )
    async with Service(cfg) as svc:
        seg = svc.pipeline.segmenter
        real = seg.predict
        calls = {"n": 0}

        def slow_flaky(image: np.ndarray) -> np.ndarray:
            calls["n"] += 1
            time.sleep(0.1)  # analysis slower than the camera: frames skip analysis
            if calls["n"] == 2:
                raise RuntimeError("injected model fault")
            return real(image)

        seg.predict = slow_flaky  # type: ignore[method-assign]
        svc.start_acquisition(None)
        await _run_to_end(svc)
        counts = svc.pipeline.counters.snapshot()
    assert counts["frames_acquired"] == 20
    assert counts["frames_skipped"] > 0 and counts["frames_failed"] == 1
    rec = open_recording(_run_dir(tmp_path))
    assert rec.complete and rec.images.shape == (20, 512, 512)
    assert [f["frame_id"] for f in rec.frames] == list(range(20))
    assert sum(f["skipped"] for f in rec.frames) == counts["frames_skipped"]
    assert sum(f["failed"] for f in rec.frames) == 1
    analysed = [f for f in rec.frames if f["analysed"]]
    assert len(analysed) == counts["frames_analysed"] > 0
    assert all(rec.images[f["frame_id"]].max() > 0 for f in rec.frames)  # every frame stored
    assert rec.pixel_size_um == pytest.approx(0.65)
    for f in rec.frames:  # labels only where analysed
        assert (rec.labels[f["frame_id"]].max() > 0) == (f["analysed"] and f["objects"] > 0)
    rows = _csv_rows(rec.measurements_csv)
    assert len(rows) == sum(f["summary"]["count"] for f in analysed)
    assert {r["acquisition"] for r in rows} == {"1"}
    cut = [r["touches_edge"] == "True" for r in rows]  # nuclei cut by the 512² field's edge
    assert cut == [r["bbox_min_row"] == "0" or r["bbox_min_col"] == "0"
                   or r["bbox_max_row"] == "512" or r["bbox_max_col"] == "512" for r in rows]
    assert 0 < sum(cut) < len(rows)
    # bright nuclei on a dark background: their local background is below them, and their
    # background-corrected signal positive
    assert all(float(r["local_background"]) < float(r["mean_intensity"]) for r in rows)
    assert all(float(r["corrected_intensity"]) > 0 for r in rows)
    kinds = [json.loads(x)["kind"] for x in (rec.path / "events.jsonl").read_text().splitlines()]
    assert kinds[0] == "service_started"
    assert {"acquisition_started", "acquisition_finished", "frame_failed"} <= set(kinds)
    assert (rec.path / "config.yaml").is_file()


async def test_a_grain_scan_records_its_grain_statistics_and_edge_grains(
    tmp_path: Path,
) -> None:
    """frames.jsonl keeps each tile's and the scan's grain statistics (ASTM G included) and
    the CSV flags grains cut by the field, which the statistics leave out of the sizes."""
    cfg = make_config(
        record={"enabled": True, "path": str(tmp_path)},
        simulation={"sample": "grains", "seed": 0, "sensor_shape_px": [256, 256],
                    "pixel_size_um": 0.65, "truth": False},
        model={"name": "grains"},
        acquisition={"sequence": {"grid_plan": {"rows": 1, "columns": 3, "overlap": 0}}},
    )
    async with Service(cfg) as svc:
        svc.start_acquisition(None)
        await _run_to_end(svc, timeout_s=60.0)
    rec = open_recording(_run_dir(tmp_path))
    frames = list(rec.frames)
    assert len(frames) == 3 and all(f["analysed"] for f in frames)
    assert [f["grains"]["cumulative"]["tiles"] for f in frames] == [1, 2, 3]
    rows = _csv_rows(rec.measurements_csv)
    for f in frames:
        tile = f["grains"]["tile"]
        assert tile["astm_g_planimetric"] is not None and tile["count"] == f["objects"]
        cut = [r["touches_edge"] for r in rows if r["frame_id"] == str(f["frame_id"])]
        assert cut.count("True") == tile["count_edge"] > 0
        assert cut.count("False") == tile["count_inside"] > 0


async def test_a_roi_is_refused_while_recording(tmp_path: Path) -> None:
    # before: accepted; the recording then silently dropped every frame of the new shape
    cfg = make_config(record={"enabled": True, "path": str(tmp_path)})
    roi = {"roi": {"offset_x": 0, "offset_y": 0, "width": 256, "height": 200}}
    async with Service(cfg) as svc:
        with pytest.raises(ConfigError, match="a roi changes the frame shape"):
            await svc.enqueue([useq.MDAEvent.model_validate(roi)])
        assert not svc.acquiring


async def test_acquisition_error_keeps_the_frames(tmp_path: Path) -> None:
    cfg = make_config(record={"enabled": True, "path": str(tmp_path)})

    def events() -> Iterator[useq.MDAEvent]:
        for i in range(6):
            yield useq.MDAEvent(index={"t": i})
        raise RuntimeError("injected camera fault")

    async with Service(cfg) as svc:
        svc._start_events(events(), {}, None)
        await _run_to_end(svc)
        status = svc.status()
    assert "injected camera fault" in status["last_error"]
    assert status["recording"]["path"] == str(_run_dir(tmp_path))  # live counters in status
    rec = open_recording(_run_dir(tmp_path))
    assert rec.images.shape[0] == 6 and all(f["analysed"] for f in rec.frames)
    kinds = [json.loads(x)["kind"] for x in (rec.path / "events.jsonl").read_text().splitlines()]
    assert "error" in kinds


# ------------------------------------------------------------------ (3) SIGTERM mid-run
@pytest.mark.timeout(90)
def test_sigterm_leaves_every_acquired_frame_readable(tmp_path: Path) -> None:
    pub, ctl = free_tcp_address(), free_tcp_address()
    cmd = [sys.executable, "-m", "livemask", "serve",
           "--config", str(ROOT / "configs" / "simulated-nuclei.yaml"),
           "--pub", pub, "--control", ctl, "--frames", "1000", "--interval", "0.05",
           "--record", str(tmp_path / "rec")]
    log_path = tmp_path / "serve.log"
    seen: dict[int, np.ndarray] = {}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            with Subscriber(pub, ("frame",)) as sub:
                deadline = time.monotonic() + 60
                while len(seen) < 15 and time.monotonic() < deadline and proc.poll() is None:
                    msg = sub.recv(timeout_s=0.5)
                    if msg is not None:
                        seen[msg.header["frame_id"]] = msg.arrays["image"].copy()
            assert len(seen) >= 15, log_path.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    rec = open_recording(_run_dir(tmp_path / "rec"))
    n = rec.images.shape[0]
    assert rec.complete
    assert [f["frame_id"] for f in rec.frames] == list(range(n))  # no gap: nothing dropped
    assert all(f["stored"] for f in rec.frames)
    assert rec.attributes["livemask"]["frames_acquired"] == n
    assert f"recording closed: {n} frames written" in text and f"of {n} acquired" in text
    assert max(seen) < n
    for fid, image in seen.items():  # what subscribers saw is exactly what was recorded
        np.testing.assert_array_equal(rec.images[fid], image)


# ------------------------------------------------------------------ (4) replay
def _nuclei_frames(n: int, shape: tuple[int, int] = (256, 256)) -> list[np.ndarray]:
    sample = NucleiSample(seed=5)
    out = []
    for _ in range(n):
        out.append(sample.render((0.0, 0.0), shape).image)
        sample.step()
    return out


async def test_replay_of_a_recording_gives_measurements(tmp_path: Path) -> None:
    images = _nuclei_frames(6)
    original = Recorder(tmp_path / "orig", pixel_size_um=0.5).start()
    for i, img in enumerate(images):
        frame = _frame(i, img, kind="skipped", p=i % 2)  # images only
        frame.pixel_size_um = 0.5  # as a service recording at 0.5 µm records them
        original.on_frame(frame)
    original.close()

    stack = open_stack(tmp_path / "orig")
    assert stack.kind == "recording" and stack.frames == 6 and stack.pixel_size_um == 0.5
    source = ReplaySource(stack, interval_s=0.0)
    cfg = make_config(record={"enabled": True, "path": str(tmp_path / "replayed")},
                      hardware={"pixel_size_um": stack.pixel_size_um},
                      acquisition={"sequence": {"time_plan": {"interval": 0, "loops": 50}}})
    async with Service(cfg, source=source) as svc:
        svc.start_acquisition(None)
        await _run_to_end(svc)
        counts = svc.pipeline.counters.snapshot()
    assert counts["frames_acquired"] == 6 and counts["frames_analysed"] == 6  # synchronized
    rec = open_recording(_run_dir(tmp_path / "replayed"))
    assert [f["index"] for f in rec.frames] == [{"t": i, "p": i % 2} for i in range(6)]
    assert [f["position"]["x_um"] for f in rec.frames] == [10.0 * (i % 2) for i in range(6)]
    for i, img in enumerate(images):
        np.testing.assert_array_equal(rec.images[i], img)
    assert all(f["summary"]["count"] > 5 for f in rec.frames)
    rows = _csv_rows(rec.measurements_csv)
    assert len(rows) == sum(f["summary"]["count"] for f in rec.frames)
    assert float(rows[0]["area_um2"]) == pytest.approx(float(rows[0]["area_px"]) * 0.25, rel=1e-3)


def test_replay_cli_plays_a_tiff_stack(tmp_path: Path) -> None:
    images = np.stack(_nuclei_frames(4))
    tifffile.imwrite(tmp_path / "stack.tif", images, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "TYX", "unit": "um"})
    stack = open_stack(tmp_path / "stack.tif")
    assert (stack.frames, stack.shape, stack.pixel_size_um) == (4, (256, 256), 0.5)
    args = ["replay", str(tmp_path / "stack.tif"), "--exit-when-done", "--interval", "0",
            "--mode", "synchronized", "--pub", "tcp://127.0.0.1:*",
            "--control", "tcp://127.0.0.1:*", "--record", str(tmp_path / "out")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rec = open_recording(_run_dir(tmp_path / "out"))
    assert rec.images.shape == (4, 256, 256) and rec.pixel_size_um == 0.5
    assert [f["index"] for f in rec.frames] == [{"t": i} for i in range(4)]
    assert all(f["analysed"] and f["summary"]["count"] > 5 for f in rec.frames)
    assert len(_csv_rows(rec.measurements_csv)) == sum(f["summary"]["count"] for f in rec.frames)


def _replayed(stack: Any) -> list[tuple[dict[str, int], np.ndarray]]:
    """(index, image) of every frame a ReplaySource plays from ``stack``."""
    source = ReplaySource(stack, interval_s=0.0)
    got: list[tuple[dict[str, int], np.ndarray]] = []
    done: list[str | None] = []
    source.connect(lambda raw: got.append((dict(raw.event.index), raw.image)))
    source.start([useq.MDAEvent()] * (stack.frames + 3), mode="free-run", on_done=done.append)
    _wait(lambda: bool(done))
    source.close()
    assert done == [None]
    return got


def test_an_ome_tiff_of_several_series_replays_each_as_a_position(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, only the first series was replayed (5 of 10 frames), and the exit code was 0."""
    data = np.random.default_rng(0).integers(0, 4000, (2, 5, 32, 48)).astype(np.uint16)
    with tifffile.TiffWriter(tmp_path / "multipos.ome.tif", ome=True) as tw:
        for p in range(2):
            tw.write(data[p], metadata={"axes": "TYX"}, photometric="minisblack")
    with caplog.at_level("INFO", logger="livemask"):
        stack = open_stack(tmp_path / "multipos.ome.tif")
    assert "its 2 image series are replayed as positions (p)" in caplog.text
    assert (stack.frames, stack.shape) == (10, (32, 48))
    played = _replayed(stack)
    # the time points outermost, as a microscope acquires them
    assert [index for index, _ in played] == [{"t": t, "p": p} for t in range(5) for p in (0, 1)]
    for index, image in played:
        np.testing.assert_array_equal(image, data[index["p"], index["t"]])
    stack.close()
    with tifffile.TiffWriter(tmp_path / "planes.ome.tif", ome=True) as tw:
        for p in range(3):  # one plane per position
            tw.write(data[0, p], metadata={"axes": "YX"}, photometric="minisblack")
    stack = open_stack(tmp_path / "planes.ome.tif")
    assert [stack.index(i) for i in range(stack.frames)] == [{"p": 0}, {"p": 1}, {"p": 2}]
    np.testing.assert_array_equal(stack.plane(2), data[0, 2])
    stack.close()


def test_tiff_series_that_differ_replay_the_first_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with tifffile.TiffWriter(tmp_path / "mixed.ome.tif", ome=True) as tw:
        tw.write(np.zeros((5, 32, 32), np.uint16), metadata={"axes": "TYX"},
                 photometric="minisblack")
        tw.write(np.zeros((3, 16, 16), np.uint16), metadata={"axes": "TYX"},
                 photometric="minisblack")
    with caplog.at_level("WARNING", logger="livemask"):
        stack = open_stack(tmp_path / "mixed.ome.tif")
    try:
        assert stack.frames == 5 and stack.shape == (32, 32)
    finally:
        stack.close()
    assert ("holds 2 image series of different shapes or types ((5, 32, 32) uint16, "
            "(3, 16, 16) uint16); only the first is replayed") in caplog.text


@pytest.mark.parametrize(("name", "kwargs", "letter"), [
    ("slices.tif", {"imagej": True, "metadata": {"axes": "ZYX"}}, "Z"),  # ImageJ's own stacks
    ("imagej.tif", {"imagej": True}, "C"),  # tifffile: a 3-D ImageJ array reads back as CYX
    ("channels.ome.tif", {"ome": True, "metadata": {"axes": "CYX"},
                          "photometric": "minisblack"}, "C"),
])
def test_a_single_stack_axis_of_any_name_replays_as_time_points(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, kwargs: dict, letter: str
) -> None:
    """Before, a Z or C stack replayed as {"z": i} or {"c": i}: each plane its own tracking
    stream, so tracks never linked."""
    data = np.random.default_rng(1).integers(0, 4000, (4, 16, 24)).astype(np.uint16)
    tifffile.imwrite(tmp_path / name, data, **kwargs)
    assert tifffile.TiffFile(tmp_path / name).series[0].axes == f"{letter}YX"
    with caplog.at_level("INFO", logger="livemask"):
        stack = open_stack(tmp_path / name)
    assert f"its one stack axis '{letter}' (4 planes) is replayed as time points" in caplog.text
    played = _replayed(stack)
    assert [index for index, _ in played] == [{"t": i} for i in range(4)]
    for i, (_, image) in enumerate(played):
        np.testing.assert_array_equal(image, data[i])
    stack.close()


def test_open_stack_reads_ome_zarr_axes(tmp_path: Path) -> None:
    root = zarr.open_group(tmp_path / "img.zarr", mode="w", zarr_format=3, attributes={"ome": {
        "version": "0.5", "multiscales": [{
            "axes": [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
                     {"name": "y", "type": "space", "unit": "nanometer"},
                     {"name": "x", "type": "space", "unit": "nanometer"}],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, 1.0, 325.0, 325.0]}]}]}]}})
    arr = root.create_array("0", shape=(2, 3, 8, 9), dtype="uint16")
    arr[:] = np.arange(2 * 3 * 8 * 9, dtype=np.uint16).reshape(2, 3, 8, 9)
    stack = open_stack(tmp_path / "img.zarr")
    assert stack.frames == 6 and stack.pixel_size_um == pytest.approx(0.325)
    assert stack.index(4) == {"t": 1, "c": 1}
    np.testing.assert_array_equal(stack.plane(4), arr[1, 1])


def _recorded(tmp_path: Path, n: int) -> tuple[Path, list[np.ndarray]]:
    """A finished recording of ``n`` simulated nuclei frames (images only)."""
    images = _nuclei_frames(n)
    rec = Recorder(tmp_path / "orig", pixel_size_um=0.5).start()
    for i, img in enumerate(images):
        rec.on_frame(_frame(i, img, kind="skipped"))
    rec.close(frames_acquired=n)
    return tmp_path / "orig", images


def _replay_args(path: Path, out: Path) -> list[str]:
    return ["replay", str(path), "--exit-when-done", "--interval", "0",
            "--mode", "synchronized", "--pub", "tcp://127.0.0.1:*",
            "--control", "tcp://127.0.0.1:*", "--record", str(out)]


def test_a_frame_lost_from_a_recording_is_skipped_and_reported_not_replayed_black(
    tmp_path: Path,
) -> None:
    """Before, zarr read the missing chunk as zeros: the lost frames were replayed (and
    re-recorded) as black frames with 0 objects, and the replay exited 0."""
    run, images = _recorded(tmp_path, 6)
    for t in (2, 4):
        (run / "images.ome.zarr" / "0" / "c" / str(t) / "0" / "0").unlink()
    stack = open_stack(run)
    with pytest.raises(ReplayError,
                       match=r"frame_id 2 \(replayed as frame 2\) of .* is not stored: 1 chunk"):
        stack.plane(2)
    np.testing.assert_array_equal(stack.plane(3), images[3])

    result = runner.invoke(app, _replay_args(run, tmp_path / "out"))
    assert result.exit_code == 1, result.output
    assert "2 of 6 frame(s) could not be read and were skipped" in result.output
    again = open_recording(_run_dir(tmp_path / "out"))
    assert [f["index"]["t"] for f in again.frames] == [0, 1, 3, 5]
    for j, t in enumerate([0, 1, 3, 5]):
        np.testing.assert_array_equal(again.images[j], images[t])
    assert all(f["summary"]["count"] > 5 for f in again.frames)


def test_a_plain_zarr_reads_left_out_chunks_as_fill_value_and_skips_a_corrupt_one(
    tmp_path: Path,
) -> None:
    """zarr leaves out chunks of fill value by default (an all-zero frame or tile): those
    are replayed as zarr reads them. A corrupt chunk skips its frame, and the rest play."""
    rng = np.random.default_rng(0)
    data = rng.integers(100, 4000, (4, 32, 48)).astype(np.uint16)
    data[1, 16:, 32:] = 0  # a tile of zeros: zarr writes no chunk for it
    arr = zarr.create_array(tmp_path / "plain.zarr", shape=data.shape, chunks=(1, 16, 16),
                            dtype="uint16", fill_value=0)
    arr[:] = data
    assert not (tmp_path / "plain.zarr" / "c" / "1" / "1" / "2").exists()
    stack = open_stack(tmp_path / "plain.zarr")
    np.testing.assert_array_equal(stack.plane(1), data[1])
    (tmp_path / "plain.zarr" / "c" / "2" / "0" / "0").write_bytes(b"not a chunk")
    source = ReplaySource(stack, interval_s=0.0)
    got: list[int] = []
    done: list[str | None] = []
    source.connect(lambda raw: (got.append(raw.event.index["t"]),
                                np.testing.assert_array_equal(raw.image,
                                                              data[raw.event.index["t"]])))
    source.start([useq.MDAEvent(index={"t": i}) for i in range(4)], mode="free",
                 on_done=done.append)
    _wait(lambda: bool(done))
    assert got == [0, 1, 3] and source.unreadable == 1
    (error,) = done
    assert error is not None and "1 of 4 frame(s) could not be read" in error
    assert "frame 2 of" in error and "cannot be read" in error


def test_a_frame_not_stored_is_named_by_its_recorded_frame_id(tmp_path: Path) -> None:
    """Before, the message named the frame's place in the replay (2), not its frame_id (4)."""
    run, _ = _recorded(tmp_path, 6)
    jsonl = run / "frames.jsonl"
    lines = jsonl.read_text(encoding="utf-8").splitlines(keepends=True)
    jsonl.write_text("".join(lines[:1] + lines[3:]), encoding="utf-8")  # frames 1, 2 lost
    (run / "images.ome.zarr" / "0" / "c" / "4" / "0" / "0").unlink()
    stack = open_stack(run)
    assert [stack.index(i)["t"] for i in range(stack.frames)] == [0, 3, 4, 5]
    with pytest.raises(ReplayError, match=r"^frame_id 4 \(replayed as frame 2\) of .* is not "
                       r"stored: 1 chunk file"):
        stack.plane(2)


def test_a_recording_from_before_every_chunk_was_written_is_not_checked(
    tmp_path: Path,
) -> None:
    """Recordings made before the recorder wrote every chunk have no chunk for an all-zero
    frame: their frames are read as zarr reads them."""
    run, images = _recorded(tmp_path, 3)
    root = zarr.open_group(run / "images.ome.zarr", mode="r+")
    attrs = dict(root.attrs["livemask"])
    del attrs["every_chunk_written"]
    root.update_attributes({"livemask": attrs})
    (run / "images.ome.zarr" / "0" / "c" / "1" / "0" / "0").unlink()
    stack = open_stack(run)
    assert not stack.plane(1).any()
    np.testing.assert_array_equal(stack.plane(2), images[2])


def test_a_frame_record_that_cannot_be_read_is_a_skipped_frame(tmp_path: Path) -> None:
    """A recording's positions and indices are read from frames.jsonl as frames play: a
    read failure there ended the replay with a bare FileNotFoundError (flaky in CI when the
    folder went between a frame's image and its record)."""
    from livemask.acquisition.replay import MAX_UNREADABLE_IN_A_ROW

    run, _ = _recorded(tmp_path, MAX_UNREADABLE_IN_A_ROW + 5)
    stack = open_stack(run)
    (run / "frames.jsonl").unlink()  # images still there, the records gone
    source = ReplaySource(stack, interval_s=0.0)
    got: list[int] = []
    done: list[str | None] = []
    source.connect(lambda raw: got.append(raw.event.index["t"]))
    source.start([useq.MDAEvent(index={"t": i}) for i in range(stack.frames)], mode="free",
                 on_done=done.append)
    _wait(lambda: bool(done))
    (error,) = done
    assert got == [] and error is not None
    assert f"{MAX_UNREADABLE_IN_A_ROW} frames in a row could not be read" in error


def test_a_replay_ends_when_its_store_is_gone_or_keeps_failing(tmp_path: Path) -> None:
    """Skipping unreadable frames must not play a deleted store's nothing to the end."""
    import shutil

    from livemask.acquisition.replay import MAX_UNREADABLE_IN_A_ROW, ReplayStack

    run, _ = _recorded(tmp_path, 30)
    source = ReplaySource(open_stack(run), interval_s=0.05)
    got: list[int] = []
    done: list[str | None] = []
    source.connect(lambda raw: got.append(raw.event.index["t"]))
    source.start([useq.MDAEvent(index={"t": i}) for i in range(30)], mode="free",
                 on_done=done.append)
    _wait(lambda: len(got) >= 3)
    shutil.rmtree(run)
    _wait(lambda: bool(done))
    (error,) = done
    assert error is not None and "it no longer exists" in error and len(got) < 30

    def broken(i: int) -> np.ndarray:
        raise OSError("Input/output error")

    (tmp_path / "x").mkdir()
    stack = ReplayStack(tmp_path / "x", "zarr", 500, (8, 8), np.dtype("uint16"), broken)
    source = ReplaySource(stack, interval_s=0.0)
    done.clear()
    source.connect(lambda raw: None)
    source.start([useq.MDAEvent(index={"t": i}) for i in range(500)], mode="free",
                 on_done=done.append)
    _wait(lambda: bool(done))
    assert source.unreadable == MAX_UNREADABLE_IN_A_ROW
    assert f"{MAX_UNREADABLE_IN_A_ROW} frames in a row could not be read" in str(done[0])


def test_the_recorder_stores_an_all_zero_frame_so_a_missing_chunk_means_a_lost_frame(
    tmp_path: Path,
) -> None:
    rec = Recorder(tmp_path / "run", pixel_size_um=0.5).start()
    rec.on_frame(_frame(0, np.zeros((16, 16), np.uint16), kind="skipped"))
    rec.close(frames_acquired=1)
    assert (tmp_path / "run" / "images.ome.zarr" / "0" / "c" / "0" / "0" / "0").is_file()
    stack = open_stack(tmp_path / "run")
    assert not stack.plane(0).any()


def test_replay_exit_code_says_when_frames_failed_and_tiny_images_replay(
    tmp_path: Path,
) -> None:
    """Before, an all-NaN stack (every frame fails) exited 0; an 8x8 stack failed with raw
    pydantic output about simulation.sensor_shape_px."""
    tifffile.imwrite(tmp_path / "nan.tif", np.full((5, 32, 32), np.nan, np.float32),
                     photometric="minisblack")
    result = runner.invoke(app, _replay_args(tmp_path / "nan.tif", tmp_path / "out1"))
    assert result.exit_code == 1, result.output
    assert "frame(s) failed; the last: frame" in result.output
    assert "no finite pixel" in result.output
    tiny = np.random.default_rng(1).integers(0, 999, (3, 8, 8)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "tiny.tif", tiny, photometric="minisblack")
    result = runner.invoke(app, _replay_args(tmp_path / "tiny.tif", tmp_path / "out2"))
    assert result.exit_code == 0, result.output
    again = open_recording(_run_dir(tmp_path / "out2"))
    assert again.images.shape == (3, 8, 8) and all(f["analysed"] for f in again.frames)


def test_a_damaged_line_in_frames_jsonl_loses_only_that_frame(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, reading stopped at the first bad line: every later frame was dropped, and
    the warning blamed a full disk."""
    run, _ = _recorded(tmp_path, 6)
    jsonl = run / "frames.jsonl"
    good = jsonl.read_text(encoding="utf-8").splitlines(keepends=True)
    lines = list(good)
    lines[1] = "\x00\x00 garbage\n"
    lines[3] = '["not", "a", "record"]\n'
    jsonl.write_text("".join(lines), encoding="utf-8")
    with caplog.at_level("WARNING", logger="livemask"):
        rec = open_recording(run)
    assert [f["frame_id"] for f in rec.frames] == [0, 2, 4, 5]
    assert "2 line(s) are not frame records and are left out (line 2, 4)" in caplog.text
    assert "2 frame(s) on the t axis have no readable line" in caplog.text
    caplog.clear()
    jsonl.write_text("".join(good[:5]) + good[5][:20], encoding="utf-8")  # a torn last line
    with caplog.at_level("INFO", logger="livemask"):
        assert [f["frame_id"] for f in read_frames_jsonl(jsonl)] == [0, 1, 2, 3, 4]
    assert "last line is torn" in caplog.text and "not frame records" not in caplog.text


@pytest.mark.parametrize("scale", [-0.5, float("nan")])
def test_a_pixel_size_that_is_not_a_size_is_ignored_with_a_warning(
    tmp_path: Path, scale: float
) -> None:
    """Before, replay printed raw pydantic output for HardwareConfig and exited 2."""
    root = zarr.open_group(tmp_path / "img.zarr", mode="w", zarr_format=3, attributes={"ome": {
        "version": "0.5", "multiscales": [{
            "axes": [{"name": "t", "type": "time"}, {"name": "y", "type": "space"},
                     {"name": "x", "type": "space"}],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, scale, scale]}]}]}]}})
    arr = root.create_array("0", shape=(2, 32, 32), dtype="uint16")
    arr[:] = np.random.default_rng(0).integers(0, 999, (2, 32, 32))
    result = runner.invoke(app, _replay_args(tmp_path / "img.zarr", tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "which is not a size; ignored (set hardware.pixel_size_um" in result.output
    assert open_recording(_run_dir(tmp_path / "out")).pixel_size_um == 1.0


# ------------------------------------------------------------------ (5) bad input
def test_replay_rejects_bad_input_clearly(tmp_path: Path) -> None:
    result = runner.invoke(app, ["replay", str(tmp_path / "missing.tif")])
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ReplayError, match="unknown file type"):
        open_stack(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReplayError, match="neither a livemask recording"):
        open_stack(tmp_path / "empty")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    with pytest.raises(ReplayError, match="RGB"):
        open_stack(tmp_path / "rgb.tif")
    tifffile.imwrite(tmp_path / "line.tif", np.zeros((1, 16), np.uint16))
    with pytest.raises(ReplayError, match=r"line\.tif has shape \(1, 16\); expected 2-D images"):
        open_stack(tmp_path / "line.tif")
    root = zarr.open_group(tmp_path / "odd.zarr", mode="w", zarr_format=3, attributes={"ome": {
        "version": "0.5", "multiscales": [{
            "axes": [{"name": "t", "type": "time"}, {"name": "q"},
                     {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, 1.0, 1.0, 1.0]}]}]}]}})
    root.create_array("0", shape=(2, 2, 8, 8), dtype="uint16")
    with pytest.raises(ReplayError, match="axis 'q' is not supported"):
        open_stack(tmp_path / "odd.zarr")
    zarr.create_array(tmp_path / "plain5d.zarr", shape=(2, 2, 2, 8, 8), dtype="uint16")
    with pytest.raises(ReplayError, match="without OME axes"):
        open_stack(tmp_path / "plain5d.zarr")


@pytest.mark.parametrize(("target", "text", "found"), [
    ("images.ome.zarr/zarr.json", "{not json", "JSONDecodeError"),
    ("images.ome.zarr/zarr.json",
     '{"zarr_format": 3, "node_type": "group", "attributes": {}}', "KeyError: 'ome'"),
    ("images.ome.zarr/0/zarr.json", "{}", "node_type"),
])
def test_damaged_zarr_metadata_names_the_recording(
    tmp_path: Path, target: str, text: str, found: str
) -> None:
    """Before, these gave a KeyError traceback or a JSON error naming no file."""
    run, _ = _recorded(tmp_path, 1)
    (run / target).write_text(text)
    result = runner.invoke(app, ["replay", str(run)])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert f"error: {run}: it cannot be read as zarr (" in flat and found in flat


def test_close_waits_for_a_slow_disk_while_it_writes_and_gives_up_on_a_hung_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, close gave up after timeout_s in all: the frames of a large backlog on a
    slow disk were lost when the process exited (the writer thread is a daemon). (The
    finishing after the last frame, fsyncs and final attributes, gets timeout_s from when
    the queue emptied: 3 s leaves it room on a busy shared disk, where 1 s was tight.)"""
    slow_write = Recorder._write_frame

    def slow(self: Recorder, item: Any) -> None:
        time.sleep(0.2)
        slow_write(self, item)

    monkeypatch.setattr(Recorder, "_write_frame", slow)
    rec = Recorder(tmp_path / "slow", pixel_size_um=0.5).start()
    _give_frames(rec, range(16))
    rec.close(frames_acquired=16, timeout_s=3.0)  # over 3.2 s of writing, 0.2 s per frame
    assert rec.report()["frames_written"] == 16 and open_recording(tmp_path / "slow").complete

    hang = threading.Event()

    def hung(self: Recorder, item: Any) -> None:
        hang.wait(10)
        slow_write(self, item)

    monkeypatch.setattr(Recorder, "_write_frame", hung)
    rec = Recorder(tmp_path / "hung", pixel_size_um=0.5).start()
    _give_frames(rec, range(3))
    with caplog.at_level("ERROR", logger="livemask"):
        t0 = time.monotonic()
        rec.close(frames_acquired=3, timeout_s=0.3)
        waited = time.monotonic() - t0
    hang.set()
    assert waited < 5 and "3 frames still unwritten, none handled in the last 0.3 s" in caplog.text


def test_run_folders_are_created_at_once_so_two_services_never_share_one(
    tmp_path: Path,
) -> None:
    # before: the name was only checked, so two services starting in the same second both
    # wrote into run-<stamp> (80 frames.jsonl lines for 40 stored frames)
    now = time.time()
    first, second = new_run_dir(tmp_path, now), new_run_dir(tmp_path, now)
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == first.name + "-2"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(RecordingError, match=r"cannot record to .*a-file: it is a file, not"):
        new_run_dir(blocker)
    with pytest.raises(RecordingError, match=r"cannot record to .*a-file/sub.*writable folder"):
        new_run_dir(blocker / "sub")


def test_replaying_an_unfinished_recording_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(2)
    rec = Recorder(tmp_path / "run", pixel_size_um=0.65, units=UNITS).start()
    for fid in range(3):
        rec.on_frame(_frame(fid, rng.integers(0, 4000, (24, 32)).astype(np.uint16)))
    try:
        _wait(lambda: rec.report()["frames_written"] == 3)
        with caplog.at_level("WARNING", logger="livemask"):
            stack = open_stack(tmp_path / "run")  # still being written
        assert stack.frames == 3
        assert "is not marked complete" in caplog.text
    finally:
        rec.close(frames_acquired=3)
    caplog.clear()
    with caplog.at_level("WARNING", logger="livemask"):
        open_stack(tmp_path / "run")
    assert "not marked complete" not in caplog.text


def test_a_long_run_lists_its_frames_in_frames_jsonl_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livemask.recording import writer

    monkeypatch.setattr(writer, "MAX_ATTRIBUTE_FRAMES", 3)
    rec = Recorder(tmp_path / "run", pixel_size_um=0.65, units=UNITS).start()
    rng = np.random.default_rng(3)
    for fid in range(5):
        rec.on_frame(_frame(fid, rng.integers(0, 4000, (24, 32)).astype(np.uint16)))
    rec.close(frames_acquired=5)
    attrs = zarr.open_group(tmp_path / "run" / "images.ome.zarr", mode="r").attrs["livemask"]
    assert attrs["complete"] is True and attrs["frames_written"] == 5
    assert "frames" not in attrs and "frames.jsonl only" in attrs["frames_omitted"]
    assert [f["frame_id"] for f in open_recording(tmp_path / "run").frames] == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------ (4) write faults
_FULL_DISK_SCRIPT = r"""
import json, resource, signal, sys, time
import numpy as np
from livemask.analysis.measure import UNITS
from livemask.recording import Recorder
from tests.test_recording import _frame

path, limit = sys.argv[1], int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
errors = []
rec = Recorder(__import__("pathlib").Path(path), pixel_size_um=0.65, units=UNITS,
               on_error=errors.append).start()
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
rng = np.random.default_rng(0)
for fid in range(40):
    rec.on_frame(_frame(fid, rng.integers(0, 4000, (24, 32)).astype(np.uint16)))
rec.close(frames_acquired=40)
print(json.dumps({"report": rec.report(), "errors": errors}))
"""


def _run_with_file_size_limit(
    script: str, run: Path, limit_bytes: int
) -> tuple[dict[str, Any], str]:
    """Run a recorder ``script`` (argv: the run folder, the limit) in a subprocess; the
    JSON object on its last line of output, and its log (stderr)."""
    done = subprocess.run(
        [sys.executable, "-c", script, str(run), str(limit_bytes)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out, done.stderr


def test_a_file_that_cannot_grow_keeps_whole_lines_and_true_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, a full disk left lines in Python's buffers (dropped at close), cut a frame's
    CSV rows in the middle, and the counters said rows and frames were written that were
    not. Here the kernel stops every file at 3000 bytes (RLIMIT_FSIZE), as a full disk
    would: writes past it fail, one of them half-way."""
    run = tmp_path / "run"
    out, _ = _run_with_file_size_limit(_FULL_DISK_SCRIPT, run, 3000)
    report = out["report"]
    lines = (run / "frames.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]  # every line whole
    assert 0 < len(records) < 40
    assert report["frames_written"] == len([r for r in records if r["stored"]])
    assert report["frames_written"] + report["frames_rejected"] == 40
    rows = _csv_rows(run / "measurements.csv")
    assert report["measurement_rows"] == len(rows)
    by_frame: dict[str, int] = {}
    for row in rows:
        by_frame[row["frame_id"]] = by_frame.get(row["frame_id"], 0) + 1
    assert set(by_frame.values()) == {2}  # each frame's rows whole, none cut
    assert report["errors_total"] > 0 and report["failing"] is True
    with caplog.at_level("WARNING", logger="livemask"):
        assert len(open_recording(run).frames) == len(records)
    assert "have no readable line in frames.jsonl" in caplog.text
    (first,) = out["errors"]  # one report for the run of errors, not one per write
    assert "File too large" in first


def _give_frames(rec: Recorder, ids: range) -> None:
    """Hand the recorder small analysed frames with these ids."""
    rng = np.random.default_rng(ids.start)
    for fid in ids:
        rec.on_frame(_frame(fid, rng.integers(0, 4000, (24, 32)).astype(np.uint16)))


def test_a_deleted_run_folder_stops_the_recording_and_says_so(tmp_path: Path) -> None:
    """Before, zarr re-created the deleted folders, the side files went on into deleted
    files, and the recording said it was complete."""
    import shutil

    errors: list[str] = []
    run = tmp_path / "run"
    rec = Recorder(run, pixel_size_um=0.65, units=UNITS, on_error=errors.append).start()
    _give_frames(rec, range(3))
    _wait(lambda: rec.report()["frames_written"] == 3)
    shutil.rmtree(run)
    _give_frames(rec, range(3, 8))
    rec.close(frames_acquired=8)
    assert not run.exists()  # nothing re-created where the user deleted it
    report = rec.report()
    assert report["frames_written"] == 3 and report["frames_rejected"] == 5
    assert report["stopped"] is not None and "deleted or moved" in report["stopped"]
    (message,) = errors
    assert "the rest of the run is not recorded" in message


async def test_the_service_announces_a_recording_that_fails(tmp_path: Path) -> None:
    """Before, a full disk or a deleted folder was only in the log: no event, and
    ``last_error`` stayed null while the run went on unrecorded."""

    from livemask.client import AsyncSubscriber

    cfg = make_config(record={"enabled": True, "path": str(tmp_path)},
                      acquisition={"sequence": {"time_plan": {"interval": 0.05,
                                                              "loops": 40}}})
    async with Service(cfg) as svc, AsyncSubscriber(
        svc.publisher.bound_address, ("event",)
    ) as sub:
        run = _run_dir(tmp_path)
        await asyncio.sleep(0.3)
        svc.start_acquisition(None)
        assert svc.recorder is not None
        errors: list[dict[str, Any]] = []
        deleted = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not deleted and svc.recorder.report()["frames_written"] >= 3:
                # moved away at once (rmtree would race the writer, file by file)
                run.rename(tmp_path / "moved")
                deleted = True
            msg = await sub.recv(timeout_s=0.05)
            if msg is not None and msg.header["kind"] == "error":
                errors.append(msg.header)
            if msg is not None and msg.header["kind"] == "acquisition_finished":
                break
        await _run_to_end(svc)
        status = svc.status()
    # (a chunk written as the folder moved may fail first: that is announced too)
    assert 1 <= len(errors) <= 2 and all(e["source"] == "recording" for e in errors)
    error = errors[-1]
    assert "deleted or moved" in error["detail"]
    assert status["last_error"] == error["detail"]
    assert status["recording"]["stopped"] is not None
    assert status["frames_acquired"] == 40  # the acquisition went on


def test_one_side_file_failing_is_one_report_and_a_replaced_folder_stops_the_recording(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A measurements.csv past a file-size limit while the rest is written: one report for
    the run of errors (a review found one per frame). A run folder swapped for another of
    the same name (moved, then re-created) stops the recording like a deleted one."""
    from livemask.recording.files import BlockFile

    real_write = BlockFile.write

    def csv_full(self: BlockFile, text: str) -> None:
        if self.path.name == "measurements.csv" and not text.startswith("frame_id"):
            raise OSError(27, "File too large")
        real_write(self, text)

    monkeypatch.setattr(BlockFile, "write", csv_full)
    errors: list[str] = []
    run = tmp_path / "run"
    rec = Recorder(run, pixel_size_um=0.65, units=UNITS, on_error=errors.append).start()
    _give_frames(rec, range(6))
    _wait(lambda: rec.report()["frames_written"] == 6)
    assert len(errors) == 1 and "measurement rows" in errors[0]
    assert rec.report()["failing"] is True
    run.rename(tmp_path / "moved")
    run.mkdir()  # another folder where the run was
    _give_frames(rec, range(6, 9))
    rec.close(frames_acquired=9)
    assert rec.report()["stopped"] is not None
    assert len(errors) == 2 and "deleted or moved" in errors[1]  # announced while failing
    assert list(run.iterdir()) == []  # nothing written into the new folder


def test_a_labels_array_that_fails_to_be_made_is_made_with_the_next_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the images array stayed, the labels were never made and the recording was
    never marked complete (bug hunt). Now the arrays are made together or not at all."""
    from zarr.core.group import Group

    real = Group.create_group
    failures = []

    def fails_once(self: Any, name: str, **kwargs: Any) -> Any:
        if name == "labels" and not failures:
            failures.append(name)
            raise OSError(28, "No space left on device")
        return real(self, name, **kwargs)

    monkeypatch.setattr(Group, "create_group", fails_once)
    image = np.arange(24 * 32, dtype=np.uint16).reshape(24, 32)
    rec = Recorder(tmp_path / "run", pixel_size_um=0.65, units=UNITS).start()
    rec.on_frame(_frame(0, image))
    _wait(lambda: rec.report()["frames_written"] + rec.counts.rejected >= 1)
    for fid in (1, 2):
        rec.on_frame(_frame(fid, image))
    rec.close(frames_acquired=3)
    assert failures == ["labels"]
    root = zarr.open_group(tmp_path / "run" / "images.ome.zarr", mode="r")
    masks = root["labels/masks/0"]
    assert [int(masks[fid].max()) for fid in (1, 2)] == [2, 2]
    assert [f["stored"] for f in root.attrs["livemask"]["frames"]] == [False, True, True]


def test_a_growing_backlog_is_warned_about_again_each_time_it_doubles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the first crossing of max_queue_mb warned: a disk a little too slow for the
    camera filled memory over a day with nothing more said (long-run hunt)."""
    release = threading.Event()
    real = Recorder._write_frame

    def slow_disk(self: Recorder, item: Any) -> None:
        release.wait(10)
        real(self, item)

    monkeypatch.setattr(Recorder, "_write_frame", slow_disk)
    image = np.zeros((24, 32), np.uint16)  # 1.5 KB + 3 KB of labels a frame
    rec = Recorder(tmp_path / "run", pixel_size_um=0.65, units=UNITS,
                   max_queue_mb=0.001).start()
    try:
        with caplog.at_level("WARNING", logger="livemask"):
            for fid in range(10):
                rec.on_frame(_frame(fid, image))
    finally:
        release.set()
        rec.close(frames_acquired=10)
    warned = [r.getMessage() for r in caplog.records if "recorder is behind" in r.getMessage()]
    assert [m.split("(")[1].split(" ")[0] for m in warned] == ["1", "2", "4", "8"]
    assert rec.report()["frames_written"] == 10  # nothing dropped


def test_frame_records_are_read_from_the_file_as_asked_for(tmp_path: Path) -> None:
    """Opening a recording held every frames.jsonl record as dicts (≈ 2.6 KB a frame: 16 GB
    for a week at 10 frames/s); now 16 bytes a frame, the records read when asked for."""
    from livemask.recording.reader import FrameRecords

    path = tmp_path / "frames.jsonl"
    lines = [json.dumps({"frame_id": i, "index": {"t": i}, "note": "é"}) for i in (2, 0, 3, 1)]
    path.write_text("\n".join([lines[0], "not json", lines[1], lines[2], lines[3]]) + "\n",
                    encoding="utf-8")
    records = FrameRecords.read(path)
    assert list(records.frame_ids) == [0, 1, 2, 3] and len(records) == 4
    assert list(records) == read_frames_jsonl(path)
    assert records[2] == {"frame_id": 2, "index": {"t": 2}, "note": "é"}
    assert records[-1]["frame_id"] == 3 and [r["frame_id"] for r in records[1:3]] == [1, 2]
    assert records.offsets.nbytes + records.frame_ids.nbytes == 16 * 4
