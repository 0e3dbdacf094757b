"""The classical baseline: Gaussian smoothing, Otsu threshold, distance-transform seeds.

No model file: :class:`ClassicalBackend` turns each normalised image into the same two maps a
network produces (foreground, seeds), so the shared seeded watershed
(:func:`livemask.analysis.instances.labels_from_probabilities`) finishes the job exactly as for
the learned models. This is the threshold + distance-transform watershed pipeline that users
know from ImageJ/CellProfiler, kept here as the reference the learned models must beat.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from livemask.errors import ModelError
from livemask.inference.models import ModelCard

log = logging.getLogger("livemask")

#: Defaults for the card's ``parameters``.
DEFAULT_SIGMA = 1.0
DEFAULT_SEED_FRACTION = 0.45
#: Width of the soft step around the Otsu threshold, in normalised intensity units.
DEFAULT_SOFTNESS = 0.02


def classical_probabilities(
    image: np.ndarray,
    *,
    sigma: float = DEFAULT_SIGMA,
    seed_fraction: float = DEFAULT_SEED_FRACTION,
    softness: float = DEFAULT_SOFTNESS,
    fill_holes: bool = True,
) -> np.ndarray:
    """Foreground and seed maps (2, H, W) float32 in [0, 1] for one normalised 2-D image.

    Foreground: a steep sigmoid around the Otsu threshold of the Gaussian-smoothed image
    (``> 0.5`` exactly where the smoothed image exceeds the threshold). Seeds: the Euclidean
    distance to the background relative to the largest distance in the pixel's connected
    component, mapped so that ``> 0.5`` exactly where it exceeds ``seed_fraction``; the graded
    values below make the watershed flood along the distance transform, so touching nuclei are
    split at their necks.
    """
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {x.shape}")
    out = np.zeros((2, *x.shape), dtype=np.float32)
    smooth = ndimage.gaussian_filter(x, sigma, truncate=3.0) if sigma > 0 else x
    lo, hi = float(smooth.min()), float(smooth.max())
    if not np.isfinite(hi - lo) or hi - lo < 1e-6:
        return out
    t = float(threshold_otsu(smooth))
    z = (smooth - np.float32(t)) * np.float32(1.0 / max(softness, 1e-6))
    np.clip(z, -30.0, 30.0, out=z)
    out[0] = 1.0 / (1.0 + np.exp(-z))
    mask = smooth > t
    if fill_holes:
        mask = _fill_holes(mask)
    comp, n = ndimage.label(mask)
    if n == 0:
        return out
    distance = ndimage.distance_transform_edt(mask).astype(np.float32)
    fg = np.flatnonzero(mask)
    peak = np.zeros(n + 1, dtype=np.float32)
    np.maximum.at(peak, comp.ravel()[fg], distance.ravel()[fg])
    relative = distance / np.maximum(peak[comp], np.float32(1e-6))
    out[1] = np.clip(relative * np.float32(0.5 / seed_fraction), 0.0, 1.0)
    out[1][~mask] = 0.0
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not touch the image edge filled."""
    bg, n = ndimage.label(~mask)
    if n == 0:
        return mask
    edge = np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]])
    hole = np.ones(n + 1, dtype=bool)
    hole[edge] = False
    hole[0] = False
    filled: np.ndarray = mask | hole[bg]
    return filled


class ClassicalBackend:
    """Threshold + distance transform as a Backend (no model file, CPU only)."""

    name = "classical"

    def __init__(self) -> None:
        self.device = "cpu"
        self.sigma = DEFAULT_SIGMA
        self.seed_fraction = DEFAULT_SEED_FRACTION
        self.softness = DEFAULT_SOFTNESS
        self.fill_holes = True
        self._loaded = False

    def load(self, card: ModelCard) -> None:
        """Read ``sigma``, ``seed_fraction``, ``softness`` and ``fill_holes`` from the card."""
        p = card.parameters
        try:
            self.sigma = float(p.get("sigma", DEFAULT_SIGMA))
            self.seed_fraction = float(p.get("seed_fraction", DEFAULT_SEED_FRACTION))
            self.softness = float(p.get("softness", DEFAULT_SOFTNESS))
            self.fill_holes = bool(p.get("fill_holes", True))
        except (TypeError, ValueError) as exc:
            raise ModelError(f"model {card.name!r}: invalid classical parameters: {exc}") from None
        if self.sigma < 0 or not 0 < self.seed_fraction < 1 or self.softness <= 0:
            raise ModelError(
                f"model {card.name!r}: need sigma >= 0, 0 < seed_fraction < 1, softness > 0"
            )
        self._loaded = True
        log.info(
            "classical: %s (sigma %.2f, seed_fraction %.2f)",
            card.name,
            self.sigma,
            self.seed_fraction,
        )

    def warmup(self, shape: tuple[int, int]) -> None:
        """Nothing to compile; run once anyway so timings are steady."""
        self.run(np.zeros((1, 1, *shape), dtype=np.float32))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, 1, H, W) normalised images → (N, 2, H, W) foreground and seed maps."""
        if not self._loaded:
            raise ModelError("backend used before load(); call load(card) first")
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected a (N, 1, H, W) batch, got shape {x.shape}")
        return np.stack(
            [
                classical_probabilities(
                    img[0],
                    sigma=self.sigma,
                    seed_fraction=self.seed_fraction,
                    softness=self.softness,
                    fill_holes=self.fill_holes,
                )
                for img in x
            ]
        )

    def close(self) -> None:
        """Nothing to release."""
        self._loaded = False
