"""Training targets and the training loop in quick mode (needs the train extra)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from livemask.training.targets import SEED_FRACTION, boundary_targets, targets_from_labels

if TYPE_CHECKING:
    from livemask.training.train import TrainSettings


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
    shipped = load_model_card(task)  # the settings the shipped model was measured with
    assert card.version == shipped.version and card.outputs == shipped.outputs
    assert card.normalization == shipped.normalization
    assert card.postprocessing == shipped.postprocessing
    seg = load_segmenter(str(card_path))
    probs = seg.predict(np.random.default_rng(0).integers(0, 4000, (100, 120)).astype(np.uint16))
    assert probs.shape == (len(card.outputs), 100, 120)
    assert probs.min() >= 0.0 and probs.max() <= 1.0


def _tiny(task: str = "nuclei", **changes: Any) -> TrainSettings:
    """Settings of a training run of seconds."""
    from livemask.training.train import TrainSettings

    tiny = TrainSettings(iterations=2, pool_size=2, refresh_every=1000, batch_size=2,
                         crop_px=64, task=task)
    return dataclasses.replace(tiny, **changes)


@pytest.fixture
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for the shipped models folder (never the real one, even on old code)."""
    import shutil

    from livemask.inference import models

    fake = tmp_path / "shipped"
    shutil.copytree(models.MODELS_DIR, fake, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(models, "MODELS_DIR", fake)
    return fake


def test_trained_card_keeps_the_shipped_settings_and_records_the_time_budget(
    tmp_path: Path,
) -> None:
    # before: version 0.1, no min_span_noise, no flood_levels, and `iterations` (requested)
    # was the only count in the card
    pytest.importorskip("torch")
    from livemask.inference.models import load_model_card
    from livemask.training.cli import train_model

    settings = _tiny(iterations=50, max_minutes=1e-6)
    card = load_model_card(train_model(tmp_path, settings, eval_images=(1, 1)))
    shipped = load_model_card("nuclei")
    assert card.version == shipped.version
    assert card.normalization == shipped.normalization
    assert card.postprocessing == shipped.postprocessing
    assert card.training["iterations"] == 50
    assert card.training["iterations_done"] == 1
    assert card.training["stopped_by"] == "time budget"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nuclei.onnx", "nuclei.yaml"]


def test_a_run_that_ends_records_all_its_iterations() -> None:
    pytest.importorskip("torch")
    from livemask.training.train import train_unet

    run = train_unet(_tiny(iterations=3))
    assert (run.iterations_done, run.stopped_by) == (3, "iterations")


def test_training_refuses_the_shipped_models_folder_without_force(models_dir: Path) -> None:
    # before: trained over the shipped model without a question
    pytest.importorskip("torch")
    from livemask.errors import ConfigError
    from livemask.training.cli import train_model

    before = (models_dir / "nuclei.onnx").read_bytes(), (models_dir / "nuclei.yaml").read_text()
    with pytest.raises(ConfigError, match=r"--out .* shipped models folder.*--force"):
        train_model(models_dir, _tiny(), eval_images=(1, 1))
    assert before == ((models_dir / "nuclei.onnx").read_bytes(),
                      (models_dir / "nuclei.yaml").read_text())


def test_an_interrupted_training_leaves_the_output_folder_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # before: the new .onnx (and a card without metrics) replaced the old files at once
    pytest.importorskip("torch")
    from livemask import evaluation
    from livemask.training.cli import train_model

    (tmp_path / "nuclei.onnx").write_bytes(b"old model")
    (tmp_path / "nuclei.yaml").write_text("old card")

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "write_card_metrics", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_model(tmp_path, _tiny(), eval_images=(1, 1))
    assert (tmp_path / "nuclei.onnx").read_bytes() == b"old model"
    assert (tmp_path / "nuclei.yaml").read_text() == "old card"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nuclei.onnx", "nuclei.yaml"]


def test_an_interrupted_forest_leaves_the_output_folder_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("skl2onnx")
    from livemask.training import random_forest

    (tmp_path / "nuclei_rf.onnx").write_bytes(b"old model")

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(random_forest, "write_card", interrupt)
    with pytest.raises(KeyboardInterrupt):
        random_forest.train_random_forest(tmp_path, fields=1, pixels_per_field=60, trees=1,
                                          depth=2)
    assert [p.name for p in tmp_path.iterdir()] == ["nuclei_rf.onnx"]
    assert (tmp_path / "nuclei_rf.onnx").read_bytes() == b"old model"


@pytest.mark.parametrize("task", ["nuclei", "grains"])
def test_forest_cards_keep_the_shipped_settings(
    tmp_path: Path, task: str, models_dir: Path
) -> None:
    pytest.importorskip("skl2onnx")
    from livemask.errors import ConfigError
    from livemask.inference.models import load_model_card
    from livemask.training.random_forest import train_random_forest

    with pytest.raises(ConfigError, match=r"--force"):
        train_random_forest(models_dir, task=task, fields=1)
    card = load_model_card(train_random_forest(tmp_path, task=task, fields=1,
                                               pixels_per_field=60, trees=1, depth=2))
    shipped = load_model_card(f"{task}_rf")
    assert card.version == shipped.version
    assert card.normalization == shipped.normalization
    assert card.postprocessing == shipped.postprocessing


@pytest.mark.skipif(not Path("/proc/sys").is_dir(), reason="needs Linux's /proc")
def test_an_output_folder_that_cannot_be_written_is_refused_before_training() -> None:
    """Found after a whole training run before (review): the stage folder came last."""
    from livemask.errors import ConfigError
    from livemask.training.output import check_output_folder

    with pytest.raises(ConfigError, match=r"--out /proc/sys: cannot write there"):
        check_output_folder(Path("/proc/sys"))


def test_stage_folders_of_killed_runs_are_removed_by_the_next_run(tmp_path: Path) -> None:
    """A SIGKILLed run cannot clean up: its hidden stage folder stayed in --out for good."""
    import os
    import subprocess
    import sys

    from livemask.training.output import STAGE_PREFIX, _host, staged_output

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    here = _host()
    abandoned = tmp_path / f"{STAGE_PREFIX}{dead.stdout.strip()}@{here}-abc"
    running = tmp_path / f"{STAGE_PREFIX}{os.getppid()}@{here}-def"  # a live process
    elsewhere = tmp_path / f"{STAGE_PREFIX}{dead.stdout.strip()}@not-{here}-ghi"  # shared
    other = tmp_path / f"{STAGE_PREFIX}notes"
    for folder in (abandoned, running, elsewhere, other):
        folder.mkdir()
        (folder / "nuclei.onnx").write_bytes(b"half written")
    with staged_output(tmp_path) as stage:
        assert stage.name.startswith(f"{STAGE_PREFIX}{os.getpid()}@{here}-")
        (stage / "nuclei.onnx").write_bytes(b"new")
    assert not abandoned.exists()
    assert running.is_dir() and elsewhere.is_dir() and other.is_dir()
    assert (tmp_path / "nuclei.onnx").read_bytes() == b"new"
