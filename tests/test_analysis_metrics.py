"""Tests for livemask.analysis.metrics on hand-made label images."""

from __future__ import annotations

import numpy as np
import pytest

from livemask.analysis import MatchResult, aggregate, f1_over_thresholds, match_instances


def squares(shape: tuple[int, int], *corners: tuple[int, int], size: int = 10) -> np.ndarray:
    """Label image with one size x size square per corner, ids 1, 2, ..."""
    labels = np.zeros(shape, dtype=np.int32)
    for i, (r, c) in enumerate(corners, start=1):
        labels[r : r + size, c : c + size] = i
    return labels


def test_identical_labels() -> None:
    truth = squares((64, 64), (2, 2), (2, 30), (30, 2), (40, 40))
    r = match_instances(truth, truth.copy())
    assert (r.tp, r.fp, r.fn, r.n_true, r.n_pred) == (4, 0, 0, 4, 4)
    assert r.precision == r.recall == r.f1 == 1.0
    assert r.mean_matched_iou == pytest.approx(1.0)


def test_shift_below_and_above_half_iou() -> None:
    truth = squares((40, 40), (10, 10))
    # shift by 2 columns: intersection 80, union 120, IoU 2/3
    r = match_instances(truth, squares((40, 40), (10, 12)))
    assert (r.tp, r.fp, r.fn) == (1, 0, 0)
    assert r.mean_matched_iou == pytest.approx(80 / 120)
    # shift by 5 columns: intersection 50, union 150, IoU 1/3
    r = match_instances(truth, squares((40, 40), (10, 15)))
    assert (r.tp, r.fp, r.fn) == (0, 1, 1)
    assert r.precision == r.recall == r.f1 == 0.0
    assert r.mean_matched_iou == 0.0
    # and the threshold is configurable
    assert match_instances(truth, squares((40, 40), (10, 15)), iou_threshold=0.3).tp == 1


def test_split_object_is_one_tp_one_fp() -> None:
    truth = squares((30, 30), (5, 5))
    pred = np.zeros_like(truth)
    pred[5:15, 5:11] = 4  # 60 px: IoU 0.6
    pred[5:15, 11:15] = 9  # 40 px: IoU 0.4
    r = match_instances(truth, pred)
    assert (r.tp, r.fp, r.fn, r.n_true, r.n_pred) == (1, 1, 0, 1, 2)
    assert r.precision == 0.5 and r.recall == 1.0
    assert r.f1 == pytest.approx(2 / 3)
    assert r.mean_matched_iou == pytest.approx(0.6)


def test_merged_objects_are_one_tp_one_fn() -> None:
    truth = np.zeros((30, 30), dtype=np.int32)
    truth[5:15, 5:12] = 1  # 70 px
    truth[5:15, 12:15] = 2  # 30 px
    pred = (truth > 0).astype(np.int32)
    r = match_instances(truth, pred)
    assert (r.tp, r.fp, r.fn) == (1, 0, 1)
    assert r.mean_matched_iou == pytest.approx(0.7)


def test_permuted_ids_do_not_matter() -> None:
    truth = squares((64, 64), (2, 2), (2, 30), (30, 2), (40, 40))
    pred = squares((64, 64), (2, 3), (3, 30), (30, 2), (41, 41))
    ref = match_instances(truth, pred)
    lut = np.array([0, 17, 3, 1000, 5], dtype=np.int64)
    permuted = match_instances(lut[[0, 4, 3, 2, 1]][truth], lut[pred])
    assert permuted == ref
    assert ref.tp == 4


def test_empty_cases() -> None:
    empty = np.zeros((16, 16), dtype=np.int32)
    one = squares((16, 16), (2, 2))
    both = match_instances(empty, empty)
    assert (both.tp, both.fp, both.fn, both.n_true, both.n_pred) == (0, 0, 0, 0, 0)
    assert both.precision == both.recall == both.f1 == 1.0
    no_pred = match_instances(one, empty)
    assert (no_pred.tp, no_pred.fp, no_pred.fn) == (0, 0, 1)
    assert no_pred.precision == no_pred.recall == no_pred.f1 == 0.0
    no_truth = match_instances(empty, one)
    assert (no_truth.tp, no_truth.fp, no_truth.fn) == (0, 1, 0)
    assert no_truth.precision == no_truth.recall == no_truth.f1 == 0.0


def test_optimal_matching_below_half_iou() -> None:
    """Greedy by IoU takes (t1, p1) and finds 1 match; the optimum has 2."""
    truth = np.zeros((5, 26), dtype=np.int32)
    truth[:, 0:20] = 1
    truth[:, 20:26] = 2
    pred = np.zeros_like(truth)
    pred[:, 0:7] = 2  # IoU with t1: 7/20 = 0.35
    pred[:, 7:26] = 1  # IoU with t1: 13/26 = 0.5, with t2: 6/19 = 0.316
    r = match_instances(truth, pred, iou_threshold=0.3)
    assert (r.tp, r.fp, r.fn) == (2, 0, 0)
    assert r.mean_matched_iou == pytest.approx((0.35 + 6 / 19) / 2)
    assert match_instances(truth, pred, iou_threshold=0.5).tp == 1


def test_aggregate_sums_counts() -> None:
    truth = squares((40, 40), (10, 10))
    a = match_instances(truth, squares((40, 40), (10, 12)))  # 1 tp, IoU 2/3
    b = match_instances(truth, squares((40, 40), (10, 15)))  # 1 fp, 1 fn
    c = match_instances(np.zeros_like(truth), np.zeros_like(truth))  # nothing
    total = aggregate([a, b, c])
    assert (total.tp, total.fp, total.fn, total.n_true, total.n_pred) == (1, 1, 1, 2, 2)
    assert total.precision == 0.5 and total.recall == 0.5 and total.f1 == 0.5
    assert total.mean_matched_iou == pytest.approx(2 / 3)
    assert aggregate(iter([a])) == a
    assert isinstance(total, MatchResult)


def test_f1_over_thresholds() -> None:
    truth = squares((40, 40), (10, 10))
    pred = squares((40, 40), (10, 12))  # IoU 2/3
    scores = f1_over_thresholds(truth, pred)
    assert list(scores) == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9])
    for t, f1 in scores.items():
        assert f1 == (1.0 if t <= 2 / 3 else 0.0)
    assert f1_over_thresholds(truth, pred, thresholds=(0.6,)) == {0.6: 1.0}


def test_bad_inputs() -> None:
    a = np.zeros((4, 4), dtype=np.int32)
    with pytest.raises(ValueError, match="shape"):
        match_instances(a, np.zeros((4, 5), dtype=np.int32))
    with pytest.raises(ValueError, match="integer"):
        match_instances(a, a.astype(float))
    with pytest.raises(ValueError, match="iou_threshold"):
        match_instances(a, a, iou_threshold=0.0)
