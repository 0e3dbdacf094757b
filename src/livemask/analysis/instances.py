"""From model probability maps (or a binary mask) to instance labels.

The fast path (:func:`labels_from_probabilities`) never floods the whole frame: foreground
connected components with exactly one seed take that seed's id through a lookup table,
components without a seed become their own object, and the marker-controlled watershed runs
only inside the bounding box of the (few) components that hold two or more seeds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

__all__ = ["labels_from_mask", "labels_from_probabilities"]

#: Returns the watershed elevation (lower floods first) for one bounding-box crop.
Elevation = Callable[[tuple[slice, ...]], np.ndarray]


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

    def elevation(sl: tuple[slice, ...]) -> np.ndarray:
        return 1.0 - sd[sl].astype(np.float32, copy=False)

    return _assign_to_seeds(mask, seed_lab, n_seed, elevation, min_area_px, min_seed_area_px)


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
    comp, _ = ndimage.label(m)
    peaks = peak_local_max(
        distance, min_distance=max(1, int(min_distance_px)), labels=comp, exclude_border=False
    )
    seed_lab = np.zeros(m.shape, dtype=np.int32)
    n_seed = len(peaks)
    if n_seed:
        seed_lab[peaks[:, 0], peaks[:, 1]] = np.arange(1, n_seed + 1, dtype=np.int32)

    def elevation(sl: tuple[slice, ...]) -> np.ndarray:
        return -distance[sl]

    return _assign_to_seeds(m, seed_lab, n_seed, elevation, min_area_px, 1, comp=comp)


def _assign_to_seeds(
    mask: np.ndarray,
    seed_lab: np.ndarray,
    n_seed: int,
    elevation: Elevation,
    min_area_px: int,
    min_seed_area_px: int,
    *,
    comp: np.ndarray | None = None,
) -> np.ndarray:
    """Give each foreground component the id of its seed(s); watershed where there are several.

    ``seed_lab`` holds seed ids 1..n_seed, each seed lying inside ``mask``. Output ids are the
    seed ids, then ``n_seed + k`` for seedless components, before the final area filter and
    sequential relabelling.
    """
    if comp is None:
        comp, n_comp = ndimage.label(mask)
    else:
        n_comp = int(comp.max())
    if n_comp == 0:
        return np.zeros(mask.shape, dtype=np.int32)

    # Which component each seed lies in, and which seeds are large enough to count.
    flat_seed = seed_lab.ravel()
    seed_px = np.flatnonzero(flat_seed)
    seed_ids_at_px = flat_seed[seed_px]
    valid = np.ones(n_seed + 1, dtype=bool)
    if min_seed_area_px > 1:
        valid = np.bincount(seed_ids_at_px, minlength=n_seed + 1) >= min_seed_area_px
    valid[0] = False
    seed_comp = np.zeros(n_seed + 1, dtype=np.intp)
    seed_comp[seed_ids_at_px] = comp.ravel()[seed_px]
    seed_comp[~valid] = 0  # invalid seeds belong to no component
    seeds_per_comp = np.bincount(seed_comp, minlength=n_comp + 1)
    seeds_per_comp[0] = 0

    lut = np.zeros(n_comp + 1, dtype=np.int32)
    seed_ids = np.arange(n_seed + 1, dtype=np.int32)
    single = valid & (seeds_per_comp[seed_comp] == 1)
    lut[seed_comp[single]] = seed_ids[single]
    seedless = np.flatnonzero(seeds_per_comp == 0)[1:]  # drop component 0 (background)
    lut[seedless] = np.arange(n_seed + 1, n_seed + 1 + seedless.size, dtype=np.int32)
    out = lut[comp]

    multi = np.flatnonzero(seeds_per_comp >= 2)
    if multi.size:
        boxes = ndimage.find_objects(comp)
        for c in multi:
            sl = boxes[c - 1]
            if sl is None:  # pragma: no cover - component ids come from this label image
                continue
            region = comp[sl] == c
            crop_seeds = seed_lab[sl]
            markers = np.where(region & valid[crop_seeds], crop_seeds, 0)
            flooded = watershed(elevation(sl), markers, mask=region)
            out[sl][region] = flooded[region]

    return _filter_and_relabel(out, n_seed + 1 + seedless.size, min_area_px)


def _filter_and_relabel(labels: np.ndarray, n_ids: int, min_area_px: int) -> np.ndarray:
    """Drop objects under ``min_area_px`` pixels and renumber the rest 1..N as int32."""
    areas = np.bincount(labels.ravel(), minlength=n_ids)
    keep = areas >= max(1, int(min_area_px))
    keep[0] = False
    lut = np.zeros(areas.size, dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]
