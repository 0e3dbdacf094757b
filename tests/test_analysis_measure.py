"""Tests for livemask.analysis.measure against hand-computed values and scikit-image."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from skimage.draw import ellipse
from skimage.measure import regionprops

from livemask.analysis import UNITS, measure_objects


def rectangle_frame() -> tuple[np.ndarray, np.ndarray]:
    """Label 1: rows 2..5, cols 3..9 (4 x 7 = 28 px) on a constant image of 10."""
    labels = np.zeros((12, 14), dtype=np.int32)
    labels[2:6, 3:10] = 1
    image = np.full(labels.shape, 10, dtype=np.uint16)
    return labels, image


def test_rectangle_hand_computed() -> None:
    labels, image = rectangle_frame()
    objects, summary = measure_objects(labels, image, pixel_size_um=0.5, decimals=None)
    assert len(objects) == 1
    o = objects[0]
    assert o["label"] == 1
    assert o["area_px"] == 28
    assert o["area_um2"] == pytest.approx(7.0)
    assert o["centroid_yx"] == pytest.approx([3.5, 6.0])
    assert o["bbox"] == [2, 3, 6, 10]
    assert o["mean_intensity"] == pytest.approx(10.0)
    assert o["integrated_intensity"] == pytest.approx(280.0)
    assert o["equivalent_diameter_um"] == pytest.approx(math.sqrt(4 * 28 / math.pi) * 0.5)
    # variances of a 4 x 7 block: (4**2 - 1) / 12 = 1.25 and (7**2 - 1) / 12 = 4
    assert o["eccentricity"] == pytest.approx(math.sqrt(1 - 1.25 / 4))
    assert summary["count"] == 1
    assert summary["foreground_fraction"] == pytest.approx(28 / (12 * 14))
    assert summary["background_mean"] == pytest.approx(10.0)


def test_disc_and_single_pixel() -> None:
    labels = np.zeros((100, 100), dtype=np.int32)
    yy, xx = np.indices(labels.shape)
    labels[(yy - 40) ** 2 + (xx - 50) ** 2 <= 20**2] = 1
    labels[90, 5] = 2
    image = np.ones(labels.shape, dtype=np.float32)
    objects, _ = measure_objects(labels, image, decimals=None)
    d, p = objects
    assert d["centroid_yx"] == pytest.approx([40.0, 50.0])
    assert d["bbox"] == [20, 30, 61, 71]
    assert d["area_px"] == pytest.approx(math.pi * 400, rel=0.01)
    assert d["equivalent_diameter_um"] == pytest.approx(40.0, rel=0.01)
    assert d["eccentricity"] < 0.05
    assert p == {
        "label": 2,
        "area_px": 1,
        "area_um2": 1.0,
        "centroid_yx": [90.0, 5.0],
        "bbox": [90, 5, 91, 6],
        "mean_intensity": 1.0,
        "integrated_intensity": 1.0,
        "equivalent_diameter_um": pytest.approx(2 / math.sqrt(math.pi)),
        "eccentricity": 0.0,
        "touches_edge": False,
        "local_background": 1.0,
        "corrected_intensity": 0.0,
        "saturated_px": None,  # a float image: no known saturation level
    }


def test_local_background_follows_a_gradient_the_frame_mean_misses() -> None:
    """Two equal nuclei (signal 100) on a background ramp from 100 to 1,100 ADU: the local
    background (unlabelled pixels within the margin of each box) recovers each one's signal,
    which the frame's ``background_mean`` gets wrong at both ends."""
    labels = np.zeros((40, 200), dtype=np.int32)
    labels[15:25, 15:25] = 1
    labels[15:25, 175:185] = 2
    ramp = np.linspace(100.0, 1100.0, 200)
    image = np.broadcast_to(ramp, labels.shape).copy()
    image[labels > 0] += 100.0
    objects, summary = measure_objects(labels, image, decimals=None, background_margin_px=5)
    for o, cols in zip(objects, (slice(10, 30), slice(170, 190)), strict=True):
        expected_bg = ramp[cols].mean()  # the grown box: 5 px either side, symmetric
        assert o["local_background"] == pytest.approx(expected_bg)
        assert o["corrected_intensity"] == pytest.approx(100.0 * 100)
        assert o["mean_intensity"] - summary["background_mean"] != pytest.approx(100.0, abs=50)


def test_local_background_leaves_out_other_objects_their_glow_and_nan_pixels() -> None:
    labels = np.zeros((30, 30), dtype=np.int32)
    labels[10:20, 10:20] = 1
    labels[0:5, 0:30] = 2  # a bright neighbour filling the top of object 1's margin
    image = np.full(labels.shape, 50.0)
    image[labels == 2] = 5000.0
    image[5:7, :] = 900.0  # its glow (blur) within the 2 px guard band below it
    image[labels == 1] = 80.0
    image[9, 10:20] = image[20, 10:20] = 70.0  # object 1's own glow, just outside its mask
    image[25, 15] = np.nan  # a NaN pixel near object 1: not in its background
    objects, _ = measure_objects(labels, image, decimals=None, background_margin_px=10)
    one = objects[0]
    assert one["local_background"] == pytest.approx(50.0)
    assert one["corrected_intensity"] == pytest.approx((80.0 - 50.0) * 100)


