"""The random-forest baseline: a pixel classifier on multi-scale filter features.

Like ilastik's pixel classification: every pixel is described by filter responses at a few
Gaussian scales (smoothed intensity, gradient magnitude, Laplacian of Gaussian, Hessian
eigenvalues, differences of Gaussians) and a random forest (scikit-learn, exported to ONNX with
skl2onnx and run with ONNX Runtime) assigns it a class. Nuclei (``task: nuclei``): background,
nucleus rim or nucleus core; foreground is rim + core and the seeds are the cores, so the shared
seeded watershed turns the result into instances as for the network models. Grains
(``task: grains``): grain interior or grain boundary; the output is the one boundary-probability
map of the grains network, finished by the shared ``boundary-label`` post-processing.
Training: ``livemask.training.random_forest``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import onnxruntime as ort
from pydantic import Field
from scipy import ndimage

from livemask.errors import ModelError
from livemask.inference.models import ModelCard
from livemask.inference.parameters import (
    CardParameters,
    ClassIndex,
    Positive,
    read_parameters,
)

log = logging.getLogger("livemask")

#: Gaussian scales (pixels) used when the card names none.
DEFAULT_SCALES: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
#: Features computed per scale, in column order (after the raw intensity column).
FEATURES_PER_SCALE: tuple[str, ...] = (
    "gaussian",
    "gradient_magnitude",
    "laplacian_of_gaussian",
    "hessian_eigenvalue_high",
    "hessian_eigenvalue_low",
)
#: Kernel half-width in standard deviations (``scipy.ndimage`` ``truncate``).
_TRUNCATE = 3.0


def feature_names(scales: Sequence[float]) -> list[str]:
    """Column names of :func:`pixel_features` for ``scales``."""
    per_scale = [f"{f}_s{s:g}" for s in scales for f in FEATURES_PER_SCALE]
    dog = [f"difference_of_gaussians_s{a:g}_s{b:g}" for a, b in itertools.pairwise(scales)]
    return ["intensity", *per_scale, *dog]


def pixel_features(image2d: np.ndarray, scales: Sequence[float] = DEFAULT_SCALES) -> np.ndarray:
    """Multi-scale filter features of a normalised 2-D image, one row per pixel.

    Returns (H*W, F) float32 in row-major pixel order, F = 1 + 5·len(scales) + len(scales) − 1
    (names: :func:`feature_names`): the intensity; per scale s the Gaussian G_s, the gradient
    magnitude s·|∇G_s|, the Laplacian of Gaussian s²·ΔG_s and the two Hessian eigenvalues s²·λ
    (high, low), derivatives by central differences of G_s (scale-normalised); then the
    differences of Gaussians G_a − G_b of consecutive scales. One Gaussian filter per scale.
    """
    x = np.asarray(image2d, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {x.shape}")
    if len(scales) == 0 or any(float(s) <= 0 for s in scales):
        raise ValueError(f"scales must be positive and non-empty, got {list(scales)}")
    h, w = x.shape
    n_scales = len(scales)
    per = len(FEATURES_PER_SCALE)
    out = np.empty((1 + per * n_scales + n_scales - 1, h, w), dtype=np.float32)
    out[0] = x
    dog = 1 + per * n_scales
    for i, s in enumerate(float(v) for v in scales):
        k = 1 + per * i
        g = out[k]
        ndimage.gaussian_filter(x, s, output=g, mode="reflect", truncate=_TRUNCATE)
        gy, gx = _gradient(g)
        gyy, gyx = _gradient(gy)
        _, gxx = _gradient(gx)
        s1, s2 = np.float32(s), np.float32(s * s)
        trace = gyy + gxx
        root = np.sqrt(np.float32(0.25) * (gyy - gxx) ** 2 + gyx * gyx)
        out[k + 1] = s1 * np.sqrt(gy * gy + gx * gx)
        out[k + 2] = s2 * trace
        out[k + 3] = s2 * (np.float32(0.5) * trace + root)
        out[k + 4] = s2 * (np.float32(0.5) * trace - root)
        if i > 0:
            np.subtract(out[k - per], g, out=out[dog + i - 1])
    return np.ascontiguousarray(out.reshape(out.shape[0], -1).T)


def _gradient(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central differences along y and x (one-sided at the edges), float32."""
    dy = np.empty_like(a)
    dx = np.empty_like(a)
    if a.shape[0] > 1:
        dy[1:-1] = (a[2:] - a[:-2]) * np.float32(0.5)
        dy[0] = a[1] - a[0]
        dy[-1] = a[-1] - a[-2]
    else:
        dy.fill(0.0)
    if a.shape[1] > 1:
        dx[:, 1:-1] = (a[:, 2:] - a[:, :-2]) * np.float32(0.5)
        dx[:, 0] = a[:, 1] - a[:, 0]
        dx[:, -1] = a[:, -1] - a[:, -2]
    else:
        dx.fill(0.0)
    return dy, dx


