"""Grain statistics (ASTM E112) against analytic tessellations, and boundary labelling."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage.measure import label as connected_label
from skimage.segmentation import expand_labels, find_boundaries

from livemask.acquisition.simulated.grains import GrainParams, GrainSample
from livemask.analysis.boundaries import labels_from_boundaries
from livemask.analysis.grains import (
    HISTOGRAM_EDGES_UM,
    CumulativeGrainStats,
    astm_g_intercept,
    astm_g_planimetric,
    grain_statistics,
    grain_table,
    intercept_count,
    planimetric_count,
)
from livemask.analysis.metrics import match_instances

SIDE_UM = 1000.0 / math.sqrt(1000.0)  # squares of this side: N_A = 1000 grains / mm²


def rect_grid(
    shape: tuple[int, int], cell: tuple[int, int], offset: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """Rectangles of ``cell`` = (height, width) px; the grid is shifted by ``offset`` px."""
    y = (np.arange(shape[0]) + offset[0]) // cell[0]
    x = (np.arange(shape[1]) + offset[1]) // cell[1]
    return (y[:, None] * (x.max() + 1) + x[None, :] + 1).astype(np.int32)


def brick_wall(
    shape: tuple[int, int], cell: tuple[int, int], offset: tuple[int, int]
) -> np.ndarray:
    """Rectangles in rows shifted by half a brick: each grain has six neighbours."""
    rows = (np.arange(shape[0]) + offset[0]) // cell[0]
    cols = np.arange(shape[1])[None, :] + offset[1] + (rows[:, None] % 2) * (cell[1] // 2)
    x = cols // cell[1]
    return (rows[:, None] * (x.max() + 1) + x + 1).astype(np.int32)


def boundaries_between(offset: int, length: int, k: int) -> int:
    """Grid lines (cell index changes) between neighbouring pixels along one axis."""
    return sum(1 for i in range(1, length) if (i + offset) % k == 0)


# ------------------------------------------------------------------ ASTM formulas


def test_astm_formula_anchor_points() -> None:
    # E112: G = 1 at N_A = 15.50 grains/mm²; each G step doubles N_A
    assert astm_g_planimetric(15.50) == pytest.approx(1.0, abs=5e-4)
    g15, g31 = astm_g_planimetric(15.5), astm_g_planimetric(31.0)
    assert g15 is not None and g31 is not None
    assert g31 - g15 == pytest.approx(1.0, abs=1e-5)
    assert astm_g_planimetric(1000.0) == pytest.approx(3.321928 * 3 - 2.954)  # 7.01
    # intercept: G = 0 at l = 0.32 mm; halving l adds two G numbers
    assert astm_g_intercept(0.32) == pytest.approx(0.0, abs=5e-3)
    g08, g16 = astm_g_intercept(0.08), astm_g_intercept(0.16)
    assert g08 is not None and g16 is not None
    assert g08 - g16 == pytest.approx(2.0, abs=1e-5)
    assert astm_g_planimetric(0.0) is None and astm_g_intercept(0.0) is None


# ------------------------------------------------------------------ square grid


def test_square_grid_cut_by_the_edges() -> None:
    k = 20
    labels = rect_grid((200, 200), (k, k), offset=(7, 3))  # 10 x 10 grain areas, 11 x 11 cut
    px = SIDE_UM / k
    s = grain_statistics(labels, px)
    assert s["count"] == 121
    assert s["count_inside"] == 81 and s["count_edge"] == 40
    # 81 inside + 0.5 * 36 sides + 4 corners / 4 = 100 equivalent grains in 0.1 mm²
    assert s["n_equivalent"] == 100.0
    assert s["test_area_mm2"] == pytest.approx(0.1)
    assert s["n_a_per_mm2"] == pytest.approx(1000.0)
    assert s["astm_g_planimetric"] == pytest.approx(3.321928 * 3 - 2.954)  # 7.011784
    assert s["mean_area_um2"] == pytest.approx(SIDE_UM**2) == pytest.approx(1000.0)
    assert s["median_area_um2"] == pytest.approx(1000.0)
    assert s["mean_area_planimetric_um2"] == pytest.approx(1000.0)
    assert s["mean_equivalent_diameter_um"] == pytest.approx(math.sqrt(4000.0 / math.pi))
    # every row crosses 10 vertical boundaries, every column 10 horizontal ones; each line
    # runs 199 px, between its first and last pixel centres (exact on average over
    # positions: test_intercept_is_exact_over_all_grid_positions)
    assert s["intercept_count"] == 2 * 200 * 10
    assert s["test_line_length_um"] == pytest.approx(2 * 200 * 199 * px)
    ell = SIDE_UM * 199 / 200
    assert s["mean_intercept_um"] == pytest.approx(ell)
    assert s["astm_g_intercept"] == pytest.approx(-6.643856 * math.log10(ell / 1000) - 3.288)
    assert s["astm_g_intercept"] == pytest.approx(6.692247)
    assert sum(s["histogram"]["counts"]) == s["count_inside"] == 81
    json.dumps(s)  # JSON-friendly


def test_square_grid_aligned_with_the_edges() -> None:
    """Grains flush with the edge touch it, so they count as cut (documented bias)."""
    s = grain_statistics(rect_grid((200, 200), (20, 20)), 1.0)
    assert s["count"] == 100 and s["count_inside"] == 64
    assert s["n_equivalent"] == 64 + 0.5 * 32 + 1  # 81
    assert s["intercept_count"] == 2 * 200 * 9


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(4, 30),
    h=st.integers(30, 120),
    w=st.integers(30, 120),
    oy=st.integers(1, 29),
    ox=st.integers(1, 29),
)
def test_planimetric_count_on_any_cut_grid(k: int, h: int, w: int, oy: int, ox: int) -> None:
    """Weights 1 / 1/2 / 1/4 factorise per axis: N = (lines across y) * (lines across x)."""
    oy, ox = oy % k or 1, ox % k or 1
    labels = rect_grid((h, w), (k, k), (oy, ox))
    py = boundaries_between(oy, h, k)
    px = boundaries_between(ox, w, k)
    table = grain_table(labels, 1.0)
    if py and px:
        assert planimetric_count(table) == py * px
    crossings, length = intercept_count(labels)
    assert crossings == h * px + w * py
    assert length == h * (w - 1) + w * (h - 1)  # from the first pixel centre to the last


def test_edge_handling_is_exact_for_every_shift() -> None:
    """N_A of a cut square grid is exact wherever the grid lies (no one-grain bias)."""
    k = 16
    for oy in range(1, k, 5):
        for ox in range(1, k, 3):
            labels = rect_grid((160, 128), (k, k), (oy, ox))
            s = grain_statistics(labels, 2.0)
            assert s["n_equivalent"] == (160 // k) * (128 // k)
            assert s["mean_area_planimetric_um2"] == pytest.approx((2.0 * k) ** 2)
            p = 160 * (128 // k) + 128 * (160 // k)
            assert s["mean_intercept_um"] == pytest.approx(2.0 * (160 * 127 + 128 * 159) / p)


@pytest.mark.parametrize(("shape", "cell"), [((48, 48), (20, 20)), ((90, 70), (12, 30))])
def test_intercept_is_exact_over_all_grid_positions(
    shape: tuple[int, int], cell: tuple[int, int]
) -> None:
    """Pooled over every position of a rectangular grid, ℓ is exact: rows cross a boundary
    every cell width, columns every cell height, and a w-px line sees boundaries in its
    w - 1 gaps between pixel centres (w px of line read ℓ high by w / (w - 1): 20.48 px
    for 20-px squares on 48² images)."""
    acc = CumulativeGrainStats()
    for oy in range(cell[0]):
        for ox in range(cell[1]):
            out = acc.add(rect_grid(shape, cell, (oy, ox)), 1.0)
    (h, w), (a, b) = shape, cell
    rows, cols = h * (w - 1), w * (h - 1)  # line lengths, px
    assert out["mean_intercept_um"] == pytest.approx((rows + cols) / (rows / b + cols / a))
    if h == w:  # the harmonic mean of the two sides
        assert out["mean_intercept_um"] == pytest.approx(2.0 / (1.0 / a + 1.0 / b))


# ------------------------------------------------------------------ other tessellations


def test_rectangular_grid() -> None:
    a, b = 12, 30  # grain height and width, px
    labels = rect_grid((240, 300), (a, b), offset=(5, 11))
    px = 0.5
    s = grain_statistics(labels, px)
    area_um2 = a * b * px**2
    assert s["n_equivalent"] == (240 // a) * (300 // b)
    assert s["n_a_per_mm2"] == pytest.approx(1e6 / area_um2)
    assert s["astm_g_planimetric"] == pytest.approx(3.321928 * math.log10(1e6 / area_um2) - 2.954)
    assert s["mean_area_um2"] == pytest.approx(area_um2)
    assert s["mean_equivalent_diameter_um"] == pytest.approx(math.sqrt(4 * area_um2 / math.pi))
    # rows cross vertical boundaries every b, columns horizontal ones every a:
    # l = L / P = 2 / (1/a + 1/b) (harmonic mean of the two directions)
    # (on average over grid positions; here 10 and 20 crossings on lines of 299 and 239 px)
    ell = (240 * 299 + 300 * 239) / (240 * 10 + 300 * 20) * px
    assert ell == pytest.approx(2.0 / (1.0 / a + 1.0 / b) * px, rel=0.005)
    assert s["mean_intercept_um"] == pytest.approx(ell)
    assert s["astm_g_intercept"] == pytest.approx(-6.643856 * math.log10(ell / 1000) - 3.288)
    # sparser test lines (every 6th row and column) see the same structure
    sparse = grain_statistics(labels, px, line_step_px=6)
    assert sparse["mean_intercept_um"] == pytest.approx(ell)
    assert sparse["test_line_length_um"] == pytest.approx((40 * 299 + 50 * 239) * px)


def test_brick_wall_six_neighbours() -> None:
    a, b = 10, 24
    labels = brick_wall((200, 240), (a, b), offset=(3, 5))
    s = grain_statistics(labels, 1.0)
    interior = grain_table(labels, 1.0)
    assert np.all(interior.area_px[interior.inside] == a * b)
    assert s["n_a_per_mm2"] == pytest.approx(1e6 / (a * b), rel=0.02)
    assert s["mean_area_um2"] == pytest.approx(a * b)
    # rows cross joints every b; columns cross every row boundary (a)
    assert s["mean_intercept_um"] == pytest.approx(2.0 / (1.0 / a + 1.0 / b), rel=0.02)


def test_zero_gaps_between_grains_do_not_change_the_counts() -> None:
    k, oy, ox = 15, 4, 9
    labels = rect_grid((120, 120), (k, k), offset=(oy, ox))
    gapped = labels.copy()  # a one-pixel unlabelled line between grains
    gapped[(np.arange(120) + oy) % k == k - 1, :] = 0
    gapped[:, (np.arange(120) + ox) % k == k - 1] = 0
    # test lines every 15 px starting at 0 never run along a gap
    full = grain_statistics(labels, 1.0, line_step_px=k)
    with_gaps = grain_statistics(gapped, 1.0, line_step_px=k)
    assert with_gaps["intercept_count"] == full["intercept_count"] > 0
    assert with_gaps["n_equivalent"] == full["n_equivalent"] == 64
    assert with_gaps["count"] == full["count"]
    # a gap between two grains is one crossing, a gap inside one grain none
    line = np.array([[1, 1, 0, 2, 2, 0, 0, 3, 0, 3]], dtype=np.int32)
    assert intercept_count(line)[0] == 2 + 0  # columns are single pixels: no crossings


def test_single_grain_and_empty_fields() -> None:
    one = grain_statistics(np.ones((50, 40), dtype=np.int32), 1.0)
    assert one["count"] == 1 and one["count_inside"] == 0
    assert one["n_equivalent"] == 1.0  # four corners of one grain
    assert one["mean_area_um2"] is None and one["mean_intercept_um"] is None
    assert one["astm_g_intercept"] is None
    empty = grain_statistics(np.zeros((20, 20), dtype=np.int32), 1.0)
    assert empty["count"] == 0 and empty["astm_g_planimetric"] is None
    json.dumps(one)
    json.dumps(empty)
    with pytest.raises(ValueError):
        grain_statistics(np.ones((4, 4), dtype=np.float32), 1.0)
    with pytest.raises(ValueError):
        grain_statistics(np.ones((4, 4), dtype=np.int32), 0.0)


def test_large_label_ids() -> None:
    labels = rect_grid((60, 60), (10, 10), (3, 3)).astype(np.int64) * 1_000_003
    s = grain_statistics(labels, 1.0)
    assert s["n_equivalent"] == 36 and s["mean_area_um2"] == pytest.approx(100.0)


# ------------------------------------------------------------------ histogram / accumulator


def test_histogram_bins() -> None:
    edges = np.asarray(HISTOGRAM_EDGES_UM)
    assert np.allclose(np.diff(np.log10(edges)), 0.1)  # 10 log-spaced bins per decade
    s = grain_statistics(rect_grid((200, 200), (20, 20), (7, 3)), SIDE_UM / 20)
    counts = np.asarray(s["histogram"]["counts"])
    assert counts.sum() == 81 and np.count_nonzero(counts) == 1
    d = math.sqrt(4000 / math.pi)
    (bin_,) = np.flatnonzero(counts)
    assert edges[bin_] <= d < edges[bin_ + 1]
    # values outside the range land in the end bins
    tiny = grain_statistics(rect_grid((20, 20), (4, 4), (1, 1)), 0.001)
    assert tiny["histogram"]["counts"][0] == tiny["count_inside"] > 0


def _tiles(sample: GrainSample, n: int, shape: tuple[int, int]) -> list[np.ndarray]:
    return [sample.render_truth((0.0, i * shape[1]), shape)[1] for i in range(n)]


def test_accumulator_equals_the_pooled_tiles() -> None:
    sample = GrainSample(replace(GrainParams(), world_shape_px=(256, 1024)), seed=5)
    tiles = _tiles(sample, 4, (256, 256))
    px = 0.4
    acc = CumulativeGrainStats()
    for t in tiles:
        out = acc.add(t, px)
    assert out == acc.summary() and out["tiles"] == 4
    tables = [grain_table(t, px) for t in tiles]
    inside = np.concatenate([tb.area_um2[tb.inside] for tb in tables])
    singles = [grain_statistics(t, px) for t in tiles]
    assert out["count"] == sum(s["count"] for s in singles)
    assert out["count_inside"] == inside.size == sum(s["count_inside"] for s in singles)
    assert out["mean_area_um2"] == pytest.approx(inside.mean())
    # medians from log bins ±0.05 % wide: the cost per tile does not grow with the scan
    assert out["median_area_um2"] == pytest.approx(np.median(inside), rel=1e-3)
    diam = np.sqrt(4 * inside / np.pi)
    assert out["median_equivalent_diameter_um"] == pytest.approx(np.median(diam), rel=1e-3)
    assert out["mean_equivalent_diameter_um"] == pytest.approx(diam.mean())
    summed = np.sum([s["histogram"]["counts"] for s in singles], axis=0)
    assert out["histogram"]["counts"] == summed.tolist()
    assert sum(out["histogram"]["counts"]) == out["count_inside"]
    n_eq = sum(s["n_equivalent"] for s in singles)
    area = sum(s["test_area_mm2"] for s in singles)
    assert out["n_a_per_mm2"] == pytest.approx(n_eq / area)
    p = sum(s["intercept_count"] for s in singles)
    length = sum(s["test_line_length_um"] for s in singles)
    assert out["mean_intercept_um"] == pytest.approx(length / p)
    lo, hi = out["mean_equivalent_diameter_ci95_um"]
    half = 1.96 * diam.std(ddof=1) / math.sqrt(diam.size)
    assert lo < diam.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.02)  # t ≈ 1.97 for ~hundreds of grains
    g = [s["astm_g_planimetric"] for s in singles]
    glo, ghi = out["astm_g_planimetric_ci95"]
    assert glo < float(np.mean(g)) < ghi
    json.dumps(out)


def test_accumulator_on_identical_tiles_matches_one_tile() -> None:
    tile = rect_grid((200, 200), (20, 20), (7, 3))
    acc = CumulativeGrainStats()
    single = grain_statistics(tile, SIDE_UM / 20)
    first = acc.add(tile, SIDE_UM / 20)
    d = math.sqrt(4000 / math.pi)
    assert first["mean_equivalent_diameter_ci95_um"] == pytest.approx([d, d])  # equal grains
    assert first["astm_g_planimetric_ci95"] is None  # one tile
    for _ in range(2):
        out = acc.add(tile, SIDE_UM / 20)
    assert out["astm_g_planimetric"] == pytest.approx(single["astm_g_planimetric"])
    assert out["astm_g_intercept"] == pytest.approx(single["astm_g_intercept"])
    assert out["count_inside"] == 3 * 81
    acc.reset()
    assert acc.summary()["tiles"] == 0 and acc.summary()["count"] == 0


def test_accumulator_leaves_out_tiles_that_overlap_pooled_ones() -> None:
    tile = rect_grid((200, 200), (20, 20), (7, 3))
    px = 0.5  # a 100 µm tile
    acc = CumulativeGrainStats()
    acc.add(tile, px, centre_um=(0.0, 0.0))
    assert acc.add(tile, px, centre_um=(0.0, 0.0))["tiles_overlapping"] == 1  # seen again
    acc.add(tile, px, centre_um=(100.0, 0.0))  # touching: pooled
    assert acc.overlap((146.0, -50.0, 246.0, 50.0)) == pytest.approx(0.04)
    acc.add(tile, px, centre_um=(196.0, 0.0))  # 4 % overlap (jitter, calibration): pooled
    out = acc.add(tile, px, centre_um=(50.0, 60.0))  # 20 % under each of two pooled tiles
    assert (out["tiles"], out["tiles_overlapping"]) == (3, 2)
    assert out["count_inside"] == 3 * 81
    assert acc.add(tile, px)["tiles"] == 4  # no position: no check
    acc.reset()
    assert acc.add(tile, px, centre_um=(0.0, 0.0))["tiles_overlapping"] == 0
    for i in range(100):  # the footprint buffer grows
        acc.add(tile, px, centre_um=(200.0 * (i + 1), 0.0))
    assert acc.summary()["tiles"] == 101 and acc.overlap((-10, -10, 10, 10)) == 1.0


# ------------------------------------------------------------------ labels from boundaries


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    """A known tessellation: a simulated field whose grains (and edge pieces) are all large.

    Slivers that the field edge cuts off a grain would vanish under any boundary line, so
    pieces under 80 px are merged into their neighbours first (skimage, independently of
    the code under test).
    """
    params = replace(GrainParams(), world_shape_px=(640, 640), mean_grain_diameter_px=48.0)
    field = GrainSample(params, seed=21).render_truth((64.0, 64.0), (512, 512))[1]
    field = connected_label(field, background=0, connectivity=1)
    areas = np.bincount(field.ravel())
    field[areas[field] < 80] = 0
    merged = expand_labels(field, distance=100)
    assert merged.min() >= 1
    return merged.astype(np.int32)


def test_labels_from_a_sharp_boundary_map(truth: np.ndarray) -> None:
    boundary = find_boundaries(truth, mode="inner").astype(np.float32)  # 2 px wide
    labels = labels_from_boundaries(boundary, threshold=0.5, min_area_px=30)
    assert labels.dtype == np.int32 and labels.min() == 1
    assert np.unique(labels).size == labels.max()  # 1..n
    result = match_instances(truth, labels, iou_threshold=0.5)
    assert result.f1 == 1.0
    assert result.mean_matched_iou > 0.97
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        labels_from_boundaries(boundary)
        times.append(time.perf_counter() - t0)
    print(f"labels_from_boundaries 512x512: best {min(times) * 1e3:.1f} ms")


def test_labels_from_a_blurred_noisy_boundary_map(truth: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    thick = find_boundaries(truth, mode="thick").astype(np.float32)
    prob = np.clip(2.0 * ndimage.gaussian_filter(thick, 0.8), 0, 1)
    prob = np.clip(prob + rng.normal(0, 0.1, prob.shape), 0, 1)
    labels = labels_from_boundaries(prob, threshold=0.5, min_area_px=30)
    result = match_instances(truth, labels, iou_threshold=0.5)
    assert result.f1 == 1.0
    assert result.mean_matched_iou > 0.95
    stats_true = grain_statistics(truth, 1.0)
    stats_pred = grain_statistics(labels, 1.0)
    assert stats_pred["mean_area_um2"] == pytest.approx(stats_true["mean_area_um2"], rel=0.02)
    assert stats_pred["astm_g_planimetric"] == pytest.approx(
        stats_true["astm_g_planimetric"], abs=0.02
    )


def test_small_regions_are_merged_and_edge_cases() -> None:
    prob = np.zeros((60, 60), dtype=np.float32)
    prob[:, 30] = 1.0  # two halves
    prob[10:16, 10:16] = 1.0
    prob[12:14, 12:14] = 0.0  # a 4-px island inside a boundary blob
    labels = labels_from_boundaries(prob, min_area_px=30)
    assert labels.min() == 1 and labels.max() == 2
    assert labels[12, 12] == labels[5, 5]  # the island went to its neighbour
    kept = labels_from_boundaries(prob, min_area_px=0)
    assert kept.max() == 3
    assert not labels_from_boundaries(np.ones((8, 8))).any()  # no interior at all
    tiny = np.ones((8, 8))
    tiny[2:4, 2:4] = 0
    assert np.all(labels_from_boundaries(tiny, min_area_px=30) == 1)  # all small: keep
    with pytest.raises(ValueError):
        labels_from_boundaries(np.zeros((2, 2, 2)))


def test_grains_cut_by_the_edge_keep_their_slivers() -> None:
    """A grain cut to a 2-px strip by the field edge shows an 18-px interior: kept (edge
    minimum 5 px), so N_A keeps its half count; with the 30-px minimum for every region the
    strips went to the inside grains next to them, which then counted as edge grains."""
    truth = rect_grid((200, 200), (20, 20), (18, 12))  # top row of grains 2 px tall
    boundary = find_boundaries(truth, mode="inner").astype(np.float32)
    expected = grain_statistics(truth, 1.0)
    assert expected["n_equivalent"] == 100 and expected["count_inside"] == 81
    s = grain_statistics(labels_from_boundaries(boundary, min_area_px=30), 1.0)
    assert s["n_equivalent"] == 100
    assert s["count_inside"] == 81 and s["count_edge"] == 40
    old = grain_statistics(labels_from_boundaries(boundary, min_edge_area_px=None), 1.0)
    assert old["n_equivalent"] == 90 and old["count_inside"] == 72


def test_edge_minimum_applies_to_border_regions_only() -> None:
    prob = np.zeros((60, 60), dtype=np.float32)
    prob[:, 30] = 1.0  # two halves
    prob[3, :30] = 1.0  # a 3-px strip along the top: 3 x 30 = 90 px ...
    prob[:3, 3] = prob[:3, 8] = 1.0  # ... cut into 3 x 3, 3 x 4 and 3 x 21 px pieces
    prob[20:26, 10:16] = 1.0  # a boundary blob ...
    prob[22:24, 12:14] = 0.0  # ... around a 4-px island, away from the border
    labels = labels_from_boundaries(prob, min_area_px=30, min_edge_area_px=10)
    assert labels.max() == 4  # halves, the 12-px and 63-px strips; not the 9-px one
    assert len({labels[1, 5], labels[1, 20], labels[10, 10], labels[10, 40]}) == 4
    assert labels[22, 12] == labels[10, 10]  # the inner island went to its neighbour
    assert labels_from_boundaries(prob, min_area_px=30, min_edge_area_px=1).max() == 5
    # the smaller of the two minimums applies; None: min_area_px for all regions
    assert labels_from_boundaries(prob, min_area_px=10, min_edge_area_px=60).max() == 4
    assert labels_from_boundaries(prob, min_area_px=30, min_edge_area_px=None).max() == 3
    assert labels_from_boundaries(prob, min_area_px=0, min_edge_area_px=60).max() == 6


def test_cards_set_the_edge_minimum_of_the_segmenter() -> None:
    from livemask.analysis.boundaries import MIN_EDGE_AREA_PX
    from livemask.inference.models import PostProcessing, load_model_card
    from livemask.offline import load_segmenter

    assert PostProcessing().min_edge_area_px == MIN_EDGE_AREA_PX
    for name in ("grains", "grains_rf", "grains_classical"):
        assert load_model_card(name).postprocessing.min_edge_area_px == MIN_EDGE_AREA_PX
    truth = rect_grid((200, 200), (20, 20), (18, 12))
    boundary = find_boundaries(truth, mode="inner").astype(np.float32)[None]
    seg = load_segmenter("grains_classical")
    assert seg.labels(boundary).max() == truth.max()  # every strip kept
    seg.post = seg.post.model_copy(update={"min_edge_area_px": 30})
    assert seg.labels(boundary).max() < truth.max()


def test_a_field_measured_once_gives_the_statistics_measured_afresh() -> None:
    """grain_field is read once per tile for the tile's and the cumulative statistics (the
    service and segment --grains); with it they equal those measured from the labels."""
    from livemask.analysis.grains import CumulativeGrainStats, grain_field, grain_statistics

    labels = GrainSample(GrainParams(world_shape_px=(256, 256)), seed=1).render(
        (0.0, 0.0), (128, 128)).labels
    field = grain_field(labels, 0.5)
    assert grain_statistics(labels, 0.5, field=field) == grain_statistics(labels, 0.5)
    shared, fresh = CumulativeGrainStats(), CumulativeGrainStats()
    assert shared.add(labels, 0.5, field=field) == fresh.add(labels, 0.5)
    with pytest.raises(ValueError, match="test lines are every 1 px, not every 2 px"):
        grain_statistics(labels, 0.5, line_step_px=2, field=field)
