"""Grain statistics in live use: tiles skipped in free-run mode, MinIsWhite TIFFs read
inverted (not masks nor ImageJ files, whose MinIsWhite is an inverting LUT), and no µm labels
nor ASTM G numbers without a pixel size."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import useq
from rich.console import Console

from livemask.acquisition.replay import ReplaySource, ReplayStack, open_stack
from livemask.acquisition.simulated.grains import GrainParams, GrainSample
from livemask.acquisition.simulated.nuclei import NucleiSample
from livemask.acquisition.source import RawFrame
from livemask.analysis.grains import CumulativeGrainStats, grain_statistics
from livemask.dashboard.server import DashboardServer
from livemask.dashboard.state import DashboardState
from livemask.errors import ReplayError
from livemask.evaluation import evaluate, load_folder
from livemask.offline import load_segmenter, read_image_file, segment_file
from livemask.protocol import Message
from livemask.service.app import Service
from livemask.service.pipeline import Pipeline
from livemask.transport.publisher import MemoryPublisher, ZmqPublisher
from livemask.viewer import ConsoleView
from tests.conftest import make_config
from tests.test_dashboard import browser, publisher  # noqa: F401  (fixtures)
from tests.test_service import collect_run

TILE = 96  # px a side
PIXEL_UM = 0.5


def _grain_tiles(n: int) -> list[np.ndarray]:
    """``n`` different fields of one small polycrystal."""
    sample = GrainSample(GrainParams(world_shape_px=(384, 384), mean_grain_diameter_px=20), 1)
    return [sample.render((TILE * (i // 3), TILE * (i % 3)), (TILE, TILE)).image
            for i in range(n)]


def _tile(image: np.ndarray, i: int) -> RawFrame:
    """Tile ``i`` of a row scan: touching fields, ``TILE`` px apart."""
    position = {"x_um": i * TILE * PIXEL_UM, "y_um": 0.0, "z_um": None}
    event = useq.MDAEvent(index={"g": i})  # type: ignore[arg-type]
    return RawFrame(image, event, time.time(), position, None)


def _grain_pipeline(mode: str, *, pixel_size_known: bool = True) -> tuple[Pipeline,
                                                                          MemoryPublisher]:
    pub = MemoryPublisher()
    pipe = Pipeline(load_segmenter("grains_classical", threads=1), pub,
                    mode=mode, queue_size=1, pixel_size_um=PIXEL_UM,  # type: ignore[arg-type]
                    pixel_size_known=pixel_size_known)
    return pipe, pub


async def _scan(pipe: Pipeline, tiles: list[np.ndarray]) -> dict[str, Any]:
    """Run one acquisition of ``tiles``, all arriving at once (a camera far ahead of the
    pipeline); the last published cumulative grain statistics."""
    pipe.start()
    pipe.begin_acquisition()
    for i, image in enumerate(tiles):
        pipe.submit(_tile(image, i))
    assert await pipe.drain(30.0)
    await pipe.close()
    last = pipe.latest["measurements"]["grains"]["cumulative"]
    return dict(last)


# ---------------------------------------------------------------- 1. free-run tile scans
async def test_free_run_scan_warns_and_counts_the_tiles_it_leaves_out(
    livemask_log: list[logging.LogRecord],
) -> None:
    """A 16-tile free-run scan pooled 4 tiles, silently: now the first skipped tile is
    warned about (not the start: an acquisition of one frame skips none), and the skipped
    tiles are counted."""
    tiles = _grain_tiles(6)
    pipe, _ = _grain_pipeline("free-run")
    cumulative = await _scan(pipe, tiles)
    skipped = pipe.counters.snapshot()["frames_skipped"]
    assert skipped > 0  # the camera was ahead: tiles skipped analysis
    assert cumulative["tiles_skipped"] == skipped
    assert cumulative["tiles"] + cumulative["tiles_skipped"] == len(tiles)
    warnings = [r.getMessage() for r in livemask_log if r.levelno == logging.WARNING]
    first_skip = [w for w in warnings if "skipped analysis" in w and "frame " in w]
    assert len(first_skip) == 1, warnings  # once per acquisition, the others counted
    assert "left out of the scan's grain statistics" in first_skip[0]
    assert "acquisition.mode: pipelined" in first_skip[0]


async def test_a_pipelined_scan_pools_every_tile_without_a_warning(
    livemask_log: list[logging.LogRecord],
) -> None:
    tiles = _grain_tiles(4)
    pipe, _ = _grain_pipeline("pipelined")
    cumulative = await _scan(pipe, tiles)
    assert (cumulative["tiles"], cumulative["tiles_skipped"]) == (4, 0)
    assert not [r for r in livemask_log if r.levelno >= logging.WARNING]


def test_the_view_says_how_many_tiles_skipped_analysis() -> None:
    labels = np.repeat(np.repeat(np.arange(1, 17, dtype=np.int32).reshape(4, 4), 10, 0), 10, 1)
    stats = CumulativeGrainStats()
    cumulative = stats.add(labels, 0.5)
    cumulative["tiles_skipped"] = 12
    view = ConsoleView()
    view.update(Message("measurements", {
        "frame_id": 3, "index": {"g": 15}, "summary": {"count": 16}, "objects": [],
        "grains": {"tile": grain_statistics(labels, 0.5), "cumulative": cumulative},
    }, {}))
    assert "over 1 tiles, 12 skipped" in view.summary_line()


# ---------------------------------------------------------------- 2. MinIsWhite TIFFs
def _nuclei(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    r = NucleiSample(seed=3).render((60.0, 60.0), (size, size))
    return r.image, r.labels


def _min_is_white(image: np.ndarray) -> np.ndarray:
    """What a MinIsWhite file stores for ``image`` (as a viewer shows it)."""
    return (np.iinfo(image.dtype).max - image).astype(image.dtype)


def test_segment_reads_a_min_is_white_tiff_as_a_viewer_shows_it(
    tmp_path: Path, livemask_log: list[logging.LogRecord],
) -> None:
    """Nuclei stored MinIsWhite were segmented with inverted contrast (F1 0.98 -> 0.07)."""
    image, _ = _nuclei()
    normal, white = tmp_path / "normal.tif", tmp_path / "white.tif"
    tifffile.imwrite(normal, image, photometric="minisblack")
    tifffile.imwrite(white, _min_is_white(image), photometric="miniswhite")
    read = read_image_file(white).data
    assert read.dtype == image.dtype and np.array_equal(read, image)
    assert any("white.tif is stored MinIsWhite" in r.getMessage() for r in livemask_log)
    for path in (normal, white):
        segment_file(path, tmp_path / f"{path.stem}_labels.tif", model="nuclei_classical")
    labels = [tifffile.imread(tmp_path / f"{p}_labels.tif") for p in ("normal", "white")]
    assert labels[0].max() > 3 and np.array_equal(labels[0], labels[1])


def _assert_replays(path: Path, frames: np.ndarray, *, cut_short: bool) -> None:
    """``open_stack`` of ``path`` (first cut to 60 % of its bytes if asked) reads at least
    3 planes, each equal to ``frames``' one."""
    if cut_short:
        raw = path.read_bytes()
        path.write_bytes(raw[:int(len(raw) * 0.6)])
    stack = open_stack(path)
    try:
        assert stack.frames >= 3
        for i in range(stack.frames):
            assert np.array_equal(stack.plane(i), frames[i]), i
    finally:
        stack.close()


