"""Session 20 tracking fixes: gap closing beyond 1/gap_penalty, per-component linking, and
the division reach of the object a parent linked to."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

import livemask.analysis.tracking as tracking
from livemask.analysis.tracking import Tracker, TrackerParams, largest_gap_frames
from livemask.config import parse_config
from livemask.errors import ConfigError


def _ids(tracker: Tracker, yx: list[tuple[float, float]], area: list[float], t: int) -> list[int]:
    return tracker.update(np.array(yx, float).reshape(-1, 2), area, t).track_ids.tolist()


# ------------------------------------------------------------------ 1: gap closing
def test_a_gap_the_penalty_makes_unlinkable_is_refused_in_the_config() -> None:
    with pytest.raises(ConfigError, match=r"tracking\.gap_penalty \(0\.25\) \* "
                       r"tracking\.max_gap_frames \(10\) must be < 1.*"
                       r"max_gap_frames to at most 3 or tracking\.gap_penalty below 0\.1"):
        parse_config({"tracking": {"max_gap_frames": 10}})
    with pytest.raises(ConfigError, match=r"max_gap_frames to at most 3"):
        parse_config({"tracking": {"max_gap_frames": 4}})
    cfg = parse_config({"tracking": {"max_gap_frames": 10, "gap_penalty": 0.09}})
    assert cfg.tracking.max_gap_frames == 10
    assert parse_config({"tracking": {"max_gap_frames": 50, "gap_penalty": 0}}).tracking


def test_tracker_params_refuse_a_gap_that_could_never_link() -> None:
    with pytest.raises(ValueError, match=r"max_gap_frames at most 3 or gap_penalty below 0\.1"):
        TrackerParams(max_gap_frames=10)
    TrackerParams(max_gap_frames=3)  # the defaults' 0.25 * 3 = 0.75 is fine


@pytest.mark.parametrize(("penalty", "frames"), [(0.25, 3), (0.1, 9), (1 / 3, 2), (0.3, 3),
                                                 (0.09, 11), (1.0, 0), (2.0, 0)])
def test_largest_gap_frames(penalty: float, frames: int) -> None:
    assert largest_gap_frames(penalty) == frames
    assert penalty * frames < 1 <= penalty * (frames + 1)


@pytest.mark.parametrize("missed", [4, 6, 8])
def test_a_track_missing_up_to_max_gap_frames_links_within_its_documented_reach(
    missed: int,
) -> None:
    """The reach is max_distance_px * sqrt(dt) * sqrt(1 - gap_penalty * missed)."""
    p = TrackerParams(max_distance_px=10.0, max_gap_frames=10, gap_penalty=0.09)
    reach = 10.0 * np.sqrt(missed + 1) * np.sqrt(1 - 0.09 * missed)
    for offset, relinked in ((0.98 * reach, True), (1.02 * reach, False)):
        tracker = Tracker(p)
        (a,) = _ids(tracker, [(100, 100)], [200], 0)
        for t in range(1, missed + 1):
            _ids(tracker, [], [], t)
        (b,) = _ids(tracker, [(100, 100 + offset)], [200], missed + 1)
        assert (a == b) is relinked


# ------------------------------------------------------------------ 2: per-component linking
def _candidates(rng: np.random.Generator, n: int, side: float, radius: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate pairs and costs as Tracker._link makes them, on a crowded random field."""
    tracks = rng.uniform(0, side, (n, 2))
    objects = tracks + rng.normal(0, radius / 3, (n, 2))
    pairs = cKDTree(tracks).sparse_distance_matrix(cKDTree(objects), radius,
                                                   output_type="ndarray")
    cost = (pairs["v"] / radius) ** 2 - 1.0
    ok = cost < 0
    return pairs["i"][ok].astype(np.intp), pairs["j"][ok].astype(np.intp), cost[ok]


