"""Tests for the grains baselines: classical ridge + Otsu and the random-forest classifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import find_boundaries

from livemask.analysis.metrics import match_instances
from livemask.errors import ModelError
from livemask.evaluation import grain_live_holdout
from livemask.inference.classical import (
    ClassicalBackend,
    classical_boundary_probability,
    hessian_ridges,
)
from livemask.inference.models import list_models, load_model_card
from livemask.inference.random_forest import RandomForestBackend
from livemask.offline import load_segmenter


def tessellation(shape: tuple[int, int] = (192, 192), grid: int = 6, seed: int = 0) -> np.ndarray:
    """Voronoi labels (1..grid², int32) of jittered grid seeds: grains ≈ 32 px across."""
    rng = np.random.default_rng(seed)
    cy, cx = shape[0] / grid, shape[1] / grid
    pts = np.array(
        [
            ((i + 0.5 + rng.uniform(-0.3, 0.3)) * cy, (j + 0.5 + rng.uniform(-0.3, 0.3)) * cx)
            for i in range(grid)
            for j in range(grid)
        ]
    )
    yy, xx = np.indices(shape)
    d2 = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    return (np.argmin(d2, axis=-1) + 1).astype(np.int32)


def grain_image(
    labels: np.ndarray,
    *,
    bright: bool = False,
    faint_pair: tuple[int, int] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """A uint16 micrograph of ``labels``: grey grains, 2-px boundaries drawn dark (or bright).

    ``faint_pair``: these two grains get the same grey level and the boundary between them
    is drawn at 3% of the contrast (a low-angle boundary).
    """
    rng = np.random.default_rng(seed)
    grey = rng.uniform(0.5, 0.7, int(labels.max()) + 1)
    if faint_pair is not None:
        grey[faint_pair[1]] = grey[faint_pair[0]]
    image = grey[labels]
    edges = find_boundaries(labels, mode="thick")
    contrast = np.full(labels.shape, 0.6)
    if faint_pair is not None:
        a, b = faint_pair
        near_a = ndimage.binary_dilation(labels == a, iterations=2)
        near_b = ndimage.binary_dilation(labels == b, iterations=2)
        contrast[near_a & near_b] = 0.03 * 0.6
    factor = 1.0 + contrast if bright else 1.0 - contrast
    image = np.where(edges, image * factor, image)
    image = ndimage.gaussian_filter(image, 1.0)
    image = image + rng.normal(0.0, 0.01, image.shape)
    return np.clip(100 + 1000 * image, 0, 65535).astype(np.uint16)


@pytest.mark.parametrize("bright", [False, True])
def test_classical_grains_recover_tessellation(bright: bool) -> None:
    truth = tessellation()
    seg = load_segmenter("grains_classical")
    probs = seg.predict(grain_image(truth, bright=bright))
    assert probs.shape == (1, *truth.shape) and probs.dtype == np.float32
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    labels = seg.labels(probs)
    assert labels.dtype == np.int32 and labels.min() >= 1  # a full tessellation
    result = match_instances(truth, labels, iou_threshold=0.5)
    assert result.f1 >= 0.9
    assert result.mean_matched_iou > 0.85


def test_classical_grains_merge_across_a_faint_boundary() -> None:
    """The baseline's known failure: a faint boundary is missed and two grains become one."""
    truth = tessellation()
    a = int(truth[96, 96])
    ring = ndimage.binary_dilation(truth == a, iterations=2) & (truth != a)
    b = int(np.bincount(truth[ring]).argmax())  # the neighbour with the longest boundary
    seg = load_segmenter("grains_classical")
    labels = seg.segment(grain_image(truth, faint_pair=(a, b)))
    assert np.bincount(labels[truth == a]).argmax() == np.bincount(labels[truth == b]).argmax()
    assert int(labels.max()) == int(truth.max()) - 1  # every other grain is still found


def test_hessian_ridges_polarity() -> None:
    x = np.full((32, 32), 0.6, np.float32)
    x[:, 15:17] = 0.2  # a dark vertical line
    dark, bright = hessian_ridges(x, 1.5)
    assert dark.dtype == np.float32 and dark.shape == x.shape
    assert dark[16, 15] > 0.1 and dark[16, 4] < 1e-6  # on the line, far from it
    assert bright[16, 15] < 1e-6
    dark2, bright2 = hessian_ridges(1.0 - x, 1.5)  # the same line, bright
    np.testing.assert_allclose(bright2, dark, atol=1e-5)
    np.testing.assert_allclose(dark2, bright, atol=1e-5)


