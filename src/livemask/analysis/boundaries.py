"""Grain instances from a boundary probability map (the grains model's output).

Pixels below the threshold are grain interiors; their 4-connected regions are the grains
(4-connectivity, so a one-pixel diagonal boundary still separates two grains). Regions
smaller than ``min_area_px`` are dropped, those touching the image border only when smaller
than ``min_edge_area_px`` (a grain cut by the field may show only a sliver, and dropping it
would lose its half count in the planimetric N_A). Every remaining pixel (boundary pixels
and dropped regions) goes to the nearest kept region by Euclidean distance, so the result
is a full tessellation: grains meet along the middle of each boundary, as in the ground
truth of the simulated polycrystal.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["MIN_EDGE_AREA_PX", "edge_values", "labels_from_boundaries"]

#: Default smallest region touching the image border that is kept as a grain (px).
MIN_EDGE_AREA_PX = 5


def edge_values(image: np.ndarray) -> np.ndarray:
    """The values of ``image``'s first and last rows and columns (corners twice)."""
    return np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])


def labels_from_boundaries(
    boundary_prob: np.ndarray,
    *,
    threshold: float = 0.5,
    min_area_px: int = 30,
    min_edge_area_px: int | None = MIN_EDGE_AREA_PX,
) -> np.ndarray:
    """Instance labels (int32, 1..n, no 0 unless no region exists) from boundary probabilities.

    ``min_area_px``: interior regions smaller than this are merged into their neighbours
    (their pixels go to the nearest kept region). ``min_edge_area_px``: the same for regions
    with a pixel in the first or last row or column; the smaller of the two applies (None:
    ``min_area_px``). If every region is too small, all are kept. An image with no pixel
    below ``threshold`` gives all zeros.
    """
    prob = np.asarray(boundary_prob)
    if prob.ndim != 2:
        raise ValueError(f"expected a 2-D boundary map, got shape {prob.shape}")
    regions, n = ndimage.label(prob < threshold)
    if n == 0:
        return np.zeros(prob.shape, dtype=np.int32)
    if min_area_px > 0:
        sizes = np.bincount(regions.ravel(), minlength=n + 1)
        keep = sizes >= min_area_px
        edge_min = min_area_px if min_edge_area_px is None else min_edge_area_px
        if edge_min < min_area_px:
            on_border = np.zeros(n + 1, dtype=bool)
            on_border[edge_values(regions)] = True
            keep |= on_border & (sizes >= edge_min)
        keep[0] = False
        if keep.any():
            lut = np.zeros(n + 1, dtype=np.int32)
            lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
            regions = lut[regions]
    unassigned = regions == 0
    if unassigned.any():
        index = ndimage.distance_transform_edt(
            unassigned, return_distances=False, return_indices=True
        )
        regions = regions[tuple(index)]
    return regions.astype(np.int32, copy=False)
