"""Fixes from a model author's bug hunt (s21): a model that runs only at batch 1 is caught at
the warm-up, channels-last and split-output models are named as such, a fixed-size model's
error says why tile_px does not help, and ordinary YAML cards load.

Each test builds a small real ONNX model in ``tmp_path`` next to a copy of the shipped
nuclei card that points at it, and runs it with ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from livemask.errors import ModelError
from livemask.evaluation import write_card as write_trained_card
from livemask.inference.models import MODELS_DIR, load_model_card
from livemask.inference.segmenter import Segmenter
from livemask.inference.select import load_backend

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

F32 = TensorProto.FLOAT
DYNAMIC: tuple[Any, ...] = ("N", 1, "H", "W")
DYNAMIC_OUT: tuple[Any, ...] = ("N", 2, "H", "W")


def _value(name: str, shape: tuple[Any, ...] | None) -> Any:
    return helper.make_tensor_value_info(name, F32, shape)


def _save(path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any],
          inits: list[Any]) -> Path:
    graph = helper.make_graph(nodes, "s21", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _clip_inits() -> list[Any]:
    return [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array(1.0, np.float32), "one")]


def _clip_twice(x: str, out: str) -> list[Any]:
    """Foreground = seeds = the normalised image clipped to [0, 1]: (N, 2, H, W)."""
    return [helper.make_node("Clip", [x, "zero", "one"], ["p"]),
            helper.make_node("Concat", ["p", "p"], [out], axis=1)]


def batch_view_model(path: Path) -> Path:
    """Declares a dynamic batch, but reshapes its output to [1, 2, H, W] inside (what a
    traced ``x.view(1, ...)`` exports): runs a batch of 1, fails on any other."""
    inits = [*_clip_inits(),
             numpy_helper.from_array(np.array([2], np.int64), "start"),
             numpy_helper.from_array(np.array([4], np.int64), "end"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "one_two")]
    nodes = [*_clip_twice("image", "pc"),
             helper.make_node("Shape", ["image"], ["s"]),
             helper.make_node("Slice", ["s", "start", "end"], ["hw"]),
             helper.make_node("Concat", ["one_two", "hw"], ["shape"], axis=0),
             helper.make_node("Reshape", ["pc", "shape"], ["probabilities"])]
    return _save(path, nodes, [_value("image", DYNAMIC)],
                 [_value("probabilities", DYNAMIC_OUT)], inits)


def plain_model(path: Path, in_shape: tuple[Any, ...] = DYNAMIC,
                out_shape: tuple[Any, ...] = DYNAMIC_OUT) -> Path:
    """(N, 1, H, W) → (N, 2, H, W), declared with ``in_shape`` and ``out_shape``."""
    return _save(path, _clip_twice("image", "probabilities"), [_value("image", in_shape)],
                 [_value("probabilities", out_shape)], _clip_inits())


def channels_last_model(path: Path, in_shape: tuple[Any, ...]) -> Path:
    """Takes (N, H, W, 1) and returns (N, H, W, 2), as a Keras/TF export does."""
    nodes = [helper.make_node("Transpose", ["image"], ["x"], perm=[0, 3, 1, 2]),
             *_clip_twice("x", "pc"),
             helper.make_node("Transpose", ["pc"], ["probabilities"], perm=[0, 2, 3, 1])]
    out_shape = (*in_shape[:3], 2)
    return _save(path, nodes, [_value("image", in_shape)],
                 [_value("probabilities", out_shape)], _clip_inits())


def split_output_model(path: Path) -> Path:
    """Foreground and seeds as two (N, 1, H, W) outputs instead of one (N, 2, H, W)."""
    nodes = [helper.make_node("Clip", ["image", "zero", "one"], ["foreground"]),
             helper.make_node("Identity", ["foreground"], ["seeds"])]
    one = ("N", 1, "H", "W")
    return _save(path, nodes, [_value("image", DYNAMIC)],
                 [_value("foreground", one), _value("seeds", one)], _clip_inits())


def card_for(tmp_path: Path, model: str, **changes: Any) -> Path:
    """A copy of the shipped nuclei card pointing at ``model`` in ``tmp_path``."""
    card = yaml.safe_load((MODELS_DIR / "nuclei.yaml").read_text())
    card.update(name="mine", file=model, **changes)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def load_error(card_path: Path) -> str:
    with pytest.raises(ModelError) as info:
        load_backend("onnxruntime", load_model_card(card_path), threads=1)
    return str(info.value)


def assert_says(message: str, *words: str) -> None:
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


# ------------------------------------------------------ 1. a model that runs only batch 1
def test_a_model_that_runs_only_a_batch_of_one_is_refused_at_warmup(tmp_path: Path) -> None:
    """Bug hunt: batchview2 passed the load check and the warm-up (batch 1), then every
    1200×1200 frame (4 tiles in one batch) failed in ONNX Runtime's Reshape."""
    batch_view_model(tmp_path / "view.onnx")
    card = load_model_card(card_for(tmp_path, "view.onnx", tile_px=256, tile_overlap_px=32))
    seg = Segmenter(card, load_backend("onnxruntime", card, threads=1))
    plan = seg.tile_plan((600, 600))
    assert plan is not None and max(plan.batch_sizes) > 1
    with pytest.raises(ModelError) as info:
        seg.warmup((600, 600))
    assert_says(str(info.value), "view.onnx", "mine.yaml", "600×600 frame",
                "runs one tile but not a batch of 4", "set max_batch: 1 in the card",
                "real dynamic batch axis", "Reshape")
    seg.warmup((200, 256))  # a whole frame runs as a batch of 1: no false alarm
    one = Segmenter(card.model_copy(update={"max_batch": 1}), seg.backend)
    one.warmup((600, 600))  # what the message says works
    image = np.random.default_rng(0).integers(0, 4000, (600, 600)).astype(np.uint16)
    assert one.predict(image).shape == (2, 600, 600)


