"""Grain tiles of a scan (grains hunt): a camera-ROI frame's tile is placed where its ROI
lies on the stage (it was centred on the stage position, so tiles were dropped as
overlapping or pooled twice), two tiles' overlap counts against the smaller one (a small
tile inside a later big one was pooled twice), and ``tiles_skipped`` counts the frames
skipped before the tile it is published with (it counted later ones too).

The pipeline here is the service's (real segmenter, publisher wire format), fed the frames
a simulated camera takes: the stage position is the centre of the camera's full image, and
a camera ROI is a window of that image (``livemask.acquisition.simulated.world``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import pytest
import useq

from livemask.acquisition.simulated.grains import GrainParams, GrainSample
from livemask.acquisition.source import RawFrame
from livemask.analysis.grains import CumulativeGrainStats, tile_footprint
from livemask.offline import load_segmenter
from livemask.service.pipeline import Pipeline
from livemask.transport.publisher import MemoryPublisher

CAMERA = 128  # px a side: the camera's full image
PX = 0.5  # µm per pixel: the full image is 64 µm a side
WORLD = 512  # px a side of the simulated sample
SAMPLE = GrainSample(GrainParams(world_shape_px=(WORLD, WORLD), mean_grain_diameter_px=16), 1)


def _frame(
    x_um: float, y_um: float, roi: tuple[int, int, int, int] | None = None, *,
    origin: int = 0, pixel_size_um: float | None = None, camera: int = CAMERA,
) -> RawFrame:
    """What the camera takes at stage (``x_um``, ``y_um``): its full image, or the camera
    ROI ``roi`` (x, y, width, height in its pixels, Micro-Manager's order) of it, with the
    ``settings.roi`` the acquisition source gives such a frame."""
    scale = (pixel_size_um or PX) / PX  # a binned camera: ``camera`` px of that size
    top = y_um / PX + WORLD / 2 - camera * scale / 2
    left = x_um / PX + WORLD / 2 - camera * scale / 2
    shape = (camera, camera)
    settings: dict[str, Any] = {"channel": None, "channel_group": None, "exposure_ms": None}
    if roi is not None:
        x, y, w, h = roi
        top, left, shape = top + y * scale, left + x * scale, (h, w)
        settings["roi"] = {"offset_x": x, "offset_y": y, "width": w, "height": h}
    image = SAMPLE.render((top, left), (round(shape[0] * scale), round(shape[1] * scale))).image
    if scale != 1:
        image = image[:: round(scale), :: round(scale)]
    position = {"x_um": x_um, "y_um": y_um, "z_um": None}
    event = useq.MDAEvent()
    return RawFrame(image, event, time.time(), position, None, origin=origin,
                    pixel_size_um=pixel_size_um, settings=settings)


def _pipeline(mode: str = "pipelined", **kwargs: Any) -> tuple[Pipeline, MemoryPublisher]:
    pub = MemoryPublisher()
    pipe = Pipeline(load_segmenter("grains_classical", threads=1), pub, mode=mode,  # type: ignore[arg-type]
                    queue_size=1, pixel_size_um=PX, **kwargs)
    pipe.camera_shape = (CAMERA, CAMERA)  # as the service sets it: the image at open
    return pipe, pub


def _cumulative(pub: MemoryPublisher) -> list[dict[str, Any]]:
    """Each analysed frame's cumulative grain statistics, in frame order."""
    meas = sorted((m.header for m in pub.messages if m.topic == "measurements"),
                  key=lambda h: h["frame_id"])
    return [h["grains"]["cumulative"] for h in meas if h.get("grains")]


async def _scan(pipe: Pipeline, frames: list[RawFrame]) -> None:
    pipe.start()
    pipe.begin_acquisition()
    for raw in frames:
        pipe.submit(raw)
    assert await pipe.drain(30.0)
    await pipe.close()


def _tiles(cumulative: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(c["tiles"], c["tiles_overlapping"]) for c in cumulative]


# ------------------------------------------------------------ 1: where a ROI's tile lies
async def test_a_roi_tile_beside_a_pooled_field_is_pooled() -> None:
    """hunt roi_test.py: the full field at stage (32, 32) covers x, y 0..64 µm; a 48 px ROI
    at the top-left of the image at stage (0, 0) covers -32..-8 µm: no overlap. Before, it
    was centred on the stage (-12..12 µm), overlapped the field by 25 % of its area and was
    left out."""
    pipe, pub = _pipeline()
    await _scan(pipe, [_frame(32.0, 32.0), _frame(0.0, 0.0, (0, 0, 48, 48))])
    assert _tiles(_cumulative(pub)) == [(1, 0), (2, 0)]


async def test_a_roi_tile_inside_a_later_full_field_is_pooled_once() -> None:
    """hunt roi_test2.py: a 48 px ROI at (80, 80) of the image at stage (0, 0) covers 8..32
    µm, wholly inside the full field taken next at stage (32, 32) (0..64 µm): the field is
    left out. Before, the ROI was placed at -12..12 µm and its overlap measured against the
    big tile (3.5 %): both were pooled, the ROI's grains counted twice."""
    pipe, pub = _pipeline()
    await _scan(pipe, [_frame(0.0, 0.0, (80, 80, 48, 48)), _frame(32.0, 32.0)])
    assert _tiles(_cumulative(pub)) == [(1, 0), (1, 1)]


async def test_a_roi_is_placed_through_the_pixel_to_stage_mapping() -> None:
    """A camera mirrored in x (``feedback.pixel_to_stage`` [[-0.5, 0], [0, 0.5]]): the ROI
    at the image's left edge lies at +x of the stage position (8..32 µm in x, -32..-8 in y),
    inside the field at stage (32, -32)."""
    pipe, pub = _pipeline()
    pipe.pixel_to_stage = ((-PX, 0.0), (0.0, PX))
    frames = [_frame(0.0, 0.0, (0, 0, 48, 48)), _frame(32.0, -32.0)]
    await _scan(pipe, frames)
    assert _tiles(_cumulative(pub)) == [(1, 0), (1, 1)]
    pipe, pub = _pipeline()  # image axes along the stage's: the ROI is at -x, apart
    await _scan(pipe, frames)
    assert _tiles(_cumulative(pub)) == [(1, 0), (2, 0)]


async def test_a_binned_whole_image_stays_centred_on_the_stage(
    livemask_log: list[logging.LogRecord],
) -> None:
    """At binning 2 the whole image is 64 px with ``settings.roi`` at (0, 0): centred on the
    stage, it is the field taken before at binning 1 (left out). A ROI at a pixel size other
    than at open cannot be placed (a binning scales the full image in pixels, an objective
    change does not): it is pooled without the check, with a warning."""
    pipe, pub = _pipeline(core_pixel_size_um=PX)
    binned = _frame(0.0, 0.0, (0, 0, 64, 64), pixel_size_um=2 * PX, camera=64)
    roi = _frame(500.0, 0.0, (10, 10, 32, 32), pixel_size_um=2 * PX, camera=64)
    await _scan(pipe, [_frame(0.0, 0.0, pixel_size_um=PX), binned, roi, roi])
    assert _tiles(_cumulative(pub)) == [(1, 0), (1, 1), (2, 1), (3, 1)]
    said = [r.getMessage() for r in livemask_log if "cannot be placed" in r.getMessage()]
    assert len(said) == 1 and "pooled without the overlap check" in said[0]


async def test_a_roi_of_a_camera_whose_image_at_open_is_not_known_is_not_placed() -> None:
    """Without the camera's image at open (a replay) a ROI's place is not known: pooled,
    not dropped by a footprint centred on the stage."""
    pipe, pub = _pipeline()
    pipe.camera_shape = None
    await _scan(pipe, [_frame(0.0, 0.0), _frame(0.0, 0.0, (40, 40, 48, 48))])
    assert _tiles(_cumulative(pub)) == [(1, 0), (2, 0)]


def test_a_small_tile_inside_a_later_big_one_counts_as_overlap() -> None:
    """Overlap is measured against the smaller of the two tiles: a 20 µm tile pooled first,
    then a 100 µm tile over it (4 % of the big one's area, all of the small one's)."""
    small = np.repeat(np.repeat(np.arange(1, 17).reshape(4, 4), 10, 0), 10, 1)
    big = np.repeat(np.repeat(np.arange(1, 401).reshape(20, 20), 10, 0), 10, 1)
    acc = CumulativeGrainStats()
    acc.add(small, 0.5, centre_um=(0.0, 0.0))
    out = acc.add(big, 0.5, centre_um=(30.0, 30.0))
    assert (out["tiles"], out["tiles_overlapping"]) == (1, 1)
    assert acc.overlap((-50.0, -50.0, 50.0, 50.0)) == 1.0
    acc.reset()  # and the other way round, as before
    acc.add(big, 0.5, centre_um=(30.0, 30.0))
    out = acc.add(small, 0.5, centre_um=(0.0, 0.0))
    assert (out["tiles"], out["tiles_overlapping"]) == (1, 1)
    out = acc.add(small, 0.5, centre_um=(-29.5, 0.0))  # 0.5 µm of its 20 under the big one
    assert (out["tiles"], out["tiles_overlapping"]) == (2, 1)


# ------------------------------------------------------------ 2: tiles_skipped as of the tile
class _CameraAhead:
    """A frame source: when the pipeline takes the first frame for the model, the camera
    delivers the others at once, far ahead of it (free-run mode skips all but the last)."""

    def __init__(self, pipe: Pipeline, later: list[RawFrame]) -> None:
        self.pipe, self.later = pipe, later

    def frame_started(self, origin: object) -> None:
        if origin == 0:
            for raw in self.later:
                self.pipe.submit(raw)

    def frame_done(self, origin: object) -> None:
        pass


async def test_tiles_skipped_counts_the_frames_before_the_tile() -> None:
    """Frame 0 was published with tiles 1, tiles_skipped 5: the frames skipped while it was
    in the model, after it. Now each tile's count is of the frames before it (docs/protocol.md:
    "frames of the acquisition up to this one that skipped analysis")."""
    pipe, pub = _pipeline("free-run")
    frames = [_frame(64.0 * i, 0.0, origin=i) for i in range(7)]
    pipe.source = _CameraAhead(pipe, frames[1:])  # type: ignore[assignment]
    await _scan(pipe, frames[:1])
    measured = sorted((m.header for m in pub.messages if m.topic == "measurements"),
                      key=lambda h: h["frame_id"])
    analysed = [(h["frame_id"], h["grains"]["cumulative"]["tiles"],
                 h["grains"]["cumulative"]["tiles_skipped"])
                for h in measured if h.get("grains")]
    assert pipe.counters.snapshot()["frames_skipped"] == 5
    assert analysed == [(0, 1, 0), (6, 2, 5)]


# ------------------------------------------------------------ 3: thresholds of a grains card
def test_a_seed_threshold_for_a_grains_card_is_warned_about(
    livemask_log: list[logging.LogRecord],
) -> None:
    """A boundary-label card has no seed map: ``analysis.seed_threshold`` was ignored
    silently. Its ``foreground_threshold`` override still applies (the boundary cut)."""
    from livemask.service.app import build_segmenter
    from tests.conftest import make_config

    cfg = make_config(model={"name": "grains_classical"},
                      analysis={"seed_threshold": 0.3, "foreground_threshold": 0.6})
    seg = build_segmenter(cfg)
    assert seg.post.foreground_threshold == 0.6
    said = [r.getMessage() for r in livemask_log if r.levelno == logging.WARNING]
    assert len(said) == 1 and "analysis.seed_threshold (0.3) has no effect" in said[0]
    assert "boundary-probability cut" in said[0]
    livemask_log.clear()
    build_segmenter(make_config(model={"name": "grains_classical"},
                                analysis={"foreground_threshold": 0.6}))
    build_segmenter(make_config(model={"name": "nuclei_classical"},
                                analysis={"seed_threshold": 0.3}))
    assert not [r for r in livemask_log if r.levelno >= logging.WARNING]


def _rotated(degrees: float, px: float = 0.65) -> tuple[tuple[float, float], ...]:
    t = math.radians(degrees)
    return ((px * math.cos(t), -px * math.sin(t)), (px * math.sin(t), px * math.cos(t)))


def _true_overlap(degrees: float, shift_um: tuple[float, float], side_um: float) -> float:
    """The shared fraction of two squares of one rotation, ``shift_um`` apart on the
    stage, by sampling one of them (its points in the other's frame)."""
    t = math.radians(degrees)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    pts = np.random.default_rng(0).uniform(-0.5, 0.5, (200_000, 2)) * side_um
    other = (pts @ rot.T + shift_um) @ rot  # the points on the stage, in the first's frame
    return float((np.abs(other) <= side_um / 2).all(axis=1).mean())


@pytest.mark.parametrize("degrees", [0.0, 4.0, 10.0, 30.0, 45.0, 90.0, 180.0])
def test_the_overlap_of_a_rotated_cameras_tiles_is_exact(degrees: float) -> None:
    """A grid laid out along the stage axes with the camera rotated against it: the
    bounding box dropped 4 of 9 tiles from 3.5° on (review), an axis-aligned tile of its own
    size saw none of the real overlap from 20° on (review); in the camera's axes it is
    exact."""
    px, side = 0.65, 512
    fov = side * px
    labels = np.zeros((side, side), np.int32)
    labels[10:50, 10:50], labels[100:200, 100:200] = 1, 2
    stats = CumulativeGrainStats()
    stats.add(labels, px, footprint_um=tile_footprint((0.0, 0.0), (side, side),
                                                      _rotated(degrees)))
    neighbour = tile_footprint((fov, 0.0), (side, side), _rotated(degrees))
    assert stats.overlap(neighbour) == pytest.approx(
        _true_overlap(degrees, (fov, 0.0), fov), abs=0.01)
    # within MAX_OVERLAP (5 %) it is pooled, above it left out, as the real overlap says
    stats.add(labels, px, footprint_um=neighbour)
    assert stats.tiles_overlapping == int(_true_overlap(degrees, (fov, 0.0), fov) > 0.05)


def test_a_grid_along_a_rotated_cameras_own_axes_pools_every_tile() -> None:
    """A 45° camera whose grid steps along its own columns and rows: the tiles touch and
    share nothing (the bounding boxes shared 8.6 %)."""
    px, side = 0.65, 512
    matrix = _rotated(45.0)
    stats = CumulativeGrainStats()
    labels = np.zeros((side, side), np.int32)
    labels[100:200, 100:200] = 1
    for i in range(3):
        for j in range(3):  # i columns and j rows of the camera's image away, on the stage
            x = matrix[0][0] * side * i + matrix[0][1] * side * j
            y = matrix[1][0] * side * i + matrix[1][1] * side * j
            stats.add(labels, px, footprint_um=tile_footprint((x, y), (side, side), matrix))
    assert stats.tiles_overlapping == 0 and stats.summary()["tiles"] == 9


def test_a_quarter_turned_camera_places_a_tile_of_its_own_size() -> None:
    """Rows run along the stage's x: a 100-row, 300-column tile is 300 px along its
    columns and 100 along its rows, wherever they point."""
    u0, v0, u1, v1 = tile_footprint((0.0, 0.0), (100, 300), ((0.0, 1.0), (1.0, 0.0)))
    assert (u1 - u0, v1 - v0) == (300.0, 100.0)
