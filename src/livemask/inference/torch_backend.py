"""PyTorch backend: the shipped ONNX U-Net's weights in ``livemask.training.unet.UNet``.

The shipped models are ONNX files only, so :func:`unet_from_onnx` reads the ONNX initializers
(``onnx``) and loads them into the same ``UNet`` class that training uses, plus the final
sigmoid (``ProbabilityModel``). The architecture (levels, channel counts, output channels) is
read from the initializer shapes, checked against the graph's operators and against the
card's ``architecture`` text, and finally the converted network is run next to ONNX Runtime on
a small random input, of the model's fixed size where its ONNX declares one
(:func:`verify_against_onnxruntime`; fp16 models get an fp16 tolerance): a model that does
not convert exactly is refused with :class:`~livemask.errors.ModelError`, never run wrong.

On CUDA the network runs in fp16 and channels-last. With ``cuda_graphs`` a shape seen a
second time is captured into a CUDA graph and replayed from then on (up to ``max_graphs``
shapes, least recently used dropped first); a shape seen once runs eagerly. Requires the
``torch`` extra (``pip install 'livemask[torch]'``, in a checkout ``pip install -e
'.[torch]'``; a CUDA build of torch for ``device="cuda"``).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from livemask.errors import BackendUnavailable, ModelError
from livemask.inference.model_checks import (
    Dim,
    ModelIO,
    check_onnx_model,
    io_from_session,
)
from livemask.inference.models import ModelCard

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("livemask")

#: ONNX operators of a U-Net exported by ``livemask.training.train.export_onnx``.
_UNET_OPS = frozenset(
    {"Conv", "Relu", "MaxPool", "ConvTranspose", "Concat", "Sigmoid", "BatchNormalization"}
)


def import_torch() -> ModuleType:
    """``import torch``, or BackendUnavailable saying what to install."""
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(
            f"the torch backend needs PyTorch ({exc}); install it with "
            "pip install 'livemask[torch]' (in a checkout: pip install -e '.[torch]') or set "
            "model.backend: auto"
        ) from None
    return torch


# --------------------------------------------------------------------------- conversion


def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _channels_from_card(architecture: str) -> tuple[int, ...] | None:
    """``8/16/32/64`` in the card's architecture text, if it names the channels."""
    m = re.search(r"(\d+(?:\s*/\s*\d+)+)\s*channels", architecture)
    if m is None:
        return None
    return tuple(int(c) for c in m.group(1).split("/"))


