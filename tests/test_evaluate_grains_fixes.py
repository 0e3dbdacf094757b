"""evaluate on annotated grain masks: one task per run, 0-valued boundary lines, the table."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from skimage.segmentation import find_boundaries
from typer.testing import CliRunner

from livemask import offline
from livemask.acquisition.simulated.grains import GrainParams, GrainSample
from livemask.cli import _grain_cells, app
from livemask.evaluation import evaluate, fill_boundary_lines, load_folder
from livemask.offline import load_segmenter

runner = CliRunner()


@functools.cache
def _sample() -> GrainSample:
    return GrainSample(GrainParams(world_shape_px=(512, 512)), seed=11)


def _tiles(n: int = 2, size: int = 192) -> list[tuple[np.ndarray, np.ndarray]]:
    """Simulated polished-section tiles (default grain size) and their full-tessellation
    truth; fields where the 2-px lines of :func:`_with_gaps` erase no grain."""
    out = []
    for y, x in [(0.0, 0.0), (510.0, 360.0)][:n]:
        r = _sample().render((y, x), (size, size))
        out.append((r.image, r.labels.astype(np.int32)))
    return out


def _with_gaps(labels: np.ndarray) -> np.ndarray:
    """The labels with 2-px 0-valued boundary lines, as annotators often draw them."""
    gap = labels.copy()
    gap[find_boundaries(labels, mode="inner")] = 0
    return gap


def _folder(
    tmp_path: Path, mask: np.ndarray, image: np.ndarray | None = None
) -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    img = np.full(mask.shape, 100, np.uint16) if image is None else image
    tifffile.imwrite(images / "a.tif", img, photometric="minisblack")
    tifffile.imwrite(masks / "a_mask.tif", mask, photometric="minisblack")
    return images, masks


@pytest.mark.parametrize("order", [("grains", "nuclei"), ("nuclei", "grains")])
def test_folders_refuse_models_of_two_tasks_before_scoring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, order: tuple[str, str]
) -> None:
    # before: both were scored, then a KeyError (grains first) or no grain columns
    image, labels = _tiles(1, 64)[0]
    images, masks = _folder(tmp_path, labels, image)
    loaded: list[str] = []

    def counting(model: str, *args: Any, **kwargs: Any) -> Any:
        loaded.append(model)
        return load_segmenter(model, *args, **kwargs)

    monkeypatch.setattr(offline, "load_segmenter", counting)
    out = tmp_path / "mix.json"
    args = ["evaluate", "--model", order[0], "--model", order[1], "--images", str(images),
            "--masks", str(masks), "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "compare models of one task at a time" in result.output
    assert "grains (grains)" in result.output and "nuclei (nuclei)" in result.output
    assert loaded == [] and not out.exists()


def test_the_grain_columns_of_a_model_without_grain_figures_are_dashes() -> None:
    # before: KeyError 'astm_g_error'
    assert _grain_cells({"model": "nuclei", "f1_iou50": 0.9}) == ["-"] * 5


def test_zero_boundary_lines_score_like_the_full_tessellation() -> None:
    # before: against 2-px 0 lines the grains model's area bias was ~+10 % and F1@0.9 ~0.4
    seg = load_segmenter("grains", 2)
    tiles = _tiles()
    assert all(np.unique(_with_gaps(t)).size == np.unique(t).size + 1 for _, t in tiles)
    full = evaluate(seg, tiles, "full").as_dict()
    gaps = evaluate(seg, [(img, _with_gaps(t)) for img, t in tiles], "gaps")
    gap = gaps.as_dict()
    assert gap["mean_area_bias"] == pytest.approx(full["mean_area_bias"], abs=0.005)
    assert gap["planimetric_area_bias"] == pytest.approx(full["planimetric_area_bias"],
                                                         abs=0.005)
    assert gap["astm_g_error"] == pytest.approx(full["astm_g_error"], abs=0.01)
    assert gap["f1_mean_iou50_90"] == pytest.approx(full["f1_mean_iou50_90"], abs=0.01)
    assert gaps.by_iou[0.9].f1 > 0.85


def test_the_filled_truth_is_the_tessellation_the_lines_were_cut_from() -> None:
    labels = _tiles(1)[0][1]
    filled = fill_boundary_lines(_with_gaps(labels))
    assert not (filled == 0).any()
    assert (filled != labels).mean() < 0.005  # only where the lines erased a sliver


def test_junctions_of_four_px_lines_are_filled_and_a_pore_is_kept() -> None:
    """Where 4-px lines meet (or a line runs diagonally) a disc wider than a line fits: those
    blobs were kept as pores, 2,051 px of a Voronoi tessellation's lines, and a perfect
    prediction scored F1@0.9 0.95 (review)."""
    from scipy import ndimage

    from livemask.analysis.metrics import match_instances

    rng = np.random.default_rng(1)
    seeds = np.zeros((256, 256), bool)
    seeds[rng.integers(0, 256, 60), rng.integers(0, 256, 60)] = True
    _, nearest = ndimage.distance_transform_edt(~seeds, return_indices=True)
    labels = ndimage.label(seeds)[0][tuple(nearest)].astype(np.int32)
    lines = ndimage.binary_dilation(find_boundaries(labels, mode="thick"))  # ~4 px wide
    cut = np.where(lines, 0, labels)
    filled = fill_boundary_lines(cut)
    assert (filled == 0).sum() < 0.05 * (cut == 0).sum()
    assert match_instances(filled, labels, iou_threshold=0.9).f1 == 1.0
    pore = np.ones((40, 40), np.int32)
    pore[10:22, 10:22] = 0
    assert (fill_boundary_lines(pore) == 0).sum() >= 0.9 * 144  # (its corners go)


def test_particles_on_a_substrate_do_not_grow_into_it() -> None:
    yy, xx = np.mgrid[:100, :100]
    mask = np.zeros((100, 100), np.int32)
    mask[(yy - 30) ** 2 + (xx - 30) ** 2 < 15**2] = 1  # alone on the substrate
    mask[70:90, 20:40], mask[70:90, 42:60] = 2, 3  # a 2-px boundary line between them
    mask[70:90, 65:80], mask[70:90, 86:95] = 4, 5  # 6 px of substrate between them
    filled = fill_boundary_lines(mask)
    for i in (1, 4, 5):
        assert np.array_equal(filled == i, mask == i)
    assert (filled[71:89, 40:42] != 0).all()  # the line went to the two grains
    assert (filled[80, 80:86] == 0).all() and (filled == 0).sum() > 0.7 * mask.size


def test_boundaries_drawn_with_a_value_are_warned_about(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    labels = _tiles(1)[0][1]
    mask = labels.copy()
    mask[find_boundaries(labels, mode="inner")] = labels.max() + 1  # one network object
    images, masks = _folder(tmp_path, mask)
    load_folder(images, masks)
    warned = [r.getMessage() for r in livemask_log if r.levelno == logging.WARNING]
    assert any("thin network" in m and "a_mask.tif" in m for m in warned), warned


def test_a_full_tessellation_is_not_warned_about(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    images, masks = _folder(tmp_path, _tiles(1)[0][1])
    load_folder(images, masks)
    assert not any("thin network" in r.getMessage() for r in livemask_log)
