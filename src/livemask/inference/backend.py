"""The inference ``Backend`` interface and backend selection."""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from livemask.errors import BackendUnavailable
from livemask.inference.models import ModelCard

log = logging.getLogger("livemask")


class Backend(Protocol):
    """Runs a model on batches of normalised images."""

    name: str
    device: str

    def load(self, card: ModelCard) -> None:
        """Load the model described by ``card``."""

    def warmup(self, shape: tuple[int, int]) -> None:
        """Run once on a dummy input of ``shape`` (H, W) so the first frame is not slow."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, 1, H, W) float32 in → (N, C, H, W) float32 probabilities out."""

    def close(self) -> None:
        """Release the model's resources."""


def create_backend(
    name: str = "auto", *, threads: int = 2, card: ModelCard | None = None
) -> Backend:
    """Instantiate a backend by name; ``auto`` picks the fastest available one.

    Models whose card says ``runtime: classical`` or ``random-forest`` carry their own
    runtime, whatever backend is configured.
    """
    if card is not None and card.runtime == "classical":
        from livemask.inference.classical import ClassicalBackend

        return ClassicalBackend()
    if card is not None and card.runtime == "random-forest":
        from livemask.inference.random_forest import RandomForestBackend

        return RandomForestBackend(threads=threads)
    if name in ("auto", "onnxruntime"):
        from livemask.inference.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(threads=threads)
    raise BackendUnavailable(f"unknown backend {name!r}; set model.backend to auto or onnxruntime")
