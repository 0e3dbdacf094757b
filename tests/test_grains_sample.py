"""The virtual polycrystal: determinism, tessellation truth, grain size, grooves, scratches."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import label as connected_label
from skimage.segmentation import find_boundaries

from livemask.acquisition.core import close_core, open_core
from livemask.acquisition.simulated import SIMULATED_CFG
from livemask.acquisition.simulated import world as world_module
from livemask.acquisition.simulated.grains import (
    GrainParams,
    GrainSample,
    random_grain_field,
)
from livemask.acquisition.simulated.nuclei import NucleiParams
from livemask.acquisition.simulated.world import SAMPLES, configure_world
from livemask.errors import ConfigError

CFG = SIMULATED_CFG
WORLD = (768, 768)
SHAPE = (256, 256)
ORIGIN = (100.0, 600.0)  # crosses the world's right edge: exercises the wrap
SMALL = replace(GrainParams(), world_shape_px=WORLD)


@pytest.fixture(scope="module")
def sample() -> GrainSample:
    """One moderately sized world, shared (rendering only advances the noise stream)."""
    return GrainSample(SMALL, seed=11)


def test_same_seed_same_frames() -> None:
    params = replace(SMALL, world_shape_px=(256, 256))
    a, b = GrainSample(params, seed=4), GrainSample(params, seed=4)
    np.testing.assert_array_equal(a.world, b.world)
    ra, rb = a.render((10, 20), (128, 128)), b.render((10, 20), (128, 128))
    np.testing.assert_array_equal(ra.image, rb.image)
    np.testing.assert_array_equal(ra.labels, rb.labels)
    c = GrainSample(params, seed=5)
    assert not np.array_equal(a.labels, c.labels)


def test_step_only_counts(sample: GrainSample) -> None:
    before = sample.render_truth(ORIGIN, SHAPE)
    step0 = sample.step_count
    sample.step()
    sample.step()
    assert sample.step_count == step0 + 2
    after = sample.render_truth(ORIGIN, SHAPE)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert sample.render(ORIGIN, SHAPE).step == step0 + 2


def test_labels_are_a_full_tessellation(sample: GrainSample) -> None:
    result = sample.render(ORIGIN, SHAPE)
    labels = result.labels
    assert labels.dtype == np.int32 and labels.shape == SHAPE
    assert labels.min() >= 1  # every pixel belongs to a grain, boundaries included
    assert labels.max() <= len(sample.radii)
    # one connected piece per grain id (power-diagram cells are convex)
    pieces = connected_label(labels, background=0, connectivity=2)
    assert pieces.max() == np.unique(labels).size
    # the world wraps: a field across the edge equals the rolled world
    rolled = np.roll(sample.labels, (-100, -600), axis=(0, 1))[: SHAPE[0], : SHAPE[1]]
    np.testing.assert_array_equal(labels, rolled)


def test_grain_count_and_size_match_the_parameters(sample: GrainSample) -> None:
    h, w = WORLD
    expected = h * w / (np.pi / 4 * SMALL.mean_grain_diameter_px**2)
    assert sample.n_grains == pytest.approx(expected, rel=0.05)
    areas = np.bincount(sample.labels.ravel())[1:]
    areas = areas[areas > 0]
    mean_d = np.sqrt(4 * areas.mean() / np.pi)
    assert mean_d == pytest.approx(SMALL.mean_grain_diameter_px, rel=0.05)
    # log-normal spread: the areas vary, but not wildly
    cv = areas.std() / areas.mean()
    assert 0.3 < cv < 1.5


def test_size_spread_follows_size_sigma() -> None:
    def cv(sigma: float) -> float:
        s = GrainSample(replace(SMALL, world_shape_px=(512, 512), size_sigma=sigma), seed=2)
        areas = np.bincount(s.labels.ravel())[1:]
        areas = areas[areas > 0]
        return float(areas.std() / areas.mean())

    assert cv(0.6) > 1.3 * cv(0.1)


def test_boundaries_are_darker_than_grain_interiors(sample: GrainSample) -> None:
    reflectance, labels = sample.render_truth(ORIGIN, SHAPE)
    boundary = find_boundaries(labels, mode="thick")
    interior = ndimage.distance_transform_edt(~boundary) > 4
    assert reflectance[boundary].mean() < 0.85 * reflectance[interior].mean()
    image = sample.render(ORIGIN, SHAPE).image.astype(np.float64) - SMALL.offset_adu
    assert image[boundary].mean() < 0.9 * image[interior].mean()


def test_faint_boundary_fraction() -> None:
    params = replace(SMALL, world_shape_px=(512, 512), faint_boundary_fraction=0.3)
    s = GrainSample(params, seed=3)
    a, b = s.labels[:, :-1].ravel(), s.labels[:, 1:].ravel()
    pairs = np.unique(np.sort(np.column_stack([a, b])[a != b], axis=1), axis=0)
    vis = s._visibility(pairs[:, 0] - 1, pairs[:, 1] - 1)
    faint = vis <= params.faint_visibility
    assert faint.mean() == pytest.approx(0.3, abs=0.06)
    assert vis[~faint].min() >= 0.7
    # the visibility belongs to the boundary, not to the side it is seen from
    np.testing.assert_array_equal(vis, s._visibility(pairs[:, 1] - 1, pairs[:, 0] - 1))


def test_scratches_change_the_image_but_not_the_labels() -> None:
    base = replace(SMALL, world_shape_px=(512, 512), scratches_per_mpx=0.0)
    plain = GrainSample(base, seed=8)
    scratched = GrainSample(replace(base, scratches_per_mpx=30.0), seed=8)
    assert not plain.scratches.any()
    on_scratch = np.abs(scratched.scratches) > 0.05
    assert 0.002 < on_scratch.mean() < 0.2  # thin lines, present
    np.testing.assert_array_equal(plain.labels, scratched.labels)
    diff = np.abs(scratched.world - plain.world)
    assert (
        diff[on_scratch].mean()
        > 10 * diff[~ndimage.binary_dilation(on_scratch, iterations=4)].mean()
    )
    # scratches cross grains: they are not boundaries of the truth
    assert not find_boundaries(scratched.labels)[on_scratch].all()


def test_render_physics(sample: GrainSample) -> None:
    dark = sample.render(ORIGIN, SHAPE, exposure_ms=0.0).image
    assert dark.dtype == np.uint16
    assert float(dark.mean()) == pytest.approx(SMALL.offset_adu, abs=1.0)
    short = sample.render(ORIGIN, SHAPE, exposure_ms=10.0).image.mean() - SMALL.offset_adu
    long = sample.render(ORIGIN, SHAPE, exposure_ms=20.0).image.mean() - SMALL.offset_adu
    assert long / short == pytest.approx(2.0, rel=0.05)
    sharp = sample.render(ORIGIN, SHAPE).image.astype(np.float64)
    blurred = sample.render(ORIGIN, SHAPE, defocus_um=4.0).image.astype(np.float64)

    def band(x: np.ndarray) -> float:
        return float(np.mean((ndimage.gaussian_filter(x, 1) - ndimage.gaussian_filter(x, 3)) ** 2))

    assert band(blurred) < 0.5 * band(sharp)
    # uneven illumination: the field corners are darker than its centre
    illum = sample.illumination(SHAPE)
    assert illum.max() == pytest.approx(1.0)
    assert illum[:16, :16].mean() < illum[112:144, 112:144].mean()


def test_render_speed_512(sample: GrainSample) -> None:
    shape = (512, 512)
    sample.render((0.0, 0.0), shape)  # warm the illumination cache
    times = []
    for k in range(5):
        t0 = time.perf_counter()
        sample.render((37.0 * k, 500.0), shape)
        times.append(time.perf_counter() - t0)
    print(
        f"grains render 512x512: best {min(times) * 1e3:.1f} ms, median "
        f"{np.median(times) * 1e3:.1f} ms"
    )


def test_random_grain_field() -> None:
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(4):
        image, labels = random_grain_field(rng, (96, 128))
        assert image.shape == labels.shape == (96, 128)
        assert image.dtype == np.uint16 and labels.dtype == np.int32
        assert labels.min() == 1
        n = int(labels.max())
        assert np.unique(labels).size == n  # 1..n, one piece per grain
        seen.add(n)
        assert image.std() > 0
    assert len(seen) > 1  # widely varied


# ------------------------------------------------------------------ simulated world


@pytest.fixture
def restore_world() -> Iterator[None]:
    """Put back the process-wide simulated world a test replaced."""
    saved = world_module._world
    yield
    world_module._world = saved


def test_configure_world_grains_through_the_devices(restore_world: None) -> None:
    assert "grains" in SAMPLES
    params = replace(GrainParams(), world_shape_px=(512, 512))
    world = configure_world(sample="grains", params=params, seed=2, sensor_shape=(128, 160))
    assert isinstance(world.sample, GrainSample)
    core = open_core(CFG)
    try:
        core.setXYPosition(0.0, 0.0)
        core.snapImage()
        first = core.getImage()
        truth = world.truth_for(first)
        assert first.shape == (128, 160) and first.dtype == np.uint16
        assert truth is not None and truth.shape == first.shape and truth.min() >= 1
        assert first.mean() > SMALL.offset_adu + 50
        origin = world.field_origin_px()
        expected = world.sample.render_truth(origin, (128, 160))[1]
        np.testing.assert_array_equal(truth, expected)
        # a static sample: moving the stage by whole pixels shifts the truth
        dx, dy = 30, 12
        core.setXYPosition(dx * world.pixel_size_um, dy * world.pixel_size_um)
        core.snapImage()
        moved = world.truth_for(core.getImage())
        assert moved is not None
        np.testing.assert_array_equal(moved[: 128 - dy, : 160 - dx], truth[dy:, dx:])
    finally:
        close_core(core)


@dataclass(frozen=True)
class _TinyGrainParams(GrainParams):
    """Default grain parameters with a small world, to test the default path cheaply."""

    world_shape_px: tuple[int, int] = (128, 128)


def test_configure_world_grains_default_and_wrong_params(
    restore_world: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(world_module, "GrainParams", _TinyGrainParams)
    world = configure_world(sample="grains", sensor_shape=(100, 40))
    assert isinstance(world.sample, GrainSample)
    assert world.sample.params.world_shape_px == (200, 128)  # at least twice the sensor
    with pytest.raises(ConfigError, match="GrainParams"):
        configure_world(sample="grains", params=NucleiParams())
    with pytest.raises(ConfigError, match="NucleiParams"):
        configure_world(sample="nuclei", params=GrainParams())
