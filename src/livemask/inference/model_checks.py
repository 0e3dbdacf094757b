"""Does an ONNX network fit its model card? Checked when it is loaded and on its first runs.

Every backend feeds a ``runtime: onnx`` network the same thing: one float32 batch
(N, 1, H, W) of normalised grey images, H and W padded to the card's ``size_multiple``,
whole frames as N = 1 and frames larger than the card's tile as tiles of at most ``tile_px``
in batches of up to ``max_batch`` (:mod:`livemask.inference.tiling`). It expects back one
(N, C, H, W) float map, C = one channel per name in the card's ``outputs``.

:func:`check_onnx_model` reads the model's declared input and output (with the ``onnx``
package when it is installed, else from an ONNX Runtime session) and
:func:`check_model_io` compares them with that: dtype float32 (or float16, which the
backends convert to), rank 4, 1 input channel, ``len(outputs)`` output channels, and
fixed (non-symbolic) height and width that some frame can actually have, and a fixed batch
only of 1. Symbolic (dynamic) dimensions are accepted. A mismatch raises
:class:`~livemask.errors.ModelError` that names the model file and its card and lists
everything found, what was expected and what to change.
:func:`livemask.inference.select.load_backend` runs it before any backend is tried, and
each ONNX backend's ``load`` runs it again (cached) for direct users.

What a declaration cannot show (symbolic sizes that the network changes, a fixed size that
only some frames have) is caught on the first real run: the :class:`Segmenter` checks each
batch against the model's fixed input dimensions before running it
(:func:`check_batch_input`) and each result's shape after (:func:`check_batch_output`),
starting at its warm-up, which also runs a test image and checks that the output is
probabilities in [0, 1] (:func:`check_output_range`), not logits, and for a tiled frame runs
different test tiles as a batch of each size the frame sends (:func:`batch_error` if one tile
runs but not a batch of them, :func:`batch_dependence_error` if a tile's output in the batch
is not its output alone).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from livemask.errors import ModelError
from livemask.inference.models import METHOD_CHANNELS, ModelCard

log = logging.getLogger("livemask")

__all__ = [
    "BATCH_ONE_FIX",
    "BATCH_TOLERANCE",
    "FLOAT_TYPES",
    "ModelIO",
    "TensorSpec",
    "batch_dependence_error",
    "batch_error",
    "batch_one_hint",
    "channels_needed",
    "check_batch_input",
    "check_batch_output",
    "check_model_io",
    "check_onnx_model",
    "check_output_range",
    "chosen_output",
    "io_from_session",
    "read_model_io",
]

#: A dimension: a fixed size, a symbolic name, or None (unknown).
Dim = int | str | None

#: Element types a network's input and output may have (the backends convert float16).
FLOAT_TYPES = ("float32", "float16")

_AXES = ("batch", "channels", "height", "width")


@dataclass(frozen=True)
class TensorSpec:
    """A declared graph input or output: name, element type (numpy's name, e.g.
    ``float32``) and shape (None when the rank is not declared)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None

    def shape_text(self) -> str:
        """The shape as ``(batch, 1, height, width)``; ``?`` for unknown dimensions."""
        if self.shape is None:
            return "(undeclared shape)"
        return "(" + ", ".join("?" if d is None else str(d) for d in self.shape) + ")"