def test_a_failed_batch_says_max_batch_one_when_one_tile_runs(tmp_path: Path) -> None:
    """The runtime error (e.g. a direct user without the warm-up) names the fix too."""
    batch_view_model(tmp_path / "view.onnx")
    card = load_model_card(card_for(tmp_path, "view.onnx"))
    backend = load_backend("onnxruntime", card, threads=1)
    x = np.zeros((2, 1, 32, 32), np.float32)
    assert backend.run(x[:1]).shape == (1, 2, 32, 32)
    with pytest.raises(ModelError, match=r"runs alone \(a batch of 1\): set max_batch: 1"):
        backend.run(x)


def test_the_batch_check_runs_a_model_that_takes_only_its_tile_size(tmp_path: Path) -> None:
    """A fixed 256×256 model with tile_px 256: the batch check runs at the tile size (a
    small test tile would not fit it), and a model that runs batches passes."""
    plain_model(tmp_path / "fixed.onnx", ("N", 1, 256, 256), ("N", 2, 256, 256))
    card = load_model_card(card_for(tmp_path, "fixed.onnx", tile_px=256))  # overlap 64
    seg = Segmenter(card, load_backend("onnxruntime", card, threads=1))
    plan = seg.tile_plan((1200, 1200))
    assert plan is not None and plan.tile_shape == (256, 256) and max(plan.batch_sizes) > 1
    seg.warmup((1200, 1200))


def test_the_batch_check_uses_the_tile_when_a_small_test_tile_does_not_run(
    tmp_path: Path,
) -> None:
    """A network that runs only multiples of 128 px (here a space-to-depth by 128 and back)
    cannot run the small test tile: the batch check falls back to the tile, no false alarm."""
    nodes = [helper.make_node("SpaceToDepth", ["image"], ["packed"], blocksize=128),
             helper.make_node("DepthToSpace", ["packed"], ["x"], blocksize=128),
             *_clip_twice("x", "probabilities")]
    _save(tmp_path / "s2d.onnx", nodes, [_value("image", DYNAMIC)],
          [_value("probabilities", DYNAMIC_OUT)], _clip_inits())
    card = load_model_card(card_for(tmp_path, "s2d.onnx", tile_px=256))
    seg = Segmenter(card, load_backend("onnxruntime", card, threads=1))
    plan = seg.tile_plan((1200, 1200))
    assert plan is not None and plan.tile_shape == (256, 256) and max(plan.batch_sizes) > 1
    seg.warmup((1200, 1200))


