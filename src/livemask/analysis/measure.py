"""Per-object measurements and a frame summary, vectorised with ``np.bincount``.

Areas, intensity sums and raw image moments come from one ``np.bincount`` each over the
foreground pixels; bounding boxes from ``scipy.ndimage.find_objects``. The only Python loop
builds the per-object dicts. Output holds plain Python types only (JSON-serialisable, no NaN).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["UNITS", "measure_objects"]

#: Unit of every per-object field, sent once per stream in the measurements descriptor.
UNITS: dict[str, str] = {
    "label": "1",
    "area_px": "px",
    "area_um2": "µm²",
    "centroid_yx": "px",
    "bbox": "px",
    "mean_intensity": "camera counts (ADU)",
    "integrated_intensity": "ADU·px",
    "equivalent_diameter_um": "µm",
    "eccentricity": "1",
}


def measure_objects(
    labels: np.ndarray,
    image: np.ndarray,
    *,
    pixel_size_um: float = 1.0,
    decimals: int | None = 4,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Measure every labelled object of ``labels`` on ``image``.

    Returns ``(objects, summary)``. ``objects`` has one dict per label present (ascending),
    with ``label``, ``area_px``, ``area_um2``, ``centroid_yx`` ([y, x]), ``bbox``
    ([min_row, min_col, max_row, max_col], half-open like scikit-image), ``mean_intensity``,
    ``integrated_intensity``, ``equivalent_diameter_um`` and ``eccentricity`` (as
    ``skimage.measure.regionprops``). ``summary`` has ``count``, ``mean_area_px``,
    ``median_area_px``, ``mean_area_um2``, ``mean_intensity`` (mean over objects),
    ``total_intensity``, ``foreground_fraction`` and ``background_mean``; undefined values
    are None. Floats are rounded to ``decimals`` places (None keeps full precision). Units
    are in :data:`UNITS`.
    """
    lab = np.asarray(labels)
    img = np.asarray(image)
    if lab.ndim != 2 or lab.shape != img.shape:
        raise ValueError(
            f"labels and image must be 2-D arrays of one shape, got {lab.shape} and {img.shape}"
        )
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype, got {lab.dtype}")
    if pixel_size_um <= 0:
        raise ValueError(f"pixel_size_um must be > 0, got {pixel_size_um}")

    width = lab.shape[1]
    flat = lab.ravel()
    values = img.ravel()
    fg_px = np.flatnonzero(flat != 0)  # a bool mask scans much faster than an int array
    ids_at_px = flat[fg_px]
    if ids_at_px.size and int(ids_at_px.min()) < 0:
        raise ValueError("labels must be >= 0 (0 = background)")

    n_px = flat.size
    fg_values = values[fg_px].astype(np.float64, copy=False)
    total_sum = float(values.sum(dtype=np.float64))
    fg_sum = float(fg_values.sum())
    n_bg = n_px - fg_px.size
    background_mean = (total_sum - fg_sum) / n_bg if n_bg else None

    if fg_px.size == 0:
        return [], _summary_empty(background_mean, decimals)

    # Compact ids: bincount length is max label + 1, so sparse huge ids get renumbered.
    max_id = int(ids_at_px.max())
    if max_id > 4 * fg_px.size + 1024:
        present, ids_at_px = np.unique(ids_at_px, return_inverse=True)
        ids_at_px = ids_at_px + 1
        present_ids = present
        box_labels = np.zeros(lab.shape, dtype=np.int32)
        box_labels.ravel()[fg_px] = ids_at_px
        max_id = present.size
    else:
        present_ids = None
        box_labels = lab

    n_bins = max_id + 1
    area = np.bincount(ids_at_px, minlength=n_bins).astype(np.float64)
    ids = np.flatnonzero(area)
    ids = ids[ids > 0]
    rows, cols = np.divmod(fg_px, width)
    rows_f = rows.astype(np.float64)
    cols_f = cols.astype(np.float64)

    a = area[ids]
    intensity_sum = np.bincount(ids_at_px, weights=fg_values, minlength=n_bins)[ids]
    s_r = np.bincount(ids_at_px, weights=rows_f, minlength=n_bins)[ids]
    s_c = np.bincount(ids_at_px, weights=cols_f, minlength=n_bins)[ids]
    s_rr = np.bincount(ids_at_px, weights=rows_f * rows_f, minlength=n_bins)[ids]
    s_cc = np.bincount(ids_at_px, weights=cols_f * cols_f, minlength=n_bins)[ids]
    s_rc = np.bincount(ids_at_px, weights=rows_f * cols_f, minlength=n_bins)[ids]

    cy = s_r / a
    cx = s_c / a
    # Second central moments divided by area (integer raw sums are exact in float64).
    var_r = np.maximum((s_rr - s_r * cy) / a, 0.0)
    var_c = np.maximum((s_cc - s_c * cx) / a, 0.0)
    cov_rc = (s_rc - s_r * cx) / a
    half_tr = 0.5 * (var_r + var_c)
    root = np.sqrt((0.5 * (var_r - var_c)) ** 2 + cov_rc**2)
    l1 = np.maximum(half_tr + root, 0.0)
    l2 = np.maximum(half_tr - root, 0.0)
    safe_l1 = np.where(l1 > 0, l1, 1.0)
    eccentricity = np.where(l1 > 0, np.sqrt(np.clip(1.0 - l2 / safe_l1, 0.0, 1.0)), 0.0)

    mean_intensity = intensity_sum / a
    area_um2 = a * pixel_size_um**2
    eq_diam_um = np.sqrt(4.0 * a / math.pi) * pixel_size_um

    boxes = ndimage.find_objects(box_labels, max_label=max_id)
    bbox = [
        [b[0].start, b[1].start, b[0].stop, b[1].stop]
        for b in (boxes[i - 1] for i in ids.tolist())
        if b is not None  # never None: every id in ids has pixels
    ]
    out_ids = (present_ids[ids - 1] if present_ids is not None else ids).tolist()

    def r(x: np.ndarray) -> list[float]:
        rounded = np.round(x, decimals) if decimals is not None else x
        result: list[float] = rounded.tolist()
        return result

    objects = [
        {
            "label": int(lbl),
            "area_px": int(ar),
            "area_um2": aum,
            "centroid_yx": [y, x],
            "bbox": bb,
            "mean_intensity": mi,
            "integrated_intensity": ii,
            "equivalent_diameter_um": ed,
            "eccentricity": ec,
        }
        for lbl, ar, aum, y, x, bb, mi, ii, ed, ec in zip(
            out_ids,
            a.tolist(),
            r(area_um2),
            r(cy),
            r(cx),
            bbox,
            r(mean_intensity),
            r(intensity_sum),
            r(eq_diam_um),
            r(eccentricity),
            strict=True,
        )
    ]

    summary: dict[str, Any] = {
        "count": len(objects),
        "mean_area_px": _round(float(a.mean()), decimals),
        "median_area_px": _round(float(np.median(a)), decimals),
        "mean_area_um2": _round(float(area_um2.mean()), decimals),
        "mean_intensity": _round(float(mean_intensity.mean()), decimals),
        "total_intensity": _round(float(intensity_sum.sum()), decimals),
        "foreground_fraction": _round(fg_px.size / n_px, decimals),
        "background_mean": _round(background_mean, decimals),
    }
    return objects, summary


def _summary_empty(background_mean: float | None, decimals: int | None) -> dict[str, Any]:
    """Summary of a frame without objects: zero counts, None for undefined means."""
    return {
        "count": 0,
        "mean_area_px": None,
        "median_area_px": None,
        "mean_area_um2": None,
        "mean_intensity": None,
        "total_intensity": 0.0,
        "foreground_fraction": 0.0,
        "background_mean": _round(background_mean, decimals),
    }


def _round(x: float | None, decimals: int | None) -> float | None:
    """Round ``x`` to ``decimals`` places; None and non-finite values become None."""
    if x is None or not math.isfinite(x):
        return None
    return round(x, decimals) if decimals is not None else float(x)