@dataclass(frozen=True)
class ModelIO:
    """A model's declared graph inputs (initializers left out) and outputs, in order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


# ------------------------------------------------------------------------------- reading
def _dim(d: Any) -> Dim:
    if isinstance(d, int):
        return d if d >= 0 else None
    return str(d) if d else None


def _ort_dtype(text: str) -> str:
    """``tensor(float)`` → ``float32``; non-tensor types are returned as they are."""
    if not (text.startswith("tensor(") and text.endswith(")")):
        return text
    inner = text[len("tensor("):-1]
    return {"float": "float32", "double": "float64"}.get(inner, inner)


def io_from_session(session: Any) -> ModelIO:
    """The inputs and outputs an ``onnxruntime.InferenceSession`` reports.

    ONNX Runtime gives an undeclared rank as ``[]``: taken as unknown, not as a scalar.
    """

    def spec(arg: Any) -> TensorSpec:
        shape = arg.shape
        dims = tuple(_dim(d) for d in shape) if shape else None
        return TensorSpec(str(arg.name), _ort_dtype(str(arg.type)), dims)

    return ModelIO(tuple(spec(a) for a in session.get_inputs()),
                   tuple(spec(a) for a in session.get_outputs()))


def _io_from_onnx(path: str) -> ModelIO | None:
    """The declared inputs/outputs read with the ``onnx`` package; None if it is not
    installed or cannot parse the file (ONNX Runtime then says what is wrong with it)."""
    try:
        import onnx
    except ImportError:
        return None
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # DecodeError and friends: let ONNX Runtime report the file
        return None
    graph = model.graph
    weights = {t.name for t in graph.initializer}

    def dtype(elem: int) -> str:
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).name
        except Exception:
            try:
                return str(onnx.TensorProto.DataType.Name(elem)).lower()
            except ValueError:
                return f"element type {elem}"

    def spec(vi: Any) -> TensorSpec:
        kind = vi.type.WhichOneof("value")
        if kind != "tensor_type":
            return TensorSpec(vi.name, f"{kind or 'undeclared type'} (not a tensor)", None)
        tt = vi.type.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = tuple(
                int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None)
                for d in tt.shape.dim
            )
        return TensorSpec(vi.name, dtype(tt.elem_type), shape)

    return ModelIO(tuple(spec(v) for v in graph.input if v.name not in weights),
                   tuple(spec(v) for v in graph.output))


def _io_from_onnxruntime(path: str) -> ModelIO:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"ONNX Runtime cannot load {path}: {exc}") from None
    return io_from_session(session)


@functools.lru_cache(maxsize=16)
def _read_cached(path: str, mtime_ns: int, size: int) -> ModelIO:
    return _io_from_onnx(path) or _io_from_onnxruntime(path)


def read_model_io(path: str | Path) -> ModelIO:
    """The declared inputs and outputs of the ONNX file at ``path`` (cached per file
    version): with ``onnx`` if installed, else with ONNX Runtime. ModelError if unreadable."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise ModelError(f"cannot read model file {p}: {exc}") from None
    return _read_cached(str(p), st.st_mtime_ns, st.st_size)


# ------------------------------------------------------------------------------- checking
def _where(card: ModelCard) -> str:
    """``model file X (card Y)``."""
    try:
        path = str(card.onnx_path)
    except ModelError:
        path = f"model {card.name!r}"
    else:
        path = f"model file {path}"
    return f"{path} (card {card.card_path})" if card.card_path else f"{path} (model {card.name!r})"


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def channels_needed(method: str) -> tuple[int, str]:
    """Output channels a post-processing ``method`` reads, and their names."""
    return METHOD_CHANNELS.get(method, (1, "probabilities"))


def _channels_last(shape: tuple[Dim, ...], channels: int) -> bool:
    """Whether a rank-4 ``shape`` reads as (N, H, W, C) with C = ``channels``: its last
    axis is fixed at ``channels`` and its second is not."""
    return len(shape) == 4 and shape[3] == channels and shape[1] != channels