def unet_from_onnx(path: str | Path, card: ModelCard | None = None) -> nn.Module:
    """The ONNX U-Net at ``path`` as a torch ``ProbabilityModel`` (CPU, fp32, eval mode).

    Works for graphs exported from ``livemask.training.unet.UNet`` with batch norm folded
    into the convolutions (the default ``torch.onnx.export``) or kept as BatchNormalization
    nodes. Raises ModelError when the graph is not such a U-Net.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise BackendUnavailable(
            f"the torch backend reads ONNX weights with the onnx package ({exc}); "
            "install it with pip install 'livemask[torch]' (in a checkout: pip install -e "
            "'.[torch]')"
        ) from None
    torch = import_torch()
    from torch import nn

    from livemask.training.unet import ProbabilityModel, UNet

    name = card.name if card is not None else str(path)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelError(f"cannot read ONNX model {path}: {exc}") from None
    graph = model.graph
    if card is not None and card.architecture and "u-net" not in card.architecture.lower():
        raise ModelError(
            f"model {name!r} is a {card.architecture!r}; the torch backend runs livemask "
            "U-Nets only: set model.backend: onnxruntime (or tensorrt)"
        )
    ops = [n.op_type for n in graph.node]
    unknown = sorted(set(ops) - _UNET_OPS)
    if unknown:
        raise ModelError(
            f"model {name!r} uses ONNX operators {unknown} that a livemask U-Net does not "
            "have; run it with model.backend: onnxruntime (or tensorrt)"
        )
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    def w(node: Any, i: int) -> np.ndarray | None:
        if len(node.input) <= i or not node.input[i]:
            return None
        if node.input[i] not in weights:
            raise ModelError(f"model {name!r}: {node.op_type} input {node.input[i]!r} is "
                             "not a constant; not a plain U-Net export")
        return np.array(weights[node.input[i]], dtype=np.float32)  # a writable copy

    convs = [n for n in graph.node if n.op_type == "Conv"]
    upconvs = [n for n in graph.node if n.op_type == "ConvTranspose"]
    norms = [n for n in graph.node if n.op_type == "BatchNormalization"]
    levels = len(upconvs) + 1
    n_block_convs = 2 * levels + 2 * (levels - 1)
    if len(convs) != n_block_convs + 1 or ops.count("MaxPool") != levels - 1 or (
        ops.count("Sigmoid") != 1 or graph.node[-1].op_type != "Sigmoid"
    ):
        raise ModelError(
            f"model {name!r}: {len(convs)} Conv, {len(upconvs)} ConvTranspose, "
            f"{ops.count('MaxPool')} MaxPool nodes do not form a livemask U-Net ending in a "
            "Sigmoid; run it with model.backend: onnxruntime"
        )
    if norms and len(norms) != n_block_convs:
        raise ModelError(f"model {name!r}: {len(norms)} BatchNormalization nodes for "
                         f"{n_block_convs} convolutions; not a livemask U-Net")
    first = [w(c, 1) for c in convs]
    channels = tuple(int(first[2 * i].shape[0]) for i in range(levels))  # type: ignore[union-attr]
    head_w = first[-1]
    assert head_w is not None
    out_channels = int(head_w.shape[0])
    from_card = _channels_from_card(card.architecture) if card is not None else None
    if from_card is not None and from_card != channels:
        raise ModelError(
            f"model {name!r}: the card says {'/'.join(map(str, from_card))} channels, the "
            f"ONNX weights have {'/'.join(map(str, channels))}; fix the card's architecture"
        )
    if card is not None and card.outputs and len(card.outputs) != out_channels:
        raise ModelError(f"model {name!r}: the card lists {len(card.outputs)} outputs "
                         f"({card.outputs}), the network has {out_channels}")
    for c in convs[:-1]:
        if list(_attr(c, "kernel_shape", [])) != [3, 3] or list(_attr(c, "pads", [])) != [1] * 4:
            raise ModelError(f"model {name!r}: U-Net convolutions must be 3×3 with padding 1")
    for u in upconvs:
        if list(_attr(u, "kernel_shape", [])) != [2, 2] or list(_attr(u, "strides", [])) != [2, 2]:
            raise ModelError(f"model {name!r}: U-Net up-convolutions must be 2×2, stride 2")

    net = UNet(channels, out_channels=out_channels)
    block_convs: list[tuple[Any, int]] = [
        (block, j) for block in [*net.down, *net.up] for j in (0, 3)
    ]
    with torch.no_grad():
        for k, ((block, j), node) in enumerate(zip(block_convs, convs[:-1], strict=True)):
            weight, bias = first[k], w(node, 2)
            conv = block[j]
            assert weight is not None and isinstance(conv, nn.Conv2d)
            if tuple(weight.shape) != tuple(conv.weight.shape):
                raise ModelError(f"model {name!r}: convolution {k} has weights "
                                 f"{weight.shape}, the U-Net expects {tuple(conv.weight.shape)}")
            if norms:
                conv.weight.copy_(torch.from_numpy(weight))
                bn = block[j + 1]
                assert isinstance(bn, nn.BatchNorm2d)
                scale, b, mean, var = (w(norms[k], i) for i in range(1, 5))
                bn.weight.copy_(torch.from_numpy(scale))
                bn.bias.copy_(torch.from_numpy(b))
                bn.running_mean.copy_(torch.from_numpy(mean))  # type: ignore[union-attr]
                bn.running_var.copy_(torch.from_numpy(var))  # type: ignore[union-attr]
                bn.eps = float(_attr(norms[k], "epsilon", 1e-5))
                if bias is not None:
                    raise ModelError(f"model {name!r}: convolution {k} has a bias and a "
                                     "batch norm; not a livemask U-Net")
            else:
                # Batch norm folded into the convolution at export: conv with bias, no norm.
                folded = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=True)
                folded.weight.copy_(torch.from_numpy(weight))
                assert folded.bias is not None
                folded.bias.copy_(torch.from_numpy(bias if bias is not None
                                                   else np.zeros(conv.out_channels, np.float32)))
                block[j] = folded
                block[j + 1] = nn.Identity()
        for up, node in zip(net.upconv, upconvs, strict=True):
            weight, bias = w(node, 1), w(node, 2)
            assert isinstance(up, nn.ConvTranspose2d) and weight is not None
            if tuple(weight.shape) != tuple(up.weight.shape):
                raise ModelError(f"model {name!r}: up-convolution weights {weight.shape}, "
                                 f"the U-Net expects {tuple(up.weight.shape)}")
            up.weight.copy_(torch.from_numpy(weight))
            assert up.bias is not None
            up.bias.copy_(torch.from_numpy(bias if bias is not None
                                           else np.zeros(up.out_channels, np.float32)))
        head_b = w(convs[-1], 2)
        if tuple(head_w.shape) != tuple(net.head.weight.shape):
            raise ModelError(f"model {name!r}: head weights {head_w.shape}, expected "
                             f"{tuple(net.head.weight.shape)}")
        net.head.weight.copy_(torch.from_numpy(head_w))
        assert net.head.bias is not None
        net.head.bias.copy_(torch.from_numpy(head_b if head_b is not None
                                             else np.zeros(out_channels, np.float32)))
    return ProbabilityModel(net).eval()


#: Largest difference allowed between the converted module (fp32) and ONNX Runtime on an
#: fp32 model: rounding in a different order of operations only.
FP32_ATOL = 1e-4
#: The same for a model whose input or weights are fp16. fp16 keeps 11 significant bits
#: (rounding step 4.9e-4 just below 1), so ONNX Runtime's fp16 output alone is off by up to
#: 2.4e-4, and a runtime that also keeps activations in fp16 rounds again after each of the
#: U-Net's ~20 layers. The output is sigmoid probabilities in [0, 1], so 1e-2 is 1% of its
#: range: far above fp16 rounding, far below what a wrong conversion gives (0.1 to 1).
FP16_ATOL = 1e-2


def _check_input_shape(declared: tuple[Dim, ...] | None, size: int,
                       size_multiple: int) -> tuple[int, int, int, int]:
    """The (N, 1, H, W) test input: the model's fixed batch, height and width where it
    declares them, else a batch of 1 and ``size`` rounded up to ``size_multiple``."""
    m = max(1, size_multiple)
    free = (1, 1, -(-size // m) * m, -(-size // m) * m)
    if declared is None or len(declared) != 4:
        return free
    n, _, h, w = (d if isinstance(d, int) and d > 0 else f
                  for d, f in zip(declared, free, strict=True))
    return int(n), 1, int(h), int(w)


def _is_fp16(onnx_path: str | Path, input_dtype: str) -> bool:
    """Whether the ONNX model takes fp16 input or keeps fp16 weights."""
    if input_dtype == "float16":
        return True
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # DecodeError and friends: ONNX Runtime read it, so take it as fp32
        return False
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def _ort_session(onnx_path: str | Path) -> Any:
    """A one-thread CPU ONNX Runtime session, or ModelError naming what to do."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(str(onnx_path), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"{onnx_path}: ONNX Runtime cannot load the model to check the torch "
                         f"conversion ({exc}); fix the model file") from None


