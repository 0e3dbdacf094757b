"""Online tracking: hand-made cases, the simulator's ground truth, and the pipeline hook."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import useq

from livemask.acquisition.source import RawFrame
from livemask.analysis.measure import UNITS, measure_objects
from livemask.analysis.tracking import (
    TRACK_UNITS,
    PositionTrackers,
    Tracker,
    TrackerParams,
    signal_intensities,
)
from livemask.config import ServiceConfig, TrackingConfig, parse_config
from livemask.errors import ConfigError
from livemask.inference.models import ModelCard
from livemask.inference.segmenter import Segmenter
from livemask.service.pipeline import Pipeline
from livemask.tracking_eval import match_ids, score_tracking, simulate
from livemask.transport.publisher import MemoryPublisher
from tests.test_pipeline import RecordingSource, ThresholdBackend


def _step(tracker: Tracker, yx: list[tuple[float, float]], area: list[float],
          t: int | None = None, intensity: list[float] | None = None) -> list[int]:
    return tracker.update(np.array(yx, float).reshape(-1, 2), area, t, intensity).track_ids.tolist()


# ------------------------------------------------------------------ hand-made cases
def test_objects_moving_linearly_keep_their_ids() -> None:
    tracker = Tracker()
    start = np.array([[20.0, 20.0], [20.0, 80.0], [80.0, 20.0], [80.0, 80.0], [50.0, 50.0]])
    velocity = np.array([[3.0, 0.0], [0.0, -3.0], [-2.0, 2.0], [3.0, 3.0], [-3.0, 1.0]])
    first = _step(tracker, start.tolist(), [100.0] * 5, 0)
    assert sorted(first) == [1, 2, 3, 4, 5]
    for t in range(1, 20):
        order = np.roll(np.arange(5), t)  # objects arrive in a different order each frame
        pos = start + t * velocity
        step = tracker.update(pos[order], np.full(5, 100.0), t)
        assert step.track_ids.tolist() == [first[i] for i in order]
        assert step.divisions == [] and (step.parent_ids == -1).all()
    assert len(tracker) == 5


def test_neighbours_swapping_places_are_not_confused() -> None:
    tracker = Tracker()
    a, b = _step(tracker, [(50, 40), (50, 60)], [100, 100], 0)
    # both move 4 px towards each other: the optimal assignment keeps them apart
    assert _step(tracker, [(50, 56), (50, 44)], [100, 100], 1) == [b, a]


def test_a_gap_of_two_frames_is_closed() -> None:
    tracker = Tracker(TrackerParams(max_gap_frames=2))
    a, b = _step(tracker, [(30, 30), (70, 70)], [100, 100], 0)
    assert _step(tracker, [(70, 71)], [100], 1) == [b]  # a not segmented
    assert _step(tracker, [(70, 72)], [100], 2) == [b]
    assert len(tracker) == 2  # a still waits
    assert _step(tracker, [(33, 31), (70, 73)], [100, 100], 3) == [a, b]


def test_a_track_missing_longer_than_max_gap_is_dropped() -> None:
    tracker = Tracker(TrackerParams(max_gap_frames=1))
    (a,) = _step(tracker, [(30, 30)], [100], 0)
    _step(tracker, [], [], 1)
    _step(tracker, [], [], 2)
    assert len(tracker) == 0  # no unbounded growth: dead tracks go
    (new,) = _step(tracker, [(30, 30)], [100], 3)
    assert new != a


def _divide(tracker: Tracker, t0: int = 0) -> tuple[int, list[int], list[int | None]]:
    """A bright parent for 3 frames, then two dimmer half-size daughters either side."""
    for t in range(t0, t0 + 3):
        (parent,) = _step(tracker, [(100, 100)], [200], t, [1000])
    step = tracker.update([[100, 92], [101, 108]], [110, 105], t0 + 3, [700, 720])
    parents = [None if p < 0 else p for p in step.parent_ids.tolist()]
    assert step.divisions == [(parent, tuple(step.track_ids.tolist()))]
    return parent, step.track_ids.tolist(), parents


def test_a_split_is_a_division_with_the_parent_id() -> None:
    tracker = Tracker()
    parent, children, parents = _divide(tracker)
    assert parent not in children and len(set(children)) == 2
    assert parents == [parent, parent]
    assert len(tracker) == 2  # the parent track ended
    # the daughters keep their ids and their parent afterwards
    step = tracker.update([[100, 91], [101, 109]], [112, 108], 4, [710, 700])
    assert step.track_ids.tolist() == children
    assert step.parent_ids.tolist() == [parent, parent] and step.divisions == []


def test_a_division_where_neither_daughter_continues_the_parent() -> None:
    tracker = Tracker()
    (parent,) = _step(tracker, [(100, 100)], [200], 0, [1000])
    _step(tracker, [], [], 1)  # parent not segmented for a frame
    step = tracker.update([[100, 85], [100, 115]], [110, 100], 2, [700, 700])
    assert [d[0] for d in step.divisions] == [parent]
    assert (step.parent_ids == parent).all()


def test_a_division_ends_the_parent_even_when_it_linked_a_third_object() -> None:
    """The parent links to the nearest object while two other births are taken as its
    daughters: the division ends the parent, so that object starts a track of its own
    (before, the parent's id lived on after its division)."""
    tracker = Tracker()
    (parent,) = _step(tracker, [(100, 100)], [100], 0, [2000])
    step = tracker.update([[103, 100], [100, 94], [100, 106]], [100, 60, 60], 1,
                          [1000, 1000, 1000])
    assert len(step.divisions) == 1
    pid, children = step.divisions[0]
    assert pid == parent and sorted(children) == step.track_ids[1:].tolist()
    third = int(step.track_ids[0])
    assert third not in (parent, *children) and step.parent_ids[0] == -1
    assert step.parent_ids[1:].tolist() == [parent, parent]
    after = tracker.update([[103, 100], [100, 94], [100, 106]], [100, 60, 60], 2,
                           [1000, 1000, 1000])
    assert after.track_ids.tolist() == step.track_ids.tolist()  # nobody carries the parent on
    assert parent not in after.track_ids.tolist()


def test_far_apart_new_objects_are_no_division() -> None:
    tracker = Tracker()
    (parent,) = _step(tracker, [(100, 100)], [200], 0, [1000])
    step = tracker.update([[100, 101], [100, 160], [100, 40]], [110, 100, 100], 1,
                          [700, 700, 700])
    assert step.divisions == []
    assert step.track_ids[0] == parent and (step.parent_ids == -1).all()


def test_a_split_without_the_mitotic_cues_is_no_division() -> None:
    # daughters as bright as the parent: over-segmentation, not mitosis (default rule)
    tracker = Tracker()
    _step(tracker, [(100, 100)], [200], 0, [1000])
    step = tracker.update([[100, 94], [100, 106]], [100, 100], 1, [1000, 1000])
    assert step.divisions == []
    # ... unless the intensity rule is off
    tracker = Tracker(TrackerParams(division_intensity_ratio=None))
    _step(tracker, [(100, 100)], [200], 0, [1000])
    assert tracker.update([[100, 94], [100, 106]], [100, 100], 1, [1000, 1000]).divisions
    # a tiny fragment next to the parent is no daughter (area ratio out of range)
    tracker = Tracker(TrackerParams(division_intensity_ratio=None))
    _step(tracker, [(100, 100)], [200], 0)
    assert not tracker.update([[100, 100], [100, 108]], [200, 20], 1).divisions
    # divisions off
    tracker = Tracker(TrackerParams(division=False))
    _step(tracker, [(100, 100)], [200], 0, [1000])
    step = tracker.update([[100, 92], [101, 108]], [110, 105], 1, [700, 720])
    assert step.divisions == [] and (step.parent_ids == -1).all()


def test_a_frame_index_jump_is_tolerated() -> None:
    p = TrackerParams(max_distance_px=10.0, max_gap_frames=1)
    tracker = Tracker(p)
    (a,) = _step(tracker, [(50, 50)], [100], 0)
    # skipped analysis: t jumps by 9; the object drifted 25 px (within 10 * sqrt(9) = 30)
    # and the skipped frames do not count as missed (max_gap_frames=1)
    assert _step(tracker, [(50, 75)], [100], 9) == [a]
    # the same drift in one frame is too far: a new track
    assert _step(tracker, [(50, 100)], [100], 10) != [a]
    # a repeated t (e.g. a burst at one time point) is one frame apart
    (b,) = _step(tracker, [(10, 10)], [100], 10)
    assert _step(tracker, [(10, 12)], [100], 10) == [b]


def test_per_position_trackers_are_independent_with_unique_ids() -> None:
    trackers = PositionTrackers()

    def frame(p: int, t: int, yx: list[list[float]]) -> list[dict[str, object]]:
        objs: list[dict[str, object]] = [
            {"label": i + 1, "centroid_yx": c, "area_px": 100, "mean_intensity": 500.0}
            for i, c in enumerate(yx)
        ]
        summary: dict[str, object] = {}
        trackers.apply(objs, summary, index={"t": t, "p": p})
        assert summary["divisions"] == []
        return objs

    p0 = [o["track_id"] for o in frame(0, 0, [[10, 10], [50, 50]])]
    p1 = [o["track_id"] for o in frame(1, 0, [[10, 10], [50, 50]])]
    assert set(p0).isdisjoint(p1) and len(trackers) == 2
    for t in range(1, 6):  # position 1 is empty from now on: position 0 is not affected
        assert [o["track_id"] for o in frame(0, t, [[10, 11], [50, 51]])] == p0
        assert frame(1, t, []) == []
    summary: dict[str, object] = {}
    objs = [{"label": 1, "centroid_yx": [10, 10], "area_px": 100}]
    trackers.apply(objs, summary, index={"t": 6, "p": 1})
    assert objs[0]["track_id"] not in p1  # position 1's tracks expired (max_gap_frames)
    assert objs[0]["parent_track_id"] is None and summary["tracks_active"] == 1


def test_streams_without_p_use_the_rounded_stage_position_and_are_bounded() -> None:
    trackers = PositionTrackers(max_positions=3)
    k1 = trackers.key({"t": 0}, {"x_um": 100.4, "y_um": -20.0})
    assert k1 == trackers.key({"t": 5}, {"x_um": 101.0, "y_um": -19.2})
    assert k1 != trackers.key({"t": 0}, {"x_um": 500.0, "y_um": -20.0})
    assert trackers.key({"p": 2, "c": 1}, {}) != trackers.key({"p": 2, "c": 0}, {})
    for p in range(10):
        trackers.apply([], {}, index={"t": 0, "p": p})
    assert len(trackers) == 3  # least recently used positions are dropped
    trackers.reset()
    assert len(trackers) == 0


def test_300_objects_keep_their_ids_over_60_frames() -> None:
    """A dense grid (300 nuclei, 34 px apart) jittering by 1 px: no id changes.

    The tracker's speed is measured by ``livemask evaluate-tracking`` (``ms track``), not
    asserted here.
    """
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(15), np.arange(20)), -1).reshape(-1, 2) * 34.0 + 20
    yx = grid + rng.normal(0, 3, grid.shape)
    area = rng.uniform(150, 300, len(yx))
    tracker = Tracker()
    first = tracker.update(yx, area, 0).track_ids
    for t in range(1, 60):
        yx = yx + rng.normal(0, 1.0, yx.shape)
        step = tracker.update(yx, area * rng.uniform(0.9, 1.1, len(yx)), t)
    assert (step.track_ids == first).all()


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_distance_px"):
        TrackerParams(max_distance_px=0)
    with pytest.raises(ValueError, match="division_area_ratio"):
        TrackerParams(division_area_ratio=(0.8, 0.3))
    with pytest.raises(ValueError, match="intensities"):
        Tracker().update([[1, 1]], [10], 0, [1.0, 2.0])
    with pytest.raises(ConfigError, match=r"tracking\.division_area_ratio"):
        parse_config({"tracking": {"division_area_ratio": [1.0, 0.5]}})
    cfg = parse_config({"tracking": {"enabled": True, "max_distance_px": 12}})
    assert PositionTrackers.from_config(cfg.tracking).params.max_distance_px == 12
    assert ServiceConfig().tracking.enabled is False
    defaults = PositionTrackers.from_config(TrackingConfig()).params
    assert defaults == TrackerParams()  # config and library defaults agree