def _input_problems(card: ModelCard, io: ModelIO) -> list[str]:
    if not io.inputs:
        return ["it has no input; expected one float32 (N, 1, H, W) image input"]
    problems = []
    if len(io.inputs) > 1:
        names = ", ".join(repr(s.name) for s in io.inputs)
        problems.append(f"it has {len(io.inputs)} inputs ({names}), expected one: livemask "
                        "feeds a single (N, 1, H, W) image batch; re-export with one input")
    spec = io.inputs[0]
    what = f"input {spec.name!r} {spec.shape_text()}"
    if spec.dtype not in FLOAT_TYPES:
        problems.append(f"{what} has dtype {spec.dtype}, expected float32 (or float16): "
                        "livemask feeds float32 images; re-export the model with a float32 input")
    if spec.shape is None:
        return problems
    if len(spec.shape) != 4:
        problems.append(f"{what} has rank {len(spec.shape)}, expected rank 4 (N, 1, H, W): "
                        "re-export the model with a batch and a channel axis")
        return problems
    n, c, h, w = spec.shape
    if _channels_last(spec.shape, 1):  # not "a fixed width 1": an (N, H, W, 1) input
        problems.append(f"{what} is channels-last (N, H, W, C): livemask needs NCHW and feeds "
                        "(N, 1, H, W); transpose it: re-export the model with an (N, 1, H, W) "
                        "input (e.g. a first Transpose with perm [0, 2, 3, 1] to the network's "
                        "(N, H, W, 1))")
        return problems
    if isinstance(c, int) and c != 1:
        problems.append(f"{what} has {_count(c, 'channel')}, expected 1 channel (N, 1, H, W): "
                        "livemask feeds single-channel (grey) images; re-export the model for "
                        "1 input channel")
    if isinstance(n, int) and n != 1:
        problems.append(f"{what} has a fixed batch of {n}, but livemask runs whole frames as a "
                        "batch of 1 (and tiles in batches of up to the card's max_batch "
                        f"{card.max_batch}): re-export the model with a dynamic batch axis (a "
                        "fixed batch of 1 also works, with max_batch: 1 for frames larger "
                        "than the tile)")
    m, t = card.size_multiple, card.tile_side
    bad = [f"{axis} {d}" for axis, d in (("height", h), ("width", w))
           if isinstance(d, int) and (d % m or d > t or d < 1)]
    if bad:
        problems.append(
            f"{what} has a fixed {' and '.join(bad)}, but livemask runs frames padded to a "
            f"multiple of size_multiple {m} and at most the tile ({t} px, from tile_px "
            f"{card.tile_px}), so no frame can have that size: re-export the model with dynamic "
            "height and width (or fix size_multiple/tile_px in the card to fit it)"
        )
    return problems


def chosen_output(card: ModelCard, io: ModelIO) -> TensorSpec | None:
    """The output a backend runs: the one named ``card.output_name``, else the model's only
    output; None when the model has several and none has that name."""
    named = [spec for spec in io.outputs if spec.name == card.output_name]
    if named:
        return named[0]
    return io.outputs[0] if len(io.outputs) == 1 else None


def _output_problems(card: ModelCard, io: ModelIO) -> list[str]:
    if not io.outputs:
        return ["it has no output; expected one (N, C, H, W) probability output"]
    problems = []
    spec = chosen_output(card, io)
    if spec is None and _split_outputs(card, io):
        return [_split_text(card, io)]
    if spec is None:
        names = ", ".join(repr(o.name) for o in io.outputs)
        return [f"it has {len(io.outputs)} outputs ({names}) and none is named "
                f"{card.output_name!r} (the card's output_name): set output_name in the card "
                "to the output with the probabilities"]
    what = f"output {spec.name!r} {spec.shape_text()}"
    if spec.dtype not in FLOAT_TYPES:
        problems.append(f"{what} has dtype {spec.dtype}, expected float32 (or float16) "
                        "probabilities; re-export the model with a float output")
    if spec.shape is None:
        return problems
    if len(spec.shape) != 4:
        problems.append(f"{what} has rank {len(spec.shape)}, expected rank 4 (N, C, H, W): "
                        "one probability map per card output, the size of the input")
        return problems
    c = spec.shape[1]
    want = len(card.outputs)
    if card.outputs and _channels_last(spec.shape, want):
        problems.append(f"{what} is channels-last (N, H, W, C): livemask needs NCHW, "
                        f"(N, {want}, H, W) with one channel per output the card lists "
                        f"({', '.join(card.outputs)}); transpose it: re-export the model with "
                        "a last Transpose with perm [0, 3, 1, 2]")
        return problems
    if isinstance(c, int) and card.outputs and c != want and _split_outputs(card, io):
        problems.append(_split_text(card, io))
    elif isinstance(c, int) and card.outputs and c != want:
        problems.append(f"{what} has {_count(c, 'channel')}, expected {len(card.outputs)}, "
                        f"one per output the card lists ({', '.join(card.outputs)}): fix the "
                        "card's outputs or re-export the model")
    inp = io.inputs[0].shape if io.inputs else None
    if inp is None or len(inp) != 4:
        return problems
    bad = []
    for i in (0, 2, 3):
        d, d_in = spec.shape[i], inp[i]
        if isinstance(d, int) and d != d_in:
            have = str(d_in) if isinstance(d_in, int) else "dynamic"
            bad.append(f"{_AXES[i]} {d} (the input's {_AXES[i]} is {have})")
    if bad:
        problems.append(f"{what} has a fixed {' and '.join(bad)}: the output must have the "
                        "input's batch, height and width; re-export the model with matching "
                        "(dynamic) axes")
    return problems


