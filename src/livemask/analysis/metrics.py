"""Instance-segmentation accuracy: IoU-based one-to-one matching against ground truth.

The IoU matrix is built sparsely from the joint histogram of (truth, prediction) label pairs
over overlapping pixels, so its cost grows with the number of overlaps, not with
``n_true * n_pred``. Matching is optimal (``scipy.optimize.linear_sum_assignment``) over the
pairs with IoU at or above the threshold: it maximises the number of matches first and the
summed IoU second (as StarDist's ``matching``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["MatchResult", "aggregate", "f1_over_thresholds", "match_instances", "matched_pairs"]

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


@dataclass(frozen=True)
class MatchResult:
    """Counts and scores of one matching (or a micro-average over several)."""

    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    mean_matched_iou: float
    n_true: int
    n_pred: int


@dataclass(frozen=True)
class _Overlaps:
    """Sparse IoU table between compacted truth ids (rows) and prediction ids (cols)."""

    n_true: int
    n_pred: int
    rows: np.ndarray  # 0-based truth index per overlapping pair
    cols: np.ndarray  # 0-based prediction index per overlapping pair
    iou: np.ndarray  # IoU per overlapping pair
    true_ids: np.ndarray  # the truth label of each row
    pred_ids: np.ndarray  # the predicted label of each column


def match_instances(
    truth: np.ndarray, pred: np.ndarray, *, iou_threshold: float = 0.5
) -> MatchResult:
    """Match predicted to true instances one-to-one; pairs with IoU >= threshold are hits.

    Label ids need not be sequential or agree between the two images (0 = background).
    Both empty gives precision = recall = f1 = 1; one side empty gives 0.
    """
    return _match(_overlaps(truth, pred), iou_threshold)


def matched_pairs(
    truth: np.ndarray, pred: np.ndarray, *, iou_threshold: float = 0.5
) -> list[tuple[int, int]]:
    """The (truth label, predicted label) pairs of :func:`match_instances`' matching."""
    ov = _overlaps(truth, pred)
    rows, cols, _ = _assignment(ov, iou_threshold)
    return [(int(ov.true_ids[r]), int(ov.pred_ids[c]))
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]


def f1_over_thresholds(
    truth: np.ndarray,
    pred: np.ndarray,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[float, float]:
    """F1 score at each IoU threshold (the overlaps are computed once)."""
    ov = _overlaps(truth, pred)
    return {float(t): _match(ov, t).f1 for t in thresholds}


def aggregate(results: Iterable[MatchResult]) -> MatchResult:
    """Micro-average: sum tp/fp/fn/n_true/n_pred over frames and recompute the scores."""
    tp = fp = fn = n_true = n_pred = 0
    iou_sum = 0.0
    for r in results:
        tp += r.tp
        fp += r.fp
        fn += r.fn
        n_true += r.n_true
        n_pred += r.n_pred
        iou_sum += r.mean_matched_iou * r.tp
    return _result(tp, fp, fn, n_true, n_pred, iou_sum)


def _overlaps(truth: np.ndarray, pred: np.ndarray) -> _Overlaps:
    """Joint histogram of label pairs → sparse IoU per overlapping (truth, pred) pair."""
    t = np.asarray(truth)
    p = np.asarray(pred)
    if t.shape != p.shape:
        raise ValueError(f"truth and pred must have one shape, got {t.shape} and {p.shape}")
    for name, arr in (("truth", t), ("pred", p)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be an integer label image, got dtype {arr.dtype}")
    t_ids, t_idx, t_area = _compact(t.ravel())
    p_ids, p_idx, p_area = _compact(p.ravel())
    both = (t_idx >= 0) & (p_idx >= 0)
    n_p = p_area.size
    pair = t_idx[both].astype(np.int64) * n_p + p_idx[both]
    keys, inter = np.unique(pair, return_counts=True)
    rows = keys // max(n_p, 1)
    cols = keys % max(n_p, 1)
    union = t_area[rows] + p_area[cols] - inter
    iou = inter / union
    return _Overlaps(t_area.size, n_p, rows, cols, iou, t_ids, p_ids)


def _compact(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The present nonzero ids, each pixel's 0-based index into them (-1 for background),
    and their areas."""
    if flat.size and int(flat.min()) < 0:
        raise ValueError("labels must be >= 0 (0 = background)")
    max_id = int(flat.max()) if flat.size else 0
    if max_id <= 4 * flat.size + 1024:
        counts = np.bincount(flat.astype(np.int64), minlength=max_id + 1)  # (ids are small)
        counts[0] = 0
        present = np.flatnonzero(counts)
        lut = np.full(max_id + 1, -1, dtype=np.int64)
        lut[present] = np.arange(present.size)
        return present, lut[flat], counts[present].astype(np.float64)
    uniq, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    idx = inverse.reshape(-1).astype(np.int64)
    if uniq[0] == 0:
        idx -= 1
        uniq, counts = uniq[1:], counts[1:]
    return uniq, idx, counts.astype(np.float64)


def _match(ov: _Overlaps, iou_threshold: float) -> MatchResult:
    """Scores of the optimal one-to-one matching (:func:`_assignment`)."""
    _, _, matched = _assignment(ov, iou_threshold)
    tp = int(matched.size)
    return _result(tp, ov.n_pred - tp, ov.n_true - tp, ov.n_true, ov.n_pred, float(matched.sum()))


def _assignment(
    ov: _Overlaps, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal one-to-one matching over the pairs with IoU >= ``iou_threshold``: the
    matched (row, column) indices and their IoU."""
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    cand = ov.iou >= iou_threshold
    rows, cols, iou = ov.rows[cand], ov.cols[cand], ov.iou[cand]
    if rows.size == 0 or iou_threshold > 0.5:
        # IoU > 0.5 pairs are unique on both sides: no assignment problem to solve.
        return rows, cols, iou
    r_ids, r_inv = np.unique(rows, return_inverse=True)
    c_ids, c_inv = np.unique(cols, return_inverse=True)
    n_small = min(r_ids.size, c_ids.size)
    # Each candidate is worth 1 plus a tie-break below 1/n: more matches always win.
    weight = np.zeros((r_ids.size, c_ids.size))
    weight[r_inv, c_inv] = 1.0 + iou / (2.0 * n_small)
    ri, ci = linear_sum_assignment(weight, maximize=True)
    hit = weight[ri, ci] > 0
    sub_iou = np.zeros_like(weight)
    sub_iou[r_inv, c_inv] = iou
    return r_ids[ri[hit]], c_ids[ci[hit]], sub_iou[ri[hit], ci[hit]]


def _result(tp: int, fp: int, fn: int, n_true: int, n_pred: int, iou_sum: float) -> MatchResult:
    """Scores from counts; both sides empty is a perfect score, one side empty is zero."""
    if n_true == 0 and n_pred == 0:
        precision = recall = f1 = 1.0
    else:
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn)
    mean_iou = iou_sum / tp if tp else 0.0
    return MatchResult(tp, fp, fn, precision, recall, f1, mean_iou, n_true, n_pred)