# ------------------------------------------------------------------ ground truth
def test_match_ids_pairs_objects_at_iou_half() -> None:
    truth = np.zeros((20, 20), np.int32)
    truth[2:8, 2:8] = 7
    truth[10:16, 10:16] = 9
    pred = np.zeros_like(truth)
    pred[2:8, 3:9] = 1  # IoU 30/42
    pred[10:12, 10:12] = 2  # IoU 4/36: no match
    assert match_ids(truth, pred) == {1: 7}


def test_tracking_the_simulator_with_truth_labels_is_accurate() -> None:
    run = simulate(None, frames=80, positions=2, seed=5, render=False)
    assert run.parent_of, "the simulator must record its lineage"
    d = score_tracking(run).as_dict()
    # measured on this run: link accuracy 1.0, false links 0.0, 20 divisions all found,
    # fragmentation 1.038 (nuclei leaving and re-entering the field); seeds 3 and 11 gave
    # link accuracy >= 0.9999, division recall >= 0.81 and precision >= 0.89
    assert d["true_links"] > 15_000
    assert d["link_accuracy"] >= 0.995
    assert d["false_link_rate"] <= 0.005
    assert d["true_divisions"] >= 10
    assert d["division_recall"] >= 0.75
    assert d["division_precision"] >= 0.8
    assert d["fragmentation"] <= 1.15
    # the scores are live: a tracker that cannot link scores badly
    broken = score_tracking(run, TrackerParams(max_distance_px=0.01)).as_dict()
    assert broken["link_accuracy"] < 0.5 and broken["division_recall"] == 0.0