def _split_outputs(card: ModelCard, io: ModelIO) -> bool:
    """Whether the model has one single-channel (N, 1, H, W) output per card output (e.g.
    foreground and seeds apart), where livemask reads one (N, C, H, W) output."""
    want = len(card.outputs)
    return want > 1 and len(io.outputs) == want and all(
        o.shape is not None and len(o.shape) == 4 and o.shape[1] == 1 for o in io.outputs)


def _split_text(card: ModelCard, io: ModelIO) -> str:
    names = ", ".join(repr(o.name) for o in io.outputs)
    want = len(card.outputs)
    return (f"it has {want} outputs ({names}) of 1 channel each, one per output the card "
            f"lists ({', '.join(card.outputs)}), but livemask runs one output with all the "
            f"channels: concatenate them into one (N, C, H, W) output, (N, {want}, H, W) in "
            f"the order of the card's outputs (a Concat on axis 1), named as the card's "
            f"output_name ({card.output_name!r}), and re-export the model")


def check_model_io(card: ModelCard, io: ModelIO) -> None:
    """Raise ModelError listing every way ``io`` does not fit what livemask feeds a
    ``runtime: onnx`` network of ``card`` and expects back (other runtimes: no check)."""
    if card.runtime != "onnx":
        return
    problems = _input_problems(card, io) + _output_problems(card, io)
    if problems:
        raise ModelError(f"{_where(card)} does not match what livemask runs: "
                         + "; also ".join(problems))


def check_onnx_model(card: ModelCard) -> ModelIO | None:
    """Read and check the card's ONNX network (:func:`check_model_io`); its declared
    inputs and outputs, or None for runtimes other than ``onnx`` (they check their own)."""
    if card.runtime != "onnx":
        return None
    io = read_model_io(card.onnx_path)
    check_model_io(card, io)
    for kind, name, specs in (("input", card.input_name, io.inputs),
                              ("output", card.output_name, io.outputs)):
        if len(specs) == 1 and specs[0].name != name:
            log.warning("%s: the card's %s_name is %r, but the model's only %s is %r; using "
                        "it (set %s_name in the card)", _where(card), kind, name, kind,
                        specs[0].name, kind)
    return io


# ------------------------------------------------------------------------ on a real run
def _frame_text(frame: tuple[int, int] | None) -> str:
    return f" for a {frame[0]}×{frame[1]} frame" if frame is not None else ""


