"""A model whose output for a tile depends on the other tiles in its batch (it normalises
over the batch: BatchNorm exported in training mode, a mean over the batch axis) gives tiled
frames wrong masks (once 45 objects instead of 556). The warm-up runs different test tiles as
a batch and alone, and refuses such a model, saying to set max_batch: 1 or re-export it in
eval mode; models that compute each tile on its own pass.

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
from livemask.inference.models import MODELS_DIR, ModelCard, load_model_card
from livemask.inference.segmenter import Segmenter
from livemask.inference.select import load_backend

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

F32 = TensorProto.FLOAT
FRAME = (600, 600)  # tile_px 256, overlap 32: 9 tiles of 208 px


def _save(path: Path, nodes: list[Any], inits: list[Any],
          in_shape: tuple[Any, ...] = ("N", 1, "H", "W")) -> Path:
    """(N, 1, H, W) "image" → (N, 2, H, W) "probabilities", foreground = seeds = "p"."""
    nodes = [*nodes, helper.make_node("Concat", ["p", "p"], ["probabilities"], axis=1)]
    out_shape = (in_shape[0], 2, *in_shape[2:])
    graph = helper.make_graph(
        nodes, "batchdep", [helper.make_tensor_value_info("image", F32, in_shape)],
        [helper.make_tensor_value_info("probabilities", F32, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _scalar(name: str, value: float) -> Any:
    return numpy_helper.from_array(np.array(value, np.float32), name)


def centred_model(path: Path, axes: list[int], weight: float = 1.0,
                  in_shape: tuple[Any, ...] = ("N", 1, "H", "W")) -> Path:
    """Sigmoid(x - weight · mean of x over ``axes``): over [0, 2, 3] the batch's mean (a
    model that normalises over its batch), over [2, 3] each image's own."""
    nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], axes=axes),
             helper.make_node("Mul", ["mean", "weight"], ["shift"]),
             helper.make_node("Sub", ["image", "shift"], ["centred"]),
             helper.make_node("Sigmoid", ["centred"], ["p"])]
    return _save(path, nodes, [_scalar("weight", weight)], in_shape)


def batchnorm_training_model(path: Path) -> Path:
    """BatchNorm as torch.onnx.export writes it in training mode (statistics of the batch,
    not the running ones), then a Sigmoid."""
    inits = [numpy_helper.from_array(np.array([v], np.float32), name)
             for name, v in (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0))]
    nodes = [helper.make_node("BatchNormalization", ["image", "scale", "bias", "mean", "var"],
                              ["y", "running_mean", "running_var"], training_mode=1),
             helper.make_node("Sigmoid", ["y"], ["p"])]
    return _save(path, nodes, inits)


def conv_model(path: Path) -> Path:
    """Sigmoid of a 3×3 convolution: each tile on its own."""
    kernel = np.full((1, 1, 3, 3), 1 / 9, np.float32)
    nodes = [helper.make_node("Conv", ["image", "kernel"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["p"])]
    return _save(path, nodes, [numpy_helper.from_array(kernel, "kernel")])


def segmenter(tmp_path: Path, model: str, **changes: Any) -> Segmenter:
    """A Segmenter on ONNX Runtime for ``model`` with a copy of the shipped nuclei card
    (tile_px 256, tile_overlap_px 32 unless ``changes`` say otherwise)."""
    card = yaml.safe_load((MODELS_DIR / "nuclei.yaml").read_text())
    card.update(name="mine", file=model, tile_px=256, tile_overlap_px=32)
    card.update(changes)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(card))
    loaded: ModelCard = load_model_card(path)
    return Segmenter(loaded, load_backend("onnxruntime", loaded, threads=1))


def record_batches(seg: Segmenter) -> list[int]:
    """The batch size of every backend run of ``seg`` from now on."""
    sizes: list[int] = []
    run = seg.backend.run

    def recording(batch: np.ndarray) -> np.ndarray:
        sizes.append(int(batch.shape[0]))
        return run(batch)

    seg.backend.run = recording  # type: ignore[method-assign]
    return sizes


def assert_says(message: str, *words: str) -> None:
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


