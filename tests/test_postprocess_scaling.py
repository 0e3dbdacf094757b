"""Post-processing at camera scale: 512² and 2048² frames of simulated nuclei.

Checks that the fast labelling and measuring give the results of plain references (a
full-frame watershed; per-pixel bincounts with ``ndimage.find_objects``) on frames with
about 2000 nuclei, and prints how long each takes. Timings are printed, never asserted:
``benchmarks/postprocess.py`` is the benchmark.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import find_boundaries, watershed

from livemask.acquisition.simulated.nuclei import NucleiSample
from livemask.analysis.instances import labels_from_probabilities
from livemask.analysis.measure import measure_objects


def synthetic_frame(size: int, seed: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(foreground, seeds, image) for a simulated field of ``size``²: smooth probability maps
    made from the ground truth (touching nuclei separated by their one-pixel rims)."""
    sample = NucleiSample(seed=seed)
    for _ in range(30):
        sample.step()
    frame = sample.render((0.0, 0.0), (size, size))
    truth = frame.labels
    inner = (truth > 0) & ~find_boundaries(truth, mode="inner")
    fg = ndimage.gaussian_filter((truth > 0).astype(np.float32), 1.0)
    core = ndimage.distance_transform_edt(inner) > 3.0
    seeds = ndimage.gaussian_filter(core.astype(np.float32), 1.0)
    return fg, seeds, frame.image


def best_ms(fn: Callable[[], Any], repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


@pytest.fixture(scope="module")
def frames() -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return {size: synthetic_frame(size) for size in (512, 2048)}


def reference_measure(labels: np.ndarray, image: np.ndarray) -> dict[str, np.ndarray]:
    """Per-object fields the straightforward way: per-pixel bincounts and find_objects."""
    flat = labels.ravel()
    px = np.flatnonzero(flat)
    ids = flat[px]
    n = int(ids.max()) + 1
    rows, cols = np.divmod(px, labels.shape[1])
    r, c = rows.astype(np.float64), cols.astype(np.float64)
    v = image.ravel()[px].astype(np.float64)
    present = np.flatnonzero(np.bincount(ids, minlength=n))
    present = present[present > 0]

    def s(w: np.ndarray | None) -> np.ndarray:
        out: np.ndarray = np.bincount(ids, weights=w, minlength=n)[present].astype(np.float64)
        return out

    a = s(None)
    cy, cx = s(r) / a, s(c) / a
    var_r = np.maximum((s(r * r) - s(r) * cy) / a, 0.0)
    var_c = np.maximum((s(c * c) - s(c) * cx) / a, 0.0)
    cov = (s(r * c) - s(r) * cx) / a
    root = np.sqrt((0.5 * (var_r - var_c)) ** 2 + cov**2)
    l1 = np.maximum(0.5 * (var_r + var_c) + root, 0.0)
    l2 = np.maximum(0.5 * (var_r + var_c) - root, 0.0)
    ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / np.where(l1 > 0, l1, 1), 0, 1)), 0.0)
    boxes = ndimage.find_objects(labels)
    bbox = np.array(
        [[b[0].start, b[1].start, b[0].stop, b[1].stop] for b in (boxes[i - 1] for i in present)]
    )
    return {
        "label": present,
        "area_px": a,
        "centroid_y": cy,
        "centroid_x": cx,
        "bbox": bbox,
        "integrated_intensity": s(v),
        "eccentricity": ecc,
    }


