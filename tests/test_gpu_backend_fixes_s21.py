"""The torch backend's load-time check against ONNX Runtime (GPU review, session 21): models
with a fixed input size, ONNX Runtime failures during the check, and fp16 models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livemask.errors import ModelError
from livemask.inference.models import ModelCard, load_model_card

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, numpy_helper  # noqa: E402

from livemask.inference.tensorrt_backend import onnx_to_fp16  # noqa: E402
from livemask.inference.torch_backend import (  # noqa: E402
    FP16_ATOL,
    TorchBackend,
    unet_from_onnx,
    verify_against_onnxruntime,
)


def _nuclei_as(tmp_path: Path, model: Any, name: str) -> ModelCard:
    """The nuclei card for ``model`` saved as ``tmp_path/name``."""
    onnx.save(model, tmp_path / name)
    card = load_model_card("nuclei").model_copy(update={"file": name})
    card.card_path = tmp_path / f"{Path(name).stem}.yaml"
    return card


def _nuclei_onnx() -> Any:
    return onnx.load(str(load_model_card("nuclei").onnx_path))


def _fixed_size(model: Any, side: int) -> Any:
    """``model`` with its input and output declared (1, C, side, side)."""
    for vi in (*model.graph.input, *model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        dims[0].dim_value, dims[2].dim_value, dims[3].dim_value = 1, side, side
    return model


def _all_fp16(model: Any) -> Any:
    """``model`` with fp16 weights, input, output and intermediate types."""
    graph = model.graph
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            half = numpy_helper.to_array(init).astype(np.float16)
            init.CopyFrom(numpy_helper.from_array(half, init.name))
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def test_a_unet_with_a_fixed_input_size_loads(tmp_path: Path) -> None:
    """Before: the check always ran ONNX Runtime on 64×64, which a model declaring
    (1, 1, 96, 96) rejects with a raw INVALID_ARGUMENT error."""
    card = _nuclei_as(tmp_path, _fixed_size(_nuclei_onnx(), 96), "fixed.onnx")
    backend = TorchBackend(threads=1, device="cpu")
    backend.load(card)
    assert backend.max_difference is not None and backend.max_difference < 1e-4
    assert backend.run(np.zeros((1, 1, 96, 96), np.float32)).shape == (1, 2, 96, 96)


def test_onnx_runtime_failures_in_the_check_are_model_errors(tmp_path: Path) -> None:
    """Before: an input ONNX Runtime cannot run (36 px through three 2× poolings) or a file
    it cannot load escaped as onnxruntime's own exceptions."""
    path = load_model_card("nuclei").onnx_path
    module = unet_from_onnx(path)
    with pytest.raises(ModelError, match=r"cannot run the model on a \(1, 1, 36, 36\) test "
                                         r"input.*model\.backend: onnxruntime"):
        verify_against_onnxruntime(module, path, size=36, output="probabilities")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match=r"cannot load the model.*fix the model file"):
        verify_against_onnxruntime(module, bad)
    # the size is rounded up to the card's size_multiple: 40 px runs
    diff = verify_against_onnxruntime(module, path, size=36, size_multiple=8,
                                      output="probabilities")
    assert diff < 1e-4


def test_an_all_fp16_unet_loads_with_an_fp16_tolerance(tmp_path: Path) -> None:
    """Before: an fp16 ONNX U-Net, converted exactly, was refused because ONNX Runtime's
    fp16 output differs from the fp32 module by more than the fp32 tolerance 1e-4."""
    card = _nuclei_as(tmp_path, _all_fp16(_nuclei_onnx()), "fp16.onnx")
    backend = TorchBackend(threads=1, device="cpu")
    backend.load(card)
    assert backend.max_difference is not None and backend.max_difference <= FP16_ATOL


def test_fp16_weights_behind_an_fp32_input_get_the_fp16_tolerance(tmp_path: Path) -> None:
    """The tolerance follows fp16 weights too (fp32 input cast to fp16, as onnx_to_fp16
    writes for TensorRT 11), checked against the fp32 module of the same network."""
    path = load_model_card("nuclei").onnx_path
    half = tmp_path / "half.onnx"
    half.write_bytes(onnx_to_fp16(path.read_bytes()))
    module = unet_from_onnx(path)
    assert verify_against_onnxruntime(module, half, output="probabilities") <= FP16_ATOL


def test_a_wrong_conversion_of_an_fp16_model_is_still_refused(tmp_path: Path) -> None:
    """The fp16 tolerance still catches a wrong conversion, and the message says the
    model is fp16 (before: only the fp32 tolerance, with no word of the precision)."""
    card = _nuclei_as(tmp_path, _all_fp16(_nuclei_onnx()), "fp16.onnx")
    module = unet_from_onnx(card.onnx_path, card)
    with torch.no_grad():
        module.net.head.bias += 1.0  # what a misplaced weight does: far off
    with pytest.raises(ModelError, match=r"differs from ONNX Runtime by .* allowed for an "
                                         r"fp16 model"):
        verify_against_onnxruntime(module, card.onnx_path, output="probabilities")