@pytest.mark.parametrize("layout", ["plain", "zlib", "cut short"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_replay_reads_a_min_is_white_tiff_as_a_viewer_shows_it(
    tmp_path: Path, layout: str, dtype: type,
) -> None:
    """Memory-mapped, plane by plane (compressed) and cut short: every reader inverts."""
    rng = np.random.default_rng(4)
    top = np.iinfo(dtype).max
    frames: np.ndarray = rng.integers(0, top, (6, 40, 48), endpoint=True).astype(dtype)
    path = tmp_path / "white.tif"
    options: dict[str, Any] = {"compression": "zlib"} if layout == "zlib" else {}
    tifffile.imwrite(path, _min_is_white(frames), photometric="miniswhite", **options)
    _assert_replays(path, frames, cut_short=layout == "cut short")


def test_a_float_min_is_white_tiff_not_from_imagej_is_refused_saying_what_to_do(
    tmp_path: Path,
) -> None:
    path = tmp_path / "white.tif"
    tifffile.imwrite(path, np.ones((2, 32, 32), np.float32), photometric="miniswhite")
    with pytest.raises(ReplayError, match=r"MinIsWhite .* save it as MinIsBlack"):
        open_stack(path)
    with pytest.raises(ValueError, match=r"stored MinIsWhite"):
        read_image_file(path)


def test_min_is_black_tiffs_read_as_before(tmp_path: Path) -> None:
    image, _ = _nuclei(64)
    path = tmp_path / "normal.tif"
    tifffile.imwrite(path, image, photometric="minisblack")
    assert np.array_equal(read_image_file(path).data, image)
    stack = open_stack(path)
    try:
        assert np.array_equal(stack.plane(0), image)
    finally:
        stack.close()


@pytest.mark.parametrize("imagej", [False, True])
@pytest.mark.parametrize("kind", ["binary", "labels"])
def test_a_min_is_white_mask_is_evaluated_as_its_min_is_black_twin(
    tmp_path: Path, kind: str, imagej: bool,
) -> None:
    """A mask's stored values are its labels: an ImageJ binary mask with an inverting LUT
    (objects 255, stored MinIsWhite) had objects and background swapped."""
    image, labels = _nuclei()
    mask = (labels > 0).astype(np.uint8) * 255 if kind == "binary" else labels.astype(np.uint16)
    scores, masks = [], []
    for photometric in ("minisblack", "miniswhite"):
        images, masks_dir = tmp_path / photometric / "images", tmp_path / photometric / "masks"
        images.mkdir(parents=True)
        masks_dir.mkdir()
        tifffile.imwrite(images / "a.tif", image)
        tifffile.imwrite(masks_dir / "a.tif", mask, photometric=photometric, imagej=imagej)
        ((_, truth),) = load_folder(images, masks_dir)
        masks.append(truth)
        result = evaluate(load_segmenter("nuclei_classical", threads=1), [(image, truth)], "x")
        scores.append({k: v for k, v in result.as_dict().items() if not k.endswith("_ms")})
    assert np.array_equal(masks[0] > 0, labels > 0) and np.array_equal(masks[0], masks[1])
    assert scores[0]["f1_iou50"] > 0.5 and scores[0] == scores[1]


def _imagej_inverted_lut(path: Path, frames: np.ndarray) -> None:
    """``frames`` saved by ImageJ shown with an inverting LUT: the stored values are the
    measurement, PhotometricInterpretation 0 the LUT."""
    tifffile.imwrite(path, frames, imagej=True, photometric="miniswhite")
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej and tif.pages.first.photometric == 0


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_segment_reads_an_imagej_inverted_lut_tiff_with_its_stored_values(
    tmp_path: Path, dtype: type, livemask_log: list[logging.LogRecord],
) -> None:
    """Fluorescence saved by ImageJ with an inverting LUT read inverted (nucleus 3000 read
    62535), and as float32 was refused."""
    image = _nuclei()[0].astype(dtype)
    normal, lut = tmp_path / "normal.tif", tmp_path / "lut.tif"
    tifffile.imwrite(normal, image, imagej=True)
    _imagej_inverted_lut(lut, image)
    read = read_image_file(lut).data
    assert read.dtype == image.dtype and np.array_equal(read, image)
    assert any("lut.tif is an ImageJ file with an inverting LUT" in r.getMessage()
               and r.levelno == logging.INFO for r in livemask_log)
    assert not any("inverted" in r.getMessage() for r in livemask_log
                   if r.levelno >= logging.WARNING)
    for path in (normal, lut):
        segment_file(path, tmp_path / f"{path.stem}_labels.tif", model="nuclei_classical")
    labels = [tifffile.imread(tmp_path / f"{p}_labels.tif") for p in ("normal", "lut")]
    assert labels[0].max() > 3 and np.array_equal(labels[0], labels[1])


@pytest.mark.parametrize("layout", ["plain", "cut short"])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_replay_reads_an_imagej_inverted_lut_tiff_with_its_stored_values(
    tmp_path: Path, layout: str, dtype: type,
) -> None:
    rng = np.random.default_rng(5)
    frames = rng.integers(100, 3000, (6, 40, 48)).astype(dtype)
    path = tmp_path / "lut.tif"
    _imagej_inverted_lut(path, frames)
    _assert_replays(path, frames, cut_short=layout == "cut short")


# ---------------------------------------------------------------- 3. no pixel size
def test_grain_statistics_have_no_astm_g_without_a_pixel_size() -> None:
    labels = np.repeat(np.repeat(np.arange(1, 26, dtype=np.int32).reshape(5, 5), 20, 0), 20, 1)
    known = grain_statistics(labels, 1.0)
    unknown = grain_statistics(labels, 1.0, pixel_size_known=False)
    assert known["astm_g_planimetric"] is not None and known["astm_g_intercept"] is not None
    assert unknown["astm_g_planimetric"] is None and unknown["astm_g_intercept"] is None
    assert unknown["n_a_per_mm2"] == known["n_a_per_mm2"]  # the counts are still there
    stats = CumulativeGrainStats(pixel_size_known=False)
    stats.add(labels, 1.0)
    pooled = stats.add(labels[:60, :60], 1.0)
    assert pooled["tiles"] == 2 and pooled["astm_g_planimetric"] is None
    assert pooled["astm_g_intercept"] is None and pooled["astm_g_planimetric_ci95"] is None


async def _uncalibrated_grain_run() -> tuple[dict[str, list[Message]], Message]:
    """Two grain tiles replayed without a pixel size through the service: its messages and
    its last status."""
    tiles = _grain_tiles(2)
    stack = ReplayStack(
        Path("tiles"), "tiff", 2, (TILE, TILE), np.dtype(tiles[0].dtype), lambda i: tiles[i],
        positions=[{"x_um": x, "y_um": 0.0, "z_um": None} for x in (0.0, 100.0)])
    cfg = make_config(simulation={"sample": "grains"}, model={"name": "grains_classical"},
                      acquisition={"sequence": {"time_plan": {"interval": 0, "loops": 2}}})
    async with Service(cfg, source=ReplaySource(stack, interval_s=0.0)) as svc:
        assert svc.pixel_size_known is False
        got = await collect_run(svc, ("measurements", "status", "event"))
    return got, got["status"][-1]


async def test_without_a_pixel_size_sizes_are_shown_in_px_and_no_astm_g() -> None:
    """An uncalibrated rig's grains were shown in µm / µm² with ASTM G as if 1 px = 1 µm,
    while status units said px."""
    got, status = await _uncalibrated_grain_run()
    grains = got["measurements"][-1].header["grains"]
    for stats in (grains["tile"], grains["cumulative"]):
        assert stats["astm_g_planimetric"] is None and stats["astm_g_intercept"] is None
    assert grains["cumulative"]["tiles"] == 2 and grains["tile"]["count"] > 0
    assert status.header["units"]["area_um2"].startswith("px²")
    view = ConsoleView()
    view.update(status)
    view.update(got["measurements"][-1])
    console = Console(width=200, record=True)
    console.print(view.render())
    text = console.export_text() + "\n" + view.summary_line()
    assert "µm" not in text and "px²" in text and "no pixel size" in text
    state = DashboardState()
    sent = state.add(status)
    assert sent is not None
    assert (sent["status"]["length_unit"], sent["status"]["area_unit"]) == ("px", "px²")


async def test_dashboard_page_shows_px_and_no_astm_g_without_a_pixel_size(
    browser: Any, publisher: ZmqPublisher,  # noqa: F811
) -> None:
    labels = np.repeat(np.repeat(np.arange(1, 26, dtype=np.int32).reshape(5, 5), 20, 0), 20, 1)
    stats = CumulativeGrainStats(pixel_size_known=False)
    grains = {"tile": grain_statistics(labels, 1.0, pixel_size_known=False),
              "cumulative": stats.add(labels, 1.0)}
    units = {"area_um2": "px² (no pixel-size calibration)",
             "equivalent_diameter_um": "px (no pixel-size calibration)"}

    async def feed() -> None:
        fid = 0
        while True:
            publisher.publish("status", {"state": "running", "acquiring": True,
                                         "uptime_s": float(fid), "pixel_size_um": 1.0,
                                         "units": units})
            base = {"frame_id": fid, "t": {"acquired": time.time()}, "index": {"g": fid}}
            publisher.publish("measurements", {**base, "grains": grains,
                                               "summary": {"count": 25, "mean_area_um2": 400.0}})
            fid += 1
            await asyncio.sleep(0.05)

    async with DashboardServer(publisher.bound_address, port=0) as server:
        feeder = asyncio.create_task(feed())
        try:
            page = await browser.new_page()
            await page.goto(server.url)
            await page.wait_for_function(
                "() => !document.getElementById('grains-panel').hidden"
                " && document.getElementById('status').textContent.includes('pixel size')",
                timeout=5000)
            await asyncio.sleep(0.3)  # the grains panel redrawn with the status' units
            astm = await page.text_content("#astm") or ""
            service = await page.text_content("#status") or ""
            await page.close()
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
    assert "µm" not in astm and "px²" in astm and "no pixel size" in astm
    assert "not calibrated" in service