def verify_against_onnxruntime(
    module: nn.Module, onnx_path: str | Path, *, size: int = 64, atol: float | None = None,
    seed: int = 0, output: str | None = None, size_multiple: int = 1,
) -> float:
    """Run ``module`` (CPU, fp32) and ONNX Runtime on one random input; the max difference.

    The input has the model's fixed batch, height and width where its ONNX declares them,
    else a batch of 1 and ``size`` rounded up to ``size_multiple``. ``output`` names the
    ONNX output compared (the card's ``output_name``; None: the first). ``atol`` defaults
    to :data:`FP32_ATOL`, or :data:`FP16_ATOL` when the model's input or weights are fp16
    (the module then gets the same fp16-rounded input as ONNX Runtime).

    Raises ModelError when the difference exceeds ``atol`` or ONNX Runtime cannot run it.
    """
    torch = import_torch()
    session = _ort_session(onnx_path)
    spec = io_from_session(session).inputs[0]
    shape = _check_input_shape(spec.shape, size, size_multiple)
    x = np.random.default_rng(seed).random(shape, dtype=np.float32)
    fp16 = _is_fp16(onnx_path, spec.dtype)
    x_in = x.astype(np.float16) if spec.dtype == "float16" else x
    x = np.asarray(x_in, dtype=np.float32)  # the module sees what ONNX Runtime sees
    names = [o.name for o in session.get_outputs()]
    name = output if output in names else names[0]
    try:
        result = session.run([name], {spec.name: x_in})[0]
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(
            f"{onnx_path}: ONNX Runtime cannot run the model on a {shape} test input to check "
            f"the torch conversion ({exc}); fix the model (or its card's size_multiple), or "
            "run it with model.backend: onnxruntime"
        ) from None
    expected = np.asarray(result, dtype=np.float32)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    if got.shape != np.shape(expected):
        raise ModelError(f"{onnx_path}: torch output {got.shape} but ONNX output "
                         f"{np.shape(expected)}")
    diff = float(np.max(np.abs(got - expected)))
    limit = atol if atol is not None else FP16_ATOL if fp16 else FP32_ATOL
    if not diff <= limit:
        kind = "an fp16" if fp16 else "an fp32"
        raise ModelError(f"{onnx_path}: the torch conversion differs from ONNX Runtime by "
                         f"{diff:.2e} (> {limit:.0e}, allowed for {kind} model); use "
                         "model.backend: onnxruntime")
    return diff


