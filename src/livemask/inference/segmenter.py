"""From a camera frame to probabilities (model) and to instance labels (post-processing)."""

from __future__ import annotations

import numpy as np

from livemask.analysis.instances import labels_from_probabilities
from livemask.analysis.normalize import percentile_normalize
from livemask.inference.backend import Backend
from livemask.inference.models import ModelCard, PostProcessing


class Segmenter:
    """A loaded model plus its pre- and post-processing. Thread-compatible, not thread-safe."""

    def __init__(
        self, card: ModelCard, backend: Backend, post: PostProcessing | None = None
    ) -> None:
        self.card = card
        self.backend = backend
        self.post = post or card.postprocessing

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Probabilities (C, H, W) for a 2-D image of any size, dtype and range."""
        if image.ndim != 2:
            raise ValueError(f"expected a 2-D image, got shape {image.shape}")
        norm = self.card.normalization
        x = percentile_normalize(image, norm.low, norm.high)
        h, w = x.shape
        m = self.card.size_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = np.pad(x, ((0, ph), (0, pw)), mode="reflect")
        out = self.backend.run(x[None, None])
        return out[0, :, :h, :w]

    def labels(self, probabilities: np.ndarray) -> np.ndarray:
        """Instance labels (int32, 0 = background) from the model's probability maps."""
        p = self.post
        if p.method == "boundary-label":
            from livemask.analysis.boundaries import labels_from_boundaries

            return labels_from_boundaries(
                probabilities[0], threshold=p.foreground_threshold, min_area_px=p.min_area_px
            )
        return labels_from_probabilities(
            probabilities[0],
            probabilities[1],
            foreground_threshold=p.foreground_threshold,
            seed_threshold=p.seed_threshold,
            min_area_px=p.min_area_px,
        )

    def segment(self, image: np.ndarray) -> np.ndarray:
        """Instance labels for one 2-D image."""
        return self.labels(self.predict(image))