def test_evaluate_tracking_command_prints_a_table() -> None:
    from typer.testing import CliRunner

    from livemask.cli import app

    out = CliRunner().invoke(app, ["evaluate-tracking", "--truth-labels", "--frames", "6"])
    assert out.exit_code == 0, out.output
    assert "truth labels" in out.output and "link acc." in out.output


# ------------------------------------------------------------------ pipeline hook
def _raw(t: int, squares: list[tuple[int, int]]) -> RawFrame:
    image = np.full((64, 64), 100, np.uint16)
    for y, x in squares:
        image[y : y + 8, x : x + 8] = 1000
    return RawFrame(image, useq.MDAEvent(index={"t": t}), time.time(), {"x_um": 0.0}, None)


async def test_pipeline_adds_track_ids_when_tracking_is_on() -> None:
    card = ModelCard(name="fake", file="none.onnx")
    pub = MemoryPublisher()
    pipe = Pipeline(Segmenter(card, ThresholdBackend()), pub, mode="synchronized")
    pipe.source = RecordingSource()
    pipe.tracker = PositionTrackers()
    pipe.start()
    try:
        for t in range(3):
            pipe.submit(_raw(t, [(10, 10 + t), (40, 30 - t)]))
            assert await pipe.drain(5.0)
        pipe.begin_acquisition()  # a new acquisition: tracks start afresh
        pipe.submit(_raw(0, [(30, 50)]))
        assert await pipe.drain(5.0)
    finally:
        await pipe.close()
    meas = [m.header for m in pub.by_topic("measurements")]
    ids = [[o["track_id"] for o in m["objects"]] for m in meas]
    assert ids[0] == ids[1] == ids[2] and sorted(ids[0]) == [1, 2]
    assert all(o["parent_track_id"] is None for m in meas for o in m["objects"])
    assert meas[2]["summary"]["divisions"] == [] and meas[2]["summary"]["tracks_active"] == 2
    assert ids[3] == [1]  # ids restart in the new acquisition
    assert set(TRACK_UNITS) <= set(pipe.report()["units"])


