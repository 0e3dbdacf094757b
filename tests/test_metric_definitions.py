"""The accuracy figures mean what the docs say: one-to-one tracking matches, grain-size errors
(signed bias, planimetric 1/N_A, undefined G counted apart) and the local-background truth."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from typer.testing import CliRunner

from livemask.analysis.grains import grain_statistics
from livemask.cli import app
from livemask.evaluation import Evaluation, _grain_errors
from livemask.tracking_eval import match_ids
from tests.test_grain_baselines import grain_image, tessellation

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _flat(output: str) -> str:
    """CLI output with rich's box drawing and line wrapping undone."""
    return " ".join(output.replace("│", " ").split())


# -- tracking: match_ids ---------------------------------------------------------------------


def test_a_nucleus_split_in_equal_halves_matches_one_half_only() -> None:
    # before: {1: 1, 2: 1}, both halves at IoU exactly 0.5 took the one nucleus
    truth = np.zeros((10, 20), np.int32)
    truth[2:8, 2:12] = 1
    pred = np.zeros_like(truth)
    pred[2:8, 2:7], pred[2:8, 7:12] = 1, 2
    out = match_ids(truth, pred)
    assert len(out) == 1 and set(out.values()) == {1}


def test_two_nuclei_merged_into_one_prediction_match_it_once() -> None:
    truth = np.zeros((10, 20), np.int32)
    truth[2:8, 2:7], truth[2:8, 7:12] = 3, 5
    pred = np.zeros_like(truth)
    pred[2:8, 2:12] = 1  # IoU exactly 0.5 with each nucleus
    out = match_ids(truth, pred)
    assert list(out) == [1] and out[1] in (3, 5)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint32, np.uint64, np.int64])
def test_match_ids_takes_every_integer_label_dtype(dtype: type) -> None:
    truth = np.zeros((20, 20), dtype)
    truth[2:8, 2:8], truth[10:15, 10:15] = 1, 2
    assert match_ids(truth, truth.copy()) == {1: 1, 2: 2}


def test_match_ids_takes_uint64_ids_beyond_int64() -> None:
    # before: astype(int64) made the id negative and bincount raised ValueError
    truth = np.zeros((20, 20), np.uint64)
    big = 2**63 + 5
    truth[2:8, 2:8], truth[10:15, 10:15] = 1, big
    pred = np.zeros((20, 20), np.int32)
    pred[2:8, 2:8], pred[10:15, 10:15] = 4, 9
    assert match_ids(truth, pred) == {4: 1, 9: big}


def test_negative_labels_are_refused() -> None:
    labels = np.array([[0, -1], [2, 2]], np.int32)
    with pytest.raises(ValueError, match=r"labels must be >= 0"):
        match_ids(labels, labels)


# -- grains: evaluation ----------------------------------------------------------------------


def _merged(labels: np.ndarray, a: int, b: int) -> np.ndarray:
    out = labels.copy()
    out[out == b] = a
    return out


def _inside_pair(labels: np.ndarray) -> tuple[int, int]:
    """Two neighbouring grains that do not touch the edge."""
    edge = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    inside = [int(k) for k in np.unique(labels) if k not in edge]
    a = inside[0]
    near = np.unique(labels[ndimage.binary_dilation(labels == a, iterations=2)])
    b = next(int(k) for k in near if k != a and k in inside)
    return a, b


def test_an_image_without_predicted_grains_is_counted_not_scored_as_g_zero() -> None:
    # before: G undefined was taken as 0, |ΔG| ≈ 7 entered the mean (here 3.5 over 2 images)
    truth = tessellation()
    result = Evaluation("drawn", "test")
    _grain_errors(result, truth, truth)
    _grain_errors(result, truth, np.zeros_like(truth))
    d = result.grain_dict()
    assert d["astm_g_error"] == 0.0
    assert d["g_undefined"] == 1
    assert d["planimetric_area_error"] == 0.0  # 1/N_A undefined too: left out with G
    assert d["mean_area_error"] == 0.5  # (an empty prediction still counts as 100 % there)


def test_only_undefined_g_gives_no_mean() -> None:
    result = Evaluation("drawn", "test")
    _grain_errors(result, tessellation(), np.zeros((192, 192), np.int32))
    d = result.grain_dict()
    assert d["g_undefined"] == 1 and d["astm_g_error"] is None
    assert d["planimetric_area_error"] is None and d["planimetric_area_bias"] is None


