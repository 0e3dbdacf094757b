"""The classical baselines: threshold + watershed pipelines without a model file.

Nuclei (``task: nuclei``): Gaussian smoothing, Otsu threshold, distance-transform seeds.
:class:`ClassicalBackend` turns each normalised image into the same two maps a network produces
(foreground, seeds), so the shared seeded watershed
(:func:`livemask.analysis.instances.labels_from_probabilities`) finishes the job exactly as for
the learned models. This is the threshold + distance-transform watershed pipeline that users
know from ImageJ/CellProfiler, kept here as the reference the learned models must beat.

Grains (``task: grains``): grain boundaries are thin dark (or bright) ridges. A Hessian ridge
measure (the larger, or for bright ridges the negated smaller, eigenvalue of the Hessian of the
Gaussian-smoothed image, scale-normalised, the maximum over one or two scales) is thresholded
at a fraction of its Otsu threshold, giving one boundary-probability map like the grains
network's; the shared ``boundary-label`` post-processing
(:func:`livemask.analysis.boundaries.labels_from_boundaries`) then labels the regions between
the boundaries and grows them over the boundary pixels (a distance-based watershed).
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal, get_args

import numpy as np
from pydantic import Field
from scipy import ndimage
from skimage.filters import threshold_otsu

from livemask.errors import ModelError
from livemask.inference.models import ModelCard
from livemask.inference.parameters import CardParameters, Positive, read_parameters

log = logging.getLogger("livemask")

#: Defaults for the card's ``parameters``.
DEFAULT_SIGMA = 1.0
DEFAULT_SEED_FRACTION = 0.45
#: Width of the soft step around the Otsu threshold, in normalised intensity units.
DEFAULT_SOFTNESS = 0.02

#: Grains mode: Gaussian scales (px) of the Hessian ridge measure.
DEFAULT_RIDGE_SIGMAS: tuple[float, ...] = (1.5,)
#: Grains mode: boundaries are ridge responses above this fraction of their Otsu threshold.
DEFAULT_THRESHOLD_SCALE = 0.4
#: Grains mode: width of the soft step, relative to the threshold.
DEFAULT_RIDGE_SOFTNESS = 0.1
#: Grains mode: ``dark`` boundaries (grooves, reflected light), ``bright`` ones (SEM edge
#: effect) or ``auto`` (per image, whichever ridge polarity responds more strongly).
Polarity = Literal["auto", "dark", "bright"]
POLARITIES: tuple[str, ...] = get_args(Polarity)


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


#: Central-difference kernels (second and first derivative).
_SECOND = np.array([1.0, -2.0, 1.0], dtype=np.float32)
_FIRST = np.array([-0.5, 0.0, 0.5], dtype=np.float32)


def hessian_ridges(image: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Dark- and bright-ridge responses (float32, >= 0) of a 2-D image at scale ``sigma``.

    With λ₁ ≥ λ₂ the eigenvalues of the Hessian of the Gaussian-smoothed image (central
    differences, scale-normalised by σ²): dark ridges (a valley across the line) give a large
    positive λ₁, bright ridges a large negative λ₂. Returns (max(σ²λ₁, 0), max(−σ²λ₂, 0)).
    """
    g = ndimage.gaussian_filter(np.asarray(image, dtype=np.float32), sigma, truncate=3.0)
    gyy = ndimage.correlate1d(g, _SECOND, axis=0, mode="reflect")
    gxx = ndimage.correlate1d(g, _SECOND, axis=1, mode="reflect")
    gy = ndimage.correlate1d(g, _FIRST, axis=0, mode="reflect")
    gxy = ndimage.correlate1d(gy, _FIRST, axis=1, mode="reflect")
    s2 = np.float32(sigma * sigma)
    half_trace = np.float32(0.5) * (gyy + gxx)
    root = np.sqrt(np.float32(0.25) * (gyy - gxx) ** 2 + gxy * gxy)
    dark = np.maximum(s2 * (half_trace + root), 0.0)
    bright = np.maximum(s2 * (root - half_trace), 0.0)
    return dark, bright


