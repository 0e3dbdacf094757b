"""Grain instances from a boundary probability map (the grains model's output).

Pixels below the threshold are grain interiors; their 4-connected regions are the grains
(4-connectivity, so a one-pixel diagonal boundary still separates two grains). Regions
smaller than ``min_area_px`` are dropped, and every remaining pixel (boundary pixels and
dropped regions) goes to the nearest kept region by Euclidean distance, so the result is
a full tessellation: grains meet along the middle of each boundary, as in the ground
truth of the simulated polycrystal.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["labels_from_boundaries"]


def labels_from_boundaries(
    boundary_prob: np.ndarray, *, threshold: float = 0.5, min_area_px: int = 30
) -> np.ndarray:
    """Instance labels (int32, 1..n, no 0 unless no region exists) from boundary probabilities.

    ``min_area_px``: interior regions smaller than this are merged into their neighbours
    (their pixels go to the nearest larger region). If every region is smaller, all are
    kept. An image with no pixel below ``threshold`` gives all zeros.
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
