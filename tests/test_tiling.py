"""Tiled inference: layout, blend weights, batching, and seam-free labels.

A fake backend that is a local function of its input (3x3 box filter + sigmoid) must give
the same probabilities tiled as untiled; the shipped nuclei model, tiled, must give the
labels it gives untiled and must not split objects at the seams. Timings are printed only.
"""

from __future__ import annotations

import time
from itertools import pairwise

import numpy as np
import pytest
from scipy import ndimage

from livemask.acquisition.simulated.nuclei import NucleiSample
from livemask.analysis.metrics import match_instances
from livemask.inference.models import ModelCard, load_model_card
from livemask.inference.segmenter import Segmenter
from livemask.inference.tiling import (
    TilePlan,
    _blend_tile,
    blend_weights_1d,
    needs_tiling,
    plan_tiles,
    predict_tiled,
)
from livemask.offline import load_segmenter


class LocalBackend:
    """A deterministic local 'model': channel 0 = sigmoid of a 3x3 box mean (zero padding,
    like a conv layer), channel 1 = the box mean itself. Records every batch shape."""

    name = "fake"
    device = "cpu"

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def load(self, card: ModelCard) -> None:
        pass

    def warmup(self, shape: tuple[int, int]) -> None:
        pass

    def run(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.ndim == 4 and batch.shape[1] == 1
        self.shapes.append(batch.shape)
        box = ndimage.uniform_filter(batch[:, 0], size=(1, 3, 3), mode="constant")
        out = np.empty((batch.shape[0], 2, *batch.shape[2:]), dtype=np.float32)
        out[:, 0] = 1.0 / (1.0 + np.exp(-6.0 * (box - 0.5)))
        out[:, 1] = box
        return out

    def close(self) -> None:
        pass


def untiled(run: LocalBackend, x: np.ndarray, m: int) -> np.ndarray:
    """What Segmenter.predict does without tiling: reflect-pad to m, run once, crop."""
    h, w = x.shape
    xp = np.pad(x, ((0, (-h) % m), (0, (-w) % m)), mode="reflect")
    return run.run(xp[None, None].astype(np.float32))[0, :, :h, :w]


def smooth_image(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 3.0)
    return ((x - x.min()) / np.ptp(x)).astype(np.float32)


# ------------------------------------------------------------------------ layout, weights
@pytest.mark.parametrize("length", [257, 512, 513, 900, 1100, 2048, 3000])
@pytest.mark.parametrize(("tile", "overlap", "m"), [(256, 32, 8), (512, 64, 8), (300, 75, 1)])
def test_layout_covers_the_axis_and_weights_sum_to_one(
    length: int, tile: int, overlap: int, m: int
) -> None:
    plan = plan_tiles((length, 64), tile_px=tile, overlap_px=overlap, size_multiple=m)
    ax = plan.y
    padded = -(-length // m) * m
    assert ax.size % m == 0 and ax.size <= tile
    assert all(s % m == 0 for s in ax.starts)  # on the model's pooling grid
    assert ax.starts[0] == 0 and ax.padded == padded
    if len(ax.starts) > 1:
        assert all(b - a <= ax.size - overlap for a, b in pairwise(ax.starts))
    total = np.zeros(padded)
    for s, w in zip(ax.starts, ax.weights, strict=True):
        assert w.min() >= 0 and w.max() <= 1 + 1e-6
        total[s : s + ax.size] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    # the outer quarter of every shared band is ignored; frame borders keep full weight
    for i, (s, w) in enumerate(zip(ax.starts, ax.weights, strict=True)):
        if i > 0:
            shared = ax.starts[i - 1] + ax.size - s
            assert np.all(w[: shared // 4] == 0)
        else:
            assert w[0] == pytest.approx(1.0)
        if i == len(ax.starts) - 1:
            assert w[-1] == pytest.approx(1.0)


def test_tile_sizes_fit_the_frame() -> None:
    plan = plan_tiles((2048, 2048), tile_px=1024, overlap_px=64, max_batch=4, size_multiple=8)
    assert plan.tile_shape == (728, 728) and plan.y.starts == (0, 656, 1320)
    assert plan.count == 9 and plan.batch_sizes == [4, 4, 1]
    plan = plan_tiles((1100, 900), tile_px=512, overlap_px=64, size_multiple=8)
    assert plan.tile_shape == (416, 488) and plan.count == 6
    small = plan_tiles((300, 2000), tile_px=512, overlap_px=64, size_multiple=8)
    assert small.tile_shape[0] == 304 and len(small.y.starts) == 1  # no tiling along y


def test_blend_window_shape() -> None:
    w = blend_weights_1d(100, 16, 24)
    assert np.all(w[:4] == 0) and np.all(w[-6:] == 0)
    assert np.all(w[16:76] == 1)
    assert np.all(np.diff(w[:16]) >= 0) and np.all(np.diff(w[-24:]) <= 0)
    np.testing.assert_allclose(w[4:12] + w[4:12][::-1], 1.0)  # sin² + cos² across a band


def test_needs_tiling() -> None:
    assert not needs_tiling((512, 512), 1024, 8)
    assert not needs_tiling((1024, 1020), 1024, 8)
    assert needs_tiling((1025, 10), 1024, 8)
    assert needs_tiling((10, 1021), 1020, 8)  # 1021 pads to 1024 > 1020


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="quarter"):
        plan_tiles((2000, 2000), tile_px=256, overlap_px=65)
    with pytest.raises(ValueError, match="max_batch"):
        plan_tiles((2000, 2000), tile_px=256, overlap_px=16, max_batch=0)
    with pytest.raises(ValueError, match="size_multiple"):
        plan_tiles((2000, 2000), tile_px=7, overlap_px=0, size_multiple=8)
    with pytest.raises(ValueError, match="at least size_multiple"):
        plan_tiles((2000, 2000), tile_px=32, overlap_px=8, size_multiple=32)
    with pytest.raises(ValueError, match="tile_px or a plan"):
        predict_tiled(LocalBackend().run, np.zeros((10, 10), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        predict_tiled(LocalBackend().run, np.zeros((1, 10, 10), np.float32), tile_px=64)

    def wrong(batch: np.ndarray) -> np.ndarray:
        return np.zeros((batch.shape[0], 1, 8, 8), np.float32)

    with pytest.raises(ValueError, match="backend returned shape"):
        predict_tiled(wrong, np.zeros((300, 300), np.float32), tile_px=128, overlap_px=16)


# ------------------------------------------------------------------------ local fake model
def test_constant_output_stays_constant() -> None:
    def const(batch: np.ndarray) -> np.ndarray:
        return np.full((batch.shape[0], 3, *batch.shape[2:]), 0.37, dtype=np.float32)

    out = predict_tiled(const, np.zeros((1000, 777), np.float32), tile_px=256, overlap_px=64)
    assert out.shape == (3, 1000, 777) and out.flags.c_contiguous
    np.testing.assert_allclose(out, 0.37, atol=1e-6)


@pytest.mark.parametrize("overlap", [0, 16, 48])
def test_blending_does_not_depend_on_tile_order(overlap: int) -> None:
    """Cores are copied, bands added: any tile order gives the same map."""
    plan = plan_tiles((700, 530), tile_px=256, overlap_px=overlap, size_multiple=8)
    rng = np.random.default_rng(overlap)
    preds = {pos: rng.random((2, *plan.tile_shape), dtype=np.float32) for pos in plan.positions()}
    maps = []
    for order in (plan.positions(), plan.positions()[::-1]):
        out = np.zeros((2, 700, 530), dtype=np.float32)
        for iy, ix in order:
            _blend_tile(out, preds[iy, ix], plan, iy, ix)
        maps.append(out)
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-6)
    for ax in (plan.y, plan.x):  # weight exactly 1 in each core
        for (lo, hi), w in zip(ax.core, ax.weights, strict=True):
            assert np.all(w[lo:hi] == 1.0)


@pytest.mark.parametrize(
    "shape",
    [(512, 768), (1024, 256), (1100, 900), (300, 1000), (257, 513), (601, 599)],
)
def test_tiled_equals_untiled_for_a_local_model(shape: tuple[int, int]) -> None:
    """Sizes that are and are not multiples of the 256 px tile: equal within 1e-5."""
    backend = LocalBackend()
    x = smooth_image(shape, seed=sum(shape))
    ref = untiled(backend, x, 8)
    backend.shapes.clear()
    plan = plan_tiles(shape, tile_px=256, overlap_px=32, max_batch=3, size_multiple=8)
    t0 = time.perf_counter()
    out = predict_tiled(backend.run, x, plan=plan)
    ms = (time.perf_counter() - t0) * 1e3
    assert out.shape == ref.shape and out.dtype == np.float32
    # away from the borders (the brief), and in fact everywhere: both pad the same way
    err = np.abs(out - ref)
    assert float(err[:, 2:-2, 2:-2].max()) < 1e-5
    assert float(err.max()) < 1e-5
    assert [s[0] for s in backend.shapes] == plan.batch_sizes
    assert all(s[1:] == (1, *plan.tile_shape) for s in backend.shapes)
    assert all(n <= 3 for n in plan.batch_sizes)
    print(
        f"\n{shape}: {plan.count} tiles of {plan.tile_shape}, batches {plan.batch_sizes}, "
        f"{ms:.1f} ms, max |tiled - untiled| = {err.max():.2e}"
    )


def test_tiles_start_on_the_pooling_grid_of_a_strided_model() -> None:
    """A model that pools 8x8 cells (like a U-Net's stride 8) is not shift-equivariant: tiles
    start on multiples of size_multiple, so its tiled output equals the untiled one."""

    def pooled(batch: np.ndarray) -> np.ndarray:
        n, _, h, w = batch.shape
        cells = batch[:, 0].reshape(n, h // 8, 8, w // 8, 8).max(axis=(2, 4))
        up = cells.repeat(8, axis=1).repeat(8, axis=2)
        return np.stack([up, 1.0 - up], axis=1).astype(np.float32)

    x = smooth_image((2048, 1100), seed=9)
    out = predict_tiled(pooled, x, tile_px=1024, overlap_px=64, size_multiple=8)
    h, w = x.shape
    xp = np.pad(x, ((0, (-h) % 8), (0, (-w) % 8)), mode="reflect")
    ref = pooled(xp[None, None])[0, :, :h, :w]
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_segmenter_tiles_only_frames_larger_than_the_tile() -> None:
    backend = LocalBackend()
    card = ModelCard(name="fake", size_multiple=8, tile_px=256, tile_overlap_px=32, max_batch=2)
    seg = Segmenter(card, backend)
    img = (smooth_image((256, 250), 1) * 4000 + 100).astype(np.uint16)
    seg.predict(img)
    assert backend.shapes == [(1, 1, 256, 256)] and seg.tile_plan(img.shape) is None

    backend.shapes.clear()
    big = (smooth_image((700, 530), 2) * 4000 + 100).astype(np.uint16)
    tiled = seg.predict(big)
    plan = seg.tile_plan(big.shape)
    assert isinstance(plan, TilePlan) and plan is seg.tile_plan(big.shape)  # cached
    assert [s[0] for s in backend.shapes] == plan.batch_sizes
    assert all(s[2:] == plan.tile_shape for s in backend.shapes)
    whole = Segmenter(card.model_copy(update={"tile_px": 4096}), backend).predict(big)
    assert tiled.shape == whole.shape == (2, 700, 530)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    # labels come from the blended full frame, as for an untiled frame
    assert seg.labels(tiled).shape == (700, 530)

    classical = Segmenter(card.model_copy(update={"runtime": "classical"}), backend)
    assert classical.tile_plan(big.shape) is None  # global thresholds: never tiled


def test_shipped_cards_keep_the_untiled_path_at_512() -> None:
    card = load_model_card("nuclei")
    assert card.tile_px >= 1024 and card.max_batch >= 1 and 4 * card.tile_overlap_px <= 1024
    assert not needs_tiling((512, 512), card.tile_px, card.size_multiple)
    assert needs_tiling((2048, 2048), card.tile_px, card.size_multiple)


# ------------------------------------------------------------------------ real model
def seam_lines(starts: tuple[int, ...], size: int) -> list[int]:
    """Middle of every band shared by neighbouring tiles (where blending is 50/50)."""
    return [(b + a + size) // 2 for a, b in pairwise(starts)]


def split_count(truth: np.ndarray, pred: np.ndarray, ids: np.ndarray) -> int:
    """Truth objects (of ``ids``) covered by two or more predicted objects at >= 20% each."""
    n = 0
    for t in ids.tolist():
        inside = pred[truth == t]
        counts = np.bincount(inside[inside > 0])
        n += int(np.sum(counts >= 0.2 * inside.size) >= 2)
    return n


def test_shipped_model_tiled_labels_match_untiled() -> None:
    """1100x900 simulator frame, 512 px tiles with 64 px overlap vs one untiled call."""
    seg = load_segmenter("nuclei", threads=1)
    untiled_seg = Segmenter(seg.card.model_copy(update={"tile_px": 4096}), seg.backend)
    tiled_seg = Segmenter(
        seg.card.model_copy(update={"tile_px": 512, "tile_overlap_px": 64, "max_batch": 4}),
        seg.backend,
    )
    frame = NucleiSample(seed=11).render((300.0, 700.0), (1100, 900))
    truth = frame.labels

    t0 = time.perf_counter()
    p_whole = untiled_seg.predict(frame.image)
    t1 = time.perf_counter()
    p_tiled = tiled_seg.predict(frame.image)
    t2 = time.perf_counter()
    plan = tiled_seg.tile_plan(frame.image.shape)
    assert plan is not None and plan.count > 1
    l_whole, l_tiled = untiled_seg.labels(p_whole), tiled_seg.labels(p_tiled)

    assert float(np.abs(p_tiled - p_whole).max()) < 0.1  # measured: about 0.015
    agreement = match_instances(l_whole, l_tiled, iou_threshold=0.5)
    assert agreement.f1 >= 0.98
    vs_truth_whole = match_instances(truth, l_whole).f1
    vs_truth_tiled = match_instances(truth, l_tiled).f1
    assert vs_truth_tiled >= vs_truth_whole - 0.01

    # objects across the seams: the same number of predicted objects touch each seam line,
    # and no truth object there is split more often than without tiling
    rows = seam_lines(plan.y.starts, plan.y.size)
    cols = seam_lines(plan.x.starts, plan.x.size)
    on_seams = np.zeros(truth.shape, dtype=bool)
    on_seams[rows, :] = True
    on_seams[:, cols] = True
    truth_ids = np.unique(truth[on_seams & (truth > 0)])
    n_whole = np.unique(l_whole[on_seams & (l_whole > 0)]).size
    n_tiled = np.unique(l_tiled[on_seams & (l_tiled > 0)]).size
    assert truth_ids.size > 20
    assert abs(n_tiled - n_whole) <= 1
    split_whole = split_count(truth, l_whole, truth_ids)
    split_tiled = split_count(truth, l_tiled, truth_ids)
    assert split_tiled <= split_whole
    print(
        f"\n1100x900: untiled {1e3 * (t1 - t0):.0f} ms, tiled {1e3 * (t2 - t1):.0f} ms "
        f"({plan.count} tiles of {plan.tile_shape}); max |dp| = "
        f"{np.abs(p_tiled - p_whole).max():.4f}; F1 tiled vs untiled {agreement.f1:.4f}; "
        f"F1 vs truth {vs_truth_whole:.4f} untiled, {vs_truth_tiled:.4f} tiled; "
        f"{truth_ids.size} truth objects on seams, predicted on seams {n_whole} untiled / "
        f"{n_tiled} tiled, split {split_whole} / {split_tiled}"
    )
