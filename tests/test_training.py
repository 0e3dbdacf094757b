"""Training targets and the training loop in quick mode (needs the train extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from livemask.training.targets import SEED_FRACTION, boundary_targets, targets_from_labels


def _disc(shape: tuple[int, int], cy: int, cx: int, r: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_seed_is_the_core_of_each_object() -> None:
    labels = np.zeros((64, 64), np.int32)
    labels[_disc(labels.shape, 20, 20, 10)] = 1
    labels[_disc(labels.shape, 45, 45, 5)] = 2
    fg, seed = targets_from_labels(labels)
    assert np.array_equal(fg > 0, labels > 0)
    assert seed[20, 20] == 1 and seed[45, 45] == 1  # centres are seeds
    assert seed[20, 11] == 0  # near the rim is not
    assert not seed[labels == 0].any()
    for lab in (1, 2):  # every object has one connected seed
        from scipy import ndimage

        _, n = ndimage.label(seed * (labels == lab))
        assert n == 1
    # the core radius is about (1 - SEED_FRACTION) of the object's radius
    core_r = np.sqrt(seed[labels == 1].sum() / np.pi)
    assert abs(core_r / 10 - (1 - SEED_FRACTION)) < 0.15


def test_touching_objects_get_separate_seeds() -> None:
    labels = np.zeros((40, 60), np.int32)
    labels[5:35, 5:30] = 1
    labels[5:35, 30:55] = 2
    _, seed = targets_from_labels(labels)
    assert not seed[:, 29:31].any()


def test_boundary_targets_mark_lines_between_labels() -> None:
    labels = np.ones((32, 32), np.int32)
    labels[:, 16:] = 2
    (b,) = boundary_targets(labels)
    assert b[:, 15:17].all() and not b[:, :14].any() and not b[:, 18:].any()


@pytest.mark.parametrize("task", ["nuclei", "grains"])
def test_quick_training_exports_a_loadable_model(tmp_path: Path, task: str) -> None:
    pytest.importorskip("torch")
    from livemask.inference.models import load_model_card
    from livemask.offline import load_segmenter
    from livemask.training.cli import train_model
    from livemask.training.train import TrainSettings

    settings = TrainSettings(iterations=3, pool_size=4, refresh_every=2, batch_size=2,
                             task=task)
    card_path = train_model(tmp_path, settings, eval_images=(1, 1))
    card = load_model_card(card_path)
    assert card.task == task and card.onnx_path.is_file()
    assert "simulator_live" in card.metrics
    seg = load_segmenter(str(card_path))
    probs = seg.predict(np.random.default_rng(0).integers(0, 4000, (100, 120)).astype(np.uint16))
    assert probs.shape == (len(card.outputs), 100, 120)
    assert probs.min() >= 0.0 and probs.max() <= 1.0