class Forest(CardParameters):
    """Feature scales and class meaning of a random-forest pixel classifier."""

    scales: Annotated[list[Positive], Field(min_length=1)] = list(DEFAULT_SCALES)
    features: list[str] | None = None  # informational: the names the scales give
    classes: list[str] | None = None  # informational: the forest's class names
    foreground_classes: Annotated[list[ClassIndex], Field(min_length=1)] = [1, 2]
    seed_classes: Annotated[list[ClassIndex], Field(min_length=1)] = [2]
    boundary_classes: Annotated[list[ClassIndex], Field(min_length=1)] = [1]


def _io_problem(inputs: Sequence[Any], output: Any, n_features: int) -> str | None:
    """Why a forest's ONNX input or ``output`` is not what the backend feeds and reads
    ((pixels, features) float in, (pixels, classes) float out), else None."""
    if len(inputs) != 1:
        return f"it has {len(inputs)} inputs, expected one (pixels, {n_features}) float input"
    spec = inputs[0]
    if spec.type != "tensor(float)" or len(spec.shape or ()) != 2:
        return (f"its input {spec.name!r} is {spec.type} {spec.shape}, expected a (pixels, "
                f"{n_features}) float tensor: is the file a forest (runtime: random-forest)?")
    width = spec.shape[-1]
    if isinstance(width, int) and width != n_features:
        return f"it expects {width} features but its scales give {n_features}"
    if output.type != "tensor(float)" or len(output.shape or ()) != 2:
        return (f"its output {output.name!r} is {output.type}, expected a (pixels, classes) "
                "float tensor of probabilities: convert the forest with skl2onnx's "
                "options={id(forest): {'zipmap': False}}")
    return None


class RandomForestBackend:
    """An ONNX random-forest pixel classifier (skl2onnx) as a Backend, on ONNX Runtime."""

    name = "random-forest"

    def __init__(self, threads: int = 2) -> None:
        self.threads = threads
        self.device = "cpu"
        self.scales: tuple[float, ...] = DEFAULT_SCALES
        self.foreground_classes: list[int] = [1, 2]
        self.seed_classes: list[int] = [2]
        self.boundary_classes: list[int] = [1]
        self.task = "nuclei"
        self._session: ort.InferenceSession | None = None
        self._input = "features"
        self._output = "probabilities"

    @property
    def channel_classes(self) -> list[list[int]]:
        """The forest classes summed into each output channel, in channel order."""
        if self.task == "grains":
            return [self.boundary_classes]
        return [self.foreground_classes, self.seed_classes]

    def load(self, card: ModelCard) -> None:
        """Open the card's ONNX forest; read ``scales`` and the class meaning from it.

        Nuclei cards name ``foreground_classes`` and ``seed_classes`` (two output channels),
        grains cards ``boundary_classes`` (one output channel).
        """
        p = read_parameters(Forest, card.name, card.parameters)
        self.scales = tuple(p.scales)
        self.foreground_classes = list(p.foreground_classes)
        self.seed_classes = list(p.seed_classes)
        self.boundary_classes = list(p.boundary_classes)
        self.task = card.task
        used = [c for group in self.channel_classes for c in group]
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # A forest run is long: spinning idle threads buys nothing and, on a loaded 2-core
        # machine, doubles the run time.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                str(card.onnx_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"ONNX Runtime cannot load {card.onnx_path}: {exc}") from None
        inputs = self._session.get_inputs()
        n_features = len(feature_names(self.scales))
        outputs = self._session.get_outputs()
        names = [o.name for o in outputs]
        self._output = card.output_name if card.output_name in names else names[-1]
        chosen = outputs[names.index(self._output)]
        problem = _io_problem(inputs, chosen, n_features)
        if problem:
            self._session = None
            raise ModelError(f"model {card.name!r} ({card.onnx_path}): {problem}")
        self._input = inputs[0].name
        n_classes = max(used) + 1
        columns = chosen.shape[-1]
        if isinstance(columns, int) and columns < n_classes:
            self._session = None
            raise ModelError(f"model {card.name!r}: class indices outside the forest's output")
        log.info(
            "random-forest: %s (%d features, %d classes, %d threads)",
            card.name,
            n_features,
            n_classes,
            self.threads,
        )

    def warmup(self, shape: tuple[int, int]) -> None:
        """Run once on zeros."""
        self.run(np.zeros((1, 1, *shape), dtype=np.float32))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, 1, H, W) normalised images → (N, C, H, W) probabilities.

        Nuclei: C = 2 (foreground, seeds); grains: C = 1 (boundary).
        """
        if self._session is None:
            raise ModelError("backend used before load(); call load(card) first")
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected a (N, 1, H, W) batch, got shape {x.shape}")
        n, _, h, w = x.shape
        groups = self.channel_classes
        out = np.empty((n, len(groups), h, w), dtype=np.float32)
        for i in range(n):
            features = pixel_features(x[i, 0], self.scales)
            try:
                (proba,) = self._session.run([self._output], {self._input: features})
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ModelError(f"ONNX Runtime cannot run the forest {self._output!r}: "
                                 f"{exc}") from None
            p = np.asarray(proba, dtype=np.float32).reshape(h, w, -1)
            for c, classes in enumerate(groups):
                out[i, c] = p[..., classes].sum(axis=-1)
        np.clip(out, 0.0, 1.0, out=out)
        return out

    def close(self) -> None:
        """Drop the session."""
        self._session = None
