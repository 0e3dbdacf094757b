"""ONNX Runtime backend: the CPU default (CUDA provider when onnxruntime-gpu is installed)."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from livemask.errors import ModelError
from livemask.inference.model_checks import (
    ModelIO,
    batch_one_hint,
    check_model_io,
    chosen_output,
    io_from_session,
)
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
        self._output = "probabilities"
        self._what = "the model"  # for errors: the ONNX file and its card, once loaded
        self._input_dtype: type[np.floating] = np.float32
        #: The loaded model's declared inputs and outputs (checked against its card).
        self.model_io: ModelIO | None = None

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
        io = io_from_session(self._session)
        try:
            check_model_io(card, io)  # dtype, rank, channels and sizes against the card
        except ModelError:
            self._session = None
            raise
        self.model_io = io
        self._what = f"{card.onnx_path} (card {card.card_path or card.name})"
        self.device = "cuda" if self._session.get_providers()[0].startswith("CUDA") else "cpu"
        self._input = io.inputs[0].name
        output = chosen_output(card, io)
        assert output is not None  # check_model_io refused a model without one
        self._output = output.name  # the card's output_name of a several-output model
        self._input_dtype = np.float16 if io.inputs[0].dtype == "float16" else np.float32
        log.info("onnxruntime: %s on %s, %d threads", card.name, self.device, self.threads)

    def warmup(self, shape: tuple[int, int]) -> None:
        """Run the model once on zeros."""
        self.run(np.zeros((1, 1, *shape), dtype=np.float32))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a (N, 1, H, W) float32 batch; float32 out (also from a float16
        model, whose input is converted to float16)."""
        if self._session is None:
            raise ModelError("backend used before load(); call load(card) first")
        x = np.ascontiguousarray(batch, self._input_dtype)
        try:
            out = self._run_session(x)
        except Exception as exc:  # onnxruntime's own errors (e.g. Concat of mismatched sizes)
            raise ModelError(
                f"ONNX Runtime failed to run {self._what} on a batch of shape {x.shape}: "
                f"{exc}{self._batch_hint(x) or self._size_hint(x)}"
            ) from None
        return np.asarray(out, dtype=np.float32)

    def _run_session(self, x: np.ndarray, *, quiet: bool = False) -> np.ndarray:
        assert self._session is not None
        options = None
        if quiet:  # a probe expected to fail: ONNX Runtime need not log it
            options = ort.RunOptions()
            options.log_severity_level = 4
        (out,) = self._session.run([self._output], {self._input: x}, options)
        return np.asarray(out)

    def _batch_hint(self, x: np.ndarray) -> str:
        """After a failed run of several tiles: advice on max_batch if the first of them
        runs alone (the network fixes its batch at 1 inside), else "". Only runs on
        failure."""
        if x.shape[0] < 2:
            return ""
        try:
            self._run_session(x[:1], quiet=True)
        except Exception:  # fails alone too: not about the batch
            return ""
        return batch_one_hint()

    def _size_hint(self, x: np.ndarray) -> str:
        """After a failed run: advice on size_multiple if the model runs the same batch
        padded to a multiple of a larger power of two (its pooling needed that), else ""
        (the failure is about something else, e.g. channels). Only runs on failure."""
        h, w = x.shape[2:]
        for m in (2 ** k for k in range(1, 8)):
            if h % m == 0 and w % m == 0:
                continue
            padded = np.pad(x, ((0, 0), (0, 0), (0, -h % m), (0, -w % m)))
            try:
                self._run_session(padded, quiet=True)
            except Exception:  # still fails at this size: try the next multiple
                continue
            return (f". The network runs at height and width multiples of {m} (it failed at "
                    f"{h}×{w}, each pooling level halves them): set size_multiple in its card "
                    f"to {m}")
        return ""

    def close(self) -> None:
        """Drop the session."""
        self._session = None
        self.model_io = None