# --------------------------------------------------------------------------- CUDA graphs


class GraphPolicy:
    """Decides, per input shape, whether to run eagerly, capture a CUDA graph or replay one.

    A shape is captured the second time it is seen (so one-off shapes never pay for a
    capture) and replayed after that. At most ``max_graphs`` graphs are kept; the least
    recently used is dropped first, once a new capture has succeeded (:meth:`captured` names
    it so the caller frees it). A shape whose capture failed runs eagerly from then on.
    """

    def __init__(self, max_graphs: int = 4) -> None:
        if max_graphs < 1:
            raise ValueError("max_graphs must be at least 1")
        self.max_graphs = max_graphs
        self._seen: set[tuple[int, ...]] = set()
        self._failed: set[tuple[int, ...]] = set()
        self._graphs: OrderedDict[tuple[int, ...], None] = OrderedDict()

    def decide(self, shape: tuple[int, ...]) -> Literal["eager", "capture", "replay"]:
        """The action for ``shape``; after "capture" call :meth:`captured` or :meth:`forget`."""
        if shape in self._graphs:
            self._graphs.move_to_end(shape)
            return "replay"
        if shape in self._failed:
            return "eager"
        if shape not in self._seen:
            self._seen.add(shape)
            return "eager"
        return "capture"

    def captured(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """Record ``shape``'s graph; the shape whose graph to drop now (or None)."""
        evict = None
        if len(self._graphs) >= self.max_graphs:
            evict, _ = self._graphs.popitem(last=False)
        self._graphs[shape] = None
        return evict

    def forget(self, shape: tuple[int, ...]) -> None:
        """``shape``'s capture failed: it runs eagerly from now on (no capture per frame)."""
        self._graphs.pop(shape, None)
        self._failed.add(shape)

    def clear(self) -> None:
        self._seen.clear()
        self._failed.clear()
        self._graphs.clear()


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    static_in: torch.Tensor
    static_out: torch.Tensor
    host_in: torch.Tensor  # pinned
    host_out: torch.Tensor  # pinned


# --------------------------------------------------------------------------- backend


class TorchBackend:
    """Runs the card's ONNX U-Net as a torch module: CUDA, fp16, channels-last, CUDA graphs.

    ``device="cpu"`` runs in fp32 (``fp16`` only applies on CUDA): that is how the weight
    conversion is tested on machines without a GPU.
    """

    name = "torch"

    def __init__(
        self,
        threads: int = 2,
        *,
        device: str = "cuda",
        fp16: bool = True,
        channels_last: bool = True,
        cuda_graphs: bool = True,
        max_graphs: int = 4,
        verify: bool = True,
    ) -> None:
        self._torch = import_torch()
        torch = self._torch
        self._dev = torch.device(device)
        if self._dev.type == "cuda" and not torch.cuda.is_available():
            build = (f"CUDA {torch.version.cuda}" if torch.version.cuda
                     else "a CPU-only build")
            raise BackendUnavailable(
                f"the torch backend needs a CUDA GPU, but torch {torch.__version__} ({build}) "
                "sees none; install a CUDA build of torch on a machine with an NVIDIA GPU, "
                "or set model.backend: auto"
            )
        if self._dev.type not in ("cuda", "cpu"):
            raise BackendUnavailable(f"torch backend device {device!r}: use 'cuda' or 'cpu'")
        self.threads = threads
        self.device = self._dev.type
        self.device_name = "cpu"
        self.fp16 = fp16 and self._dev.type == "cuda"
        self.channels_last = channels_last
        self.cuda_graphs = cuda_graphs and self._dev.type == "cuda"
        self.verify = verify
        self.max_difference: float | None = None
        self._policy = GraphPolicy(max_graphs)
        self._graphs: dict[tuple[int, ...], _Graph] = {}
        self._module: nn.Module | None = None
        #: None: the network is rebuilt from the ONNX weights and runs any batch and size,
        #: whatever fixed sizes the ONNX declares (checked against the card at load only).
        self.model_io: ModelIO | None = None

    @property
    def _memory_format(self) -> torch.memory_format:
        t = self._torch
        return t.channels_last if self.channels_last else t.contiguous_format

    def load(self, card: ModelCard) -> None:
        """Convert the card's ONNX weights, verify them against ONNX Runtime, move to device."""
        torch = self._torch
        check_onnx_model(card)  # dtype, rank, channels vs the card
        module = unet_from_onnx(card.onnx_path, card)
        if self.verify:
            self.max_difference = verify_against_onnxruntime(
                module, card.onnx_path, output=card.output_name,
                size_multiple=card.size_multiple)
        dtype = torch.float16 if self.fp16 else torch.float32
        module = module.to(device=self._dev, dtype=dtype)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if self._dev.type == "cpu" and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # process-wide, like the CPU backend's threads
        if self._dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
            index = self._dev.index if self._dev.index is not None else torch.cuda.current_device()
            self.device_name = torch.cuda.get_device_name(index)
        self._module = module
        self._policy.clear()
        self._graphs.clear()
        log.info(
            "torch: %s on %s (%s)%s%s%s",
            card.name,
            self._dev,
            self.device_name,
            ", fp16" if self.fp16 else ", fp32",
            ", channels-last" if self.channels_last else "",
            ", CUDA graphs" if self.cuda_graphs else "",
        )

    def warmup(self, shape: tuple[int, int]) -> None:
        """Run twice on zeros: the second run captures the CUDA graph for this shape."""
        x = np.zeros((1, 1, *shape), dtype=np.float32)
        self.run(x)
        if self.cuda_graphs:
            self.run(x)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, 1, H, W) float32 → (N, C, H, W) float32 probabilities."""
        if self._module is None:
            raise ModelError("backend used before load(); call load(card) first")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected a (N, 1, H, W) batch, got shape {x.shape}")
        if self._dev.type != "cuda":
            return self._eager(x)
        # Executor threads start on device 0: make ours current for copies and replays.
        with self._torch.cuda.device(self._dev):
            return self._run_cuda(x) if self.cuda_graphs else self._eager(x)

    @property
    def torch_device(self) -> torch.device:
        """The torch device the model runs on."""
        return self._dev

    def run_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) float32 tensor on the device → (N, C, H, W) float32 tensor there.

        The device-resident path (no host copies): a new tensor each call, so the caller may
        keep it while the next frame runs. CUDA graphs as in :meth:`run`.
        """
        torch = self._torch
        if self._module is None:
            raise ModelError("backend used before load(); call load(card) first")
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected a (N, 1, H, W) batch, got shape {tuple(x.shape)}")
        g = self._graph_for(tuple(int(s) for s in x.shape)) if self.cuda_graphs else None
        with torch.inference_mode():
            if g is None:
                dtype = torch.float16 if self.fp16 else torch.float32
                t = x.to(dtype).contiguous(memory_format=self._memory_format)
                return self._module(t).float().contiguous()
            g.static_in.copy_(x)
            g.graph.replay()
            return g.static_out.clone()

    def _run_cuda(self, x: np.ndarray) -> np.ndarray:
        g = self._graph_for(tuple(int(s) for s in x.shape))
        return self._eager(x) if g is None else self._replay(g, x)

    def _graph_for(self, shape: tuple[int, ...]) -> _Graph | None:
        """The CUDA graph to replay for ``shape`` (captured now if its turn came), or None
        to run eagerly (first sight of a shape, or a failed capture)."""
        action = self._policy.decide(shape)
        if action == "eager":
            return None
        if action == "capture":
            try:
                graph = self._capture(shape)
            except RuntimeError as exc:  # capture can fail (memory, unsupported op)
                log.warning("torch: CUDA graph capture for %s failed (%s); this shape runs "
                            "eagerly from now on", shape, exc)
                self._policy.forget(shape)
                return None
            evict = self._policy.captured(shape)
            if evict is not None:
                self._graphs.pop(evict, None)
            self._graphs[shape] = graph
        return self._graphs[shape]

    def _eager(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        assert self._module is not None
        dtype = torch.float16 if self.fp16 else torch.float32
        if not x.flags.writeable:
            x = x.copy()  # torch.from_numpy wants a writable array
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self._dev, non_blocking=False)
            t = t.to(dtype).contiguous(memory_format=self._memory_format)
            out = self._module(t).float().contiguous()
            result: np.ndarray = out.cpu().numpy()
        return result

    def _capture(self, shape: tuple[int, ...]) -> _Graph:
        torch = self._torch
        assert self._module is not None
        dtype = torch.float16 if self.fp16 else torch.float32
        with torch.no_grad():
            static_in = torch.zeros(shape, device=self._dev, dtype=dtype).contiguous(
                memory_format=self._memory_format
            )
            # Warm up on a side stream first (cuDNN autotuning, lazy initialisation), as the
            # CUDA graphs documentation asks, then capture.
            side = torch.cuda.Stream(device=self._dev)
            side.wait_stream(torch.cuda.current_stream(self._dev))
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._module(static_in)
            torch.cuda.current_stream(self._dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the analysis thread may use CUDA while this one captures
            # ("global", the default, errors on actions in other threads)
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = self._module(static_in).float().contiguous()
        host_in = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        host_out = torch.empty(tuple(static_out.shape), dtype=torch.float32, pin_memory=True)
        log.debug("torch: captured a CUDA graph for %s", shape)
        return _Graph(graph, static_in, static_out, host_in, host_out)

    def _replay(self, g: _Graph, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            g.host_in.numpy()[...] = x
            g.static_in.copy_(g.host_in, non_blocking=True)
            g.graph.replay()
            g.host_out.copy_(g.static_out, non_blocking=True)
            torch.cuda.current_stream(self._dev).synchronize()
        # A copy: the pinned buffer is overwritten by the next replay.
        return np.array(g.host_out.numpy(), copy=True)

    def close(self) -> None:
        """Drop the module, the graphs and their memory."""
        self._graphs.clear()
        self._policy.clear()
        self._module = None
        if self._dev.type == "cuda":
            self._torch.cuda.empty_cache()