def test_area_bias_is_signed_and_planimetric_area_is_reported() -> None:
    # before: only |Δ| ("mean_area_error"), though the docs showed a signed "area bias"
    truth = tessellation()
    a, b = _inside_pair(truth)
    merged = _merged(truth, a, b)  # fewer grains: larger areas
    result = Evaluation("drawn", "test")
    _grain_errors(result, truth, merged)
    _grain_errors(result, truth, truth)
    d = result.grain_dict()
    t, p = grain_statistics(truth, 1.0), grain_statistics(merged, 1.0)
    inside = (p["mean_area_um2"] - t["mean_area_um2"]) / t["mean_area_um2"]
    plan = (p["mean_area_planimetric_um2"] - t["mean_area_planimetric_um2"]) / (
        t["mean_area_planimetric_um2"])
    assert inside > 0 and plan > 0 and inside != pytest.approx(plan, rel=0.01)
    assert d["mean_area_bias"] == d["mean_area_error"] == pytest.approx(inside / 2, abs=1e-4)
    assert d["planimetric_area_bias"] == pytest.approx(plan / 2, abs=1e-4)
    split = truth.copy()  # one grain cut in two: smaller areas, a negative bias
    rows = np.nonzero(split == a)[0]
    split[(split == a) & (np.arange(192)[:, None] > np.median(rows))] = truth.max() + 1
    other = Evaluation("drawn", "test")
    _grain_errors(other, truth, split)
    d = other.grain_dict()
    assert d["mean_area_bias"] < 0 and d["mean_area_error"] == -d["mean_area_bias"]
    assert d["planimetric_area_bias"] < 0


def test_evaluate_table_and_json_show_bias_planimetric_error_and_undefined_g(
    tmp_path: Path,
) -> None:
    # before: the table had "area err", "ASTM ΔG", "diam. KS" only, and no bias in the JSON
    truth = tessellation()
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    tifffile.imwrite(images / "a.tif", grain_image(truth, faint_pair=_inside_pair(truth)))
    tifffile.imwrite(masks / "a_masks.tif", truth)
    out = tmp_path / "e.json"
    result = CliRunner().invoke(app, ["evaluate", "--model", "grains_classical", "--images",
                                      str(images), "--masks", str(masks), "--json", str(out)])
    assert result.exit_code == 0, result.output
    (d,) = json.loads(out.read_text())
    for key in ("mean_area_error", "mean_area_bias", "planimetric_area_error",
                "planimetric_area_bias", "astm_g_error", "g_undefined"):
        assert key in d
    assert d["g_undefined"] == 0
    text = _flat(result.output)
    for header in ("area bias", "1/N_A err", "ASTM ΔG"):
        assert header in text
    assert f"{d['mean_area_bias']:+.1%}" in text
    assert "grains not cut by the image edge" in text


# -- nuclei: the local-background benchmark's truth ------------------------------------------


def _benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "local_background", BENCHMARKS / "local_background.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_local_background_truth_is_each_nucleus_own_light() -> None:
    # before: the whole field was blurred, so a bright neighbour's light counted as the truth
    script = _benchmark()
    sigma = 1.3
    labels = np.zeros((40, 60), np.int32)
    labels[10:20, 10:20], labels[10:20, 20:30], labels[25:35, 45:55] = 1, 2, 3
    signal = np.where(labels == 1, 10.0, np.where(labels > 1, 1.0, 0.0)).astype(np.float32)
    gain = np.linspace(0.5, 1.0, 60)[None, :] * np.ones((40, 1))
    own = script.own_light(signal, labels, sigma, gain)
    every = script.all_light(signal, labels, sigma, gain)
    for k in (1, 2, 3):
        alone = ndimage.gaussian_filter(np.where(labels == k, signal, 0.0), sigma,
                                        mode="constant", truncate=3.0)
        assert own[k] == pytest.approx(float((alone * gain)[labels == k].sum()), rel=1e-5)
    assert every[2] > 1.2 * own[2]  # the bright neighbour spills into the dim nucleus
    assert every[3] == pytest.approx(own[3], rel=1e-5)  # an isolated nucleus: the same light
