"""TensorRT backend: an engine built from the card's ONNX file, cached on disk, run on a stream.

Build: ``trt.Builder`` → network (explicit batch, the only mode in TensorRT 10+) →
``trt.OnnxParser`` → builder config with FP16, one optimisation profile (min/opt/max of batch
and H×W, :class:`EngineProfile`, by default derived from the model card, its optimum the
camera's frame or tiles where the service passes ``frame_shape``) and a timing cache →
``build_serialized_network``. TensorRT 10 takes ``BuilderFlag.FP16``; TensorRT 11 removed the
weak-typing flags, so there the ONNX model is first converted to fp16 with fp32 inputs and
outputs (:func:`onnx_to_fp16`) and built as a strongly typed network. ``fp16=False`` also
clears ``BuilderFlag.TF32`` (on by default), so fp32 means fp32.

Cache: the serialized engine is stored as ``<cache_dir>/<key>.engine``, ``key`` =
:func:`engine_cache_key` (sha256 of the model file's sha256, the TensorRT version, the GPU's
name and compute capability, the profile shapes, the precision and the output kept), next
to a ``<key>.json`` that spells those inputs out. The timing cache is one file per TensorRT
version and GPU. A second start with the same key deserializes the engine instead of building
it. The directory is ``$LIVEMASK_CACHE_DIR/engines``, else
``$XDG_CACHE_HOME/livemask/engines`` (default ``~/.cache/livemask/engines``). A cache that
cannot be written (read-only, full disk) is logged as a warning and the freshly built engine
is used anyway.

Run: PyTorch is the CUDA memory and stream provider (no second CUDA binding): one
``torch.cuda.Stream``, device buffers pre-allocated for the profile's largest input and output
(``torch.empty(..., device="cuda")``, addresses given to TensorRT with ``data_ptr()``), and
pinned host buffers for the copies. ``run`` copies in, sets the input shape when it changed,
``execute_async_v3`` on the stream, copies out and synchronises.

Written against the TensorRT 10/11 Python API documentation; see docs/backends.md for what
was executed where.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from livemask.errors import BackendUnavailable, ModelError
from livemask.inference.model_checks import ModelIO, check_onnx_model, chosen_output
from livemask.inference.models import ModelCard
from livemask.inference.tiling import needs_tiling, plan_tiles

if TYPE_CHECKING:
    import torch

log = logging.getLogger("livemask")

#: Bumped when the way livemask builds engines changes, so old cached engines are not reused.
#: 2: fp32 engines without TF32; Resize/Upsample scales kept fp32 in the TensorRT 11 fp16 model.
#: 3: only the card's output is built, so its name is part of the key (older keys lacked it).
ENGINE_RECIPE = 3

INSTALL_HINT = (
    "install the gpu extra (tensorrt and a CUDA build of torch) with pip install "
    "'livemask[gpu]' (in a checkout: pip install -e '.[gpu]') on a machine with an NVIDIA GPU "
    "and driver, or set model.backend: auto"
)

Shape3 = tuple[int, int, int]


# --------------------------------------------------------------------------- profile & key


@dataclass(frozen=True)
class EngineProfile:
    """An optimisation profile: (batch, height, width) at its minimum, optimum and maximum.

    The input is (batch, 1, height, width). Every frame run through the engine must lie
    within [min, max] (larger batches are split); the engine is fastest at ``opt``.
    """

    min_shape: Shape3 = (1, 32, 32)
    opt_shape: Shape3 = (1, 512, 512)
    max_shape: Shape3 = (4, 2048, 2048)

    @classmethod
    def for_tile(cls, tile: tuple[int, int], max_batch: int = 4) -> EngineProfile:
        """A profile for fixed-size tiles in batches of 1 to ``max_batch``."""
        h, w = tile
        return cls((1, h, w), (max_batch, h, w), (max_batch, h, w))

    @classmethod
    def for_card(
        cls, card: ModelCard, max_batch: int | None = None,
        frame_shape: tuple[int, int] | None = None,
    ) -> EngineProfile:
        """The profile covering what :class:`~livemask.inference.segmenter.Segmenter` sends.

        With ``m`` = ``size_multiple`` and ``t`` = ``tile_px`` rounded down to a multiple of
        ``m``: frames whose padded sides are at most ``t`` run whole as (1, H, W); larger
        frames run as tiles of at most t×t (their size depends on the frame: 728² for a 2048²
        frame at the default 1024) in batches of up to ``max_batch``. Hence min (1, m, m)
        and max (max_batch, t, t); ``max_batch`` defaults to the card's. The optimum is what
        a camera of ``frame_shape`` (H, W) sends: the padded frame, or its tiles in the
        plan's largest batch; without a frame shape (1, t, t), the largest whole frame.
        """
        m, t = card.size_multiple, card.tile_side
        if t < m:
            raise ModelError(f"model {card.name!r}: tile_px {card.tile_px} is smaller than "
                             f"size_multiple {m}; raise tile_px in its card")
        b = card.max_batch if max_batch is None else max_batch
        opt: Shape3 = (1, t, t)
        if frame_shape is not None and min(frame_shape) > 0:
            if needs_tiling(frame_shape, card.tile_px, m):
                plan = plan_tiles(frame_shape, tile_px=card.tile_px,
                                  overlap_px=card.tile_overlap_px, max_batch=card.max_batch,
                                  size_multiple=m)
                opt = (min(max(plan.batch_sizes), b), *plan.tile_shape)
            else:
                ph, pw = (max(m, -(-int(n) // m) * m) for n in frame_shape)
                opt = (1, ph, pw)
        return cls((1, m, m), opt, (b, t, t))

    def pinned(self, fixed: tuple[int | str | None, ...]) -> EngineProfile:
        """This profile with the (batch, height, width) dimensions the network fixes
        (ints in ``fixed``; names or None are dynamic) set at min, opt and max alike:
        TensorRT rejects a profile that ranges over a static dimension."""
        def pin(shape: Shape3) -> Shape3:
            return tuple(d if isinstance(d, int) and not isinstance(d, bool) else s
                         for d, s in zip(fixed, shape, strict=True))  # type: ignore[return-value]

        return EngineProfile(pin(self.min_shape), pin(self.opt_shape), pin(self.max_shape))

    def validate(self, size_multiple: int = 1) -> None:
        """Raise ModelError unless min ≤ opt ≤ max, all positive, H and W multiples."""
        for a, b in ((self.min_shape, self.opt_shape), (self.opt_shape, self.max_shape)):
            if len(a) != 3 or len(b) != 3 or any(x > y for x, y in zip(a, b, strict=True)):
                raise ModelError(
                    f"TensorRT profile must have min ≤ opt ≤ max per dimension, got "
                    f"{self.min_shape} / {self.opt_shape} / {self.max_shape}"
                )
        if min(self.min_shape) < 1:
            raise ModelError(f"TensorRT profile shapes must be positive, got {self.min_shape}")
        m = size_multiple
        for s in (self.min_shape, self.opt_shape, self.max_shape):
            if s[1] % m or s[2] % m:
                raise ModelError(f"TensorRT profile H and W must be multiples of {m}, got {s}")

    def input_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) as NCHW input shapes."""
        return tuple((s[0], 1, s[1], s[2]) for s in (self.min_shape, self.opt_shape,
                                                      self.max_shape))  # type: ignore[return-value]

    def fits(self, height: int, width: int) -> bool:
        """Whether an H×W frame lies within the profile."""
        return (self.min_shape[1] <= height <= self.max_shape[1]
                and self.min_shape[2] <= width <= self.max_shape[2])

    def warmup_shape(self, shape: tuple[int, int], size_multiple: int = 1) -> tuple[int, int]:
        """``shape`` padded to ``size_multiple`` and clamped into the profile's H×W range.

        A frame larger than the profile is tiled by the Segmenter into tiles no larger than
        its maximum, so that is the shape to warm up with.
        """
        m = max(1, size_multiple)
        lo, hi = self.min_shape, self.max_shape
        h, w = (-(-int(n) // m) * m for n in shape)
        return min(max(h, lo[1]), hi[1]), min(max(w, lo[2]), hi[2])


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def onnx_sha256(path: str | Path) -> str:
    """Hex sha256 of an ONNX model: its file and, where the onnx package can list them, the
    external-data files its weights live in (retrained weights there must not reuse an old
    engine)."""
    path = Path(path)
    try:
        import onnx
    except ImportError:  # the gpu extra installs it; without it, the file alone
        return file_sha256(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable here: the parser reports it properly later
        return file_sha256(path)
    locations = sorted({
        entry.value for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data if entry.key == "location"
    })
    if not locations:
        return file_sha256(path)
    h = hashlib.sha256(file_sha256(path).encode())
    for location in locations:
        data = path.parent / location
        h.update(f"|{location}:".encode())
        h.update((file_sha256(data) if data.is_file() else "missing").encode())
    return h.hexdigest()


def engine_cache_key(
    *,
    model_sha256: str,
    trt_version: str,
    gpu_name: str,
    compute_capability: tuple[int, int],
    profile: EngineProfile,
    precision: str,
    output_name: str,
    workspace_mb: int = 1024,
    recipe: int = ENGINE_RECIPE,
) -> str:
    """The engine's cache key: sha256 (hex) of everything an engine depends on.

    A pure function of its arguments: the model's sha256 (its external data included, see
    :func:`onnx_sha256`), the TensorRT version, the GPU name and compute capability, the
    optimisation profile, the precision (``fp16``/``fp32``), the name of the one output
    the engine keeps (the card's ``output_name``: the others are pruned), the builder's
    workspace (it limits the tactics TensorRT may choose) and livemask's build recipe version.
    """
    fields = {
        "model_sha256": model_sha256,
        "tensorrt": trt_version,
        "gpu": gpu_name,
        "compute_capability": [int(compute_capability[0]), int(compute_capability[1])],
        "profile": {k: list(v) for k, v in asdict(profile).items()},
        "precision": precision,
        "output_name": output_name,
        "workspace_mb": int(workspace_mb),
        "recipe": recipe,
    }
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def default_cache_dir() -> Path:
    """``$LIVEMASK_CACHE_DIR/engines``, else ``$XDG_CACHE_HOME/livemask/engines``."""
    root = os.environ.get("LIVEMASK_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "engines"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "livemask" / "engines"


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class EngineCache:
    """Serialized engines and timing caches in one directory; writes are atomic."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def engine_path(self, key: str) -> Path:
        return self.directory / f"{key}.engine"

    def load(self, key: str) -> bytes | None:
        """The cached engine for ``key``, or None (missing, empty or unreadable)."""
        try:
            data = self.engine_path(key).read_bytes()
        except OSError:
            return None
        return data or None

    def store(self, key: str, engine: bytes, meta: dict[str, Any]) -> Path:
        """Write the engine and a JSON sidecar describing it."""
        path = self.engine_path(key)
        _atomic_write(path, engine)
        sidecar = json.dumps({"key": key, **meta}, indent=2, sort_keys=True).encode("utf-8")
        _atomic_write(path.with_suffix(".json"), sidecar)
        return path

    def discard(self, key: str) -> None:
        """Remove an engine that failed to deserialize."""
        for suffix in (".engine", ".json"):
            with contextlib.suppress(OSError):
                self.engine_path(key).with_suffix(suffix).unlink()

    def timing_cache_path(
        self, trt_version: str, gpu_name: str, compute_capability: tuple[int, int],
        precision: str = "fp16", cuda_version: str = "",
    ) -> Path:
        """The timing cache of this TensorRT, GPU, CUDA and precision: TensorRT's docs tie a
        timing cache to the device, the CUDA and TensorRT versions and the builder flags
        that change layer implementations (fp32 builds clear TF32, fp16 builds keep it)."""
        tag = hashlib.sha256(
            f"{trt_version}|{gpu_name}|{compute_capability[0]}.{compute_capability[1]}|"
            f"{precision}|{cuda_version}".encode()
        ).hexdigest()[:16]
        return self.directory / f"timing-{tag}.cache"

    def load_timing(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError:
            return b""

    def store_timing(self, path: Path, data: bytes) -> bool:
        """Save a timing cache; a failure (read-only or full disk) is a warning, not an error."""
        if not data:
            return False
        try:
            _atomic_write(path, data)
        except OSError as exc:
            log.warning("tensorrt: cannot save the timing cache %s (%s); the next build "
                        "starts without it", path, exc)
            return False
        return True


# --------------------------------------------------------------------------- fp16 ONNX

#: Operators whose computation type follows their inputs, safe to run in fp16 as they are.
_FP16_OPS = frozenset({
    "Conv", "ConvTranspose", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "MaxPool", "AveragePool",
    "Concat", "BatchNormalization", "Add", "Sub", "Mul", "Identity", "Resize", "Upsample",
})
_FP16_MAX = 65504.0


def _fp32_only_inputs(node: Any, opset: int) -> list[str]:
    """Inputs of ``node`` that the ONNX schema types as float32 whatever the data type.

    Resize (opset 11+): ``roi`` (1) and ``scales`` (2); Resize 10 and Upsample 9: ``scales`` (1).
    """
    if node.op_type == "Resize":
        positions = (1, 2) if opset >= 11 else (1,)
    elif node.op_type == "Upsample":
        positions = (1,)
    else:
        return []
    return [node.input[i] for i in positions if i < len(node.input) and node.input[i]]


def onnx_to_fp16(data: bytes) -> bytes:
    """The ONNX model ``data`` with fp16 weights and computation, fp32 inputs and outputs.

    For strongly typed TensorRT (11+): float initializers become fp16, a Cast to fp16
    follows each float graph input and a Cast to fp32 precedes each float graph output.
    Only operators in a small type-following set are allowed (a U-Net's); anything else
    raises ModelError rather than silently changing the model. The ``roi`` and ``scales``
    of Resize/Upsample stay float32 (the schema requires it). The result passes
    ``onnx.checker.check_model(full_check=True)``, else ModelError.
    """
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise BackendUnavailable(f"fp16 TensorRT engines need the onnx package ({exc}); "
                                 "install it with pip install 'livemask[gpu]' (in a "
                                 "checkout: pip install -e '.[gpu]')") from None
    model = onnx.load_from_string(data)
    graph = model.graph
    unknown = sorted({n.op_type for n in graph.node} - _FP16_OPS)
    if unknown:
        raise ModelError(f"cannot convert operators {unknown} to fp16 for TensorRT 11; "
                         "build in fp32 (fp16=False) or use model.backend: torch")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    keep = {name for node in graph.node for name in _fp32_only_inputs(node, opset)}
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    converted = set()
    for init in graph.initializer:
        if init.data_type == f32 and init.name not in keep:
            arr = numpy_helper.to_array(init)
            if arr.size and float(np.max(np.abs(arr))) > _FP16_MAX:
                raise ModelError(f"weight {init.name!r} exceeds the fp16 range; build in fp32")
            init.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), init.name))
            converted.add(init.name)
    for vi in graph.value_info:
        if vi.type.tensor_type.elem_type == f32 and vi.name not in keep:
            vi.type.tensor_type.elem_type = f16
    initializer_names = {i.name for i in graph.initializer}
    head, tail = [], []
    for inp in graph.input:
        if inp.name in converted:  # IR < 4 lists initializers as graph inputs too
            inp.type.tensor_type.elem_type = f16
        if (inp.name in initializer_names or inp.name in keep
                or inp.type.tensor_type.elem_type != f32):
            continue
        cast = f"{inp.name}__fp16"
        for node in graph.node:
            node.input[:] = [cast if x == inp.name else x for x in node.input]
        head.append(helper.make_node("Cast", [inp.name], [cast], to=f16,
                                     name=f"{inp.name}__to_fp16"))
    for out in graph.output:
        if out.type.tensor_type.elem_type != f32:
            continue
        raw = f"{out.name}__fp16"
        for node in graph.node:
            node.output[:] = [raw if x == out.name else x for x in node.output]
            node.input[:] = [raw if x == out.name else x for x in node.input]
        tail.append(helper.make_node("Cast", [raw], [out.name], to=f32,
                                     name=f"{out.name}__to_fp32"))
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelError(f"the fp16 conversion of this model is not valid ONNX ({exc}); "
                         "build in fp32 (fp16=False) or use model.backend: torch") from None
    return model.SerializeToString()


# --------------------------------------------------------------------------- imports


def import_tensorrt() -> ModuleType:
    """``import tensorrt``, or BackendUnavailable saying what to install."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(f"the tensorrt backend needs TensorRT ({exc}); "
                                 f"{INSTALL_HINT}") from None
    return tensorrt


def import_torch_cuda() -> ModuleType:
    """``import torch`` with a CUDA device, or BackendUnavailable."""
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(f"the tensorrt backend uses PyTorch for CUDA memory and "
                                 f"streams ({exc}); {INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise BackendUnavailable(f"the tensorrt backend needs a CUDA GPU, but torch "
                                 f"{torch.__version__} ({build}) sees none; {INSTALL_HINT}")
    return torch


_logger_lock = threading.Lock()
_logger: Any = None


def shared_logger(trt: ModuleType) -> Any:
    """The process's one TensorRT logger, created on first use.

    TensorRT keeps the first logger it is given for the whole process (NVIDIA/TensorRT#1475),
    so every builder, parser and runtime gets this one.
    """
    global _logger
    with _logger_lock:
        if _logger is None or not isinstance(_logger, trt.ILogger):  # (a fake trt in tests)
            _logger = _make_logger(trt)
        return _logger


def _make_logger(trt: ModuleType) -> Any:
    """A ``trt.ILogger`` that forwards TensorRT's messages to the ``livemask`` logger."""
    sev = trt.ILogger.Severity
    levels = {
        sev.INTERNAL_ERROR: logging.ERROR,
        sev.ERROR: logging.ERROR,
        sev.WARNING: logging.WARNING,
        sev.INFO: logging.DEBUG,
    }

    class _Logger(trt.ILogger):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity)
            if level is not None:  # VERBOSE is dropped
                log.log(level, "tensorrt: %s", msg)

    return _Logger()


# --------------------------------------------------------------------------- backend


class TensorRTBackend:
    """Runs the card's ONNX model as a cached TensorRT engine on one CUDA stream."""

    name = "tensorrt"

    def __init__(
        self,
        threads: int = 2,
        *,
        cache_dir: str | Path | None = None,
        fp16: bool = True,
        profile: EngineProfile | None = None,
        max_batch: int | None = None,
        workspace_mb: int = 1024,
        device_index: int = 0,
        frame_shape: tuple[int, int] | None = None,
    ) -> None:
        self._trt = import_tensorrt()
        self._torch = import_torch_cuda()
        self.threads = threads  # unused: the GPU does the work
        self.device = "cuda"
        self.fp16 = fp16
        if profile is not None:
            profile.validate()
        self._requested_profile = profile
        self.max_batch = max_batch
        #: The camera's (H, W) where known: the derived profile's optimum is built for it.
        self.frame_shape = frame_shape
        #: The engine's profile: ``profile=``, else derived from the card in :meth:`load`.
        self.profile: EngineProfile | None = profile
        self._size_multiple = 1
        self.cache = EngineCache(cache_dir)
        self.workspace_bytes = workspace_mb << 20
        self.device_index = device_index
        props = self._torch.cuda.get_device_properties(device_index)
        self.device_name = str(props.name)
        self.compute_capability = (int(props.major), int(props.minor))
        self.engine_key: str | None = None
        self.built = False  # whether load() built the engine (False: loaded from the cache)
        #: The loaded model's declared inputs and outputs (checked against its card).
        self.model_io: ModelIO | None = None
        self._logger = shared_logger(self._trt)
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._input = ""
        self._output = ""
        self._kept_output = ""  # the output the engine keeps (set by load)
        self._last_shape: tuple[int, ...] | None = None
        self._dev_in: torch.Tensor | None = None
        self._dev_out: torch.Tensor | None = None
        self._host_in: torch.Tensor | None = None
        self._host_out: torch.Tensor | None = None

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    @property
    def _strongly_typed(self) -> bool:
        """TensorRT 11 removed BuilderFlag.FP16: precision comes from the network's types."""
        return not hasattr(self._trt.BuilderFlag, "FP16")

    def load(self, card: ModelCard) -> None:
        """Load the cached engine for this model, GPU and profile, or build and cache it."""
        trt, torch = self._trt, self._torch
        io = check_onnx_model(card)  # dtype, rank, channels, sizes vs the card
        self.model_io = io
        profile = self._requested_profile
        if profile is None:
            profile = EngineProfile.for_card(card, self.max_batch, self.frame_shape)
        if io is not None and io.inputs and io.inputs[0].shape is not None:
            n, _, h, w = io.inputs[0].shape  # rank 4: check_onnx_model said so
            profile = profile.pinned((n, h, w))
        profile.validate(card.size_multiple)
        self.profile, self._size_multiple = profile, card.size_multiple
        self._kept_output = self._kept_output_name(card, io)
        key_fields: dict[str, Any] = {
            "model_sha256": onnx_sha256(card.onnx_path),
            "trt_version": str(trt.__version__),
            "gpu_name": self.device_name,
            "compute_capability": self.compute_capability,
            "profile": profile,
            "precision": self.precision,
            "output_name": self._kept_output,
            "workspace_mb": self.workspace_bytes >> 20,
        }
        key = engine_cache_key(**key_fields)
        self.engine_key = key
        with torch.cuda.device(self.device_index):
            self._runtime = trt.Runtime(self._logger)
            engine = None
            data = self.cache.load(key)
            if data is not None:
                engine = self._runtime.deserialize_cuda_engine(data)
                if engine is None:
                    log.warning("tensorrt: cached engine %s does not deserialize; rebuilding",
                                self.cache.engine_path(key))
                    self.cache.discard(key)
            self.built = engine is None
            if engine is None:
                t0 = time.perf_counter()
                data = self._build(card)
                seconds = time.perf_counter() - t0
                meta = {**key_fields, "profile": asdict(profile), "model": card.name,
                        "model_file": str(card.onnx_path), "build_s": round(seconds, 1),
                        "recipe": ENGINE_RECIPE}
                path = self.cache.engine_path(key)
                try:
                    self.cache.store(key, data, meta)
                except OSError as exc:  # read-only or full disk: use the engine anyway
                    log.warning("tensorrt: built %s in %.1f s but cannot cache it as %s (%s); "
                                "the next start builds it again", card.name, seconds, path, exc)
                else:
                    log.info("tensorrt: built %s in %.1f s, cached as %s", card.name, seconds,
                             path)
                engine = self._runtime.deserialize_cuda_engine(data)
                if engine is None:
                    raise ModelError(f"TensorRT built an engine for {card.name} that does not "
                                     "deserialize; see the tensorrt log messages")
            else:
                log.info("tensorrt: loaded cached engine %s", self.cache.engine_path(key))
            self._engine = engine
            self._setup(card)
        log.info("tensorrt: %s on %s (sm_%d%d), %s, profile %s..%s", card.name,
                 self.device_name, *self.compute_capability, self.precision,
                 profile.min_shape, profile.max_shape)

    @staticmethod
    def _kept_output_name(card: ModelCard, io: ModelIO | None) -> str:
        """The output the engine keeps: the one named ``output_name``, else the only one."""
        spec = chosen_output(card, io) if io is not None else None
        return spec.name if spec is not None else card.output_name

    def _loaded_profile(self) -> EngineProfile:
        if self.profile is None:
            raise ModelError("backend used before load(); call load(card) first")
        return self.profile

    def _build(self, card: ModelCard) -> bytes:
        trt = self._trt
        shapes = self._loaded_profile()
        builder = trt.Builder(self._logger)
        flags = 0
        if self._strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)  # explicit batch: the only mode in TRT 10+
        parser = trt.OnnxParser(network, self._logger)
        if self.fp16 and self._strongly_typed:
            parsed = parser.parse(onnx_to_fp16(Path(card.onnx_path).read_bytes()))
        else:  # from the file, so that ONNX external data next to it is found
            parsed = parser.parse_from_file(str(card.onnx_path))
        if not parsed:
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"TensorRT cannot parse {card.onnx_path}: {errors}")
        outputs = [network.get_output(i) for i in range(network.num_outputs)]
        named = [t for t in outputs if t.name == card.output_name]
        keep = named[0] if named else outputs[0] if len(outputs) == 1 else None
        if network.num_inputs != 1 or keep is None:
            raise ModelError(f"{card.onnx_path}: the tensorrt backend expects one input and "
                             f"one output (or one named {card.output_name!r}, the card's "
                             f"output_name), the model has {network.num_inputs} and "
                             f"{[t.name for t in outputs]}")
        for tensor in outputs:  # the others are not computed (TensorRT prunes them)
            if tensor is not keep:
                network.unmark_output(tensor)
        input_name = network.get_input(0).name
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if self.fp16 and not self._strongly_typed:
            config.set_flag(trt.BuilderFlag.FP16)
        elif not self.fp16 and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # on by default; fp32 means fp32
        timing_path = self.cache.timing_cache_path(
            str(trt.__version__), self.device_name, self.compute_capability, self.precision,
            str(self._torch.version.cuda or ""),
        )
        try:
            timing = config.create_timing_cache(self.cache.load_timing(timing_path))
        except Exception:  # an unreadable cache file: start from an empty one
            timing = None
        if timing is None:
            log.warning("tensorrt: timing cache %s is unreadable; starting a new one",
                        timing_path)
            timing = config.create_timing_cache(b"")
        config.set_timing_cache(timing, False)
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, *shapes.input_shapes())
        if config.add_optimization_profile(profile) < 0:
            raise ModelError(f"TensorRT rejects the optimisation profile {shapes} for input "
                             f"{input_name!r} of {card.onnx_path}")
        log.info("tensorrt: building an engine for %s (%s, profile %s..%s); this takes a "
                 "while the first time", card.name, self.precision, shapes.min_shape,
                 shapes.max_shape)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ModelError(f"TensorRT could not build an engine for {card.onnx_path}; see "
                             "the tensorrt log messages (LIVEMASK_LOG_LEVEL=DEBUG)")
        self.cache.store_timing(timing_path, bytes(config.get_timing_cache().serialize()))
        return bytes(serialized)

    def _setup(self, card: ModelCard) -> None:
        """Execution context, stream, and device/pinned buffers for the profile's max shape."""
        trt, torch = self._trt, self._torch
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:  # every output would need a buffer
            raise ModelError(f"engine for {card.name} has inputs {inputs} and outputs "
                             f"{outputs}; the TensorRT backend runs models with one of each: "
                             "re-export with only the probability output, or use "
                             "model.backend: onnxruntime")
        if self._kept_output and outputs[0] != self._kept_output:
            raise ModelError(f"the engine {self.cache.engine_path(self.engine_key or '')} for "
                             f"{card.name} computes output {outputs[0]!r}, not "
                             f"{self._kept_output!r} (the card's output_name): delete that "
                             "file so that the engine is built again")
        self._input, self._output = inputs[0], outputs[0]
        context = engine.create_execution_context()
        if context is None:
            raise ModelError("TensorRT could not create an execution context (GPU memory?)")
        max_in = self._loaded_profile().input_shapes()[2]
        if not context.set_input_shape(self._input, max_in):
            raise ModelError(f"the engine for {card.name} does not accept its profile's "
                             f"largest input {max_in}")
        max_out = tuple(int(d) for d in context.get_tensor_shape(self._output))
        if min(max_out) < 0:
            raise ModelError(f"engine output shape {max_out} is not determined by the input")

        def torch_dtype(name: str) -> Any:
            np_type = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            return torch.from_numpy(np.empty(0, dtype=np_type)).dtype

        dev = torch.device("cuda", self.device_index)
        self._dev_in = torch.empty(math.prod(max_in), dtype=torch_dtype(self._input), device=dev)
        self._dev_out = torch.empty(math.prod(max_out), dtype=torch_dtype(self._output),
                                    device=dev)
        self._host_in = torch.empty(math.prod(max_in), dtype=torch.float32, pin_memory=True)
        self._host_out = torch.empty(math.prod(max_out), dtype=torch.float32, pin_memory=True)
        context.set_tensor_address(self._input, self._dev_in.data_ptr())
        context.set_tensor_address(self._output, self._dev_out.data_ptr())
        self._context = context
        self._stream = torch.cuda.Stream(device=dev)
        self._last_shape = max_in

    def warmup(self, shape: tuple[int, int]) -> None:
        """Run once on zeros of ``shape``, padded and clamped into the profile
        (:meth:`EngineProfile.warmup_shape`: a larger frame is run as tiles)."""
        h, w = self._loaded_profile().warmup_shape(shape, self._size_multiple)
        self.run(np.zeros((1, 1, h, w), dtype=np.float32))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, 1, H, W) float32 → (N, C, H, W) float32; batches above the profile are split."""
        if self._context is None:
            raise ModelError("backend used before load(); call load(card) first")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected a (N, 1, H, W) batch, got shape {x.shape}")
        n, _, h, w = x.shape
        profile = self._loaded_profile()
        if not profile.fits(h, w):
            lo, hi = profile.min_shape, profile.max_shape
            raise ModelError(
                f"a {h}×{w} frame is outside the TensorRT profile ({lo[1]}×{lo[2]} to "
                f"{hi[1]}×{hi[2]}); tile the frame or build the engine with a larger profile"
            )
        step = profile.max_shape[0]
        if n <= step:
            return self._run_chunk(x)
        return np.concatenate([self._run_chunk(x[i:i + step]) for i in range(0, n, step)])

    def _run_chunk(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        assert self._dev_in is not None and self._dev_out is not None
        assert self._host_in is not None and self._host_out is not None
        shape = tuple(int(s) for s in x.shape)
        n_in = x.size
        host_in = self._host_in[:n_in].view(shape)
        host_in.numpy()[...] = x
        profile = self._loaded_profile()
        with torch.cuda.device(self.device_index), torch.cuda.stream(self._stream):
            try:
                self._dev_in[:n_in].view(shape).copy_(host_in, non_blocking=True)
                if shape != self._last_shape:
                    if not self._context.set_input_shape(self._input, shape):
                        self._last_shape = None
                        raise ModelError(f"TensorRT rejects input shape {shape} (profile "
                                         f"{profile.min_shape}..{profile.max_shape})")
                    self._last_shape = shape
                out_shape = tuple(int(d) for d in self._context.get_tensor_shape(self._output))
                if not self._context.execute_async_v3(self._stream.cuda_stream):
                    raise ModelError("TensorRT execution failed; see the tensorrt log messages")
                n_out = math.prod(out_shape)
                host_out = self._host_out[:n_out].view(out_shape)
                host_out.copy_(self._dev_out[:n_out].view(out_shape), non_blocking=True)
            finally:  # also on errors: the queued copy reads the pinned buffer reused next call
                self._stream.synchronize()
        # A copy: the pinned buffer is reused by the next call.
        return np.array(host_out.numpy(), copy=True)

    def close(self) -> None:
        """Release the context, engine, runtime and buffers (the shared logger stays)."""
        self._context = None
        self._engine = None
        self._runtime = None
        self._stream = None
        self._dev_in = self._dev_out = self._host_in = self._host_out = None
        self._last_shape = None