def check_batch_input(
    card: ModelCard, io: ModelIO | None, shape: tuple[int, ...],
    frame: tuple[int, int] | None = None,
) -> None:
    """Before a run: ModelError if the batch ``shape`` does not fit the model's fixed
    input dimensions (symbolic ones fit anything)."""
    if io is None or not io.inputs:
        return
    declared = io.inputs[0].shape
    if declared is None or len(declared) != len(shape):
        return
    bad = [_AXES[i] for i, (d, n) in enumerate(zip(declared, shape, strict=True))
           if isinstance(d, int) and d != n]
    if not bad:
        return
    m, t = card.size_multiple, card.tile_side
    fixes = []
    if "batch" in bad and declared[0] == 1:
        fixes.append("set max_batch: 1 in the card (frames larger than the tile then run one "
                     "tile at a time) or re-export the model with a dynamic batch axis")
    elif "batch" in bad:  # whole frames run as a batch of 1: no card setting fits
        fixes.append("re-export the model with a dynamic batch axis")
    if "height" in bad or "width" in bad:
        fixes.append(_fixed_size_fix(declared, shape))
    elif bad != ["batch"]:
        fixes.append("re-export the model with dynamic height and width axes")
    raise ModelError(
        f"{_where(card)} takes inputs of fixed shape {io.inputs[0].shape_text()}, but "
        f"livemask runs it on a batch of shape {tuple(shape)}{_frame_text(frame)} (another "
        f"{' and '.join(bad)}: frames are padded to a multiple of size_multiple {m}, and "
        f"frames larger than the {t} px tile run as tiles of at most {t} px in batches of up "
        f"to max_batch {card.max_batch}): {'; '.join(fixes)}"
    )


def _fixed_size_fix(declared: tuple[Dim, ...], shape: tuple[int, ...]) -> str:
    """What to do about a fixed input height or width that a batch does not have."""
    fixed = " and ".join(f"{axis} {d}" for axis, d in (("height", declared[2]),
                                                       ("width", declared[3]))
                         if isinstance(d, int))
    return (f"this model has a fixed input {fixed}, but livemask runs frames padded whole or "
            f"as tiles whose size depends on the frame ({shape[2]}×{shape[3]} here; tile_px "
            "sets only the largest tile, so setting it to the model's size does not make "
            "every frame fit): re-export the model with dynamic height and width axes")


#: What to do about a model that runs one tile but not a batch of them.
BATCH_ONE_FIX = ("set max_batch: 1 in the card (frames larger than the tile then run one tile "
                 "at a time), or re-export the model with a real dynamic batch axis (no "
                 "reshape or view to a batch of 1 inside, such as a traced x.view(1, ...))")


def batch_one_hint() -> str:
    """The sentence a backend appends to a failed run of several tiles when the first of
    them runs alone."""
    return f". The first of these tiles runs alone (a batch of 1): {BATCH_ONE_FIX}"


def batch_error(
    card: ModelCard, shape: tuple[int, ...], frame: tuple[int, int] | None, tiles: int,
    cause: Exception,
) -> ModelError:
    """The ModelError for a model that ran a batch of 1 but failed on ``shape`` (a batch
    of several tiles) with ``cause``."""
    reason = str(cause).removesuffix(batch_one_hint())
    return ModelError(
        f"{_where(card)} runs one tile but not a batch of {shape[0]} (a test batch of shape "
        f"{tuple(shape)})"
        f"{_frame_text(frame)}, which runs as {_count(tiles, 'tile')} in batches of up to "
        f"max_batch {card.max_batch}: {BATCH_ONE_FIX}. The batch failed with: {reason}"
    )


#: How far a tile's probabilities in a batch may differ from its probabilities alone. fp16
#: backends (torch CUDA fp16, TensorRT FP16) pick other kernels for other batch sizes and
#: differ by up to ~1e-2 (the torch backend's FP16_ATOL; float32 ONNX Runtime: 0 for the
#: shipped nuclei model). A model that normalises over its batch shifts the first test
#: tile's probabilities by far more (the test tiles' means differ by ~0.4 after
#: normalisation, as an empty and a crowded tile of one frame do): measured ~0.1 for a bare
#: mean over the batch before a Sigmoid, ~0.4 for BatchNorm in training mode. 0.05 is 5x the
#: fp16 noise and half the weakest of those.
BATCH_TOLERANCE = 0.05


