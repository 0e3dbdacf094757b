"""Grain statistics from grain instance labels: sizes, distribution and ASTM E112 numbers.

Conventions
-----------
- ``labels``: 2-D integer array, one id per grain; 0 = no grain (an unassigned boundary
  pixel, a pore). Ids need not be sequential. The test area is the whole image.
- A grain *touches the edge* when any of its pixels lies in the first or last row or
  column. Such grains are cut by the field, so they are left out of the size
  distribution (areas, diameters, histogram) and count as fractions in the planimetric
  count.
- Equivalent diameter: the diameter of the circle of equal area, ``sqrt(4 A / pi)``.

ASTM E112-13 (Standard Test Methods for Determining Average Grain Size)
------------------------------------------------------------------------
Planimetric (Jeffries) procedure, Section 11, rectangular test area. Grains completely
inside count 1, grains intercepted by the rectangle's sides count 1/2 and the grains at
the four corners count 1/4 each::

    N_A = (N_inside + 0.5 * N_intercepted + 1) / A          [grains / mm^2]
    G   = 3.321928 * log10(N_A) - 2.954

(``N_intercepted`` excludes the corner grains; a grain holding several corners counts
1/4 per corner, a corner pixel with label 0 counts nothing.) For a field cut from a
regular tessellation this count is exact, where the circle rule
``N_inside + 0.5 N_intercepted`` over-counts by one grain. The constant: G = 1 at
N_A = 15.50 grains/mm^2 at 1x (2**(G - 1) grains per square inch at 100x), so
``G = log2(N_A / 15.50) + 1 = 3.321928 log10 N_A - 2.954``.

Intercept (Heyn) procedure, Sections 12-13, straight test lines: every row and every
column of the image (or every ``line_step_px``-th one) is a test line from its first
pixel centre to its last, ``w - 1`` px long for a row of ``w`` pixels: a boundary can only
be seen between two pixel centres. ``P`` counts boundary intersections: places along a line
where the grain id changes (label-0 pixels in between are skipped, so a boundary drawn as a
gap still counts once). With the total line length ``L``::

    P_L = P / L,   mean lineal intercept  l = 1 / P_L = L / P
    G   = -6.643856 * log10(l_mm) - 3.288

(G = 0 at l = 0.32 mm.) Counting intersections rather than intercepts needs no rule for
line ends inside a grain; along lines of random position the expected count is exactly
``L / l`` (with the full ``w`` px per row it would read ``l`` high by ``w / (w - 1)``).

Statistics over fields (Section 15): :class:`CumulativeGrainStats` pools the counts of
all tiles (N_A = sum N / sum A, l = sum L / sum P) and gives the 95 % confidence
interval ``t(0.975, n-1) * s / sqrt(n)`` of the mean equivalent diameter over grains and
of the planimetric G over tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from livemask.analysis.boundaries import edge_values

__all__ = [
    "BIG_REGION_FRACTION",
    "HISTOGRAM_EDGES_UM",
    "CumulativeGrainStats",
    "GrainField",
    "GrainTable",
    "astm_g_intercept",
    "astm_g_planimetric",
    "grain_field",
    "grain_statistics",
    "grain_table",
    "intercept_count",
    "largest_region_fraction",
    "planimetric_count",
    "roi_centre_offset",
    "size_histogram",
    "tile_footprint",
]

#: Fixed log-spaced bins of equivalent diameter (µm): 0.1 µm to 10 mm, 10 per decade.
#: Diameters outside fall into the first or last bin.
HISTOGRAM_EDGES_UM: tuple[float, ...] = tuple(float(10.0**e) for e in np.linspace(-1, 4, 51))

#: A field where one region covers more than this fraction of the image is not a grain
#: field: an empty or off-specimen field, or an SEM data bar, segments as one huge "grain".
BIG_REGION_FRACTION = 0.25


@dataclass(frozen=True)
class GrainTable:
    """Per-grain sizes of one labelled field (one entry per grain id > 0)."""

    ids: np.ndarray  # grain id
    area_px: np.ndarray  # int64
    area_um2: np.ndarray
    equivalent_diameter_um: np.ndarray
    touches_edge: np.ndarray  # bool: cut by the field, excluded from the distribution
    corners: np.ndarray  # how many of the four field corners the grain holds

    def __len__(self) -> int:
        return int(self.ids.size)

    @property
    def inside(self) -> np.ndarray:
        """Mask of the grains that do not touch the field edge."""
        return ~self.touches_edge


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size == 0:
        raise ValueError(f"expected a non-empty 2-D label image, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    return labels


def grain_table(labels: np.ndarray, pixel_size_um: float) -> GrainTable:
    """Area, equivalent diameter and edge contact of every grain in ``labels``."""
    labels = _check_labels(labels)
    if pixel_size_um <= 0:
        raise ValueError(f"pixel_size_um must be > 0, got {pixel_size_um}")
    flat = labels.ravel()
    top = int(flat.max())
    if int(flat.min()) < 0:
        raise ValueError("labels must be >= 0")
    if top <= 4 * flat.size:  # ids are small: one bincount
        counts = np.bincount(flat, minlength=top + 1)
        ids = np.flatnonzero(counts)
        ids = ids[ids > 0]
        area_px = counts[ids].astype(np.int64)
    else:
        ids, area_px = np.unique(flat[flat > 0], return_counts=True)
        area_px = area_px.astype(np.int64)
    touches = np.isin(ids, edge_values(labels))
    corner_ids = np.array(
        [labels[0, 0], labels[0, -1], labels[-1, 0], labels[-1, -1]], dtype=ids.dtype
    )
    corners = (ids[:, None] == corner_ids[None, :]).sum(axis=1)
    area_um2 = area_px * float(pixel_size_um) ** 2
    return GrainTable(
        ids=ids,
        area_px=area_px,
        area_um2=area_um2,
        equivalent_diameter_um=np.sqrt(4.0 * area_um2 / np.pi),
        touches_edge=touches,
        corners=corners,
    )


def largest_region_fraction(table: GrainTable, pixels: int) -> float:
    """The fraction of a field of ``pixels`` pixels that its largest grain covers (0 for
    no grain); above :data:`BIG_REGION_FRACTION` the field is not a grain field."""
    if len(table) == 0 or pixels <= 0:
        return 0.0
    return int(table.area_px.max()) / pixels


@dataclass(frozen=True)
class GrainField:
    """One field's grains (:func:`grain_table`) and its test lines' boundary crossings
    (:func:`intercept_count`), measured once for :func:`grain_statistics` and
    :meth:`CumulativeGrainStats.add` of the same field (:func:`grain_field`)."""

    table: GrainTable
    crossings: int
    line_length_px: int
    line_step_px: int


def grain_field(labels: np.ndarray, pixel_size_um: float, *,
                line_step_px: int = 1) -> GrainField:
    """The :class:`GrainField` of ``labels`` at ``pixel_size_um``."""
    crossings, length_px = intercept_count(labels, line_step_px=line_step_px)
    return GrainField(grain_table(labels, pixel_size_um), crossings, length_px, line_step_px)


def _field_of(labels: np.ndarray, pixel_size_um: float, line_step_px: int,
              field: GrainField | None) -> GrainField:
    """``field`` where the caller measured it (with these test lines), else measured now."""
    if field is None:
        return grain_field(labels, pixel_size_um, line_step_px=line_step_px)
    if field.line_step_px != line_step_px:
        raise ValueError(f"the field's test lines are every {field.line_step_px} px, not "
                         f"every {line_step_px} px")
    return field


def planimetric_count(table: GrainTable) -> float:
    """Equivalent whole grains in the field: inside 1, edge 1/2, corner 1/4 per corner."""
    inside = int(np.count_nonzero(~table.touches_edge))
    on_side = int(np.count_nonzero(table.touches_edge & (table.corners == 0)))
    return inside + 0.5 * on_side + 0.25 * int(table.corners.sum())


def intercept_count(labels: np.ndarray, *, line_step_px: int = 1) -> tuple[int, int]:
    """Boundary intersections ``P`` and total test-line length in pixels.

    Test lines: every ``line_step_px``-th row and column, each from its first pixel centre
    to its last (``w - 1`` px for a row of ``w``), where boundaries can be seen.
    """
    labels = _check_labels(labels)
    if line_step_px < 1:
        raise ValueError(f"line_step_px must be >= 1, got {line_step_px}")
    rows = labels[::line_step_px, :]
    cols = labels[:, ::line_step_px].T
    crossings = _line_crossings(rows) + _line_crossings(cols)
    length = rows.shape[0] * (rows.shape[1] - 1) + cols.shape[0] * (cols.shape[1] - 1)
    return crossings, length


def _line_crossings(lines: np.ndarray) -> int:
    """Changes of the non-zero id along each row of ``lines`` (zeros skipped)."""
    if lines.shape[1] < 2:
        return 0
    if lines.all():
        return int(np.count_nonzero(lines[:, 1:] != lines[:, :-1]))
    r, c = np.nonzero(lines)
    v = lines[r, c]
    return int(np.count_nonzero((r[1:] == r[:-1]) & (v[1:] != v[:-1])))


def astm_g_planimetric(n_a_per_mm2: float) -> float | None:
    """ASTM E112 grain size number from grains per mm² (None if not positive)."""
    if not n_a_per_mm2 > 0:
        return None
    return 3.321928 * math.log10(n_a_per_mm2) - 2.954


def astm_g_intercept(mean_intercept_mm: float) -> float | None:
    """ASTM E112 grain size number from the mean lineal intercept in mm (None if undefined)."""
    if not (mean_intercept_mm > 0 and math.isfinite(mean_intercept_mm)):
        return None
    return -6.643856 * math.log10(mean_intercept_mm) - 3.288


def size_histogram(
    diameters_um: np.ndarray, edges_um: tuple[float, ...] = HISTOGRAM_EDGES_UM
) -> dict[str, list[float] | list[int]]:
    """Counts of equivalent diameters in fixed bins; values outside go to the end bins."""
    edges = np.asarray(edges_um, dtype=np.float64)
    values = np.clip(np.asarray(diameters_um, dtype=np.float64), edges[0], edges[-1])
    counts, _ = np.histogram(values, bins=edges)
    return _histogram(edges_um, counts)


def _histogram(
    edges_um: tuple[float, ...], counts: np.ndarray
) -> dict[str, list[float] | list[int]]:
    """The JSON form of a histogram: its bin edges and counts."""
    return {"edges_um": [float(e) for e in edges_um], "counts": [int(c) for c in counts]}


def _float(x: float | np.floating[Any] | None) -> float | None:
    """A JSON-friendly float (None for missing or non-finite values)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class _Sizes:
    """Size statistics of inside grains: counts, means, medians, histogram."""

    n: int = 0
    mean_area: float | None = None
    median_area: float | None = None
    mean_diameter: float | None = None
    median_diameter: float | None = None
    histogram: dict[str, list[float] | list[int]] | None = None

    @classmethod
    def of(cls, areas_um2: np.ndarray, edges_um: tuple[float, ...]) -> _Sizes:
        """Exact statistics of ``areas_um2``."""
        diam = np.sqrt(4.0 * areas_um2 / np.pi)
        hist = size_histogram(diam, edges_um)
        if areas_um2.size == 0:
            return cls(histogram=hist)
        return cls(
            int(areas_um2.size),
            float(areas_um2.mean()),
            float(np.median(areas_um2)),
            float(diam.mean()),
            float(np.median(diam)),
            hist,
        )