async def test_pipeline_without_tracker_has_no_track_fields() -> None:
    card = ModelCard(name="fake", file="none.onnx")
    pub = MemoryPublisher()
    pipe = Pipeline(Segmenter(card, ThresholdBackend()), pub, mode="synchronized")
    pipe.source = RecordingSource()
    pipe.start()
    try:
        pipe.submit(_raw(0, [(10, 10)]))
        assert await pipe.drain(5.0)
    finally:
        await pipe.close()
    (meas,) = [m.header for m in pub.by_topic("measurements")]
    assert "track_id" not in meas["objects"][0] and "divisions" not in meas["summary"]
    assert "track_id" not in pipe.report()["units"]


def test_an_uncalibrated_pipeline_gives_its_micrometre_fields_in_pixels() -> None:
    """Data-analyst hunt: without a pixel-size calibration the service's units (status,
    service_started, the recording) said µm² for areas that were pixel counts."""
    card = ModelCard(name="fake", file="none.onnx")
    pipe = Pipeline(Segmenter(card, ThresholdBackend()), MemoryPublisher(),
                    pixel_size_known=False)
    units = pipe.report()["units"]
    assert units["area_um2"].startswith("px² (no pixel-size calibration")
    assert units["equivalent_diameter_um"].startswith("px (no pixel-size calibration")
    assert units["area_px"] == "px" and units["mean_intensity"] == UNITS["mean_intensity"]
    calibrated = Pipeline(Segmenter(card, ThresholdBackend()), MemoryPublisher())
    assert calibrated.report()["units"]["area_um2"] == "µm²"


