"""From model probability maps (or a binary mask) to instance labels.

The fast path never floods the whole frame. After labelling, all work is on the foreground
pixels only: a connected component with exactly one seed takes that seed's id through a lookup
table, a component without a seed becomes one object, and only the components that hold two or
more seeds are flooded. Those are cut out (bounding boxes), packed side by side with one-pixel
gaps into one small mosaic, and split by a single marker-controlled watershed call, so the
per-call overhead of ``skimage.segmentation.watershed`` is paid once per frame, not per cluster.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

__all__ = ["labels_from_mask", "labels_from_probabilities"]

#: Returns the watershed elevation (lower floods first) at the given flat pixel indices.
Elevation = Callable[[np.ndarray], np.ndarray]


def labels_from_probabilities(
    foreground: np.ndarray,
    seeds: np.ndarray,
    *,
    foreground_threshold: float = 0.5,
    seed_threshold: float = 0.5,
    min_area_px: int = 20,
    min_seed_area_px: int = 4,
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
    seed_lab, n_seed = ndimage.label((sd > seed_threshold) & mask)

    def elevation(px: np.ndarray) -> np.ndarray:
        return 1.0 - sd.ravel()[px].astype(np.float32, copy=False)

    comp, n_comp = ndimage.label(mask)
    return _assign_to_seeds(
        mask, comp, n_comp, seed_lab, n_seed, elevation, min_area_px, min_seed_area_px
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

    def elevation(px: np.ndarray) -> np.ndarray:
        return -distance.ravel()[px]

    return _assign_to_seeds(m, comp, n_comp, seed_lab, n_seed, elevation, min_area_px, 1)


def _assign_to_seeds(
    mask: np.ndarray,
    comp: np.ndarray,
    n_comp: int,
    seed_lab: np.ndarray,
    n_seed: int,
    elevation: Elevation,
    min_area_px: int,
    min_seed_area_px: int,
) -> np.ndarray:
    """Give each foreground component the id of its seed(s); watershed where there are several.

    ``comp`` labels the connected components of ``mask`` (ids 1..n_comp); ``seed_lab`` holds
    seed ids 1..n_seed, every seed inside ``mask``. Seeds under ``min_seed_area_px`` pixels
    are ignored. Returns the final int32 labels, filtered by area and numbered 1..N.
    """
    out = np.zeros(mask.size, dtype=np.int32)
    fg_px = np.flatnonzero(mask)
    if fg_px.size == 0:
        return out.reshape(mask.shape)
    comp_fg = comp.ravel()[fg_px]
    seed_fg = seed_lab.ravel()[fg_px]

    # Which component each seed lies in; invalid (too small) seeds lie in none.
    valid = np.bincount(seed_fg, minlength=n_seed + 1) >= max(1, int(min_seed_area_px))
    valid[0] = False
    in_seed = seed_fg > 0
    seed_comp = np.zeros(n_seed + 1, dtype=np.intp)
    seed_comp[seed_fg[in_seed]] = comp_fg[in_seed]
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
    ids_fg = lut[comp_fg]

    is_multi = seeds_per_comp >= 2
    if is_multi.any():
        sel = np.flatnonzero(is_multi[comp_fg])
        px = fg_px[sel]
        markers = np.where(valid[seed_fg[sel]], seed_fg[sel], 0)
        ids_fg[sel] = _packed_watershed(
            px, comp_fg[sel], markers, elevation(px), mask.shape[1], is_multi
        )

    # Drop small objects and renumber 1..N.
    areas = np.bincount(ids_fg, minlength=n_ids)
    keep = areas >= max(1, int(min_area_px))
    keep[0] = False
    final = np.zeros(areas.size, dtype=np.int32)
    final[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    out[fg_px] = final[ids_fg]
    return out.reshape(mask.shape)


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
    k = index[comp_px]
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

    mr = rows - r0[k] + off_r[k]
    mc = cols - c0[k] + off_c[k]
    region = np.zeros(shape, dtype=bool)
    region[mr, mc] = True
    markers = np.zeros(shape, dtype=np.int32)
    markers[mr, mc] = markers_px
    elev = np.zeros(shape, dtype=elevation_px.dtype)
    elev[mr, mc] = elevation_px

    # Seed pixels whose four neighbours carry the same seed are settled already: leaving them
    # out of the flood (markers only on seed rims) saves about a third of the heap work.
    inner = markers > 0
    inner[1:] &= markers[1:] == markers[:-1]
    inner[:-1] &= markers[:-1] == markers[1:]
    inner[:, 1:] &= markers[:, 1:] == markers[:, :-1]
    inner[:, :-1] &= markers[:, :-1] == markers[:, 1:]
    region &= ~inner
    rim_markers = np.where(region, markers, 0)
    flooded = watershed(elev, rim_markers, mask=region)
    flooded[inner] = markers[inner]
    result: np.ndarray = flooded[mr, mc]
    return result