def _dense(ti: np.ndarray, oj: np.ndarray, cost: np.ndarray) -> set[tuple[int, int]]:
    """The reference: every candidate pair in one linear_sum_assignment."""
    sub = np.zeros((ti.max() + 1, oj.max() + 1))
    sub[ti, oj] = cost
    ri, ci = linear_sum_assignment(sub)
    hit = sub[ri, ci] < 0
    return set(zip(ri[hit].tolist(), ci[hit].tolist(), strict=True))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dense_max", [0, 256])
@pytest.mark.parametrize(("n", "side", "cut"),
                         [(800, 400.0, False), (800, 700.0, True), (1400, 560.0, True)])
def test_per_component_links_equal_one_dense_assignment(
    seed: int, dense_max: int, n: int, side: float, cut: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 800 nuclei in 400² px (one component holds nearly all: solved in one matrix), in
    700² px (components of up to ~50: cut, the larger ones by the solver one by one) and
    1,400 in 560² px (more than 1,000 ambiguous: cut though one component holds most)."""
    monkeypatch.setattr(tracking, "_DENSE_MAX", dense_max)
    rng = np.random.default_rng(seed)
    ti, oj, cost = _candidates(rng, n, side, 20.0)
    rows = np.bincount(ti)
    assert rows.max() > tracking._BRUTE_MAX  # some components go to the solver one by one
    paths: list[bool] = []
    real = tracking._assign_components

    def spy(*args: Any) -> Any:
        found = real(*args)
        paths.append(found is not None)
        return found

    monkeypatch.setattr(tracking, "_assign_components", spy)
    t, o = tracking._assign(ti, oj, cost)
    assert paths == [cut]
    assert np.unique(t).size == t.size and np.unique(o).size == o.size
    assert set(zip(t.tolist(), o.tolist(), strict=True)) == _dense(ti, oj, cost)


@pytest.mark.parametrize("side", [300.0, 600.0])
def test_crowded_field_track_ids_equal_a_dense_solver(
    side: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(5)
    yx = rng.uniform(0, side, (600, 2))
    frames = []
    for _ in range(6):
        yx = yx + rng.normal(0, 4, yx.shape)
        keep = rng.random(len(yx)) > 0.05  # some objects go unsegmented for a frame
        frames.append((yx[keep], rng.uniform(80, 120, keep.sum())))

    def run() -> list[list[int]]:
        tracker = Tracker()
        return [tracker.update(f, a, t).track_ids.tolist() for t, (f, a) in enumerate(frames)]

    monkeypatch.setattr(tracking, "_DENSE_MAX", 0)
    per_component = run()

    def dense(ti: np.ndarray, oj: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, ...]:
        pairs = sorted(_dense(ti, oj, cost))
        return np.array([p[0] for p in pairs], np.intp), np.array([p[1] for p in pairs], np.intp)

    monkeypatch.setattr(tracking, "_assign", dense)
    assert per_component == run()


# ------------------------------------------------------------------ 4: division reach
def test_a_linked_object_beyond_the_division_reach_is_no_daughter() -> None:
    p = TrackerParams(division_distance_px=5, area_weight=1.0)
    tracker = Tracker(p)
    (parent,) = _ids(tracker, [(100, 100)], [100], 0)
    # the parent links to the same-size object 8 px away (beyond 5 px); a half-size birth
    # lies 4 px the other side, so their midpoint is 2 px from the parent
    step = tracker.update(np.array([[100, 108], [100, 96]], float), [100, 50], 1)
    assert step.divisions == []
    assert step.track_ids[0] == parent and (step.parent_ids == -1).all()


def test_a_linked_object_within_the_division_reach_still_makes_a_division() -> None:
    tracker = Tracker(TrackerParams(division_distance_px=5, area_weight=1.0))
    (parent,) = _ids(tracker, [(100, 100)], [100], 0)
    step = tracker.update(np.array([[100, 104.5], [100, 96]], float), [100, 50], 1)
    assert [d[0] for d in step.divisions] == [parent]
    assert step.parent_ids.tolist() == [parent, parent]
