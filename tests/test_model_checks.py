"""ONNX models that do not match their card are refused when loaded, with a clear ModelError.

Each test builds a small real ONNX model in ``tmp_path`` (a 1×1 convolution and a sigmoid,
plus the defect) next to a copy of the shipped nuclei card that points at it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from livemask.errors import ModelError
from livemask.inference.models import MODELS_DIR, ModelCard, load_model_card
from livemask.inference.segmenter import Segmenter
from livemask.inference.select import load_backend
from livemask.offline import load_segmenter

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

F32, F16, F64, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64
DYNAMIC: tuple[Any, ...] = ("batch", 1, "height", "width")
DYNAMIC_OUT: tuple[Any, ...] = ("batch", 2, "height", "width")


def build_model(
    path: Path,
    *,
    in_type: int = F32,
    in_shape: tuple[Any, ...] | None = DYNAMIC,
    out_shape: tuple[Any, ...] | None = DYNAMIC_OUT,
    in_channels: int = 1,
    out_channels: int = 2,
    rank3: bool = False,
    pool: bool = False,
    logits_out: bool = False,
) -> Path:
    """A 1×1 convolution + sigmoid from ``image`` to ``probabilities``, with a defect:
    another input type (cast to float inside), a rank-3 input (unsqueezed inside), a 2×2
    max-pool (half the size out), or other declared shapes and channel counts."""
    half = in_type == F16
    ftype = np.float16 if half else np.float32
    nodes, x = [], "image"
    if in_type not in (F32, F16):
        nodes.append(helper.make_node("Cast", [x], ["image_f"], to=F32))
        x = "image_f"
    inits = [
        numpy_helper.from_array(np.full((out_channels, in_channels, 1, 1), 2.0, ftype), "w"),
        numpy_helper.from_array(np.linspace(-1, 1, out_channels).astype(ftype), "b"),
    ]
    if rank3:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
        nodes.append(helper.make_node("Unsqueeze", [x, "axes"], ["image4"]))
        x = "image4"
    nodes.append(helper.make_node("Conv", [x, "w", "b"], ["logits"]))
    y = "logits"
    if pool:
        nodes.append(helper.make_node("MaxPool", [y], ["pooled"], kernel_shape=[2, 2],
                                      strides=[2, 2]))
        y = "pooled"
    nodes.append(helper.make_node("Sigmoid", [y], ["probabilities"]))
    outputs = [helper.make_tensor_value_info("probabilities", F16 if half else F32, out_shape)]
    if logits_out:  # a second output, listed first (e.g. an export that kept the logits)
        outputs.insert(0, helper.make_tensor_value_info(y, F16 if half else F32, out_shape))
    graph = helper.make_graph(nodes, "defect",
                              [helper.make_tensor_value_info("image", in_type, in_shape)],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def write_card(tmp_path: Path, model: str = "bad.onnx", **changes: Any) -> Path:
    """A copy of the shipped nuclei card pointing at ``model`` in ``tmp_path``."""
    card = yaml.safe_load((MODELS_DIR / "nuclei.yaml").read_text())
    card.update(name="bad", file=model, **changes)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def load_error(tmp_path: Path, **model: Any) -> str:
    """The ModelError of loading a model built with ``model``, on ONNX Runtime."""
    build_model(tmp_path / "bad.onnx", **model)
    card = load_model_card(write_card(tmp_path))
    with pytest.raises(ModelError) as info:
        load_backend("onnxruntime", card, threads=1)
    return str(info.value)


def assert_says(message: str, *words: str) -> None:
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


# ------------------------------------------------------------------------ input defects
@pytest.mark.parametrize(("onnx_type", "name"), [(F64, "float64"), (I64, "int64")])
def test_wrong_input_dtype_is_refused_at_load(tmp_path: Path, onnx_type: int, name: str) -> None:
    msg = load_error(tmp_path, in_type=onnx_type)
    assert_says(msg, "bad.onnx", "bad.yaml", "input 'image'", f"dtype {name}", "float32",
                "re-export")


def test_wrong_input_channels_is_refused_at_load(tmp_path: Path) -> None:
    msg = load_error(tmp_path, in_shape=("batch", 3, "height", "width"), in_channels=3)
    assert_says(msg, "bad.onnx", "input 'image'", "3 channels", "expected 1 channel",
                "(N, 1, H, W)")


def test_wrong_input_rank_is_refused_at_load(tmp_path: Path) -> None:
    msg = load_error(tmp_path, in_shape=("batch", "height", "width"), rank3=True)
    assert_says(msg, "bad.onnx", "input 'image'", "rank 3", "expected rank 4", "(N, 1, H, W)")


@pytest.mark.parametrize("size", [100, 2048])
def test_fixed_input_size_that_no_frame_can_have_is_refused_at_load(
    tmp_path: Path, size: int
) -> None:
    # 100: not a multiple of size_multiple (8); 2048: larger than the card's tile (1024)
    msg = load_error(tmp_path, in_shape=("batch", 1, size, size),
                     out_shape=("batch", 2, size, size))
    assert_says(msg, "bad.onnx", f"fixed height {size}", "size_multiple 8", "tile", "1024",
                "dynamic height and width")


def test_fixed_batch_larger_than_max_batch_is_refused_at_load(tmp_path: Path) -> None:
    msg = load_error(tmp_path, in_shape=(8, 1, "height", "width"))
    assert_says(msg, "bad.onnx", "fixed batch of 8", "max_batch 4", "dynamic batch axis")


def test_fixed_batch_other_than_one_is_refused_at_load_even_within_max_batch(
    tmp_path: Path,
) -> None:
    """A fixed batch of 4 (max_batch 4) loaded, then every warm-up refused it with the
    advice 'set max_batch: 1', which cannot fit: whole frames always run as a batch of 1."""
    from livemask.inference.model_checks import check_batch_input, read_model_io

    msg = load_error(tmp_path, in_shape=(4, 1, "height", "width"),
                     out_shape=(4, 2, "height", "width"))
    assert_says(msg, "bad.onnx", "fixed batch of 4", "whole frames as a batch of 1",
                "dynamic batch axis")
    card = load_model_card(write_card(tmp_path))
    with pytest.raises(ModelError) as info:  # a direct user who skipped the load check
        check_batch_input(card, read_model_io(tmp_path / "bad.onnx"), (1, 1, 64, 64), (60, 64))
    assert_says(str(info.value), "(4, 1, height, width)", "dynamic batch axis")
    assert "max_batch: 1" not in str(info.value)


def test_fixed_batch_of_one_runs_whole_frames_and_needs_max_batch_one_for_tiles(
    tmp_path: Path,
) -> None:
    # what torch.onnx.export gives without dynamic_axes for the batch: fine for whole frames
    build_model(tmp_path / "bad.onnx", in_shape=(1, 1, "height", "width"),
                out_shape=(1, 2, "height", "width"))
    card = load_model_card(write_card(tmp_path, tile_px=256, tile_overlap_px=32))
    backend = load_backend("onnxruntime", card, threads=1)  # no false alarm
    Segmenter(card, backend).warmup((200, 256))  # one whole frame: N = 1
    with pytest.raises(ModelError) as info:
        Segmenter(card, backend).warmup((600, 600))  # 9 tiles in batches of 4, 4, 1
    assert_says(str(info.value), "fixed shape (1, 1, height, width)", "another batch",
                "600×600 frame", "max_batch: 1", "dynamic batch axis")
    one = Segmenter(card.model_copy(update={"max_batch": 1}), backend)
    one.warmup((600, 600))  # what the message says works
    assert one.predict(np.ones((600, 600), np.uint16)).shape == (2, 600, 600)


# ----------------------------------------------------------------------- output defects
def test_wrong_output_channels_is_refused_at_load(tmp_path: Path) -> None:
    msg = load_error(tmp_path, out_channels=3, out_shape=("batch", 3, "height", "width"))
    assert_says(msg, "bad.onnx", "output 'probabilities'", "3 channels", "expected 2",
                "foreground, seeds", "outputs")


def test_fixed_output_size_with_a_dynamic_input_is_refused_at_load(tmp_path: Path) -> None:
    msg = load_error(tmp_path, out_shape=("batch", 2, 64, 64))
    assert_says(msg, "output 'probabilities'", "fixed height 64 (the input's height is dynamic)",
                "width 64", "must have the input's batch, height and width")


def test_every_defect_is_listed_in_one_message(tmp_path: Path) -> None:
    msg = load_error(tmp_path, in_type=F64, in_shape=("batch", 3, "height", "width"),
                     in_channels=3, out_channels=3, out_shape=("batch", 3, "height", "width"))
    assert_says(msg, "dtype float64", "3 channels, expected 1", "3 channels, expected 2")


# ------------------------------------------------------------------------- load paths
def test_every_load_path_checks_the_model(tmp_path: Path) -> None:
    from livemask.inference.onnxruntime_backend import OnnxRuntimeBackend

    build_model(tmp_path / "bad.onnx", out_channels=3, out_shape=("batch", 3, "h", "w"))
    path = write_card(tmp_path)
    with pytest.raises(ModelError, match=r"3 channels, expected 2"):
        load_segmenter(str(path), threads=1)  # offline: model.backend auto
    with pytest.raises(ModelError, match=r"3 channels, expected 2"):
        OnnxRuntimeBackend(threads=1).load(load_model_card(path))  # the backend on its own


def test_torch_backend_checks_the_model_first(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from livemask.inference.torch_backend import TorchBackend

    build_model(tmp_path / "bad.onnx", in_type=F64)
    with pytest.raises(ModelError, match=r"dtype float64, expected float32"):
        TorchBackend(threads=1, device="cpu").load(load_model_card(write_card(tmp_path)))


def test_without_the_onnx_package_onnxruntime_reads_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from livemask.inference.model_checks import check_onnx_model

    build_model(tmp_path / "bad.onnx", out_channels=3, out_shape=("batch", 3, "h", "w"))
    card = load_model_card(write_card(tmp_path))
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    with pytest.raises(ModelError, match=r"output 'probabilities' .* has 3 channels, expected 2"):
        check_onnx_model(card)


def test_corrupt_file_is_still_reported_by_onnxruntime(tmp_path: Path) -> None:
    from livemask.inference.model_checks import check_onnx_model

    (tmp_path / "bad.onnx").write_bytes(b"not an onnx file")
    card = load_model_card(write_card(tmp_path))
    with pytest.raises(ModelError, match=r"ONNX Runtime cannot load .*bad\.onnx"):
        check_onnx_model(card)  # onnx cannot parse it: ONNX Runtime says why
    with pytest.raises(ModelError, match=r"ONNX Runtime cannot load .*bad\.onnx"):
        load_backend("onnxruntime", card, threads=1)


# ------------------------------------------------------------------------ no false alarm
def test_shipped_models_pass_the_checks() -> None:
    from livemask.inference.model_checks import check_onnx_model

    for name, channels in (("nuclei", 2), ("grains", 1)):
        card = load_model_card(name)
        io = check_onnx_model(card)
        assert io.inputs[0].dtype == "float32" and io.inputs[0].shape == DYNAMIC
        assert io.outputs[0].shape == ("batch", channels, "height", "width")
        backend = load_backend("onnxruntime", card, threads=1)
        assert backend.model_io == io  # type: ignore[attr-defined]
        seg = Segmenter(card, backend)
        seg.warmup((100, 90))
        assert seg.predict(np.full((100, 90), 7, np.uint16)).shape == (channels, 100, 90)
    for name in ("nuclei_rf", "grains_rf", "nuclei_classical", "grains_classical"):
        card = load_model_card(name)
        assert check_onnx_model(card) is None  # not an (N, 1, H, W) network: its own checks
        seg = Segmenter(card, load_backend("onnxruntime", card, threads=1))
        seg.warmup((40, 48))
        assert seg.predict(np.full((40, 48), 7, np.uint16)).shape[1:] == (40, 48)


def test_float16_and_fixed_size_models_that_fit_load_and_run(tmp_path: Path) -> None:
    build_model(tmp_path / "half.onnx", in_type=F16)
    card = load_model_card(write_card(tmp_path, "half.onnx"))
    seg = Segmenter(card, load_backend("onnxruntime", card, threads=1))
    seg.warmup((64, 64))
    out = seg.predict(np.arange(60 * 70, dtype=np.uint16).reshape(60, 70))
    assert out.dtype == np.float32 and out.shape == (2, 60, 70)

    build_model(tmp_path / "fixed.onnx", in_shape=("batch", 1, 64, 64),
                out_shape=("batch", 2, 64, 64))
    card = load_model_card(write_card(tmp_path, "fixed.onnx"))
    seg = Segmenter(card, load_backend("onnxruntime", card, threads=1))
    seg.warmup((60, 64))  # padded to 64×64: the model's size
    assert seg.predict(np.ones((60, 64), np.uint16)).shape == (2, 60, 64)


# ---------------------------------------------------------- card normalisation defects
@pytest.mark.parametrize(("low", "high"), [(50.0, 10.0), (5.0, 5.0)])
def test_normalization_low_not_below_high_is_a_card_error(
    tmp_path: Path, low: float, high: float
) -> None:
    (tmp_path / "nuclei.onnx").write_bytes((MODELS_DIR / "nuclei.onnx").read_bytes())
    path = write_card(tmp_path, "nuclei.onnx",
                      normalization={"kind": "percentile", "low": low, "high": high})
    with pytest.raises(ModelError) as info:
        load_model_card(path)
    assert_says(str(info.value), "bad.yaml", "normalization", f"low ({low:g})",
                f"high ({high:g})", "normalization.low < normalization.high")


def test_normalization_must_be_finite() -> None:
    with pytest.raises(ValueError, match="finite"):
        ModelCard(name="x", normalization={"low": float("nan")})  # type: ignore[arg-type]


# -------------------------------------------------- safety net: the first real inference
def test_wrong_actual_output_size_is_caught_at_warmup_and_first_frame(tmp_path: Path) -> None:
    # declared with symbolic sizes (so the load check cannot know), but pools to half size
    build_model(tmp_path / "bad.onnx", pool=True, out_shape=("batch", 2, "h2", "w2"))
    card = load_model_card(write_card(tmp_path))
    backend = load_backend("onnxruntime", card, threads=1)  # symbolic dims: accepted
    with pytest.raises(ModelError) as info:
        Segmenter(card, backend).warmup((64, 64))
    assert_says(str(info.value), "bad.onnx", "(1, 2, 32, 32)", "(1, 1, 64, 64)",
                "expected (1, 2, 64, 64)")
    with pytest.raises(ModelError, match=r"expected \(1, 2, 64, 64\)"):
        Segmenter(card, backend).predict(np.ones((64, 64), np.uint16))  # offline: no warm-up
    tiled = Segmenter(card.model_copy(update={"tile_px": 64, "tile_overlap_px": 16}), backend)
    with pytest.raises(ModelError, match=r"returned an output of shape \(\d, 2, 32, 32\)"):
        tiled.predict(np.ones((100, 100), np.uint16))


def test_output_channels_known_only_to_onnxruntime_are_caught_at_load(tmp_path: Path) -> None:
    # declared as a symbolic "c"; ONNX Runtime's shape inference finds 1 from the weights
    msg = load_error(tmp_path, out_channels=1, out_shape=("batch", "c", "h", "w"))
    assert_says(msg, "bad.onnx", "has 1 channel, expected 2", "foreground, seeds")


def test_output_channels_other_than_the_card_says_are_caught_at_warmup() -> None:
    card = load_model_card("nuclei")
    backend = load_backend("onnxruntime", card, threads=1)
    # the card changed after loading (as tests and tools do with model_copy)
    three = card.model_copy(update={"outputs": ["foreground", "seeds", "edges"]})
    with pytest.raises(ModelError) as info:
        Segmenter(three, backend).warmup((32, 40))
    assert_says(str(info.value), "nuclei.onnx", "(1, 2, 32, 40)", "expected (1, 3, 32, 40)",
                "foreground, seeds, edges", "32×40 frame")
    grains = load_model_card("grains")
    one = Segmenter(grains, load_backend("onnxruntime", grains, threads=1),
                    post=grains.postprocessing.model_copy(update={"method": "seeded-watershed"}))
    with pytest.raises(ModelError, match=r"at least 2 channels \(foreground, seeds\)"):
        one.predict(np.ones((16, 16), np.uint16))  # 1 channel cannot be watershed-seeded


def test_fixed_input_size_other_than_the_frames_is_caught_before_running(tmp_path: Path) -> None:
    build_model(tmp_path / "bad.onnx", in_shape=("batch", 1, 64, 64),
                out_shape=("batch", 2, 64, 64))
    card = load_model_card(write_card(tmp_path))
    backend = load_backend("onnxruntime", card, threads=1)  # 64 could fit some frames
    with pytest.raises(ModelError) as info:
        Segmenter(card, backend).warmup((512, 512))
    assert_says(str(info.value), "bad.onnx", "fixed", "64", "(1, 1, 512, 512)", "512×512 frame",
                "dynamic height and width")
    with pytest.raises(ModelError, match="fixed"):
        Segmenter(card, backend).predict(np.ones((100, 80), np.uint16))


def test_device_path_checks_the_output_too() -> None:
    """Segmenter.infer on the torch backend (CPU, kept 'on the device') checks like predict."""
    pytest.importorskip("torch")
    from livemask.inference.segmenter import DeviceProbabilities
    from livemask.inference.torch_backend import TorchBackend

    card = load_model_card("nuclei")
    backend = TorchBackend(threads=1, device="cpu")
    backend.load(card)
    assert backend.model_io is None  # runs any batch and size: no per-batch input check
    image = np.full((48, 56), 9, np.uint16)
    image[10:20, 10:20] = 900
    seg = Segmenter(card, backend, device_resident=True)
    seg.warmup(image.shape)  # the shipped model: no false alarm on the device path either
    assert isinstance(seg.infer(image), DeviceProbabilities)
    three = card.model_copy(update={"outputs": ["foreground", "seeds", "edges"]})
    with pytest.raises(ModelError, match=r"expected \(1, 3, 48, 56\)"):
        Segmenter(three, backend, device_resident=True).infer(image)


def test_torch_backend_runs_tiles_in_batches_whatever_batch_the_onnx_declares(
    tmp_path: Path,
) -> None:
    """The torch backend rebuilds the network from the ONNX weights and runs any batch: a
    common export with its batch fixed at 1 must still run tiled frames there (the review
    found the per-batch check refusing it at warm-up)."""
    pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    from livemask.inference.segmenter import Segmenter
    from livemask.inference.torch_backend import TorchBackend

    model = onnx.load(str(MODELS_DIR / "nuclei.onnx"))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1  # batch fixed at 1
    onnx.save(model, str(tmp_path / "bad.onnx"))
    card = load_model_card(write_card(tmp_path, tile_px=256))
    backend = TorchBackend(threads=1, device="cpu")
    backend.load(card)
    seg = Segmenter(card, backend)
    seg.warmup((512, 512))  # tiles of 256 px or less, in batches of up to 4
    image = np.random.default_rng(0).integers(0, 4000, (512, 512)).astype(np.uint16)
    assert seg.predict(image).shape == (2, 512, 512)


# ------------------------------------------------------------------------ output names
def test_the_output_the_card_names_is_run_not_the_first(tmp_path: Path) -> None:
    """A model with outputs [logits, probabilities] ran its logits although the card said
    output_name: probabilities (bug hunt: 62 nuclei instead of 83)."""
    build_model(tmp_path / "bad.onnx", logits_out=True)
    card = load_model_card(write_card(tmp_path))
    assert card.output_name == "probabilities"
    backend = load_backend("onnxruntime", card, threads=1)
    x = np.linspace(-3, 3, 2 * 16 * 16, dtype=np.float32).reshape(2, 1, 16, 16)
    out = backend.run(x)
    logits = 2.0 * x + np.array([-1.0, 1.0], np.float32)[None, :, None, None]
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-logits)), atol=1e-6)


def test_several_outputs_and_none_named_by_the_card_is_refused(tmp_path: Path) -> None:
    build_model(tmp_path / "bad.onnx", logits_out=True)
    card = load_model_card(write_card(tmp_path, output_name="probs"))
    with pytest.raises(ModelError) as info:
        load_backend("onnxruntime", card, threads=1)
    assert_says(str(info.value), "2 outputs ('logits', 'probabilities')", "'probs'",
                "set output_name in the card")


def test_a_single_output_of_another_name_is_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build_model(tmp_path / "bad.onnx")
    card = load_model_card(write_card(tmp_path, output_name="probs", input_name="x"))
    with caplog.at_level("WARNING", logger="livemask"):
        backend = load_backend("onnxruntime", card, threads=1)
    assert backend.run(np.zeros((1, 1, 16, 16), np.float32)).shape == (1, 2, 16, 16)
    assert "output_name is 'probs', but the model's only output is 'probabilities'" in caplog.text
    assert "input_name is 'x', but the model's only input is 'image'" in caplog.text


def test_a_size_multiple_too_small_for_the_network_is_a_model_error(tmp_path: Path) -> None:
    """The nuclei U-Net needs multiples of 8: a card saying 4 gave a raw ONNX Runtime
    traceback (a Concat of mismatched sizes) on a 300×300 image (bug hunt)."""
    shutil.copy(MODELS_DIR / "nuclei.onnx", tmp_path / "bad.onnx")
    card = load_model_card(write_card(tmp_path, size_multiple=4))
    seg = Segmenter(card, load_backend("onnxruntime", card, threads=1))
    with pytest.raises(ModelError, match=r"bad\.onnx .*set size_multiple in its card"):
        seg.segment(np.zeros((300, 300), np.float32))
