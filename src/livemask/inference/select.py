"""Which inference backends can run on this machine, and which one to use.

``auto`` prefers, in order: ``tensorrt`` (TensorRT importable and a CUDA GPU), ``torch``
(a CUDA build of torch and a GPU), ``onnxruntime`` (always: the CPU default, with the CUDA
execution provider when ``onnxruntime-gpu`` is installed); torch comes before TensorRT when
the service labels frames on the GPU (``model.device_analysis``). Each backend it passes over is
logged at INFO with the reason. A backend requested by name that cannot run here raises
:class:`~livemask.errors.BackendUnavailable` naming what to install, or to set
``model.backend: auto``.

The probes are cheap on machines without NVIDIA hardware: they look for the NVIDIA driver
library before importing torch, so a CPU-only service never loads torch just to find no GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from livemask.errors import BackendUnavailable, LivemaskError

if TYPE_CHECKING:
    from livemask.inference.backend import Backend
    from livemask.inference.models import ModelCard

log = logging.getLogger("livemask")

#: Backend names in ``auto``'s order of preference.
BACKEND_NAMES: tuple[str, ...] = ("tensorrt", "torch", "onnxruntime")
#: What ``model.backend`` accepts.
BACKEND_CHOICES: tuple[str, ...] = ("auto", *BACKEND_NAMES)

INSTALL_HINTS: dict[str, str] = {
    "tensorrt": "install TensorRT and a CUDA build of torch with pip install 'livemask[gpu]' "
    "(in a checkout: pip install -e '.[gpu]') on a machine with an NVIDIA GPU and driver",
    "torch": "install a CUDA build of torch with pip install 'livemask[torch]' (in a checkout: "
    "pip install -e '.[torch]') on a machine with an NVIDIA GPU and driver",
    "onnxruntime": "install onnxruntime (or onnxruntime-gpu for its CUDA provider)",
}


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here: ``detail`` is its device, or why it cannot run."""

    name: str
    available: bool
    detail: str


def nvidia_driver() -> tuple[bool, str]:
    """Whether the NVIDIA driver's CUDA library loads (without importing torch)."""
    if sys.platform == "darwin":
        return False, "macOS has no CUDA"
    lib = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(lib)
    except OSError:
        return False, f"no NVIDIA driver ({lib} cannot be loaded)"
    return True, lib


def torch_cuda() -> tuple[bool, str]:
    """Whether torch is installed with CUDA and sees a GPU; else why not."""
    ok, why = nvidia_driver()
    if not ok:
        return False, why
    if importlib.util.find_spec("torch") is None:
        return False, "torch is not installed"
    try:
        import torch
    except Exception as exc:  # a broken install can raise anything
        return False, f"torch does not import ({exc})"
    if not torch.version.cuda:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
    return True, f"cuda: {torch.cuda.get_device_name(0)}"


def probe_tensorrt() -> BackendStatus:
    """TensorRT importable, and torch with a CUDA GPU (the memory/stream provider)."""
    if importlib.util.find_spec("tensorrt") is None:
        return BackendStatus("tensorrt", False, "tensorrt is not installed")
    ok, detail = torch_cuda()
    if not ok:
        return BackendStatus("tensorrt", False, detail)
    try:
        import tensorrt
    except Exception as exc:  # missing libnvinfer and the like
        return BackendStatus("tensorrt", False, f"tensorrt does not import ({exc})")
    return BackendStatus("tensorrt", True, f"TensorRT {tensorrt.__version__} on {detail}")


def probe_torch() -> BackendStatus:
    """torch with a CUDA GPU (the torch backend's CPU mode is for tests, not for auto)."""
    ok, detail = torch_cuda()
    return BackendStatus("torch", ok, detail)


def probe_onnxruntime() -> BackendStatus:
    """ONNX Runtime: always there (a core dependency); says which provider it would use."""
    try:
        import onnxruntime as ort
    except Exception as exc:
        return BackendStatus("onnxruntime", False, f"onnxruntime does not import ({exc})")
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    return BackendStatus("onnxruntime", True, "cuda execution provider" if cuda else "cpu")


#: The probe of each backend (tests replace entries to simulate machines).
PROBES: dict[str, Callable[[], BackendStatus]] = {
    "tensorrt": probe_tensorrt,
    "torch": probe_torch,
    "onnxruntime": probe_onnxruntime,
}


def available_backends() -> dict[str, BackendStatus]:
    """Every backend's status, in ``auto``'s order of preference."""
    return {name: PROBES[name]() for name in BACKEND_NAMES}


def _unknown(name: str) -> BackendUnavailable:
    return BackendUnavailable(
        f"unknown backend {name!r}; set model.backend to one of {', '.join(BACKEND_CHOICES)}"
    )