async def test_frames_of_an_earlier_acquisition_keep_its_tracks_and_skip_feedback() -> None:
    """A stop followed at once by a start: the first acquisition's frames still in flight
    finish with its tracks, and do not drive feedback (their actions would land in the
    new acquisition)."""
    card = ModelCard(name="fake", file="none.onnx")
    pub = MemoryPublisher()
    pipe = Pipeline(Segmenter(card, ThresholdBackend()), pub, mode="pipelined")
    pipe.source = RecordingSource()
    pipe.tracker = PositionTrackers()
    fed: list[int] = []
    pipe.on_measurements = lambda frame, _: fed.append(frame.frame_id)
    pipe.start()
    try:
        pipe.begin_acquisition()
        for t in range(3):
            pipe.submit(_raw(t, [(10, 10 + t), (40, 30 - t)]))
        pipe.begin_acquisition()  # before any of the three was analysed
        pipe.submit(_raw(0, [(30, 50)]))
        assert await pipe.drain(5.0)
    finally:
        await pipe.close()
    ids = [[o["track_id"] for o in m.header["objects"]] for m in pub.by_topic("measurements")]
    assert ids[0] == ids[1] == ids[2] and sorted(ids[0]) == [1, 2]  # one acquisition's tracks
    assert ids[3] == [1]  # the new acquisition's tracks start afresh
    assert fed == [3]


def test_each_feedback_action_is_tracked_as_a_stream_of_its_own() -> None:
    """End-to-end hunt: a GFP burst at t=2 was tracked on from DAPI frames of earlier actions
    at another plane (35 tracks spanned several actions), and a burst from the planned frames
    of a plan without channels."""
    trackers = PositionTrackers()
    ids: dict[object, set[int]] = {}
    for fb in (None, 1, 2):
        index = {"t": 0, "p": 0, **({"fb": fb} if fb is not None else {})}
        objs: list[dict[str, object]] = [
            {"label": i + 1, "centroid_yx": [20.0 + 40 * i, 30.0], "area_px": 100}
            for i in range(5)
        ]
        trackers.apply(objs, {}, index=index)
        ids[fb] = {int(o["track_id"]) for o in objs}  # type: ignore[call-overload]
    assert ids[None].isdisjoint(ids[1]) and ids[1].isdisjoint(ids[2])
    assert len(trackers) == 3


def test_grid_tiles_of_one_position_are_separate_streams() -> None:
    """A grid plan inside a stage position images other fields: useq gives its tiles the
    index ``g``, and their nuclei must never share a track (found by the bug hunt: 17 of 35
    ids were shared between two tiles 600 px apart)."""
    trackers = PositionTrackers()
    ids: dict[int, set[int]] = {0: set(), 1: set()}
    for t in range(4):
        for g in (0, 1):
            objs: list[dict[str, object]] = [
                {"label": i + 1, "centroid_yx": [20.0 + 40 * i, 30.0 + g], "area_px": 100}
                for i in range(5)
            ]
            trackers.apply(objs, {}, index={"t": t, "p": 0, "g": g})
            ids[g].update(int(o["track_id"]) for o in objs)  # type: ignore[call-overload]
    assert len(ids[0]) == len(ids[1]) == 5 and ids[0].isdisjoint(ids[1])
    assert len(trackers) == 2


def test_dropping_a_stream_with_live_tracks_is_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    trackers = PositionTrackers(max_positions=2)
    one = [{"label": 1, "centroid_yx": [10.0, 10.0], "area_px": 100}]
    with caplog.at_level("WARNING", logger="livemask"):
        for t in range(2):
            for p in range(3):  # 3 streams, 2 kept: each is dropped before it comes back
                trackers.apply([dict(o) for o in one], {}, index={"t": t, "p": p})
    assert trackers.dropped_live == 4  # every stream but the first two created
    assert caplog.text.count("tracking.max_positions (2)") == 1


def test_the_table_shows_object_precision_and_recall_apart() -> None:
    """The table's object column was matched / predicted, described as recall (bug hunt):
    a model that misses a nucleus in every frame showed 100 %. Now both are shown."""
    from livemask.tracking_eval import TrackingEvaluation, format_rows

    res = TrackingEvaluation(segmentation="model", frames=10, positions=1)
    res.objects, res.true_objects, res.matched = 90, 100, 90
    cols, (row,) = format_rows([res])
    table = dict(zip(cols, row, strict=True))
    assert (table["precision"], table["recall"]) == ("100.0%", "90.0%")


