"""From a camera frame to probabilities (model) and to instance labels (post-processing)."""

from __future__ import annotations

import numpy as np

from livemask.analysis.instances import labels_from_probabilities
from livemask.analysis.normalize import percentile_normalize
from livemask.inference.backend import Backend
from livemask.inference.models import ModelCard, PostProcessing
from livemask.inference.tiling import TilePlan, needs_tiling, plan_tiles, predict_tiled


class Segmenter:
    """A loaded model plus its pre- and post-processing. Thread-compatible, not thread-safe."""

    def __init__(
        self, card: ModelCard, backend: Backend, post: PostProcessing | None = None
    ) -> None:
        self.card = card
        self.backend = backend
        self.post = post or card.postprocessing
        self._plan: TilePlan | None = None
        self._plan_key: tuple[object, ...] | None = None

    def tile_plan(self, shape: tuple[int, int]) -> TilePlan | None:
        """How :meth:`predict` tiles a frame of ``shape`` (H, W); None if it runs it whole.

        Frames whose height or width, padded to the card's ``size_multiple``, exceed its
        ``tile_px`` are tiled (not for ``runtime: classical``, whose thresholds are global).
        ``plan.tile_shape`` and ``plan.batch_sizes`` are the backend input shapes, e.g. for
        a warm-up.
        """
        card = self.card
        if card.runtime == "classical" or not needs_tiling(
            shape, card.tile_px, card.size_multiple
        ):
            return None
        key = (shape, card.tile_px, card.tile_overlap_px, card.max_batch, card.size_multiple)
        if self._plan_key != key:  # one plan per frame shape, computed once
            self._plan = plan_tiles(
                shape,
                tile_px=card.tile_px,
                overlap_px=card.tile_overlap_px,
                max_batch=card.max_batch,
                size_multiple=card.size_multiple,
            )
            self._plan_key = key
        return self._plan

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Probabilities (C, H, W) for a 2-D image of any size, dtype and range.

        The image is normalised as a whole; frames larger than the card's tile are then run
        as overlapping tiles in batches and blended (:mod:`livemask.inference.tiling`).
        """
        if image.ndim != 2:
            raise ValueError(f"expected a 2-D image, got shape {image.shape}")
        norm = self.card.normalization
        x = percentile_normalize(image, norm.low, norm.high)
        plan = self.tile_plan((x.shape[0], x.shape[1]))
        if plan is not None:
            return predict_tiled(self.backend.run, x, plan=plan)
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