def test_local_background_is_none_without_unlabelled_pixels() -> None:
    """Space-filling labels (grains): no background, None rather than a made-up number."""
    labels = np.ones((20, 20), dtype=np.int32)
    labels[:, 10:] = 2
    objects, _ = measure_objects(labels, np.full(labels.shape, 7, np.uint16))
    assert [o["local_background"] for o in objects] == [None, None]
    assert [o["corrected_intensity"] for o in objects] == [None, None]
    json.dumps(objects, allow_nan=False)


def test_background_margin_must_be_positive() -> None:
    labels, image = rectangle_frame()
    with pytest.raises(ValueError, match=r"background_margin_px must be >= 1, got 0"):
        measure_objects(labels, image, background_margin_px=0)


def test_objects_cut_by_the_field_edge_are_flagged() -> None:
    """A pixel in the first or last row or column: the object's size is not its own."""
    labels = np.zeros((20, 30), dtype=np.int32)
    labels[0:3, 10:14] = 1  # top row
    labels[8:12, 0:2] = 2  # left column
    labels[17:20, 5:8] = 3  # bottom row
    labels[5:9, 27:30] = 4  # right column
    labels[1:19, 1:3] = 5  # one pixel in from the left, top and bottom edges: inside
    labels[19, 29] = 6  # the corner pixel
    objects, _ = measure_objects(labels, np.ones(labels.shape), decimals=None)
    assert [o["touches_edge"] for o in objects] == [True, True, True, True, False, True]


def test_intensities_and_summary() -> None:
    labels = np.zeros((10, 10), dtype=np.int32)
    labels[0:2, 0:5] = 3  # 10 px at intensity 100
    labels[5:10, 4:10] = 7  # 30 px at intensity 20
    image = np.full(labels.shape, 5.0)
    image[labels == 3] = 100.0
    image[labels == 7] = 20.0
    objects, summary = measure_objects(labels, image)
    assert [o["label"] for o in objects] == [3, 7]
    assert [o["area_px"] for o in objects] == [10, 30]
    assert [o["mean_intensity"] for o in objects] == [100.0, 20.0]
    assert [o["integrated_intensity"] for o in objects] == [1000.0, 600.0]
    assert summary == {
        "count": 2,
        "mean_area_px": 20.0,
        "median_area_px": 20.0,
        "mean_area_um2": 20.0,
        "mean_intensity": 60.0,
        "total_intensity": 1600.0,
        "foreground_fraction": 0.4,
        "background_mean": 5.0,
        "saturated_objects": None,
    }


def test_pixel_size_scales_area_and_diameter() -> None:
    labels, image = rectangle_frame()
    (o1,), s1 = measure_objects(labels, image, pixel_size_um=1.0, decimals=None)
    (o2,), s2 = measure_objects(labels, image, pixel_size_um=0.5, decimals=None)
    assert o2["area_um2"] == pytest.approx(o1["area_um2"] / 4)
    assert o2["equivalent_diameter_um"] == pytest.approx(o1["equivalent_diameter_um"] / 2)
    assert o2["area_px"] == o1["area_px"]
    assert s2["mean_area_um2"] == pytest.approx(s1["mean_area_um2"] / 4)


@pytest.mark.parametrize("offset", [0, 1900])
def test_matches_regionprops_on_random_ellipses(offset: int) -> None:
    rng = np.random.default_rng(offset)
    size = offset + 200
    labels = np.zeros((size, size), dtype=np.int32)
    image = rng.uniform(0, 4000, size=labels.shape)
    lab = 0
    for cy in range(offset + 20, offset + 200, 45):
        for cx in range(offset + 20, offset + 200, 45):
            lab += 1
            rr, cc = ellipse(
                cy,
                cx,
                rng.uniform(2, 18),
                rng.uniform(2, 18),
                shape=labels.shape,
                rotation=rng.uniform(-np.pi, np.pi),
            )
            labels[rr, cc] = lab
    objects, _ = measure_objects(labels, image, pixel_size_um=0.25, decimals=None)
    props = regionprops(labels, intensity_image=image)
    assert len(objects) == len(props) == lab
    for o, p in zip(objects, props, strict=True):
        assert o["label"] == p.label
        assert o["area_px"] == p.area
        assert o["bbox"] == list(p.bbox)
        assert o["centroid_yx"] == pytest.approx(list(p.centroid), abs=1e-9)
        assert o["mean_intensity"] == pytest.approx(p.intensity_mean, rel=1e-9)
        assert o["equivalent_diameter_um"] == pytest.approx(
            p.equivalent_diameter_area * 0.25, rel=1e-9
        )
        assert abs(o["eccentricity"] - p.eccentricity) < 1e-6


