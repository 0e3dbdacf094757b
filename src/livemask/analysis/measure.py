"""Per-object measurements and a frame summary, vectorised with ``np.bincount``.

The labelled pixels are visited once to find their row runs (stretches of one label along a
row, about ten times fewer than the pixels); areas, raw image moments (exact integer sums in
closed form per run) and bounding boxes come from the runs, intensity sums from one
``np.bincount`` over the labelled pixels. The full frame is touched by the foreground scan,
the frame sum and the local backgrounds' guard band (below); Python loops build the
per-object dicts and take one slice per object for its local background. Output holds plain
Python types only (JSON-serialisable, no NaN).

NaN and infinite image pixels (float images) count in an object's area and geometry but not
in any intensity: sums and means are over the finite pixels only. Such pixels are found from
the frame sum, so a frame without them costs nothing extra.

Each object's local background is the mean of the pixels around it that are not within
:data:`BACKGROUND_GUARD_PX` of any object (the light an object's blur spreads past its mask
stays out), in its bounding box grown by :data:`BACKGROUND_MARGIN_PX` (one slice per object):
the background a gradient or vignetting leaves there, where the frame's ``background_mean``
is one value for the whole field.

An object's ``saturated_px`` counts its pixels at or above the camera's saturation level
(:func:`saturation_level`: the dtype's maximum for integer frames, 65535 for uint16;
unknown, None, for float frames): its intensities are then too low, by an unknown amount.
Only the labelled pixels are compared, once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BACKGROUND_GUARD_PX", "BACKGROUND_MARGIN_PX", "INTENSITY_SIGNIFICANT_DIGITS",
           "UM_SIGNIFICANT_DIGITS", "UNITS", "ObjectSums", "local_backgrounds",
           "measure_objects", "objects_from_sums", "saturation_level", "units_in_pixels"]

#: µm values keep at least this many significant digits when rounded (``decimals`` places
#: alone would erase them at electron-microscope pixel sizes).
UM_SIGNIFICANT_DIGITS = 6
#: Intensities keep at least this many significant digits when rounded: float frames in
#: small units (1e-5 per count) kept none at ``decimals`` places; camera counts of 1 and
#: more keep their ``decimals`` places as before.
INTENSITY_SIGNIFICANT_DIGITS = 5
#: An object's local background comes from the unlabelled pixels within this many pixels of
#: its bounding box.
BACKGROUND_MARGIN_PX = 10
#: ... leaving out the pixels within this many pixels (rows and columns) of any object.
BACKGROUND_GUARD_PX = 2

#: Unit of every per-object field, sent once per stream in the measurements descriptor.
UNITS: dict[str, str] = {
    "label": "1",
    "area_px": "px",
    "area_um2": "µm²",
    "centroid_yx": "px",
    "bbox": "px",
    "mean_intensity": "camera counts (ADU)",
    "integrated_intensity": "ADU·px",
    "local_background": "camera counts (ADU)",
    "corrected_intensity": "ADU·px",
    "equivalent_diameter_um": "µm",
    "eccentricity": "1",
    "touches_edge": "bool",
    "saturated_px": "px",
}


#: What a µm unit says where the pixel size is not calibrated.
UNCALIBRATED_NOTE = ("no pixel-size calibration: pixel_size_um is the placeholder 1.0, so "
                     "these µm values are pixel values")


def units_in_pixels(units: Mapping[str, str]) -> dict[str, str]:
    """``units`` of object fields measured without a pixel-size calibration: each µm unit
    (area, diameter) said in px, with :data:`UNCALIBRATED_NOTE` (units that have it already
    stay as they are)."""
    return {key: f"{unit.replace('µm', 'px')} ({UNCALIBRATED_NOTE})"
            if "µm" in unit and UNCALIBRATED_NOTE not in unit else unit
            for key, unit in units.items()}


def saturation_level(dtype: np.dtype[Any] | type) -> float | None:
    """The camera's saturation level for frames of ``dtype``: the dtype's maximum for
    integer pixels (65535 for uint16), None (unknown) for float ones."""
    dt = np.dtype(dtype)
    return float(np.iinfo(dt).max) if np.issubdtype(dt, np.integer) else None


def measure_objects(
    labels: np.ndarray,
    image: np.ndarray,
    *,
    pixel_size_um: float = 1.0,
    decimals: int | None = 4,
    background_margin_px: int = BACKGROUND_MARGIN_PX,
    saturation: float | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Measure every labelled object of ``labels`` on ``image``.

    Returns ``(objects, summary)``. ``objects`` has one dict per label present (ascending),
    with ``label``, ``area_px``, ``area_um2``, ``centroid_yx`` ([y, x]), ``bbox``
    ([min_row, min_col, max_row, max_col], half-open like scikit-image), ``mean_intensity``,
    ``integrated_intensity``, ``equivalent_diameter_um`` and ``eccentricity`` (as
    ``skimage.measure.regionprops``), ``touches_edge`` (a pixel in the first or last row
    or column: cut by the field, so its size and shape are not the object's),
    ``local_background`` (see :func:`local_backgrounds`: ``background_margin_px`` around the
    box, :data:`BACKGROUND_GUARD_PX` from every object) and ``corrected_intensity``
    (``integrated_intensity`` less ``local_background`` per pixel; both None without a
    background pixel there) and ``saturated_px`` (pixels at or above ``saturation``, by
    default :func:`saturation_level` of the image's dtype; None where that is None). ``summary``
    has ``count``, ``mean_area_px``, ``median_area_px``, ``mean_area_um2``,
    ``mean_intensity`` (mean over objects), ``total_intensity``, ``foreground_fraction``,
    ``background_mean`` and ``saturated_objects`` (objects with a saturated pixel); undefined
    values are None. Intensities leave NaN/infinite pixels out (an object without a finite
    pixel has ``mean_intensity`` None). Floats are rounded to ``decimals`` places, µm values
    to at least :data:`UM_SIGNIFICANT_DIGITS` and intensities to at least
    :data:`INTENSITY_SIGNIFICANT_DIGITS` significant digits (None keeps full precision).
    Units are in :data:`UNITS`.
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
    if background_margin_px < 1:
        raise ValueError(f"background_margin_px must be >= 1, got {background_margin_px}")
    level = saturation_level(img.dtype) if saturation is None else float(saturation)

    width = lab.shape[1]
    flat = lab.ravel()
    values = img.ravel()
    fg_px = np.flatnonzero(flat != 0)  # a bool mask scans much faster than an int array
    ids_at_px = np.take(flat, fg_px)

    n_px = flat.size
    with np.errstate(invalid="ignore", over="ignore"):  # inf + -inf: NaN, handled below
        total_sum = float(values.sum(dtype=np.float64))
    bad_fg: np.ndarray | None = None  # flat indices of labelled NaN/inf pixels, if any
    n_finite = n_px
    if not math.isfinite(total_sum):  # a NaN/inf pixel (or a float64 overflow): leave them out
        bad = np.flatnonzero(~np.isfinite(values))
        values = values.copy()
        values[bad] = 0
        n_finite = n_px - bad.size
        total_sum = float(values.sum(dtype=np.float64))
        bad_fg = bad[np.take(flat, bad) != 0]
    if fg_px.size == 0:
        return [], _summary_empty(total_sum / n_finite if n_finite else None, decimals,
                                  saturation_known=level is not None)

    # Runs: maximal stretches of one label along a row, found on the foreground pixels
    # (flat indices ascending). All geometry comes from the runs, which are ~10x fewer
    # than the pixels; every pixel lies in exactly one run, so min/max over the runs are
    # min/max over the pixels.
    run_row, run_c0, run_len, run_ids = _runs(fg_px, ids_at_px, width)
    if int(run_ids.min()) < 0:
        raise ValueError("labels must be >= 0 (0 = background)")

    fg_raw = np.take(values, fg_px)
    fg_values = fg_raw.astype(np.float64, copy=False)
    fg_sum = float(fg_values.sum())
    # the labelled NaN/inf pixels as positions in fg_px (their ids: ids_at_px there)
    fg_bad = None if bad_fg is None else np.searchsorted(fg_px, bad_fg)
    n_bg = n_finite - fg_px.size + (0 if fg_bad is None else fg_bad.size)  # finite background
    background_mean = (total_sum - fg_sum) / n_bg if n_bg else None

    # Compact ids: bincount length is max label + 1, so sparse huge ids get renumbered.
    max_id = int(run_ids.max())
    present_ids: np.ndarray | None = None
    if max_id > 4 * fg_px.size + 1024:
        present_ids, inverse = np.unique(run_ids, return_inverse=True)
        run_ids = inverse.reshape(-1).astype(np.intp) + 1
        ids_at_px = np.repeat(run_ids, run_len)
        max_id = present_ids.size
    else:
        run_ids = run_ids.astype(np.intp, copy=False)

    n_bins = max_id + 1
    run_c1 = run_c0 + run_len  # exclusive
    # Exact integer sums per run (then per object): sum of c and of c**2 over [c0, c1).
    s_c_run = (run_c0 + run_c1 - 1) * run_len // 2
    s_cc_run = _sum_squares_below(run_c1) - _sum_squares_below(run_c0)
    area = np.bincount(run_ids, weights=run_len, minlength=n_bins)
    ids = np.flatnonzero(area)
    ids = ids[ids > 0]

    def per_object(run_values: np.ndarray) -> np.ndarray:
        sums: np.ndarray = np.bincount(run_ids, weights=run_values, minlength=n_bins)
        return sums[ids]

    a = area[ids]
    intensity_sum = np.bincount(ids_at_px, weights=fg_values, minlength=n_bins)[ids]
    saturated = None
    if level is not None:  # the labelled pixels at the level: few, or none (most frames)
        at_level = _at_or_above(fg_raw, level)
        saturated = np.bincount(np.take(ids_at_px, at_level), minlength=n_bins)[ids]
    n_valid = None  # per object: pixels with a finite value (None: all of them)
    if fg_bad is not None and fg_bad.size:
        n_valid = a - np.bincount(np.take(ids_at_px, fg_bad), minlength=n_bins)[ids]
    s_r = per_object(run_row * run_len)
    s_c = per_object(s_c_run)
    s_rr = per_object(run_row * run_row * run_len)
    s_cc = per_object(s_cc_run)
    s_rc = per_object(run_row * s_c_run)

    # Bounding boxes, half-open like ndimage.find_objects.
    big = np.iinfo(np.intp).max
    top = np.full(n_bins, big, dtype=np.intp)
    np.minimum.at(top, run_ids, run_row)
    bottom = np.zeros(n_bins, dtype=np.intp)
    np.maximum.at(bottom, run_ids, run_row)
    left = np.full(n_bins, big, dtype=np.intp)
    np.minimum.at(left, run_ids, run_c0)
    right = np.zeros(n_bins, dtype=np.intp)
    np.maximum.at(right, run_ids, run_c1)
    bbox = np.stack([top[ids], left[ids], bottom[ids] + 1, right[ids]], axis=1)
    out_ids = present_ids[ids - 1] if present_ids is not None else ids
    finite = None if bad_fg is None else np.isfinite(img)
    sums = ObjectSums(
        labels=out_ids, area=a, s_r=s_r, s_c=s_c, s_rr=s_rr, s_cc=s_cc, s_rc=s_rc,
        intensity=intensity_sum, bbox=bbox, n_finite=n_valid,
        local_background=local_backgrounds(lab, img, bbox, background_margin_px, finite),
        saturated=saturated,
    )
    return objects_from_sums(
        sums, shape=lab.shape, n_fg=int(fg_px.size), background_mean=background_mean,
        pixel_size_um=pixel_size_um, decimals=decimals,
    )


@dataclass
class ObjectSums:
    """Per-object raw sums (one entry per object, ascending label), from any device.

    ``area`` is the pixel count; ``s_r``/``s_c`` the sums of row/column indices, ``s_rr``,
    ``s_cc``, ``s_rc`` the sums of their squares and product, ``intensity`` the sum of the
    image over the object and ``bbox`` (n, 4) ``[min_row, min_col, max_row + 1, max_col + 1]``.
    ``n_finite``, if given, counts the object's pixels with a finite image value (the mean
    intensity's divisor; ``intensity`` must then sum those pixels only); None: all of them.
    ``local_background`` holds :func:`local_backgrounds` (NaN: none there). ``saturated``,
    if given, counts the object's pixels at or above the saturation level (None: unknown).
    """

    labels: np.ndarray
    area: np.ndarray
    s_r: np.ndarray
    s_c: np.ndarray
    s_rr: np.ndarray
    s_cc: np.ndarray
    s_rc: np.ndarray
    intensity: np.ndarray
    bbox: np.ndarray
    local_background: np.ndarray
    n_finite: np.ndarray | None = None
    saturated: np.ndarray | None = None


def local_backgrounds(
    labels: np.ndarray, image: np.ndarray, bbox: np.ndarray, margin_px: int,
    finite: np.ndarray | None = None, *, guard_px: int = BACKGROUND_GUARD_PX,
) -> np.ndarray:
    """Per box of ``bbox`` ((n, 4) half-open ``[r0, c0, r1, c1]``): the mean of ``image``
    over the pixels of the box grown by ``margin_px`` on each side (clipped to the frame)
    that are farther than ``guard_px`` rows or columns from every labelled pixel (and
    ``finite``, if given); NaN where there is none."""
    h, w = labels.shape
    out = np.full(len(bbox), np.nan)
    background = ~_grown(labels != 0, guard_px)
    if finite is not None:
        background &= finite
    if not background.any():  # space-filling labels (grains): nothing to look at
        return out
    values = np.where(background, image, 0).astype(np.float64, copy=False)
    box = np.asarray(bbox).reshape(-1, 4)
    r0 = np.maximum(box[:, 0] - margin_px, 0).tolist()
    c0 = np.maximum(box[:, 1] - margin_px, 0).tolist()
    r1 = np.minimum(box[:, 2] + margin_px, h).tolist()
    c1 = np.minimum(box[:, 3] + margin_px, w).tolist()
    for i in range(len(r0)):  # about 10 µs an object: views and two reductions
        n = np.count_nonzero(background[r0[i]:r1[i], c0[i]:c1[i]])
        if n:
            out[i] = values[r0[i]:r1[i], c0[i]:c1[i]].sum() / n
    return out


def _grown(mask: np.ndarray, by: int) -> np.ndarray:
    """``mask`` dilated by a (2 ``by`` + 1)² square (shifted ORs: a few times faster than
    ``ndimage.maximum_filter``)."""
    rows = mask.copy()
    for k in range(1, by + 1):
        rows[k:] |= mask[:-k]
        rows[:-k] |= mask[k:]
    out = rows.copy()
    for k in range(1, by + 1):
        out[:, k:] |= rows[:, :-k]
        out[:, :-k] |= rows[:, k:]
    return out


def objects_from_sums(
    sums: ObjectSums,
    *,
    shape: tuple[int, ...],
    n_fg: int,
    background_mean: float | None,
    pixel_size_um: float,
    decimals: int | None = 4,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The ``measure_objects`` output from per-object sums (shared by the CPU and GPU paths)
    of a ``shape`` (rows, columns) label image."""
    h, w = shape
    n_px = h * w
    a = np.asarray(sums.area, dtype=np.float64)
    if a.size == 0:
        return [], _summary_empty(background_mean, decimals,
                                  saturation_known=sums.saturated is not None)
    s_r, s_c = np.asarray(sums.s_r, np.float64), np.asarray(sums.s_c, np.float64)
    s_rr, s_cc = np.asarray(sums.s_rr, np.float64), np.asarray(sums.s_cc, np.float64)
    s_rc = np.asarray(sums.s_rc, np.float64)
    intensity_sum = np.asarray(sums.intensity, np.float64)
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

    if sums.n_finite is None:
        mean_intensity = intensity_sum / a
        has_mean = None
    else:  # NaN/inf pixels left out: divide by the finite pixels; none finite, no mean
        n_finite = np.asarray(sums.n_finite, dtype=np.float64)
        has_mean = n_finite > 0
        mean_intensity = np.divide(intensity_sum, n_finite, out=np.zeros_like(intensity_sum),
                                   where=has_mean)
    local_bg = np.asarray(sums.local_background, dtype=np.float64)
    n_measured = a if sums.n_finite is None else np.asarray(sums.n_finite, dtype=np.float64)
    corrected = intensity_sum - local_bg * n_measured
    corrected[n_measured == 0] = np.nan  # no finite pixel: no intensity to correct
    area_um2 = a * pixel_size_um**2
    eq_diam_um = np.sqrt(4.0 * a / math.pi) * pixel_size_um

    boxes = np.asarray(sums.bbox).reshape(-1, 4)
    bbox = boxes.tolist()
    # cut by the field: a pixel in the first or last row or column (its size is not its own)
    edge: list[bool] = ((boxes[:, 0] <= 0) | (boxes[:, 1] <= 0) | (boxes[:, 2] >= h)
                        | (boxes[:, 3] >= w)).tolist()
    out_ids = np.asarray(sums.labels).tolist()

    def r(x: np.ndarray) -> list[float]:
        rounded = np.round(x, decimals) if decimals is not None else x
        result: list[float] = rounded.tolist()
        return result

    um: list[list[float]] = _round_significant(np.stack([area_um2, eq_diam_um]), decimals).tolist()
    # intensities: significant digits too (float frames in small units kept none)
    adu: list[list[float]] = _round_significant(
        np.stack([mean_intensity, intensity_sum, local_bg, corrected]), decimals,
        INTENSITY_SIGNIFICANT_DIGITS).tolist()
    n_saturated: list[int | None] = ([None] * len(out_ids) if sums.saturated is None else
                                     np.asarray(sums.saturated, dtype=np.int64).tolist())

    means: list[Any] = adu[0]
    if has_mean is not None and not has_mean.all():
        means = [m if ok else None for m, ok in zip(means, has_mean.tolist(), strict=True)]
        mean_of_means = float(mean_intensity[has_mean].mean()) if has_mean.any() else None
    else:
        mean_of_means = float(mean_intensity.mean())

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
            "touches_edge": te,
            "local_background": lb,
            "corrected_intensity": ci,
            "saturated_px": sp,
        }
        for lbl, ar, aum, y, x, bb, mi, ii, ed, ec, te, lb, ci, sp in zip(
            out_ids,
            a.astype(np.int64).tolist(),
            um[0],
            r(cy),
            r(cx),
            bbox,
            means,
            adu[1],
            um[1],
            r(eccentricity),
            edge,
            _or_none(adu[2]),
            _or_none(adu[3]),
            n_saturated,
            strict=True,
        )
    ]

    summary: dict[str, Any] = {
        "count": len(objects),
        "mean_area_px": _round(float(a.mean()), decimals),
        "median_area_px": _round(float(np.median(a)), decimals),
        "mean_area_um2": _round(float(area_um2.mean()), decimals, digits=UM_SIGNIFICANT_DIGITS),
        "mean_intensity": _round(mean_of_means, decimals, digits=INTENSITY_SIGNIFICANT_DIGITS),
        "total_intensity": _round(float(intensity_sum.sum()), decimals,
                                  digits=INTENSITY_SIGNIFICANT_DIGITS),
        "foreground_fraction": _round(n_fg / n_px, decimals),
        "background_mean": _round(background_mean, decimals, digits=INTENSITY_SIGNIFICANT_DIGITS),
        "saturated_objects": (None if sums.saturated is None
                              else int(np.count_nonzero(sums.saturated))),
    }
    return objects, summary


