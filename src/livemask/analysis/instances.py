"""From model probability maps (or a binary mask) to instance labels.

The fast path never floods, labels or copies the whole frame beyond one threshold and one
scan for the foreground pixels. From then on all work is on the foreground pixels (as flat
indices in raster order) and on their row runs (maximal stretches along a row, ~15x fewer):

- connected components (4-connectivity) of the foreground and of the seeds come from the
  runs: runs on neighbouring rows that overlap are joined (``np.searchsorted``) and the run
  graph is split by ``scipy.sparse.csgraph.connected_components``. Components are numbered
  in raster order of their first pixel, exactly like ``scipy.ndimage.label``;
- a component with exactly one seed takes that seed's id through a lookup table, a
  component without a seed becomes one object, and only the components that hold two or
  more seeds are flooded. Those are cut out (bounding boxes), packed side by side with
  one-pixel gaps into one small mosaic, and split by a single marker-controlled watershed
  call, so the per-call overhead of ``skimage.segmentation.watershed`` is paid once per
  frame, not per cluster.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

__all__ = ["labels_from_mask", "labels_from_probabilities"]

#: Returns the watershed elevation (lower floods first) of the foreground pixels at the given
#: positions (indices into the foreground pixel list).
Elevation = Callable[[np.ndarray], np.ndarray]


def labels_from_probabilities(
    foreground: np.ndarray,
    seeds: np.ndarray,
    *,
    foreground_threshold: float = 0.5,
    seed_threshold: float = 0.5,
    min_area_px: int = 20,
    min_seed_area_px: int = 4,
    flood_levels: int | None = None,
) -> np.ndarray:
    """Instance labels from foreground and seed (nucleus core) probability maps.

    Seeds are the connected components of ``seeds > seed_threshold`` inside the foreground
    (components smaller than ``min_seed_area_px`` are ignored). Every foreground pixel
    (``foreground > foreground_threshold``) goes to a seed of its connected component by a
    marker-controlled watershed on ``1 - seeds``; a component without a seed becomes one
    object. Objects smaller than ``min_area_px`` are removed. Returns int32 labels numbered
    1..N (0 = background), same shape as the inputs.
    """
    fg = np.asarray(foreground)
    sd = np.asarray(seeds)
    if fg.ndim != 2 or fg.shape != sd.shape:
        raise ValueError(
            f"foreground and seeds must be 2-D arrays of one shape, got {fg.shape} and {sd.shape}"
        )
    mask = fg > foreground_threshold
    fg_px = np.flatnonzero(mask)
    if fg_px.size == 0:
        return np.zeros(mask.shape, dtype=np.int32)
    width = mask.shape[1]
    # seed probabilities at the foreground pixels only (raster order, like fg_px)
    sd_fg = np.take(sd.reshape(-1), fg_px) if sd.flags.c_contiguous else sd[mask]
    comp_fg, n_comp = _label_pixels(fg_px, width)
    in_seed = np.flatnonzero(sd_fg > seed_threshold)
    seed_fg = np.zeros(fg_px.size, dtype=np.int32)
    n_seed = 0
    if in_seed.size:
        seed_fg[in_seed], n_seed = _label_pixels(np.take(fg_px, in_seed), width)

    def elevation(at: np.ndarray) -> np.ndarray:
        e = 1.0 - np.take(sd_fg, at).astype(np.float32, copy=False)
        if flood_levels:  # quantised: flat levels flood outward evenly from the seeds
            e = np.ceil(e * flood_levels) / flood_levels
        return e

    return _assign_to_seeds(
        mask.shape,
        fg_px,
        comp_fg,
        n_comp,
        seed_fg,
        n_seed,
        elevation,
        min_area_px,
        min_seed_area_px,
    )


def labels_from_mask(
    mask: np.ndarray,
    *,
    min_distance_px: int = 5,
    min_area_px: int = 20,
) -> np.ndarray:
    """Instance labels from a binary mask by classical distance-transform watershed.

    Seeds are the maxima of the Euclidean distance to the background (``peak_local_max``,
    at least ``min_distance_px`` apart, found per connected component); touching objects are
    split by a watershed on the negated distance. Components without a peak stay whole.
    Objects smaller than ``min_area_px`` are removed. Returns int32 labels 1..N.
    """
    m = np.asarray(mask).astype(bool, copy=False)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    if not m.any():
        return np.zeros(m.shape, dtype=np.int32)
    distance = ndimage.distance_transform_edt(m)
    comp, n_comp = ndimage.label(m)
    peaks = peak_local_max(
        distance, min_distance=max(1, int(min_distance_px)), labels=comp, exclude_border=False
    )
    seed_lab = np.zeros(m.shape, dtype=np.int32)
    n_seed = len(peaks)
    if n_seed:
        seed_lab[peaks[:, 0], peaks[:, 1]] = np.arange(1, n_seed + 1, dtype=np.int32)
    fg_px = np.flatnonzero(m)
    neg_distance = -np.take(distance.reshape(-1), fg_px)

    def elevation(at: np.ndarray) -> np.ndarray:
        return np.take(neg_distance, at)

    return _assign_to_seeds(
        m.shape,
        fg_px,
        np.take(comp.reshape(-1), fg_px),
        n_comp,
        np.take(seed_lab.reshape(-1), fg_px),
        n_seed,
        elevation,
        min_area_px,
        1,
    )


def _row_runs(px: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Maximal row runs of ascending flat pixel indices ``px``: (start index, length)."""
    n = px.size
    brk = np.empty(n, dtype=bool)
    brk[0] = True
    np.not_equal(np.diff(px), 1, out=brk[1:])
    first = np.flatnonzero(brk)
    start = np.take(px, first)
    length = np.diff(first, append=n)
    if np.any(start // width != (start + length - 1) // width):  # a run goes on next row
        brk |= px % width == 0
        first = np.flatnonzero(brk)
        start = np.take(px, first)
        length = np.diff(first, append=n)
    return start, length


def _label_pixels(px: np.ndarray, width: int) -> tuple[np.ndarray, int]:
    """4-connected component ids (int32, 1..n) of the pixels at ascending flat indices ``px``.

    Numbered in raster order of each component's first pixel, as ``ndimage.label`` numbers
    them. Runs on consecutive rows are joined where their column ranges overlap.
    """
    start, length = _row_runs(px, width)
    end = start + length
    # runs of the row above that overlap run j: indices lo[j] .. hi[j] - 1
    lo = np.searchsorted(end, start - width, side="right")
    hi = np.searchsorted(start, end - width, side="left")
    count = np.maximum(hi - lo, 0)
    indptr = np.zeros(start.size + 1, dtype=np.intp)
    np.cumsum(count, out=indptr[1:])
    indices = np.arange(int(indptr[-1]), dtype=np.intp) + np.repeat(lo - indptr[:-1], count)
    graph = csr_matrix(
        (np.ones(indices.size, dtype=np.int8), indices, indptr), shape=(start.size, start.size)
    )
    n, run_label = connected_components(graph, directed=False)
    labels = np.repeat(run_label.astype(np.int32) + 1, length)
    return labels, int(n)


def _assign_to_seeds(
    shape: tuple[int, ...],
    fg_px: np.ndarray,
    comp_fg: np.ndarray,
    n_comp: int,
    seed_fg: np.ndarray,
    n_seed: int,
    elevation: Elevation,
    min_area_px: int,
    min_seed_area_px: int,
) -> np.ndarray:
    """Give each foreground component the id of its seed(s); watershed where there are several.

    ``fg_px`` are the flat indices (ascending) of the foreground pixels of a frame of
    ``shape``; ``comp_fg`` their component ids (1..n_comp) and ``seed_fg`` their seed ids
    (1..n_seed, 0 = no seed; every seed lies in one component). Seeds under
    ``min_seed_area_px`` pixels are ignored. Returns the final int32 labels, filtered by
    area and numbered 1..N.
    """
    out = np.zeros(int(np.prod(shape)), dtype=np.int32)
    if fg_px.size == 0:
        return out.reshape(shape)

    # Which component each seed lies in; invalid (too small) seeds lie in none. All pixels
    # of a seed share one component, so a plain scatter over the foreground is exact (the
    # background entry 0 is reset).
    valid = np.bincount(seed_fg, minlength=n_seed + 1) >= max(1, int(min_seed_area_px))
    valid[0] = False
    seed_comp = np.zeros(n_seed + 1, dtype=np.intp)
    seed_comp[seed_fg] = comp_fg
    seed_comp[~valid] = 0
    seeds_per_comp = np.bincount(seed_comp, minlength=n_comp + 1)
    seeds_per_comp[0] = 0

    # Output ids: seed ids for seeded components, n_seed + k for seedless ones.
    lut = np.zeros(n_comp + 1, dtype=np.int32)
    seed_ids = np.arange(n_seed + 1, dtype=np.int32)
    single = valid & (seeds_per_comp[seed_comp] == 1)
    lut[seed_comp[single]] = seed_ids[single]
    seedless = np.flatnonzero(seeds_per_comp == 0)[1:]  # skip 0, the background
    n_ids = n_seed + 1 + seedless.size
    lut[seedless] = np.arange(n_seed + 1, n_ids, dtype=np.int32)
    ids_fg = np.take(lut, comp_fg)

    is_multi = seeds_per_comp >= 2
    if is_multi.any():
        sel = np.flatnonzero(np.take(is_multi, comp_fg))
        seed_sel = np.take(seed_fg, sel)
        markers = np.where(np.take(valid, seed_sel), seed_sel, 0)
        ids_fg[sel] = _packed_watershed(
            np.take(fg_px, sel),
            np.take(comp_fg, sel),
            markers,
            elevation(sel),
            shape[1],
            is_multi,
        )

    # Drop small objects and renumber 1..N.
    areas = np.bincount(ids_fg, minlength=n_ids)
    keep = areas >= max(1, int(min_area_px))
    keep[0] = False
    final = np.zeros(areas.size, dtype=np.int32)
    final[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    out[fg_px] = np.take(final, ids_fg)
    return out.reshape(shape)


def _packed_watershed(
    px: np.ndarray,
    comp_px: np.ndarray,
    markers_px: np.ndarray,
    elevation_px: np.ndarray,
    width: int,
    is_multi: np.ndarray,
) -> np.ndarray:
    """Watershed several components at once, their bounding boxes packed into one mosaic.

    ``px`` are flat frame indices of the pixels of the components flagged in ``is_multi``,
    with their component id, marker (seed id or 0) and elevation. Crops are laid out on
    shelves (tallest first) with a one-pixel gap, so no flood crosses from one component to
    another. Returns the seed id reached by each pixel.
    """
    rows, cols = np.divmod(px, width)
    index = np.full(is_multi.size, -1, dtype=np.intp)
    multi_ids = np.flatnonzero(is_multi)
    index[multi_ids] = np.arange(multi_ids.size)
    k = np.take(index, comp_px)
    big = np.iinfo(np.intp).max
    r0 = np.full(multi_ids.size, big, dtype=np.intp)
    c0 = np.full(multi_ids.size, big, dtype=np.intp)
    r1 = np.zeros(multi_ids.size, dtype=np.intp)
    c1 = np.zeros(multi_ids.size, dtype=np.intp)
    np.minimum.at(r0, k, rows)
    np.minimum.at(c0, k, cols)
    np.maximum.at(r1, k, rows)
    np.maximum.at(c1, k, cols)
    h_arr = r1 - r0 + 2  # + 1 for the gap
    w_arr = c1 - c0 + 2
    shelf_width = max(int(w_arr.max()), int(np.sqrt(float((h_arr * w_arr).sum()))))
    heights: list[int] = h_arr.tolist()
    widths: list[int] = w_arr.tolist()
    off_r = np.zeros(multi_ids.size, dtype=np.intp)
    off_c = np.zeros(multi_ids.size, dtype=np.intp)
    y = x = shelf_h = 0
    for i in sorted(range(len(heights)), key=heights.__getitem__, reverse=True):
        if x + widths[i] > shelf_width:
            y, x, shelf_h = y + shelf_h, 0, 0
        off_r[i], off_c[i] = y, x
        x += widths[i]
        shelf_h = max(shelf_h, heights[i])
    shape = (y + shelf_h, shelf_width)

    # Flat mosaic index of every pixel: one per-component shift added to row * width + col.
    shift = (off_r - r0) * shelf_width + (off_c - c0)
    mpx = rows * shelf_width + cols + np.take(shift, k)
    size = shape[0] * shape[1]
    region_flat = np.zeros(size, dtype=bool)
    region_flat[mpx] = True
    markers_flat = np.zeros(size, dtype=np.int32)
    markers_flat[mpx] = markers_px
    elev_flat = np.zeros(size, dtype=elevation_px.dtype)
    elev_flat[mpx] = elevation_px
    region = region_flat.reshape(shape)
    markers = markers_flat.reshape(shape)

    # Seed pixels whose four neighbours carry the same seed are settled already: leaving them
    # out of the flood (markers only on seed rims) saves about a third of the heap work.
    inner = markers > 0
    inner[1:] &= markers[1:] == markers[:-1]
    inner[:-1] &= markers[:-1] == markers[1:]
    inner[:, 1:] &= markers[:, 1:] == markers[:, :-1]
    inner[:, :-1] &= markers[:, :-1] == markers[:, 1:]
    region &= ~inner
    rim_markers = np.where(region, markers, 0)
    flooded = watershed(elev_flat.reshape(shape), rim_markers, mask=region)
    result: np.ndarray = np.where(
        np.take(inner.reshape(-1), mpx), markers_px, np.take(flooded.reshape(-1), mpx)
    )
    return result