def test_empty_labels() -> None:
    labels = np.zeros((8, 8), dtype=np.int32)
    image = np.full((8, 8), 3, dtype=np.uint16)
    objects, summary = measure_objects(labels, image)
    assert objects == []
    assert summary == {
        "count": 0,
        "mean_area_px": None,
        "median_area_px": None,
        "mean_area_um2": None,
        "mean_intensity": None,
        "total_intensity": 0.0,
        "foreground_fraction": 0.0,
        "background_mean": 3.0,
        "saturated_objects": 0,  # uint16: the level is known, and no object reaches it
    }
    json.dumps(summary, allow_nan=False)


def test_all_foreground_has_no_background_mean() -> None:
    labels = np.ones((4, 4), dtype=np.int32)
    _, summary = measure_objects(labels, np.ones((4, 4)))
    assert summary["background_mean"] is None
    assert summary["foreground_fraction"] == 1.0


def test_output_is_plain_json() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 6, size=(32, 32)).astype(np.uint16)
    image = rng.integers(0, 65535, size=(32, 32)).astype(np.uint16)
    objects, summary = measure_objects(labels, image, pixel_size_um=0.1625)
    text = json.dumps({"objects": objects, "summary": summary}, allow_nan=False)
    assert json.loads(text)["summary"]["count"] == 5
    for o in objects:
        assert set(o) <= set(UNITS)
        for key, value in o.items():
            if isinstance(value, list):
                assert all(type(v) in (int, float) for v in value), key
            else:
                allowed: tuple[type, ...] = (bool,) if key == "touches_edge" else (int, float)
                if key in ("local_background", "corrected_intensity"):  # no background near
                    allowed = (float, type(None))
                assert type(value) in allowed, key
        assert type(o["label"]) is int and type(o["area_px"]) is int
        assert all(type(v) is int for v in o["bbox"])
    assert type(summary["count"]) is int


def test_rounding() -> None:
    labels = np.zeros((3, 3), dtype=np.int32)
    labels[0, 0:2] = 1
    labels[1, 0] = 1
    image = np.array([[1.0, 2.0, 0], [2.0, 0, 0], [0, 0, 0]])
    (o,), _ = measure_objects(labels, image, decimals=4)
    assert o["centroid_yx"] == [0.3333, 0.3333]
    assert o["mean_intensity"] == 1.6667


def test_sparse_huge_label_ids() -> None:
    labels = np.zeros((6, 6), dtype=np.int64)
    labels[0:2, 0:2] = 2**40
    labels[4:6, 3:6] = 5
    objects, summary = measure_objects(labels, np.ones((6, 6)))
    assert [(o["label"], o["area_px"], o["bbox"]) for o in objects] == [
        (5, 6, [4, 3, 6, 6]),
        (2**40, 4, [0, 0, 2, 2]),
    ]
    assert summary["count"] == 2


def test_units_descriptor() -> None:
    assert UNITS["area_um2"] == "µm²"
    assert UNITS["mean_intensity"] == "camera counts (ADU)"
    labels, image = rectangle_frame()
    (o,), _ = measure_objects(labels, image)
    assert set(o) <= set(UNITS)


def test_bad_inputs() -> None:
    labels, image = rectangle_frame()
    with pytest.raises(ValueError, match="shape"):
        measure_objects(labels, image[:-1])
    with pytest.raises(ValueError, match="integer"):
        measure_objects(labels.astype(float), image)
    with pytest.raises(ValueError, match="pixel_size_um"):
        measure_objects(labels, image, pixel_size_um=0)
    with pytest.raises(ValueError, match=">= 0"):
        measure_objects(-labels, image)


def test_nan_and_inf_pixels_are_left_out_of_intensities() -> None:
    """Before, one NaN pixel made its object's mean and integrated intensity NaN and the
    summary's mean_intensity, total_intensity and background_mean None."""
    labels = np.zeros((8, 8), dtype=np.int32)
    labels[1:3, 1:3] = 1
    labels[5:7, 5:7] = 2
    labels[0, 6] = 3  # its only pixel is NaN: no mean
    image = np.full(labels.shape, 10.0, dtype=np.float32)
    image[5, 5] = 22.0
    image[1, 1] = np.nan  # inside object 1
    image[6, 6] = np.inf  # inside object 2
    image[0, 6] = np.nan
    image[7, 0] = -np.inf  # background
    image[7, 1] = 4.0  # background
    objects, summary = measure_objects(labels, image)
    assert [(o["label"], o["area_px"], o["mean_intensity"], o["integrated_intensity"])
            for o in objects] == [(1, 4, 10.0, 30.0), (2, 4, 14.0, 42.0), (3, 1, None, 0.0)]
    # no finite pixel: nothing to correct either (was 0.0, read as "no signal")
    assert objects[2]["corrected_intensity"] is None
    assert objects[0]["centroid_yx"] == [1.5, 1.5]  # geometry keeps every pixel
    # background: 64 - 9 labelled = 55 px, one infinite: 53 * 10 + 4 over 54 finite pixels
    assert summary["background_mean"] == pytest.approx((53 * 10 + 4) / 54, abs=1e-4)
    assert summary["mean_intensity"] == 12.0  # over the objects that have a mean
    assert summary["total_intensity"] == 72.0
    json.dumps({"objects": objects, "summary": summary}, allow_nan=False)