def _or_none(values: list[float]) -> list[float | None]:
    """``values`` with NaN as None (JSON has no NaN)."""
    return [None if v != v else v for v in values]


def _runs(
    fg_px: np.ndarray, ids: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Row runs of equal labels: (row, first column, length, label) of each run.

    ``fg_px`` are the ascending flat indices of the labelled pixels and ``ids`` their
    labels. A run ends where the label changes, a gap follows or the row ends.
    """
    n = fg_px.size
    brk = np.empty(n, dtype=bool)
    brk[0] = True
    np.not_equal(ids[1:], ids[:-1], out=brk[1:])
    brk[1:] |= np.diff(fg_px) != 1
    first = np.flatnonzero(brk)
    start = fg_px[first]
    length = np.diff(first, append=n)
    run_ids = ids[first]
    row, col = np.divmod(start, width)
    wraps = col + length > width
    if wraps.any():  # a run went on at the start of the next row: cut it at each row end
        pieces = (col + length - 1) // width + 1
        rep = np.repeat(np.arange(first.size), pieces)
        j = np.arange(rep.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        row = row[rep] + j
        end = (start + length)[rep]
        start = np.maximum(start[rep], row * width)
        length = np.minimum(end, (row + 1) * width) - start
        col = start - row * width
        run_ids = run_ids[rep]
    return row, col, length, run_ids


def _at_or_above(values: np.ndarray, level: float) -> np.ndarray:
    """Indices of ``values`` at or above ``level``; integer values are compared in their own
    dtype (a float level would convert them all to float64 first: 7 times slower)."""
    if not np.issubdtype(values.dtype, np.integer):
        return np.flatnonzero(values >= level)
    info = np.iinfo(values.dtype)
    if level > info.max:
        return np.zeros(0, dtype=np.intp)
    return np.flatnonzero(values >= max(math.ceil(level), int(info.min)))


def _sum_squares_below(n: np.ndarray) -> np.ndarray:
    """0² + 1² + ... + (n - 1)², exactly (integer arrays)."""
    result: np.ndarray = (n - 1) * n * (2 * n - 1) // 6
    return result


def _summary_empty(
    background_mean: float | None, decimals: int | None, *, saturation_known: bool
) -> dict[str, Any]:
    """Summary of a frame without objects: zero counts, None for undefined means (and for
    ``saturated_objects`` where the saturation level is not known)."""
    return {
        "count": 0,
        "mean_area_px": None,
        "median_area_px": None,
        "mean_area_um2": None,
        "mean_intensity": None,
        "total_intensity": 0.0,
        "foreground_fraction": 0.0,
        "background_mean": _round(background_mean, decimals, digits=INTENSITY_SIGNIFICANT_DIGITS),
        "saturated_objects": 0 if saturation_known else None,
    }


def _round(x: float | None, decimals: int | None, *, digits: int | None = None) -> float | None:
    """Round ``x`` to ``decimals`` places (or to ``digits`` significant digits, whichever
    keeps more); None and non-finite values become None."""
    if x is None or not math.isfinite(x):
        return None
    if decimals is None:
        return float(x)
    if digits is not None and x != 0:
        decimals = max(decimals, digits - 1 - math.floor(math.log10(abs(x))))
    return round(x, decimals)


def _round_significant(
    x: np.ndarray, decimals: int | None, digits: int = UM_SIGNIFICANT_DIGITS
) -> np.ndarray:
    """``x`` rounded to ``decimals`` places or to ``digits`` significant digits, whichever
    keeps more (None: unrounded; NaN stays NaN)."""
    if decimals is None:
        return x
    if decimals < 0:  # (whole tens and more): no place count to raise
        return np.round(x, decimals)
    scale = np.abs(x)
    np.log10(scale, out=scale, where=scale > 0)  # zeros stay 0: ``decimals`` places
    np.floor(scale, out=scale)
    # places kept: at least ``decimals``; 10**places stays finite
    np.subtract(digits - 1, scale, out=scale)
    np.clip(scale, decimals, 300, out=scale)
    np.power(10.0, scale, out=scale)
    result: np.ndarray = np.rint(x * scale)
    result /= scale
    return result