def _summary(
    *,
    sizes: _Sizes,
    count: int,
    n_equivalent: float,
    test_area_um2: float,
    crossings: int,
    line_length_um: float,
    pixel_size_known: bool = True,
) -> dict[str, Any]:
    """The statistics dict shared by single fields and the accumulator; the ASTM G numbers
    are None where the pixel size is not known (G needs a real length scale)."""
    n_a = n_equivalent / (test_area_um2 * 1e-6) if test_area_um2 > 0 else 0.0
    mean_intercept = line_length_um / crossings if crossings > 0 else None
    out: dict[str, Any] = {
        "count": int(count),
        "count_inside": int(sizes.n),
        "count_edge": int(count - sizes.n),
        "n_equivalent": float(n_equivalent),
        "test_area_mm2": float(test_area_um2 * 1e-6),
        "n_a_per_mm2": float(n_a),
        "astm_g_planimetric": _float(astm_g_planimetric(n_a)),
        "mean_area_planimetric_um2": _float(1e6 / n_a) if n_a > 0 else None,
        "mean_area_um2": _float(sizes.mean_area),
        "median_area_um2": _float(sizes.median_area),
        "mean_equivalent_diameter_um": _float(sizes.mean_diameter),
        "median_equivalent_diameter_um": _float(sizes.median_diameter),
        "intercept_count": int(crossings),
        "test_line_length_um": float(line_length_um),
        "mean_intercept_um": _float(mean_intercept),
        "astm_g_intercept": (
            _float(astm_g_intercept(mean_intercept * 1e-3)) if mean_intercept else None
        ),
        "histogram": sizes.histogram,
    }
    if not pixel_size_known:
        out["astm_g_planimetric"] = out["astm_g_intercept"] = None
    return out