BATCH_NORMALISING = {
    "batch mean": lambda path: centred_model(path, [0, 2, 3]),
    "BatchNorm in training mode": batchnorm_training_model,
}


@pytest.mark.parametrize("max_batch", [2, 3, 4])
@pytest.mark.parametrize("build", BATCH_NORMALISING.values(), ids=BATCH_NORMALISING.keys())
def test_a_model_that_normalises_over_its_batch_is_refused_for_tiled_frames(
    tmp_path: Path, build: Any, max_batch: int,
) -> None:
    """The old check ran one tile repeated: a batch of identical tiles has each tile's own
    statistics, so such a model passed and tiled frames got wrong masks."""
    build(tmp_path / "batchdep.onnx")
    seg = segmenter(tmp_path, "batchdep.onnx", max_batch=max_batch)
    plan = seg.tile_plan(FRAME)
    assert plan is not None and plan.count == 9 and max(plan.batch_sizes) == max_batch
    with pytest.raises(ModelError) as info:
        seg.warmup(FRAME)
    assert_says(str(info.value), "batchdep.onnx", "mine.yaml", "600×600 frame", "9 tiles",
                f"in a batch of {max_batch} than alone",
                "depends on the other tiles in its batch", "BatchNorm exported in training mode",
                "tiled frames would get wrong masks", "set max_batch: 1 in the card",
                "re-export the model in eval mode")


def test_a_fixed_size_batch_normalising_model_is_refused_at_its_tile_size(
    tmp_path: Path,
) -> None:
    """A fixed 256×256 model cannot run the small test tile: the batch runs at the tile
    size and is compared with the output check_output got for the tile alone."""
    centred_model(tmp_path / "fixed.onnx", [0, 2, 3], in_shape=("N", 1, 256, 256))
    seg = segmenter(tmp_path, "fixed.onnx", tile_overlap_px=64)
    plan = seg.tile_plan((1200, 1200))
    assert plan is not None and plan.tile_shape == (256, 256) and max(plan.batch_sizes) > 1
    with pytest.raises(ModelError, match="set max_batch: 1 in the card"):
        seg.check_frame((1200, 1200))


def test_the_batch_normalising_model_runs_with_max_batch_one(tmp_path: Path) -> None:
    """What the message says works: one tile at a time, so no batch to check."""
    centred_model(tmp_path / "batchdep.onnx", [0, 2, 3])
    seg = segmenter(tmp_path, "batchdep.onnx", max_batch=1)
    batches = record_batches(seg)
    seg.warmup(FRAME)
    image = np.random.default_rng(0).integers(0, 4000, FRAME).astype(np.uint16)
    assert seg.predict(image).shape == (2, *FRAME)
    assert set(batches) == {1}


MODELS_OF_ONE_TILE = {
    "per-image mean": lambda path: centred_model(path, [2, 3]),
    "convolution": conv_model,
    # batch-dependent, but within fp16 noise (~1e-2): no false alarm
    "weak batch mean": lambda path: centred_model(path, [0, 2, 3], weight=0.05),
}


@pytest.mark.parametrize("build", MODELS_OF_ONE_TILE.values(), ids=MODELS_OF_ONE_TILE.keys())
def test_a_model_that_computes_each_tile_on_its_own_passes(tmp_path: Path, build: Any) -> None:
    build(tmp_path / "ordinary.onnx")
    seg = segmenter(tmp_path, "ordinary.onnx")
    batches = record_batches(seg)
    seg.warmup(FRAME)
    assert 4 in batches  # the batch check ran
    image = np.random.default_rng(0).integers(0, 4000, FRAME).astype(np.uint16)
    assert seg.predict(image).shape == (2, *FRAME)


def test_a_frame_smaller_than_the_tile_runs_no_batch_check(tmp_path: Path) -> None:
    """Whole frames run as a batch of 1, so a batch-normalising model computes them right."""
    centred_model(tmp_path / "batchdep.onnx", [0, 2, 3])
    seg = segmenter(tmp_path, "batchdep.onnx")
    batches = record_batches(seg)
    assert seg.tile_plan((200, 256)) is None
    seg.warmup((200, 256))
    assert set(batches) == {1}
