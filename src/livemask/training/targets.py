"""Training targets derived from ground-truth instance labels (numpy only)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import find_boundaries

#: A pixel is a seed when its distance to the object boundary exceeds this fraction of the
#: object's largest such distance. Model cards record it; post-processing relies on it.
SEED_FRACTION = 0.45


def targets_from_labels(labels: np.ndarray, seed_fraction: float = SEED_FRACTION) -> np.ndarray:
    """Return float32 targets (2, H, W): foreground, and seed (inner core of each object)."""
    foreground = labels > 0
    interior = foreground & ~find_boundaries(labels, mode="inner")
    distance = ndimage.distance_transform_edt(interior)
    n = int(labels.max())
    if n == 0:
        return np.zeros((2, *labels.shape), dtype=np.float32)
    peak = np.zeros(n + 1, dtype=np.float64)
    peak[1:] = ndimage.maximum(distance, labels, index=np.arange(1, n + 1))
    relative = distance / np.maximum(peak[labels], 1e-6)
    seeds = foreground & (relative > seed_fraction)
    return np.stack([foreground, seeds]).astype(np.float32)


def boundary_targets(labels: np.ndarray, width_px: int = 2) -> np.ndarray:
    """Float32 target (1, H, W): 1 on grain boundaries (``width_px`` wide), 0 inside grains."""
    edges = find_boundaries(labels, mode="thick" if width_px >= 2 else "inner")
    if width_px > 2:
        edges = ndimage.binary_dilation(edges, iterations=(width_px - 2) // 2)
    return edges[None].astype(np.float32)