def assert_matches_reference(labels: np.ndarray, image: np.ndarray) -> None:
    objects, summary = measure_objects(labels, image, decimals=None)
    ref = reference_measure(labels, image)
    assert [o["label"] for o in objects] == ref["label"].tolist()
    assert [o["area_px"] for o in objects] == ref["area_px"].astype(int).tolist()
    assert [o["bbox"] for o in objects] == ref["bbox"].tolist()
    got_cy = np.array([o["centroid_yx"][0] for o in objects])
    got_cx = np.array([o["centroid_yx"][1] for o in objects])
    np.testing.assert_allclose(got_cy, ref["centroid_y"], rtol=1e-12)
    np.testing.assert_allclose(got_cx, ref["centroid_x"], rtol=1e-12)
    np.testing.assert_allclose(
        [o["integrated_intensity"] for o in objects], ref["integrated_intensity"], rtol=1e-12
    )
    np.testing.assert_allclose(
        [o["eccentricity"] for o in objects], ref["eccentricity"], rtol=1e-9, atol=1e-12
    )
    assert summary["count"] == len(objects)
    assert summary["foreground_fraction"] == pytest.approx(np.mean(labels > 0))
    bg = labels == 0
    if bg.any():
        assert summary["background_mean"] == pytest.approx(float(image[bg].mean()))
    json_objects, _ = measure_objects(labels, image)  # rounded, as published
    assert [o["bbox"] for o in json_objects] == ref["bbox"].tolist()
    for o in json_objects:
        diameter = math.sqrt(4 * o["area_px"] / math.pi)  # µm: 4 places or 6 digits
        places = max(4, 5 - math.floor(math.log10(diameter)))
        assert o["equivalent_diameter_um"] == round(diameter, places)


@pytest.mark.parametrize("size", [512, 2048])
def test_labels_match_a_plain_full_frame_watershed(
    frames: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], size: int
) -> None:
    fg, seeds, _ = frames[size]
    labels = labels_from_probabilities(fg, seeds, min_area_px=1, min_seed_area_px=1)
    assert labels.dtype == np.int32
    mask = fg > 0.5
    markers, n = ndimage.label((seeds > 0.5) & mask)
    expected = watershed(1.0 - seeds, markers, mask=mask)
    seeded = expected > 0
    assert np.all(labels[seeded] > 0)
    joint = np.zeros((n + 1, int(labels.max()) + 1), dtype=np.int64)
    np.add.at(joint, (expected[seeded], labels[seeded]), 1)
    best = joint[1:].argmax(axis=1)
    assert np.unique(best).size == n  # one-to-one
    agree = joint[1:][np.arange(n), best].sum() / seeded.sum()
    assert agree > 0.999
    if size == 2048:
        assert n > 1500  # a crowded frame: the scale this test is about


@pytest.mark.parametrize("size", [512, 2048])
def test_measure_matches_the_per_pixel_reference(
    frames: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], size: int
) -> None:
    fg, seeds, image = frames[size]
    labels = labels_from_probabilities(fg, seeds)
    assert_matches_reference(labels, image)
    assert_matches_reference(labels.astype(np.int64), image.astype(np.float32) * 0.37)


def test_measure_runs_that_wrap_rows_and_odd_shapes() -> None:
    """Objects touching the right border and the next row's left border, 1-px wide frames."""
    rng = np.random.default_rng(5)
    lab = np.zeros((20, 9), dtype=np.int32)
    lab[:, -2:] = 7
    lab[1:, 0] = 7  # row r's last pixels and row r+1's first pixel are adjacent in memory
    lab[5:9, 3:5] = 2
    assert_matches_reference(lab, rng.random(lab.shape))
    for shape in [(1, 17), (17, 1), (1, 1), (3, 4)]:
        lab = rng.integers(0, 4, shape).astype(np.int32)
        if lab.any():
            assert_matches_reference(lab, rng.integers(0, 999, shape).astype(np.uint16))
    full = np.full((6, 5), 3, dtype=np.uint8)
    assert_matches_reference(full, np.arange(30.0).reshape(6, 5))


def test_print_scaling(frames: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Time labelling and measuring at 512² and 2048² (printed; see benchmarks/)."""
    lines = []
    for size, (fg, seeds, image) in frames.items():
        labels = labels_from_probabilities(fg, seeds)
        t_lab = best_ms(lambda fg=fg, seeds=seeds: labels_from_probabilities(fg, seeds))
        t_mea = best_ms(lambda labels=labels, image=image: measure_objects(labels, image))
        mpx = size * size / 1e6
        lines.append(
            f"{size}²: {int(labels.max())} objects, labels_from_probabilities {t_lab:.1f} ms "
            f"({t_lab / mpx:.1f} ms/Mpx), measure_objects {t_mea:.1f} ms "
            f"({t_mea / mpx:.1f} ms/Mpx)"
        )
        assert labels.max() > 0
    print("\n" + "\n".join(lines))
