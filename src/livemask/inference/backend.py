"""The inference ``Backend`` interface and backend selection."""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from livemask.inference.models import ModelCard

log = logging.getLogger("livemask")


class Backend(Protocol):
    """Runs a model on batches of normalised images.

    The ONNX backends also set ``model_io`` in :meth:`load`: the network's declared inputs
    and outputs (:class:`livemask.inference.model_checks.ModelIO`, checked against the
    card), which the Segmenter uses to check each batch against fixed input sizes.
    """

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

    ``auto`` prefers tensorrt (TensorRT and a CUDA GPU), then torch (CUDA), then onnxruntime,
    logging at INFO why each one it passes over cannot run. A backend named explicitly that
    cannot run here raises BackendUnavailable saying what to install (or to set
    ``model.backend: auto``). Models whose card says ``runtime: classical`` or
    ``random-forest`` carry their own runtime, whatever backend is configured.
    ``livemask.inference.select.load_backend`` also loads the model and, under ``auto``,
    falls back to the next backend when one fails to load.
    """
    from livemask.inference.select import choose_backend, instantiate

    if card is not None and card.runtime != "onnx" and name not in ("auto", "onnxruntime"):
        log.info("model %s runs on its own %s runtime; model.backend %s does not apply",
                 card.name, card.runtime, name)
    if card is not None and card.runtime == "classical":
        from livemask.inference.classical import ClassicalBackend

        return ClassicalBackend()
    if card is not None and card.runtime == "random-forest":
        from livemask.inference.random_forest import RandomForestBackend

        return RandomForestBackend(threads=threads)
    return instantiate(choose_backend(name), threads=threads)