def test_classical_boundary_probability_edge_cases() -> None:
    assert not classical_boundary_probability(np.full((16, 16), 0.4, np.float32)).any()
    x = np.random.default_rng(0).random((40, 48)).astype(np.float32)
    p = classical_boundary_probability(x, sigmas=(1.0, 2.0), polarity="dark")
    assert p.shape == (1, 40, 48) and p.min() >= 0.0 and p.max() <= 1.0
    with pytest.raises(ValueError):
        classical_boundary_probability(x, polarity="sideways")
    with pytest.raises(ValueError):
        classical_boundary_probability(x[None])


def test_classical_grains_backend_validates_parameters() -> None:
    card = load_model_card("grains_classical")
    assert card.task == "grains" and card.outputs == ["boundary"]
    assert card.postprocessing.method == "boundary-label"
    backend = ClassicalBackend()
    bads: list[dict[str, object]] = [
        {"polarity": "sideways"},
        {"sigmas": []},
        {"threshold_scale": 0},
    ]
    for bad in bads:
        with pytest.raises(ModelError):
            backend.load(card.model_copy(update={"parameters": {**card.parameters, **bad}}))
    backend.load(card)
    out = backend.run(np.zeros((2, 1, 8, 8), np.float32))
    assert out.shape == (2, 1, 8, 8) and out.dtype == np.float32
    # The same backend still serves nuclei cards with two channels.
    backend.load(load_model_card("nuclei_classical"))
    assert backend.run(np.zeros((1, 1, 8, 8), np.float32)).shape == (1, 2, 8, 8)


def test_random_forest_grains_on_live_tile() -> None:
    card = load_model_card("grains_rf")
    assert card.runtime == "random-forest" and card.task == "grains"
    assert card.onnx_path.stat().st_size < 5_000_000
    assert card.outputs == ["boundary"] and card.postprocessing.method == "boundary-label"
    seg = load_segmenter("grains_rf", threads=1)
    ((image, truth),) = grain_live_holdout(1)
    probs = seg.predict(image)
    assert probs.shape == (1, *image.shape) and probs.dtype == np.float32
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    # Measured 0.86 on this tile (0.87 over the 20-tile live hold-out; classical: 0.80).
    assert match_instances(truth, seg.labels(probs)).f1 >= 0.75
    seg.backend.close()


def test_random_forest_grains_rejects_bad_classes() -> None:
    card = load_model_card("grains_rf")
    bad = card.model_copy(update={"parameters": {**card.parameters, "boundary_classes": [2]}})
    with pytest.raises(ModelError, match="class"):
        RandomForestBackend(threads=1).load(bad)
    bad = card.model_copy(update={"parameters": {**card.parameters, "boundary_classes": []}})
    with pytest.raises(ModelError, match="class"):
        RandomForestBackend(threads=1).load(bad)


def test_quick_random_forest_training_grains(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("skl2onnx")
    from livemask.acquisition.simulated.grains import random_grain_field
    from livemask.training.random_forest import train_random_forest

    card_path = train_random_forest(
        tmp_path, task="grains", fields=2, pixels_per_field=400, trees=2, depth=4, n_jobs=1
    )
    assert card_path == tmp_path / "grains_rf.yaml"
    card = load_model_card(card_path)
    assert card.task == "grains" and card.runtime == "random-forest"
    assert card.onnx_path == tmp_path / "grains_rf.onnx"
    assert card.parameters["classes"] == ["interior", "boundary"]
    assert card.training["trees"] == 2 and card.training["class_counts"][1] > 0
    seg = load_segmenter(str(card_path), threads=1)
    image, _ = random_grain_field(np.random.default_rng(5), (64, 64))
    probs = seg.predict(image)
    assert probs.shape == (1, 64, 64)
    labels = seg.labels(probs)
    assert labels.shape == (64, 64) and labels.dtype == np.int32
    with pytest.raises(ValueError, match="task"):
        train_random_forest(tmp_path, task="cells", fields=1)


def test_shipped_cards_match_training_defaults() -> None:
    from livemask.training.random_forest import DEFAULTS, GRAINS_THRESHOLD

    for task in ("nuclei", "grains"):
        training = load_model_card(f"{task}_rf").training
        assert {k: training[k if k != "depth" else "max_depth"] for k in DEFAULTS[task]} == (
            DEFAULTS[task]
        )
    grains = load_model_card("grains_rf")
    assert grains.postprocessing.foreground_threshold == GRAINS_THRESHOLD


def test_list_models_includes_grain_baselines() -> None:
    cards = {c.name: c for c in list_models()}
    assert {"grains_classical", "grains_rf"} <= set(cards)
    assert cards["grains_classical"].runtime == "classical"
    assert cards["grains_rf"].runtime == "random-forest"
    for name in ("grains_classical", "grains_rf"):
        assert cards[name].task == "grains"
        metrics = cards[name].metrics
        assert metrics["f1_iou50"] > 0.5
        assert "mean_area_error" in metrics["simulator_live"]
