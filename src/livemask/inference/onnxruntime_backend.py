"""ONNX Runtime backend: the CPU default (CUDA provider when onnxruntime-gpu is installed)."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from livemask.errors import ModelError
from livemask.inference.models import ModelCard

log = logging.getLogger("livemask")


class OnnxRuntimeBackend:
    """Runs an ONNX model with ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, threads: int = 2) -> None:
        self.threads = threads
        self.device = "cpu"
        self._session: ort.InferenceSession | None = None
        self._input = "image"

    def load(self, card: ModelCard) -> None:
        """Create the inference session for the card's ONNX file."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads sleep instead of spinning: in the service the model shares the
        # cores with analysis, the camera thread and publishing, which spinning starves.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self._session = ort.InferenceSession(
                str(card.onnx_path), options, providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"ONNX Runtime cannot load {card.onnx_path}: {exc}") from None
        self.device = "cuda" if self._session.get_providers()[0].startswith("CUDA") else "cpu"
        self._input = self._session.get_inputs()[0].name
        log.info("onnxruntime: %s on %s, %d threads", card.name, self.device, self.threads)

    def warmup(self, shape: tuple[int, int]) -> None:
        """Run the model once on zeros."""
        self.run(np.zeros((1, 1, *shape), dtype=np.float32))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a (N, 1, H, W) float32 batch."""
        if self._session is None:
            raise ModelError("backend used before load(); call load(card) first")
        out = self._session.run(None, {self._input: np.ascontiguousarray(batch, np.float32)})
        return np.asarray(out[0])

    def close(self) -> None:
        """Drop the session."""
        self._session = None