def grain_statistics(
    labels: np.ndarray,
    pixel_size_um: float,
    *,
    line_step_px: int = 1,
    edges_um: tuple[float, ...] = HISTOGRAM_EDGES_UM,
    pixel_size_known: bool = True,
    field: GrainField | None = None,
) -> dict[str, Any]:
    """Grain size statistics of one field (JSON-friendly; None where undefined).

    Keys: ``count`` (all grains), ``count_inside`` / ``count_edge``, ``n_equivalent``
    (planimetric count), ``test_area_mm2``, ``n_a_per_mm2``, ``astm_g_planimetric``,
    ``mean_area_planimetric_um2`` (1 / N_A), ``mean_area_um2`` / ``median_area_um2`` /
    ``mean_equivalent_diameter_um`` / ``median_equivalent_diameter_um`` (grains inside),
    ``intercept_count``, ``test_line_length_um``, ``mean_intercept_um``,
    ``astm_g_intercept``, ``histogram`` (``edges_um``, ``counts`` of inside grains).

    ``pixel_size_known=False`` (``pixel_size_um`` is a placeholder, e.g. 1.0 on a rig
    without a calibration: the µm values are pixel values): both ASTM G numbers are None.
    ``field``: :func:`grain_field` of ``labels`` at ``pixel_size_um``, where the caller has
    it already (two passes over the labels less).
    """
    field = _field_of(labels, pixel_size_um, line_step_px, field)
    table = field.table
    h, w = np.asarray(labels).shape
    return _summary(
        sizes=_Sizes.of(table.area_um2[table.inside], edges_um),
        count=len(table),
        n_equivalent=planimetric_count(table),
        test_area_um2=h * w * float(pixel_size_um) ** 2,
        crossings=field.crossings,
        line_length_um=field.line_length_px * float(pixel_size_um),
        pixel_size_known=pixel_size_known,
    )