def classical_boundary_probability(
    image: np.ndarray,
    *,
    sigmas: tuple[float, ...] = DEFAULT_RIDGE_SIGMAS,
    polarity: str = "auto",
    threshold_scale: float = DEFAULT_THRESHOLD_SCALE,
    softness: float = DEFAULT_RIDGE_SOFTNESS,
) -> np.ndarray:
    """Boundary probability (1, H, W) float32 in [0, 1] for one normalised 2-D grains image.

    The ridge response r (:func:`hessian_ridges`, maximum over ``sigmas``; polarity ``auto``
    takes the polarity whose 99th percentile is larger) is compared with
    t = ``threshold_scale`` × Otsu(r): the output is the sigmoid of (r / t − 1) / ``softness``,
    so ``> 0.5`` exactly where r > t. An image without ridges gives all zeros (one grain).
    """
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {x.shape}")
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {POLARITIES}, got {polarity!r}")
    out = np.zeros((1, *x.shape), dtype=np.float32)
    dark: np.ndarray | None = None
    bright: np.ndarray | None = None
    for s in sigmas:
        d, b = hessian_ridges(x, float(s))
        dark = d if dark is None else np.maximum(dark, d)
        bright = b if bright is None else np.maximum(bright, b)
    if dark is None or bright is None:
        raise ValueError("sigmas must not be empty")
    if polarity == "auto":
        step = 2 if min(x.shape) >= 64 else 1  # a subsample is enough for a percentile
        d99 = float(np.percentile(dark[::step, ::step], 99))
        b99 = float(np.percentile(bright[::step, ::step], 99))
        ridge = dark if d99 >= b99 else bright
    else:
        ridge = dark if polarity == "dark" else bright
    lo, hi = float(ridge.min()), float(ridge.max())
    if not np.isfinite(hi - lo) or hi - lo < 1e-6:
        return out
    t = float(threshold_otsu(ridge)) * threshold_scale
    if t <= 0:
        return out
    z = (ridge * np.float32(1.0 / t) - np.float32(1.0)) * np.float32(1.0 / max(softness, 1e-6))
    np.clip(z, -30.0, 30.0, out=z)
    out[0] = 1.0 / (1.0 + np.exp(-z))
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


class ClassicalNuclei(CardParameters):
    """Smoothing, threshold and seeds of the classical nuclei pipeline."""

    sigma: Annotated[float, Field(ge=0)] = DEFAULT_SIGMA
    seed_fraction: Annotated[float, Field(gt=0, lt=1)] = DEFAULT_SEED_FRACTION
    softness: Positive = DEFAULT_SOFTNESS
    fill_holes: bool = True


class ClassicalGrains(CardParameters):
    """Ridge filter and threshold of the classical grain-boundary pipeline."""

    sigmas: Annotated[list[Positive], Field(min_length=1)] | Positive = list(
        DEFAULT_RIDGE_SIGMAS)
    polarity: Polarity = "auto"
    threshold_scale: Positive = DEFAULT_THRESHOLD_SCALE
    softness: Positive = DEFAULT_RIDGE_SOFTNESS


class ClassicalBackend:
    """Threshold + watershed pipelines as a Backend (no model file, CPU only).

    The card's ``task`` picks the mode: ``nuclei`` → (foreground, seeds) maps,
    ``grains`` → one boundary-probability map.
    """

    name = "classical"

    def __init__(self) -> None:
        self.device = "cpu"
        self.task = "nuclei"
        self.sigma = DEFAULT_SIGMA
        self.seed_fraction = DEFAULT_SEED_FRACTION
        self.softness = DEFAULT_SOFTNESS
        self.fill_holes = True
        self.sigmas: tuple[float, ...] = DEFAULT_RIDGE_SIGMAS
        self.polarity = "auto"
        self.threshold_scale = DEFAULT_THRESHOLD_SCALE
        self._loaded = False

    def load(self, card: ModelCard) -> None:
        """Read the mode's parameters from the card.

        Nuclei: ``sigma``, ``seed_fraction``, ``softness``, ``fill_holes``. Grains: ``sigmas``
        (ridge scales, px), ``polarity``, ``threshold_scale``, ``softness`` (relative).
        """
        if card.task == "grains":
            self._load_grains(card)
            return
        p = read_parameters(ClassicalNuclei, card.name, card.parameters)
        self.sigma, self.seed_fraction = p.sigma, p.seed_fraction
        self.softness, self.fill_holes = p.softness, p.fill_holes
        self.task = "nuclei"
        self._loaded = True
        log.info(
            "classical: %s (sigma %.2f, seed_fraction %.2f)",
            card.name,
            self.sigma,
            self.seed_fraction,
        )

    def _load_grains(self, card: ModelCard) -> None:
        p = read_parameters(ClassicalGrains, card.name, card.parameters)
        sigmas = tuple(p.sigmas) if isinstance(p.sigmas, list) else (p.sigmas,)
        polarity, threshold_scale, softness = p.polarity, p.threshold_scale, p.softness
        self.task = "grains"
        self.sigmas, self.polarity = sigmas, polarity
        self.threshold_scale, self.softness = threshold_scale, softness
        self._loaded = True
        log.info(
            "classical grains: %s (ridge sigmas %s, %s boundaries, threshold %.2f x Otsu)",
            card.name,
            "/".join(f"{s:g}" for s in sigmas),
            polarity,
            threshold_scale,
        )

    def warmup(self, shape: tuple[int, int]) -> None:
        """Nothing to compile; run once anyway so timings are steady."""
        self.run(np.zeros((1, 1, *shape), dtype=np.float32))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, 1, H, W) normalised images → (N, 2, H, W) foreground and seed maps (nuclei)
        or (N, 1, H, W) boundary probabilities (grains)."""
        if not self._loaded:
            raise ModelError("backend used before load(); call load(card) first")
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected a (N, 1, H, W) batch, got shape {x.shape}")
        if self.task == "grains":
            return np.stack(
                [
                    classical_boundary_probability(
                        img[0],
                        sigmas=self.sigmas,
                        polarity=self.polarity,
                        threshold_scale=self.threshold_scale,
                        softness=self.softness,
                    )
                    for img in x
                ]
            )
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
