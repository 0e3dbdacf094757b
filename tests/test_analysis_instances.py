"""Tests for livemask.analysis.instances on hand-made probability maps and masks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage.segmentation import watershed

from livemask.analysis import labels_from_mask, labels_from_probabilities


def disc(shape: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    """Boolean disc."""
    yy, xx = np.indices(shape)
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def assert_sequential_int32(labels: np.ndarray) -> None:
    assert labels.dtype == np.int32
    ids = np.unique(labels)
    np.testing.assert_array_equal(ids, np.arange(ids.size))


def two_touching_discs(
    shape: tuple[int, int] = (64, 80),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Discs of radius 12 at x=24 and x=44 (overlap x=32..36, neck at x=34), seeds radius 5."""
    left, right = disc(shape, (32, 24), 12), disc(shape, (32, 44), 12)
    fg = (left | right).astype(np.float32)
    seeds = (disc(shape, (32, 24), 5) | disc(shape, (32, 44), 5)).astype(np.float32)
    return fg, seeds, left, right


def test_two_touching_discs_split_at_the_neck() -> None:
    fg, seeds, _, _ = two_touching_discs()
    labels = labels_from_probabilities(fg, seeds)
    assert_sequential_int32(labels)
    assert labels.max() == 2
    np.testing.assert_array_equal(labels > 0, fg > 0.5)
    a, b = labels[32, 24], labels[32, 44]
    assert {int(a), int(b)} == {1, 2}
    cols = np.indices(fg.shape)[1]
    fgm = fg > 0.5
    # the cut runs through the neck (column 34, the only column where a tie is possible)
    assert np.all(labels[fgm & (cols <= 33)] == a)
    assert np.all(labels[fgm & (cols >= 35)] == b)
    # the cut is at the neck: the two halves are mirror images within a column's width
    area_a, area_b = np.sum(labels == a), np.sum(labels == b)
    assert abs(area_a - area_b) <= 2 * 25  # at most the neck column (about 2 x 12.5 px high)
    # each object is connected
    for lab in (a, b):
        assert ndimage.label(labels == lab)[1] == 1


def test_component_without_seed_is_kept() -> None:
    shape = (64, 120)
    fg, seeds, _, _ = two_touching_discs(shape)
    lone = disc(shape, (32, 100), 8)
    fg = np.maximum(fg, lone.astype(np.float32))
    labels = labels_from_probabilities(fg, seeds)
    assert_sequential_int32(labels)
    assert labels.max() == 3
    lone_ids = np.unique(labels[lone])
    assert lone_ids.size == 1 and lone_ids[0] > 0
    assert np.sum(labels == lone_ids[0]) == lone.sum()


def test_small_objects_dropped_and_small_seeds_ignored() -> None:
    shape = (60, 60)
    big = disc(shape, (20, 20), 10)
    small = np.zeros(shape, dtype=bool)
    small[50:53, 50:53] = True  # 9 px, below min_area_px=20
    fg = (big | small).astype(np.float32)
    seeds = disc(shape, (20, 20), 4).astype(np.float32)
    seeds[20, 28] = 1.0  # a one-pixel seed inside the big disc: below min_seed_area_px
    seeds[51, 51] = 1.0
    labels = labels_from_probabilities(fg, seeds, min_area_px=20, min_seed_area_px=4)
    assert_sequential_int32(labels)
    assert labels.max() == 1
    np.testing.assert_array_equal(labels > 0, big)
    # with min_area_px lowered, the small square survives as its own object
    labels = labels_from_probabilities(fg, seeds, min_area_px=5)
    assert labels.max() == 2
    assert np.all(labels[small] == labels[51, 51])


def test_thresholds_are_applied() -> None:
    fg, seeds, _, _ = two_touching_discs()
    labels = labels_from_probabilities(fg * 0.6, seeds * 0.6, foreground_threshold=0.7)
    assert labels.max() == 0
    # seeds below their threshold: the touching pair becomes one seedless object
    labels = labels_from_probabilities(fg, seeds * 0.4, seed_threshold=0.5)
    assert labels.max() == 1


def test_seed_outside_foreground_is_ignored() -> None:
    shape = (40, 40)
    fg = disc(shape, (20, 20), 8).astype(np.float32)
    seeds = disc(shape, (20, 20), 3).astype(np.float32)
    seeds[0:5, 0:5] = 1.0  # a seed in the background
    labels = labels_from_probabilities(fg, seeds)
    assert labels.max() == 1
    assert labels[2, 2] == 0


def test_empty_and_shape_errors() -> None:
    zeros = np.zeros((16, 16), dtype=np.float32)
    labels = labels_from_probabilities(zeros, zeros)
    assert labels.dtype == np.int32 and labels.shape == (16, 16) and not labels.any()
    with pytest.raises(ValueError, match="shape"):
        labels_from_probabilities(zeros, np.zeros((16, 15), dtype=np.float32))


def test_three_seeds_in_a_row() -> None:
    """A chain of three touching discs with a seed each gives three objects in order."""
    shape = (40, 100)
    centers = [(20, 20), (20, 45), (20, 70)]
    fg = np.zeros(shape, dtype=bool)
    seeds = np.zeros(shape, dtype=bool)
    for c in centers:
        fg |= disc(shape, c, 14)
        seeds |= disc(shape, c, 5)
    labels = labels_from_probabilities(fg.astype(np.float32), seeds.astype(np.float32))
    assert labels.max() == 3
    ids = [labels[c] for c in centers]
    assert len(set(ids)) == 3
    cols = np.indices(shape)[1]
    assert np.all(labels[fg & (cols <= 30)] == ids[0])
    assert np.all(labels[fg & (cols >= 35) & (cols <= 55)] == ids[1])
    assert np.all(labels[fg & (cols >= 60)] == ids[2])