class _Moments:
    """Count, mean and sum of squared deviations, merged chunk by chunk (Chan et al.), so a
    long scan costs the same per tile as a short one."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        """Pool ``values`` in."""
        nb = int(values.size)
        if nb == 0:
            return
        mean_b = float(values.mean())
        m2_b = float(((values - mean_b) ** 2).sum())
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean += delta * nb / n
        self.m2 += m2_b + delta * delta * self.n * nb / n
        self.n = n

    def ci95(self) -> list[float] | None:
        """Student-t 95 % confidence interval of the mean (None with fewer than 2 values)."""
        if self.n < 2:
            return None
        sd = math.sqrt(max(self.m2, 0.0) / (self.n - 1))
        half = float(stats.t.ppf(0.975, self.n - 1)) * sd / math.sqrt(self.n)
        return [self.mean - half, self.mean + half]


def tile_footprint(
    stage_xy_um: tuple[float, float],
    shape: tuple[int, int],
    pixel_to_stage: tuple[tuple[float, float], tuple[float, float]],
    centre_offset_px: tuple[float, float] = (0.0, 0.0),
) -> tuple[float, float, float, float]:
    """The rectangle ``(u0, v0, u1, v1)`` (µm) that a tile of ``shape`` (rows, cols)
    covers, in the camera's axes, for :meth:`CumulativeGrainStats.add`.

    ``stage_xy_um`` is the stage position, the centre of the camera's full image;
    ``centre_offset_px`` (rows, cols) how far the tile's centre lies from there (a camera
    ROI's: :func:`roi_centre_offset`); ``pixel_to_stage`` maps pixels to the stage,
    ``((dx/dcol, dx/drow), (dy/dcol, dy/drow))`` µm per pixel (``feedback.pixel_to_stage``
    scaled to the tile's pixel size, or the pixel size on the diagonal). The tile's centre
    on the stage is projected onto the directions its columns (``u``) and rows (``v``) run
    in: tiles of one camera, rotated or mirrored against the stage as it may be, are then
    rectangles along the same axes, and their overlaps are exact (with the camera along the
    stage, ``u, v`` are the stage's ``x, y``)."""
    (a, b), (c, d) = pixel_to_stage
    drow, dcol = centre_offset_px
    cx = float(stage_xy_um[0]) + a * dcol + b * drow
    cy = float(stage_xy_um[1]) + c * dcol + d * drow
    col_um, row_um = math.hypot(a, c), math.hypot(b, d)  # one pixel's width and height
    u = (cx * a + cy * c) / col_um  # the centre along the columns' direction
    v = (cx * b + cy * d) / row_um  # and along the rows'
    half_w, half_h = col_um * shape[1] / 2, row_um * shape[0] / 2
    return (u - half_w, v - half_h, u + half_w, v + half_h)


def roi_centre_offset(
    roi_offset_yx: tuple[int, int], shape: tuple[int, int], full_shape: tuple[int, int]
) -> tuple[float, float]:
    """How far (rows, cols) the centre of a camera ROI of ``shape`` at ``roi_offset_yx``
    (its top-left pixel) lies from the centre of the camera's full image of
    ``full_shape``, where the stage position is."""
    return (roi_offset_yx[0] + shape[0] / 2 - full_shape[0] / 2,
            roi_offset_yx[1] + shape[1] / 2 - full_shape[1] / 2)


#: The cumulative medians come from counts in log bins this wide (relative ±0.05 % around
#: each bin's centre), 1e-6 to 1e9 µm²: memory and time per tile do not grow with the scan.
_MEDIAN_BIN_LOG = math.log(1.001)
_MEDIAN_LOG_LO, _MEDIAN_LOG_HI = math.log(1e-6), math.log(1e9)
_MEDIAN_BINS = math.ceil((_MEDIAN_LOG_HI - _MEDIAN_LOG_LO) / _MEDIAN_BIN_LOG)


def _median_bin(areas_um2: np.ndarray) -> np.ndarray:
    logs = np.log(np.maximum(areas_um2, 1e-300))
    idx = np.floor((logs - _MEDIAN_LOG_LO) / _MEDIAN_BIN_LOG).astype(np.int64)
    return np.clip(idx, 0, _MEDIAN_BINS - 1)


def _median_bin_area(index: int) -> float:
    return math.exp(_MEDIAN_LOG_LO + (index + 0.5) * _MEDIAN_BIN_LOG)


class CumulativeGrainStats:
    """Grain statistics accumulated over non-overlapping tiles of a scan.

    Each :meth:`add` pools the tile's counts (planimetric equivalent grains and test
    area, intercepts and line length) and the sizes of its inside grains, and returns
    the cumulative statistics: the keys of :func:`grain_statistics` plus ``tiles``,
    ``mean_equivalent_diameter_ci95_um`` (over grains) and ``astm_g_planimetric_ci95``
    (over tiles, ASTM E112 Section 15).

    Overlapping tiles would count grains twice and narrow the confidence intervals falsely:
    given where each tile lies on the stage (its centre, or its :func:`tile_footprint`), a
    tile that shares more than ``MAX_OVERLAP`` of the smaller one's area with a tile already
    added is left out (counted in ``tiles_overlapping``): a small tile (a camera ROI) wholly
    inside an earlier big one, and a big one over earlier small ones alike. Tiles without a
    position are all pooled.

    ``tiles_skipped`` (in the summary too) counts the scan's tiles that never reached
    :meth:`add` (frames that skipped analysis in free-run mode): whoever feeds the tiles
    sets it. ``pixel_size_known=False``: the ASTM G numbers and their interval are None
    (see :func:`grain_statistics`).
    """

    #: Largest fraction of the smaller tile's area that two tiles may share: stage jitter,
    #: and a pixel size a few per cent off the one the stage grid was laid out with.
    MAX_OVERLAP = 0.05

    def __init__(
        self, *, line_step_px: int = 1, edges_um: tuple[float, ...] = HISTOGRAM_EDGES_UM,
        pixel_size_known: bool = True,
    ) -> None:
        self.line_step_px = line_step_px
        self.edges_um = edges_um
        self.pixel_size_known = pixel_size_known
        self.reset()

    def reset(self) -> None:
        """Forget all tiles."""
        self.tiles = 0
        self.tiles_overlapping = 0
        self.tiles_skipped = 0
        self._footprints = np.empty((64, 4))  # u0, v0, u1, v1 µm of the pooled tiles
        self._placed = 0  # rows of _footprints in use
        self.count = 0
        self.n_equivalent = 0.0
        self.test_area_um2 = 0.0
        self.crossings = 0
        self.line_length_um = 0.0
        self._area = _Moments()
        self._diameter = _Moments()
        self._tile_g = _Moments()
        self._histogram = np.zeros(len(self.edges_um) - 1, dtype=np.int64)
        self._median_counts = np.zeros(_MEDIAN_BINS, dtype=np.int64)

    def overlap(self, footprint: tuple[float, float, float, float]) -> float:
        """The largest fraction of the smaller tile's area that ``footprint`` (u0, v0, u1,
        v1 µm: :func:`tile_footprint`) shares with a tile already added: 1 where either lies
        wholly inside the other."""
        if not self._placed:
            return 0.0
        u0, v0, u1, v1 = footprint
        seen = self._footprints[: self._placed]
        du = np.minimum(seen[:, 2], u1) - np.maximum(seen[:, 0], u0)
        dv = np.minimum(seen[:, 3], v1) - np.maximum(seen[:, 1], v0)
        shared = np.clip(du, 0, None) * np.clip(dv, 0, None)
        areas = (seen[:, 2] - seen[:, 0]) * (seen[:, 3] - seen[:, 1])
        smaller = np.maximum(np.minimum(areas, (u1 - u0) * (v1 - v0)), 1e-12)
        return float((shared / smaller).max())

    def add(
        self,
        labels: np.ndarray,
        pixel_size_um: float,
        centre_um: tuple[float, float] | None = None,
        *,
        field: GrainField | None = None,
        footprint_um: tuple[float, float, float, float] | None = None,
    ) -> dict[str, Any]:
        """Add one tile's labels and where it lies on the stage, where known: its
        ``footprint_um`` (u0, v0, u1, v1 µm; :func:`tile_footprint`), else its centre
        ``centre_um`` (x, y µm; image axes along the stage's); return the cumulative
        statistics. A tile overlapping earlier ones is left out (see the class).
        ``field``: the tile's :func:`grain_field`, where the caller has it already."""
        h, w = np.asarray(labels).shape
        if footprint_um is None and centre_um is not None:
            px = float(pixel_size_um)
            footprint_um = tile_footprint(centre_um, (h, w), ((px, 0.0), (0.0, px)))
        if footprint_um is not None:
            u0, v0, u1, v1 = (float(x) for x in footprint_um)
            footprint = (u0, v0, u1, v1)
            if self.overlap(footprint) > self.MAX_OVERLAP:
                self.tiles_overlapping += 1
                return self.summary()
            if self._placed == len(self._footprints):
                self._footprints = np.concatenate([self._footprints,
                                                   np.empty_like(self._footprints)])
            self._footprints[self._placed] = footprint
            self._placed += 1
        field = _field_of(labels, pixel_size_um, self.line_step_px, field)
        table, crossings, length_px = field.table, field.crossings, field.line_length_px
        area = h * w * float(pixel_size_um) ** 2
        n_eq = planimetric_count(table)
        self.tiles += 1
        self.count += len(table)
        self.n_equivalent += n_eq
        self.test_area_um2 += area
        self.crossings += crossings
        self.line_length_um += length_px * float(pixel_size_um)
        inside = np.asarray(table.area_um2[table.inside], dtype=np.float64)
        diam = np.sqrt(4.0 * inside / np.pi)
        self._area.add(inside)
        self._diameter.add(diam)
        self._histogram += np.asarray(size_histogram(diam, self.edges_um)["counts"], np.int64)
        self._median_counts += np.bincount(_median_bin(inside), minlength=_MEDIAN_BINS)
        g = astm_g_planimetric(n_eq / (area * 1e-6))
        if g is not None:
            self._tile_g.add(np.array([g]))
        return self.summary()

    def _medians(self) -> tuple[float | None, float | None]:
        """Median area and equivalent diameter from the binned areas (±0.05 %)."""
        n = self._area.n
        if n == 0:
            return None, None
        cum = np.cumsum(self._median_counts)
        middle = [(n - 1) // 2, n // 2]  # the two middle ranks (the same one for odd n)
        areas = [_median_bin_area(int(np.searchsorted(cum, k, side="right"))) for k in middle]
        diameters = [math.sqrt(4.0 * a / math.pi) for a in areas]
        return sum(areas) / 2, sum(diameters) / 2

    def summary(self) -> dict[str, Any]:
        """Cumulative statistics over all tiles added so far."""
        median_area, median_diameter = self._medians()
        has = self._area.n > 0
        sizes = _Sizes(
            self._area.n,
            self._area.mean if has else None,
            median_area,
            self._diameter.mean if has else None,
            median_diameter,
            _histogram(self.edges_um, self._histogram),
        )
        out = _summary(
            sizes=sizes,
            count=self.count,
            n_equivalent=self.n_equivalent,
            test_area_um2=self.test_area_um2,
            crossings=self.crossings,
            line_length_um=self.line_length_um,
            pixel_size_known=self.pixel_size_known,
        )
        out["tiles"] = self.tiles
        out["tiles_overlapping"] = self.tiles_overlapping
        out["tiles_skipped"] = self.tiles_skipped
        out["mean_equivalent_diameter_ci95_um"] = self._diameter.ci95()
        out["astm_g_planimetric_ci95"] = self._tile_g.ci95() if self.pixel_size_known else None
        return out