# ------------------------------------------------------------------ division intensities
def _nuclei_frame(offset: float, squares: list[tuple[int, int, int, float]]) -> tuple[
        list[dict[str, Any]], dict[str, Any]]:
    """Measured nuclei (``(row, col, side, signal)`` squares) over a camera offset."""
    labels = np.zeros((200, 200), np.int32)
    image = np.full((200, 200), offset)
    for i, (y, x, side, signal) in enumerate(squares, start=1):
        labels[y : y + side, x : x + side] = i
        image[y : y + side, x : x + side] += signal
    return measure_objects(labels, image)


def _track_split(offset: float, daughter_signal: float) -> list[dict[str, Any]]:
    """A nucleus with a 200 ADU signal for 3 frames, then two half-size objects."""
    trackers = PositionTrackers()
    for t in range(3):
        objects, summary = _nuclei_frame(offset, [(93, 93, 14, 200.0)])
        trackers.apply(objects, summary, index={"t": t})
    objects, summary = _nuclei_frame(
        offset, [(95, 87, 10, daughter_signal), (95, 103, 10, daughter_signal)])
    trackers.apply(objects, summary, index={"t": 3})
    divisions: list[dict[str, Any]] = summary["divisions"]
    return divisions


@pytest.mark.parametrize("offset", [100.0, 1000.0])
def test_division_intensity_rule_does_not_depend_on_the_camera_offset(offset: float) -> None:
    """Bug hunt: the rule compared raw means, offset included: daughters with half the
    parent's signal have 67 % of its raw mean over a 100 ADU offset but 92 % over 1000 ADU
    (recall 100 % -> 26 % on the simulator). Now it compares the signal above the local
    background: a mitosis is found, and an over-segmented nucleus is not, at either offset."""
    assert len(_track_split(offset, daughter_signal=100.0)) == 1
    assert _track_split(offset, daughter_signal=200.0) == []


def test_signal_intensities_fall_back_to_the_frame_background_then_raw() -> None:
    objects: list[dict[str, Any]] = [
        {"mean_intensity": 300.0, "local_background": 110.0},
        {"mean_intensity": 300.0, "local_background": None},
        {"mean_intensity": None, "local_background": 110.0},
    ]
    got = signal_intensities(objects, {"background_mean": 100.0})
    assert got[:2].tolist() == [190.0, 200.0] and np.isnan(got[2])
    assert signal_intensities(objects[1:2], {"background_mean": None}).tolist() == [300.0]
    assert signal_intensities(objects[:1], {}, exposure_ms=10.0).tolist() == [19.0]


def test_an_exposure_change_makes_no_division_when_the_exposure_is_given() -> None:
    """Bug hunt: after `set exposure_ms` halved the exposure, a nucleus split in two by the
    segmentation had half its signal and passed as a division. Per ms it has not changed."""
    for exposure_ms, found in ((None, 1), (10.0, 0)):
        trackers = PositionTrackers()
        for t in range(3):
            objects, summary = _nuclei_frame(100.0, [(93, 93, 14, 200.0)])
            trackers.apply(objects, summary, index={"t": t}, exposure_ms=exposure_ms)
        objects, summary = _nuclei_frame(100.0, [(95, 87, 10, 100.0), (95, 103, 10, 100.0)])
        half = None if exposure_ms is None else exposure_ms / 2
        trackers.apply(objects, summary, index={"t": 3}, exposure_ms=half)
        assert len(summary["divisions"]) == found


def test_frames_without_t_count_the_frames_since_the_streams_last() -> None:
    """A stream of frames without ``t`` in free-run mode: 2 of 3 frames skip analysis and
    the object moves 10 px a camera frame. Counted as the stream's last + 1 (the first fix
    for mixed streams), dt stayed 1 and the track got a new id at every analysed frame
    (review); with the frames since its last (frame ids), dt is 3: one track."""
    trackers = PositionTrackers()
    ids = []
    for frame_id in range(0, 30, 3):  # the analysed frames; the others skipped
        objs = [{"label": 1, "centroid_yx": [100.0, 20.0 + 10 * frame_id], "area_px": 100}]
        trackers.apply(objs, {}, index={}, frame_id=frame_id)
        ids.append(objs[0]["track_id"])
    assert ids == [ids[0]] * 10