# ------------------------------------------------ 4. channels-last and split outputs
@pytest.mark.parametrize("in_shape", [("N", "H", "W", 1), (1, 256, 256, 1)])
def test_a_channels_last_model_is_named_as_such(tmp_path: Path, in_shape: Any) -> None:
    """Bug hunt: (N, H, W, 1) was 'a fixed width 1 ... dynamic height and width', and
    (1, 256, 256, 1) 'has 256 channels'."""
    channels_last_model(tmp_path / "nhwc.onnx", in_shape)
    msg = load_error(card_for(tmp_path, "nhwc.onnx"))
    assert_says(msg, "nhwc.onnx", "input 'image'", "is channels-last (N, H, W, C)",
                "livemask needs NCHW", "(N, 1, H, W)", "output 'probabilities'",
                "(N, 2, H, W)", "transpose")
    for wrong in ("fixed width", "256 channels", "dynamic height and width"):
        assert wrong not in msg, f"{wrong!r} in {msg!r}"


@pytest.mark.parametrize("output_name", ["probabilities", "foreground"])
def test_split_outputs_are_told_to_concatenate(tmp_path: Path, output_name: str) -> None:
    """Bug hunt: two (N, 1, H, W) outputs were told to set output_name, which then said
    'has 1 channel, expected 2'."""
    split_output_model(tmp_path / "split.onnx")
    msg = load_error(card_for(tmp_path, "split.onnx", output_name=output_name))
    assert_says(msg, "split.onnx", "2 outputs ('foreground', 'seeds') of 1 channel each",
                "concatenate them into one (N, C, H, W) output", "(N, 2, H, W)",
                f"output_name ({output_name!r})")
    assert "has 1 channel, expected 2" not in msg
    assert "set output_name in the card" not in msg


# ------------------------------------------------------------- 5. fixed spatial size
def test_a_fixed_size_model_says_tile_px_does_not_make_frames_fit(tmp_path: Path) -> None:
    plain_model(tmp_path / "fixed.onnx", ("N", 1, 256, 256), ("N", 2, 256, 256))
    card = load_model_card(card_for(tmp_path, "fixed.onnx", tile_px=256))
    seg = Segmenter(card, load_backend("onnxruntime", card, threads=1))
    seg.warmup((256, 256))  # its own size runs
    with pytest.raises(ModelError) as info:
        seg.warmup((300, 300))  # tiles of 184×184 in this frame's plan
    assert_says(str(info.value), "fixed.onnx", "fixed input height 256 and width 256",
                "tiles whose size depends on the frame (184×184 here", "tile_px sets only "
                "the largest tile", "dynamic height and width axes")


# -------------------------------------------------------------- 6. ordinary YAML cards
@pytest.mark.parametrize(("written", "read"), [("1.0", "1.0"), ("2", "2"), ("'0.3'", "0.3")])
def test_a_numeric_version_is_read_as_text(tmp_path: Path, written: str, read: str) -> None:
    plain_model(tmp_path / "ok.onnx")
    path = card_for(tmp_path, "ok.onnx")
    text = path.read_text()
    path.write_text("\n".join(line for line in text.splitlines()
                              if not line.startswith("version:")) + f"\nversion: {written}\n")
    assert load_model_card(path).version == read


@pytest.mark.parametrize("section", ["metrics", "training", "normalization", "postprocessing"])
def test_an_empty_section_takes_its_defaults(tmp_path: Path, section: str) -> None:
    plain_model(tmp_path / "ok.onnx")
    path = card_for(tmp_path, "ok.onnx")
    card = yaml.safe_load(path.read_text())
    card.pop(section)
    path.write_text(yaml.safe_dump(card) + f"{section}:\n")  # YAML: null
    loaded = load_model_card(path)
    default = type(loaded).model_fields[section].get_default(call_default_factory=True)
    assert getattr(loaded, section) == default


def test_a_trained_card_does_not_point_to_a_missing_description(tmp_path: Path) -> None:
    card = {"name": "nuclei", "version": "1", "file": "nuclei.onnx"}
    write_trained_card(tmp_path / "nuclei.yaml", card)
    first = (tmp_path / "nuclei.yaml").read_text().splitlines()[0]
    assert "nuclei.md" not in first and "docs/models.md" in first
    (tmp_path / "nuclei.md").write_text("# nuclei\n")  # a shipped model's description
    write_trained_card(tmp_path / "nuclei.yaml", card)
    first = (tmp_path / "nuclei.yaml").read_text().splitlines()[0]
    assert first == "# Model card: see nuclei.md for the full description."
    assert yaml.safe_load((tmp_path / "nuclei.yaml").read_text()) == card