def test_plus_and_minus_infinite_pixels_give_no_stray_warning() -> None:
    """inf + -inf in the frame sum is NaN: handled, but numpy printed a RuntimeWarning."""
    labels = np.zeros((4, 4), dtype=np.int32)
    labels[1:3, 1:3] = 1
    image = np.full(labels.shape, 5.0)
    image[0, 0], image[3, 3] = np.inf, -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        objects, summary = measure_objects(labels, image)
    assert objects[0]["mean_intensity"] == 5.0 and summary["background_mean"] == 5.0


def test_nan_pixels_with_sparse_huge_ids_and_without_objects() -> None:
    labels = np.zeros((6, 6), dtype=np.int64)
    labels[0:2, 0:2] = 2**40
    labels[4:6, 3:6] = 5
    image = np.ones((6, 6))
    image[0, 0] = image[4, 4] = image[3, 0] = np.nan
    objects, summary = measure_objects(labels, image * 3)
    assert [(o["label"], o["mean_intensity"], o["integrated_intensity"]) for o in objects] == [
        (5, 3.0, 15.0), (2**40, 3.0, 9.0)]
    assert summary["background_mean"] == 3.0
    objects, summary = measure_objects(np.zeros((6, 6), np.int32), image)
    assert objects == [] and summary["background_mean"] == 1.0
    _, summary = measure_objects(np.zeros((2, 2), np.int32), np.full((2, 2), np.nan))
    assert summary["background_mean"] is None


def test_um_values_keep_significant_digits_at_small_pixel_sizes() -> None:
    """Before, µm values were rounded to 4 decimal places: at 2 nm/px a 30-px object's
    area_um2 was 0.0001 (exact 0.00012) and at 1 nm/px 0.0."""
    labels = np.zeros((64, 64), dtype=np.int32)
    labels[10:15, 10:16] = 1  # 30 px
    labels[30:50, 30:50] = 2  # 400 px
    image = np.full(labels.shape, 100, dtype=np.uint16)
    for px in (0.65, 0.01, 0.002, 0.001, 1e-5, 37.0):
        objects, summary = measure_objects(labels, image, pixel_size_um=px)
        for o in objects:
            assert o["area_um2"] == pytest.approx(o["area_px"] * px**2, rel=1e-5), px
            assert o["equivalent_diameter_um"] == pytest.approx(
                math.sqrt(4 * o["area_px"] / math.pi) * px, rel=1e-5), px
        assert summary["mean_area_um2"] == pytest.approx(215 * px**2, rel=1e-5), px
    objects, _ = measure_objects(labels, image, pixel_size_um=0.002)
    assert objects[0]["area_um2"] == 0.00012
    objects, summary = measure_objects(labels, image, pixel_size_um=1 / 3)
    assert objects[0]["area_um2"] == 3.33333  # 6 significant digits
    assert objects[1]["area_um2"] == 44.4444  # 4 places keep 6 digits too
    assert summary["mean_area_um2"] == 23.8889
    objects, _ = measure_objects(labels, image, pixel_size_um=1e6)
    assert objects[0]["area_um2"] == 30e12  # large values keep their integer part
    _, summary = measure_objects(labels, image, pixel_size_um=0.001, decimals=None)
    assert summary["mean_area_um2"] == pytest.approx(215e-6, rel=1e-12)


def test_units_in_pixels_converts_once() -> None:
    """Review: the service hands the recorder units the pipeline converted already, and the
    recorder converted them again ('... these px values are pixel values) (no pixel-size
    calibration ...)' in units.json)."""
    from livemask.analysis.measure import UNCALIBRATED_NOTE, units_in_pixels
    from livemask.recording.writer import column_units

    once = units_in_pixels(UNITS)
    assert units_in_pixels(once) == once
    columns = column_units(once, calibrated=False)
    assert columns["area_um2"] == f"px² ({UNCALIBRATED_NOTE})"
    assert columns["equivalent_diameter_um"] == f"px ({UNCALIBRATED_NOTE})"
