"""The virtual nuclei sample: determinism, ground truth, dynamics and imaging physics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from livemask.acquisition.simulated.nuclei import NucleiParams, NucleiSample

SHAPE = (256, 256)
ORIGIN = (300.0, 500.0)


def _high_frequency_energy(image: np.ndarray) -> float:
    """Energy of a difference-of-Gaussians band: edges of nuclei, above pixel noise."""
    image = image.astype(np.float64)
    band = ndimage.gaussian_filter(image, 1.0) - ndimage.gaussian_filter(image, 3.0)
    return float(np.mean(band**2))


def _signal(image: np.ndarray, params: NucleiParams) -> float:
    """Mean signal above the camera offset (ADU)."""
    return float(image.mean()) - params.offset_adu


def test_same_seed_same_frames() -> None:
    a, b = NucleiSample(seed=7), NucleiSample(seed=7)
    for _ in range(5):
        a.step()
        b.step()
    ra, rb = a.render(ORIGIN, SHAPE), b.render(ORIGIN, SHAPE)
    np.testing.assert_array_equal(ra.image, rb.image)
    np.testing.assert_array_equal(ra.labels, rb.labels)
    assert ra.step == rb.step == 5


def test_different_seed_different_frames() -> None:
    ra = NucleiSample(seed=1).render(ORIGIN, SHAPE)
    rb = NucleiSample(seed=2).render(ORIGIN, SHAPE)
    assert not np.array_equal(ra.labels, rb.labels)


def test_image_dtype_and_range() -> None:
    sample = NucleiSample(seed=0)
    result = sample.render(ORIGIN, SHAPE, exposure_ms=10.0)
    assert result.image.dtype == np.uint16
    assert result.labels.dtype == np.int32
    assert result.image.shape == result.labels.shape == SHAPE
    # offset keeps the floor above 0, a 10 ms exposure stays far from saturation
    assert result.image.min() > 0 and result.image.max() < 65535
    assert result.labels.min() == 0 and result.labels.max() > 0


def test_every_label_is_brighter_than_background() -> None:
    sample = NucleiSample(seed=0)
    result = sample.render(ORIGIN, SHAPE, exposure_ms=20.0)
    image, labels = result.image.astype(np.float64), result.labels
    ids = np.unique(labels[labels > 0])
    assert ids.size > 10
    background = image[labels == 0].mean()
    per_label = ndimage.mean(image, labels, ids)
    assert np.all(per_label > background), per_label.min()


def test_labels_match_rendered_objects() -> None:
    """Label ids are the persistent nucleus ids + 1 and cover the signal."""
    sample = NucleiSample(seed=0)
    signal, labels = sample.render_truth(ORIGIN, SHAPE)
    assert np.all(signal[labels > 0] > 0)
    assert np.all(signal[labels == 0] == 0)
    assert set(np.unique(labels[labels > 0]) - 1) <= set(sample.nuclei.ids.tolist())


def test_nuclei_move_and_divide() -> None:
    sample = NucleiSample(seed=3)
    ids0 = set(sample.nuclei.ids.tolist())
    y0 = dict(zip(sample.nuclei.ids.tolist(), sample.nuclei.y.tolist(), strict=True))
    n0 = len(sample.nuclei)
    for _ in range(300):
        sample.step()
    nu = sample.nuclei
    assert len(nu) > n0 * 1.1  # the population grows
    assert len(set(nu.ids.tolist()) - ids0) > 0  # daughters get new ids
    survivors = [(y0[i], y) for i, y in zip(nu.ids.tolist(), nu.y.tolist(), strict=True) if i in y0]
    moved = np.abs(np.array([y - y_start for y_start, y in survivors]))
    assert np.median(moved) > 1.0  # nuclei wander


def test_defocus_lowers_high_frequencies() -> None:
    sharp = NucleiSample(seed=4).render(ORIGIN, SHAPE, exposure_ms=50.0, defocus_um=0.0)
    slightly = NucleiSample(seed=4).render(ORIGIN, SHAPE, exposure_ms=50.0, defocus_um=1.0)
    blurred = NucleiSample(seed=4).render(ORIGIN, SHAPE, exposure_ms=50.0, defocus_um=4.0)
    np.testing.assert_array_equal(sharp.labels, blurred.labels)  # truth is focus-independent
    energy = [_high_frequency_energy(r.image) for r in (sharp, slightly, blurred)]
    assert energy[0] > energy[1] > energy[2]
    assert energy[2] < 0.3 * energy[0]


def test_exposure_scales_the_signal() -> None:
    params = NucleiParams()
    short = NucleiSample(params, seed=5).render(ORIGIN, SHAPE, exposure_ms=10.0)
    long = NucleiSample(params, seed=5).render(ORIGIN, SHAPE, exposure_ms=30.0)
    ratio = _signal(long.image, params) / _signal(short.image, params)
    assert ratio == pytest.approx(3.0, rel=0.03)


def test_zero_exposure_is_a_dark_frame() -> None:
    params = NucleiParams()
    dark = NucleiSample(params, seed=5).render(ORIGIN, SHAPE, exposure_ms=0.0)
    assert float(dark.image.mean()) == pytest.approx(params.offset_adu, abs=1.0)
    assert float(dark.image.std()) == pytest.approx(params.read_noise_e, rel=0.2)


@pytest.mark.parametrize(("dy", "dx"), [(37, 53), (0, 100), (-20, 11)])
def test_shifted_origin_shows_the_same_nuclei_shifted(dy: int, dx: int) -> None:
    sample = NucleiSample(seed=6)
    base = sample.render(ORIGIN, SHAPE).labels
    moved = sample.render((ORIGIN[0] + dy, ORIGIN[1] + dx), SHAPE).labels
    h, w = SHAPE
    ys, xs = slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0))
    ys2, xs2 = slice(max(-dy, 0), h + min(-dy, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    np.testing.assert_array_equal(moved[ys2, xs2], base[ys, xs])


def test_world_is_periodic() -> None:
    sample = NucleiSample(seed=8)
    wh, ww = sample.params.world_shape_px
    a = sample.render((10.0, 20.0), SHAPE).labels
    b = sample.render((10.0 + wh, 20.0 - ww), SHAPE).labels
    np.testing.assert_array_equal(a, b)


def test_bleaching_levels_off_so_a_long_time_lapse_keeps_its_nuclei() -> None:
    sample = NucleiSample(seed=0)
    params = sample.params
    fresh = sample.render(ORIGIN, SHAPE, bleach_steps=0).extras["scale"]
    early = sample.render(ORIGIN, SHAPE, bleach_steps=200).extras["scale"]
    assert early / fresh == pytest.approx(np.exp(-params.bleach_per_step * 200))  # decays ...
    late = [sample.render(ORIGIN, SHAPE, bleach_steps=s) for s in (5_000, 100_000)]
    # ... to the plateau, where turnover balances bleaching (exp would leave 5e-4 and 0)
    assert [r.extras["scale"] / fresh for r in late] == pytest.approx([params.bleach_floor] * 2)
    image, labels = late[1].image.astype(np.float64), late[1].labels
    inside = ndimage.mean(image, labels, np.unique(labels[labels > 0]))
    background = np.median(image[labels == 0])
    assert np.median(inside) - background > 5 * image[labels == 0].std()  # still clear
