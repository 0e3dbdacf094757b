"""Tests for livemask.analysis.normalize."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from livemask.acquisition.simulated.nuclei import NucleiSample
from livemask.analysis import percentile_normalize
from livemask.analysis.normalize import (
    SATURATED_MIN_PX,
    image_problem,
    noise_sigma,
    unsaturated,
)
from livemask.offline import load_segmenter


def test_min_max_map_to_zero_and_one_exactly() -> None:
    image = np.arange(100, 200, dtype=np.uint16).reshape(10, 10)
    out = percentile_normalize(image, 0.0, 100.0, subsample=1)
    assert out.dtype == np.float32
    assert out.shape == image.shape
    assert out[0, 0] == 0.0
    assert out[-1, -1] == pytest.approx(1.0)
    # linear in between: value 150 is halfway-ish (50 of 99 steps)
    assert out.flat[50] == pytest.approx(50 / 99, abs=1e-6)


def test_default_percentiles_on_ramp() -> None:
    rng = np.random.default_rng(0)
    image = rng.permutation(512 * 512).astype(np.float64).reshape(512, 512)
    out = percentile_normalize(image)
    # 1 % of the pixels lie below 0 and 0.2 % above 1 (estimate from a 1/16 subsample)
    assert np.mean(out < 0) == pytest.approx(0.01, abs=0.002)
    assert np.mean(out > 1) == pytest.approx(0.002, abs=0.002)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32, np.float64])
def test_dtypes(dtype: type) -> None:
    rng = np.random.default_rng(0)
    image: np.ndarray = rng.integers(10, 200, size=(64, 80)).astype(dtype)
    out = percentile_normalize(image, 0.0, 100.0, subsample=1)
    assert out.dtype == np.float32
    assert out.min() == pytest.approx(0.0)
    assert out.max() == pytest.approx(1.0)


def test_input_not_modified() -> None:
    image = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    before = image.copy()
    out = percentile_normalize(image)
    assert out is not image
    np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_flat_image_gives_zeros_without_warnings(dtype: type) -> None:
    image: np.ndarray = np.full((32, 32), 7, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = percentile_normalize(image)
    assert out.dtype == np.float32
    assert not out.any()


def test_subsample_estimate_close_to_full() -> None:
    rng = np.random.default_rng(1)
    image = rng.gamma(2.0, 100.0, size=(512, 512)).astype(np.uint16)
    fast = percentile_normalize(image, subsample=4)
    full = percentile_normalize(image, subsample=1)
    assert np.abs(fast - full).max() < 0.05


def test_small_image_with_large_stride() -> None:
    image = np.arange(9, dtype=np.uint16).reshape(3, 3)
    out = percentile_normalize(image, 0.0, 100.0, subsample=8)
    assert out[0, 0] == 0.0
    assert out[2, 2] == pytest.approx(1.0)


def test_clip() -> None:
    image = np.arange(1000, dtype=np.float32).reshape(20, 50)
    out = percentile_normalize(image, 10.0, 90.0, clip=True)
    assert out.min() == 0.0
    assert out.max() == 1.0


def test_empty_image() -> None:
    out = percentile_normalize(np.zeros((0, 5), dtype=np.uint16))
    assert out.shape == (0, 5)
    assert out.dtype == np.float32


@pytest.mark.parametrize(("low", "high"), [(50.0, 50.0), (60.0, 40.0), (-1.0, 99.0), (1.0, 101.0)])
def test_bad_percentiles(low: float, high: float) -> None:
    with pytest.raises(ValueError, match="low"):
        percentile_normalize(np.zeros((4, 4)), low, high)


def test_bad_subsample() -> None:
    with pytest.raises(ValueError, match="subsample"):
        percentile_normalize(np.zeros((4, 4)), subsample=0)


def _gamma_image() -> np.ndarray:
    rng = np.random.default_rng(2)
    return rng.gamma(2.0, 100.0, size=(128, 128)).astype(np.float32)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_left_out_and_take_the_nearest_finite_value(bad: float) -> None:
    image = _gamma_image()
    image[40:43, :] = bad  # full rows: the nearest finite pixel is in the same column
    finite = np.isfinite(image)
    out = percentile_normalize(image, 1.0, 99.0, subsample=1)
    lo, hi = np.percentile(image[finite], (1.0, 99.0))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[40], out[39])  # not 0, the dark end of the range
    np.testing.assert_array_equal(out[42], out[43])
    assert {out[41, x] for x in range(128)} <= {out[39, x] for x in range(128)} | {
        out[43, x] for x in range(128)}
    np.testing.assert_allclose(out[finite], (image[finite] - lo) / (hi - lo), atol=1e-5)
    assert np.isnan(image[40:43]).all() or np.isinf(image[40:43]).all()  # input untouched


def test_non_finite_fill_stays_within_its_plane() -> None:
    stack = np.stack([_gamma_image(), _gamma_image() + 1000.0, _gamma_image()])
    stack[0, 50:60, 50:60] = np.nan
    stack[2] = np.nan  # a plane without finite pixels: the bottom of the range (0)
    out = percentile_normalize(stack, 0.0, 100.0, subsample=1)
    assert np.isfinite(out).all()
    ring = out[0, 49:61, 49:61].copy()
    ring[1:-1, 1:-1] = np.nan
    assert set(out[0, 50:60, 50:60].ravel()) <= set(ring[np.isfinite(ring)].ravel())
    assert not out[2].any()


def test_nan_region_adds_no_objects_at_its_edge() -> None:
    """A NaN strip (a registration border) or patch: the model sees the neighbouring
    pixels continue, not an edge to the darkest level (which read as nucleus rims)."""
    seg = load_segmenter("nuclei")
    image = NucleiSample(seed=11).render((0.0, 0.0), (256, 256)).image.astype(np.float32)
    clean = seg.segment(image)
    for region in (np.s_[:, :12], np.s_[60:80, 150:170]):
        hole = np.zeros(image.shape, dtype=bool)
        hole[region] = True
        holed = image.copy()
        holed[hole] = np.nan
        labels, expected = seg.segment(holed), clean.copy()
        labels[hole] = expected[hole] = 0
        new = [int(np.count_nonzero(labels == i)) for i in np.unique(labels[labels > 0])
               if not expected[labels == i].any()]
        assert all(area < 20 for area in new), (region, new)  # at most a hole's sliver
        n_found, n_expected = (len(np.unique(x)) - 1 for x in (labels, expected))
        assert abs(n_found - n_expected) <= 1, (region, n_found, n_expected)


def test_nan_patch_barely_changes_the_subsampled_estimate() -> None:
    rng = np.random.default_rng(1)
    image = rng.gamma(2.0, 100.0, size=(512, 512)).astype(np.float32)
    patched = image.copy()
    patched[200:205, 300:305] = np.nan
    keep = np.isfinite(patched)
    out = percentile_normalize(patched)
    assert np.abs(out[keep] - percentile_normalize(image)[keep]).max() < 0.05


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_no_finite_pixel_raises(bad: float) -> None:
    with pytest.raises(ValueError, match="no finite pixel"):
        percentile_normalize(np.full((16, 16), bad, dtype=np.float32))


@pytest.mark.parametrize("dtype", [np.bool_, np.complex64])
def test_bool_and_complex_pixels_raise(dtype: type) -> None:
    with pytest.raises(ValueError, match=f"dtype {np.dtype(dtype)}; expected integer"):
        percentile_normalize(np.ones((16, 16), dtype=dtype))


@pytest.mark.parametrize(
    ("shape", "dtype", "problem"),
    [
        ((7,), np.uint16, "shape (7,)"),
        ((0, 0), np.uint16, "shape (0, 0)"),
        ((1, 64), np.uint16, "at least 2x2"),
        ((3, 0, 4), np.float32, "shape (3, 0, 4)"),
        ((0, 8, 8), np.uint16, "holds no images"),
        ((8, 8), np.bool_, "dtype bool"),
        ((2, 8, 8), np.complex64, "dtype complex64"),
    ],
)
def test_image_problem_names_what_is_wrong(
    shape: tuple[int, ...], dtype: type, problem: str
) -> None:
    reason = image_problem(shape, np.dtype(dtype))
    assert reason is not None and problem in reason


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float16, np.float64])
def test_image_problem_accepts_images_and_stacks(dtype: type) -> None:
    assert image_problem((2, 2), np.dtype(dtype)) is None
    assert image_problem((5, 3, 64, 48), np.dtype(dtype)) is None


def test_noise_floor_keeps_an_empty_field_from_filling_the_range() -> None:
    """Camera noise alone spans about 5 sigma between the 1st and 99.8th percentiles: without
    a floor it is stretched to 0..1, where a model finds objects in it."""
    rng = np.random.default_rng(3)
    noise = rng.normal(100, 5, (256, 256)).astype(np.float32)
    plain = percentile_normalize(noise)
    floored = percentile_normalize(noise, min_span_noise=25)
    assert np.percentile(plain, 99.8) - np.percentile(plain, 1) == pytest.approx(1, abs=0.05)
    spread = np.percentile(floored, 99.8) - np.percentile(floored, 1)
    assert spread == pytest.approx(5.1 / 25, abs=0.03)  # about 5 sigma over 25 sigma
    assert noise_sigma(noise[::4, ::4]) == pytest.approx(5, rel=0.1)
    # a field with objects far above the noise is not touched by the floor
    field = noise.copy()
    field[::16, ::16] = 5000  # bright objects: the 99.8th percentile is theirs
    field[64:128, 64:128] = 3000
    np.testing.assert_array_equal(percentile_normalize(field, min_span_noise=25),
                                  percentile_normalize(field))
    flat = np.full((64, 64), 7, np.uint16)  # no noise: no floor, zeros as before
    assert not percentile_normalize(flat, min_span_noise=25).any()


@pytest.mark.parametrize("floor", [None, 25.0])
def test_one_object_on_a_black_background_reaches_one(floor: float | None) -> None:
    """Fewer object pixels than 100 - high percent made both percentiles 0 and the frame
    was normalised to zeros: no model found the one nucleus (bug hunt)."""
    yy, xx = np.mgrid[:512, :512]
    image = np.zeros((512, 512), np.uint16)
    image[(yy - 100) ** 2 + (xx - 100) ** 2 < 12**2] = 2000  # 0.17 % of the pixels
    out = percentile_normalize(image, 1.0, 99.8, min_span_noise=floor)
    assert out.max() == 1.0 and out.min() == 0.0
    from livemask.inference.models import load_model_card
    from livemask.inference.segmenter import Segmenter
    from livemask.inference.select import load_backend

    card = load_model_card("nuclei")
    assert Segmenter(card, load_backend("onnxruntime", card, threads=1)).segment(image).max() == 1


@pytest.mark.parametrize(("dtype", "offset"), [(np.float64, 1e7), (np.int64, 2**30),
                                               (np.uint32, 3_000_000_000)])
def test_a_small_signal_on_a_large_offset_keeps_its_levels(dtype: type, offset: float) -> None:
    """The cast to float32 came before the offset was taken off: 10 counts on 1e7 kept 11
    grey levels of 5923 (bug hunt)."""
    signal = np.random.default_rng(0).integers(0, 800, (64, 64))
    step = 0.01 if dtype == np.float64 else 1
    image = (offset + signal * step).astype(dtype)
    out = percentile_normalize(image)
    assert len(np.unique(out)) == len(np.unique(signal))
    expected = percentile_normalize(signal.astype(np.float64))
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_the_noise_floor_still_holds_a_faint_speck_on_a_black_background() -> None:
    """Review: the black-background fallback stretched a few counts of debris to 1 and
    cancelled the noise floor (the phantom-nucleus case it is there for)."""
    image = np.zeros((512, 512), np.uint16)
    image[100:104, 200:204] = 3  # 3 grey levels: debris, a hot pixel
    assert not percentile_normalize(image, 1.0, 99.8, min_span_noise=25).any()
    assert percentile_normalize(image, 1.0, 99.8).max() == 1.0  # no floor: the top is 1
    image[100:104, 200:204] = 30  # 30 grey levels above a black background: something
    assert percentile_normalize(image, 1.0, 99.8, min_span_noise=25).max() == 1.0


def _noisy(dtype: type, top: float) -> np.ndarray:
    """A noisy field up to about ``top / 4`` in ``dtype`` (no pixel at ``top``)."""
    rng = np.random.default_rng(11)
    image = rng.normal(top / 8, top / 40, (256, 256)).clip(0, top / 4)
    return image.astype(dtype)


@pytest.mark.parametrize(("dtype", "top"), [(np.uint8, 255), (np.uint16, 4095),
                                            (np.uint16, 65535), (np.float32, 1.0),
                                            (np.float32, 37.5)])
def test_a_saturated_plateau_is_found_at_the_frames_own_maximum(
    dtype: type, top: float
) -> None:
    """Saturated pixels share one value, the frame's maximum, whatever the dtype: 255 in
    uint8, 4095 for a 12-bit camera in uint16 (not the dtype's 65535), any float."""
    image = _noisy(dtype, top)
    assert unsaturated(image).size == image.size  # noise reaches its top a pixel at a time
    image[:8, :8] = top  # saturated debris
    kept = unsaturated(image)
    assert kept.size == image.size - 64 and kept.max() < top
    few = _noisy(dtype, top)
    few.reshape(-1)[:SATURATED_MIN_PX - 1] = top  # fewer: not a plateau
    assert unsaturated(few).size == few.size
    flat = np.full((8, 8), top, dtype)  # all plateau: a flat image, kept whole
    assert unsaturated(flat).size == 64


@pytest.mark.parametrize(("dtype", "top"), [(np.uint8, 255), (np.uint16, 4095),
                                            (np.uint16, 65535), (np.float32, 1.0)])
def test_saturated_debris_does_not_become_the_top_of_the_range(dtype: type, top: float) -> None:
    """Saturated debris over more than 100 - high percent of the frame was the 99.8th
    percentile: real nuclei came out below 0.01 and no model found them (evaluation)."""
    image = _noisy(dtype, top)
    image[100:110, 100:110] = top * 0.8 / 4  # a nucleus about 8x the background
    image[:20, :20] = top  # saturated debris: 0.6 % of the frame
    nucleus = np.s_[102:108, 102:108]
    old = percentile_normalize(image, 1.0, 99.8)
    assert old[nucleus].mean() < 0.25
    new = percentile_normalize(image, 1.0, 99.8, exclude_saturated=True, clip=(-1.0, 3.0))
    assert new[nucleus].mean() == pytest.approx(1.0, abs=0.05)
    assert new[:20, :20].max() == 3.0  # the debris: clipped, not 4-40x the nucleus


def test_an_overexposed_frame_keeps_its_nuclei_high() -> None:
    """Saturated nuclei are the plateau: left out of the percentiles they still normalise to
    at least 1 (the clip keeps them at most 3)."""
    image = _noisy(np.uint16, 4095)
    image[50:150, 50:150] = 4095  # a fifth of the frame saturated
    out = percentile_normalize(image, 1.0, 99.8, exclude_saturated=True, clip=(-1.0, 3.0))
    assert out[60:140, 60:140].min() >= 1.0
    assert np.median(out[200:, 200:]) < 0.7


def test_clip_to_a_range() -> None:
    image = np.arange(1000, dtype=np.float32).reshape(20, 50)
    out = percentile_normalize(image, 10.0, 20.0, clip=(-1.0, 3.0))
    assert out.min() == -1.0 and out.max() == 3.0
    np.testing.assert_array_equal(out[1, 10:20], percentile_normalize(image, 10.0, 20.0)[1, 10:20])


@pytest.mark.parametrize("holes", ["one pixel", "two far corners", "a border"])
def test_filling_holes_in_boxes_equals_one_transform_over_the_plane(holes: str) -> None:
    """Holes are filled within their bounding boxes (a NaN pixel in a 2048² frame cost a
    distance transform over all of it: 7-13x the normalisation); the values are those of a
    transform over the whole plane."""
    from scipy import ndimage

    from livemask.analysis.normalize import fill_non_finite

    rng = np.random.default_rng(3)
    image = rng.normal(100.0, 10.0, (300, 400))
    finite = np.ones(image.shape, bool)
    if holes == "one pixel":
        finite[150, 200] = False
    elif holes == "two far corners":
        finite[2:9, 3:12] = finite[290:300, 380:400] = False
    else:
        finite[:5], finite[-5:], finite[:, :5], finite[:, -5:] = False, False, False, False
    image[~finite] = np.nan
    nearest = ndimage.distance_transform_edt(~finite, return_distances=False,
                                             return_indices=True)
    expected = image[tuple(nearest)]
    np.testing.assert_array_equal(fill_non_finite(image, finite, 0.0), expected)


def test_the_service_path_leaves_non_finite_pixels_out_of_the_labels() -> None:
    """Review: with the NaN fill, a NaN block on a nucleus was labelled in the service's
    analysis (134 of 144 pixels; its area counted them, its intensity did not), while
    ``segment`` gave them label 0. Now both give 0 there."""
    seg = load_segmenter("nuclei")
    image = NucleiSample(seed=11).render((0.0, 0.0), (256, 256)).image.astype(np.float32)
    clean = seg.segment(image)
    ids, areas = np.unique(clean[clean > 0], return_counts=True)
    big = int(ids[np.argmax(areas)])
    rows, cols = np.nonzero(clean == big)
    cy, cx = int(rows.mean()), int(cols.mean())
    holed = image.copy()
    holed[cy - 3:cy + 3, cx - 3:cx + 3] = np.nan
    for labels in (seg.segment(holed), seg.analyse(seg.predict(holed), holed)[0]):
        assert not labels[cy - 3:cy + 3, cx - 3:cx + 3].any()
        assert labels[rows, cols].any()  # the rest of the nucleus stays


def test_objects_mostly_in_non_finite_pixels_are_dropped() -> None:
    from livemask.inference.segmenter import without_non_finite

    labels = np.zeros((10, 10), np.int32)
    labels[0:4, 0:4] = 1  # 16 px, 12 of them NaN: dropped
    labels[6:10, 6:10] = 2  # 16 px, 4 NaN: kept, less those
    image = np.ones(labels.shape)
    image[0:3, 0:4] = np.nan
    image[6:7, 6:10] = np.nan
    out = without_non_finite(labels, image)
    assert not (out == 1).any() and np.count_nonzero(out == 2) == 12
    assert without_non_finite(labels, np.ones(labels.shape, np.uint16)) is labels