def test_many_clusters_match_a_plain_full_frame_watershed() -> None:
    """The packed per-cluster watershed gives what one full-frame watershed gives."""
    rng = np.random.default_rng(3)
    shape = (256, 256)
    fg = np.zeros(shape, dtype=bool)
    seeds = np.zeros(shape, dtype=bool)
    for _ in range(60):
        c = (rng.uniform(0, 256), rng.uniform(0, 256))
        r = rng.uniform(6, 12)
        fg |= disc(shape, c, r)
        seeds |= disc(shape, c, 0.5 * r)
    fg_p = ndimage.gaussian_filter(fg.astype(np.float32), 1.0)
    sd_p = ndimage.gaussian_filter(seeds.astype(np.float32), 1.0)
    labels = labels_from_probabilities(fg_p, sd_p, min_area_px=1, min_seed_area_px=1)

    mask = fg_p > 0.5
    markers, _ = ndimage.label((sd_p > 0.5) & mask)
    expected = watershed(1.0 - sd_p, markers, mask=mask)
    assert np.all((expected > 0) <= (labels > 0))
    # same partition of the seeded pixels up to the ids (ties may move a handful of pixels)
    seeded = expected > 0
    n = int(markers.max())
    joint = np.zeros((n + 1, int(labels.max()) + 1), dtype=np.int64)
    np.add.at(joint, (expected[seeded], labels[seeded]), 1)
    best = joint[1:].argmax(axis=1)
    assert np.unique(best).size == n  # one-to-one
    agree = joint[1:][np.arange(n), best].sum() / seeded.sum()
    assert agree > 0.999


def test_labels_from_mask_splits_touching_discs() -> None:
    shape = (64, 80)
    left, right = disc(shape, (32, 24), 12), disc(shape, (32, 44), 12)
    labels = labels_from_mask(left | right, min_distance_px=5)
    assert_sequential_int32(labels)
    assert labels.max() == 2
    cols = np.indices(shape)[1]
    a, b = labels[32, 24], labels[32, 44]
    assert a != b
    assert np.all(labels[(left | right) & (cols <= 32)] == a)
    assert np.all(labels[(left | right) & (cols >= 36)] == b)


def test_labels_from_mask_single_objects_and_small_ones() -> None:
    shape = (60, 60)
    mask = disc(shape, (20, 20), 10)
    mask[50:53, 50:53] = True  # 9 px
    labels = labels_from_mask(mask, min_area_px=20)
    assert_sequential_int32(labels)
    assert labels.max() == 1
    assert np.sum(labels == 1) == disc(shape, (20, 20), 10).sum()
    assert labels_from_mask(mask, min_area_px=1).max() == 2
    empty = labels_from_mask(np.zeros(shape, dtype=bool))
    assert empty.dtype == np.int32 and not empty.any()


def test_labels_from_mask_rectangle_is_not_oversegmented() -> None:
    """A plateau of distance maxima (even-width bar) must give one object, not several."""
    mask = np.zeros((30, 60), dtype=bool)
    mask[10:20, 5:55] = True
    labels = labels_from_mask(mask, min_distance_px=8)
    assert labels.max() >= 1
    # a long bar may legitimately split along its length, but never across it
    for lab in range(1, labels.max() + 1):
        rows = np.flatnonzero((labels == lab).any(axis=1))
        assert rows.min() == 10 and rows.max() == 19


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    sigma=st.floats(1.0, 4.0),
    min_area=st.sampled_from([1, 5, 30]),
)
def test_properties_on_random_maps(seed: int, sigma: float, min_area: int) -> None:
    """Any input gives sequential int32 labels of connected objects inside the foreground."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((48, 64)), sigma)
    fg = (noise - noise.min()) / max(float(np.ptp(noise)), 1e-9)
    seeds = np.clip(fg * 1.6 - 0.6, 0.0, 1.0)
    labels = labels_from_probabilities(fg, seeds, min_area_px=min_area)
    assert_sequential_int32(labels)
    assert np.all(fg[labels > 0] > 0.5)
    areas = np.bincount(labels.ravel())[1:]
    assert np.all(areas >= min_area)
    for lab in range(1, int(labels.max()) + 1):
        assert ndimage.label(labels == lab)[1] == 1
    if min_area == 1:  # nothing is dropped: every foreground pixel is labelled
        np.testing.assert_array_equal(labels > 0, fg > 0.5)


def test_flood_levels_split_flat_plateaus_evenly() -> None:
    """Low seed values (noise) steer the continuous watershed; quantised levels do not."""
    from livemask.analysis.instances import labels_from_probabilities

    fg = np.zeros((12, 44), dtype=np.float32)
    fg[1:11, 2:42] = 1.0
    seeds = np.zeros_like(fg)
    seeds[1:11, 2:42] = 0.02
    seeds[1:11, 22:42] = 0.2  # the right half of the plateau is a little less dark
    seeds[4:8, 4:8] = 1.0
    seeds[4:8, 36:40] = 1.0
    row = 6

    def cut(levels: int | None) -> int:
        lab = labels_from_probabilities(fg, seeds, flood_levels=levels, min_area_px=5)
        assert lab.max() == 2
        return int(np.flatnonzero(np.diff(lab[row, 2:42]))[0]) + 2

    assert cut(None) < 18  # the right seed took the whole right half first
    assert 19 <= cut(4) <= 23  # even flooding: the cut is half way between the seeds