def _unavailable(status: BackendStatus) -> BackendUnavailable:
    return BackendUnavailable(
        f"backend {status.name!r} cannot run here: {status.detail}; "
        f"{INSTALL_HINTS[status.name]}, or set model.backend: auto"
    )


def candidates(requested: str, *, device_analysis: bool = False) -> list[str]:
    """Backends to try for ``requested``: the one named, or the available ones for ``auto``.

    ``auto`` logs every backend it passes over at INFO with the reason; a named backend that
    cannot run raises BackendUnavailable. With ``device_analysis`` (label and measure on the
    GPU, which only the torch backend can feed), ``auto`` tries torch before TensorRT: on
    TensorRT the frames' labelling runs on the CPU (217 ms against 15 ms on the GPU for a
    2048² frame, docs/performance.md), which costs far more than TensorRT's faster model.
    """
    if requested not in BACKEND_CHOICES:
        raise _unknown(requested)
    if requested != "auto":
        status = PROBES[requested]()
        if not status.available:
            raise _unavailable(status)
        return [requested]
    found = []
    for name in BACKEND_NAMES:
        status = PROBES[name]()
        if status.available:
            found.append(name)
        else:
            log.info("backend auto: %s unavailable (%s)", name, status.detail)
    if not found:
        raise BackendUnavailable(
            f"no inference backend can run here; {INSTALL_HINTS['onnxruntime']}"
        )
    if device_analysis and {"tensorrt", "torch"} <= set(found):
        found.remove("torch")
        found.insert(found.index("tensorrt"), "torch")
        log.info("backend auto: torch before tensorrt: model.device_analysis labels frames "
                 "on the GPU, which only the torch backend feeds (set it to false to prefer "
                 "tensorrt)")
    return found


def choose_backend(requested: str) -> str:
    """The backend ``requested`` resolves to on this machine (see :func:`candidates`)."""
    name = candidates(requested)[0]
    if requested == "auto":
        log.info("backend auto: using %s", name)
    return name


def instantiate(
    name: str, *, threads: int = 2, frame_shape: tuple[int, int] | None = None
) -> Backend:
    """Construct backend ``name`` with its defaults (constructors raise BackendUnavailable);
    ``frame_shape``, the camera's (H, W) where known, sets a TensorRT engine's optimum."""
    if name == "tensorrt":
        from livemask.inference.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(threads=threads, frame_shape=frame_shape)
    if name == "torch":
        from livemask.inference.torch_backend import TorchBackend

        return TorchBackend(threads=threads)
    if name == "onnxruntime":
        from livemask.inference.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(threads=threads)
    raise _unknown(name)


def load_backend(
    requested: str, card: ModelCard, *, threads: int = 2,
    frame_shape: tuple[int, int] | None = None, device_analysis: bool = False,
) -> Backend:
    """Create and load a backend for ``card``; under ``auto``, fall back when one fails.
    ``frame_shape`` is the camera's (H, W) where known (see :func:`instantiate`);
    ``device_analysis``: ``auto`` prefers torch to TensorRT (see :func:`candidates`).

    An ONNX network is first checked against its card
    (:func:`livemask.inference.model_checks.check_onnx_model`): one that does not fit raises
    ModelError whatever the backend.
    A GPU backend can pass its probe and still fail to load (an engine that will not build,
    a model the torch backend cannot convert, no GPU memory, any other exception): with
    ``auto`` that is logged at WARNING with the exception's type and message (and its
    traceback when it is not a livemask error) and the next candidate is tried; a backend
    requested by name, or the last candidate, raises.
    """
    from livemask.inference.backend import create_backend
    from livemask.inference.model_checks import check_onnx_model

    if card.runtime != "onnx":
        own = create_backend(requested, threads=threads, card=card)
        own.load(card)
        return own
    # Once, before any backend: a network that does not fit its card is a ModelError
    # naming the file and what to change, not a fallback through every backend.
    check_onnx_model(card)
    names = candidates(requested, device_analysis=device_analysis)
    for i, name in enumerate(names):
        backend: Backend | None = None
        try:
            backend = instantiate(name, threads=threads, frame_shape=frame_shape)
            backend.load(card)
        except Exception as exc:  # BackendUnavailable, ModelError, CUDA errors, OSError, ...
            if backend is not None:
                with contextlib.suppress(Exception):  # the load's error is the one to report
                    backend.close()
            if requested != "auto" or i == len(names) - 1:
                raise
            # A traceback for the unexpected (a TensorRT API mismatch, say), not for ours.
            log.warning("backend auto: %s failed to load %s (%s: %s); trying %s", name,
                        card.name, type(exc).__name__, exc, names[i + 1],
                        exc_info=not isinstance(exc, LivemaskError))
            continue
        if requested == "auto":
            log.info("backend auto: using %s", name)
        return backend
    raise AssertionError("unreachable")  # pragma: no cover