def batch_dependence_error(
    card: ModelCard, shape: tuple[int, ...], frame: tuple[int, int] | None, tiles: int,
    difference: float,
) -> ModelError:
    """The ModelError for a model whose output for a test tile in a batch of ``shape``
    differs from its output for the tile alone by up to ``difference``."""
    return ModelError(
        f"{_where(card)} gives a tile other probabilities in a batch of {shape[0]} than alone "
        f"(they differ by up to {difference:.3g}, more than the {BATCH_TOLERANCE:g} allowed, "
        f"in a test batch of shape {tuple(shape)} of different tiles){_frame_text(frame)}, "
        f"which runs as {_count(tiles, 'tile')} in batches of up to max_batch "
        f"{card.max_batch}: the model's output for a tile depends on the other tiles in its "
        "batch (it normalises over the batch, e.g. BatchNorm exported in training mode or a "
        "mean over the batch axis), so tiled frames would get wrong masks. To fix it, set "
        "max_batch: 1 in the card (frames larger than the tile then run one tile at a time), "
        "or re-export the model in eval mode (model.eval() before torch.onnx.export, so that "
        "BatchNorm uses its running statistics)"
    )


def check_batch_output(
    card: ModelCard, out_shape: tuple[int, ...], in_shape: tuple[int, ...],
    method: str | None = None, frame: tuple[int, int] | None = None,
) -> None:
    """After a run: ModelError unless the output is (N, C, H, W) for an (N, 1, H, W) input,
    C = the card's output count (for ONNX networks) and at least what ``method`` (the
    post-processing method, default the card's) reads."""
    out_shape = tuple(int(s) for s in out_shape)
    n, _, h, w = (int(s) for s in in_shape)
    method = method or card.postprocessing.method
    need, names = channels_needed(method)
    want = len(card.outputs) if card.runtime == "onnx" and card.outputs else None
    if len(out_shape) == 4 and out_shape[0] == n and out_shape[2:] == (h, w):
        c = out_shape[1]
        if (want is None or c == want) and c >= need:
            return
    if want is not None:
        expected = (f"expected {(n, want, h, w)}: one channel per output the card lists "
                    f"({', '.join(card.outputs)})")
    else:
        expected = f"expected ({n}, C, {h}, {w})"
    if want is None or want < need:
        expected += f", with at least {need} channels ({names}) for post-processing {method}"
    raise ModelError(
        f"{_where(card)} returned an output of shape {out_shape} for an input of shape "
        f"{tuple(int(s) for s in in_shape)}{_frame_text(frame)}; {expected}. The model does "
        "not compute what its card says: fix the model (its output must keep the input's "
        "batch, height and width) or the card's outputs"
    )


#: How far outside [0, 1] an output may reach (float16 rounding, tile blending).
RANGE_TOLERANCE = 1e-3


def check_output_range(
    card: ModelCard, out: np.ndarray, in_shape: tuple[int, ...],
    frame: tuple[int, int] | None = None,
) -> None:
    """After a run: ModelError unless every output value is a probability, finite and in
    [0, 1] (give or take :data:`RANGE_TOLERANCE`): a network that returns logits would
    otherwise be thresholded at 0.5 as if they were probabilities."""
    lo, hi = float(np.min(out)), float(np.max(out))  # NaN in, NaN out
    if lo >= -RANGE_TOLERANCE and hi <= 1.0 + RANGE_TOLERANCE:
        return
    on = f"on a test input of shape {tuple(int(s) for s in in_shape)}{_frame_text(frame)}"
    bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
    if bad:
        found = f"{_count(bad, 'non-finite value')} (NaN or infinite)"
    else:
        found = f"values from {lo:.4g} to {hi:.4g}"
    raise ModelError(
        f"{_where(card)} returned {found} {on}, but its output must be probabilities in "
        "[0, 1] (post-processing thresholds them, e.g. foreground_threshold "
        f"{card.postprocessing.foreground_threshold:g}). A network that returns logits needs "
        "its activation in the graph: add a Sigmoid (one probability per channel) or a "
        "Softmax over the channels, whichever it was trained with, as the last node and "
        "re-export it"
    )
