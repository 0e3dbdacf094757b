"""What a model's output channels must hold: probabilities in [0, 1] (checked at warm-up),
in the order and meaning the post-processing method reads (checked on the card's names).

Bug hunt: a nuclei U-Net exported without its final Sigmoid (logits) was accepted and
segmented worse (F1 0.5-0.9 0.973 -> 0.838); cards with [background, foreground] or a
foreground-only channel under boundary-label loaded and gave F1 0.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from livemask.errors import ModelError
from livemask.inference.model_checks import RANGE_TOLERANCE, check_output_range
from livemask.inference.models import MODELS_DIR, ModelCard, load_model_card
from livemask.inference.segmenter import Segmenter, probe_image
from livemask.inference.select import load_backend

onnx = pytest.importorskip("onnx")


def _card(tmp_path: Path, model: str, **changes: Any) -> Path:
    """A copy of the shipped nuclei card pointing at ``model`` in ``tmp_path``."""
    card = yaml.safe_load((MODELS_DIR / "nuclei.yaml").read_text())
    card.update(name="mine", file=model, **changes)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def _logits_model(path: Path) -> Path:
    """The shipped nuclei U-Net with its final Sigmoid removed: it returns logits."""
    model = onnx.load(str(MODELS_DIR / "nuclei.onnx"))
    sigmoid = model.graph.node[-1]
    assert sigmoid.op_type == "Sigmoid" and sigmoid.output[0] == "probabilities"
    model.graph.node.remove(sigmoid)
    for node in model.graph.node:
        node.output[:] = ["probabilities" if o == sigmoid.input[0] else o for o in node.output]
    onnx.save(model, str(path))
    return path


# ------------------------------------------------------------------ probabilities, not logits
def test_a_model_returning_logits_is_refused_at_warmup(tmp_path: Path) -> None:
    _logits_model(tmp_path / "logits.onnx")
    card = load_model_card(_card(tmp_path, "logits.onnx"))
    seg = Segmenter(card, load_backend("onnxruntime", card, threads=1))
    with pytest.raises(ModelError) as info:
        seg.warmup((120, 100))
    msg = str(info.value)
    for word in ("logits.onnx", "mine.yaml", "values from -", "120×100 frame",
                 "probabilities in [0, 1]", "Sigmoid", "Softmax", "re-export"):
        assert word in msg, f"{word!r} not in {msg!r}"


def test_a_tiled_frame_checks_the_range_on_its_tile(tmp_path: Path) -> None:
    _logits_model(tmp_path / "logits.onnx")
    card = load_model_card(_card(tmp_path, "logits.onnx", tile_px=128, tile_overlap_px=16))
    seg = Segmenter(card, load_backend("onnxruntime", card, threads=1))
    tile = seg.tile_plan((300, 260))
    assert tile is not None
    shape = rf"\(1, 1, {tile.tile_shape[0]}, {tile.tile_shape[1]}\)"
    with pytest.raises(ModelError, match=rf"test input of shape {shape} for a 300×260 frame"):
        seg.warmup((300, 260))  # one tile, not the whole frame: what the backend runs


@pytest.mark.parametrize(
    "name", ["nuclei", "grains", "nuclei_rf", "grains_rf", "nuclei_classical",
             "grains_classical"])
def test_every_shipped_model_returns_probabilities_on_the_test_image(name: str) -> None:
    card = load_model_card(name)
    seg = Segmenter(card, load_backend("onnxruntime", card, threads=1))
    seg.warmup((70, 90))  # no false alarm
    out = seg.predict(probe_image((70, 90)))
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.max() - out.min() > 0.5  # the test image makes the model use its range


def test_the_test_image_is_not_flat_and_is_repeatable() -> None:
    image = probe_image((50, 70))
    assert image.shape == (50, 70) and image.dtype == np.uint16
    assert image.max() > 4 * image.min() > 0
    assert np.array_equal(image, probe_image((50, 70)))


def test_non_finite_and_out_of_range_outputs_are_refused() -> None:
    card = load_model_card("nuclei")
    ok = np.array([[[[-RANGE_TOLERANCE / 2, 1 + RANGE_TOLERANCE / 2]]]], np.float32)
    check_output_range(card, ok, (1, 1, 1, 2))  # float16 rounding passes
    bad = np.array([[[[0.2, np.nan, np.inf]]]], np.float32)
    with pytest.raises(ModelError, match=r"returned 2 non-finite values \(NaN or infinite\)"):
        check_output_range(card, bad, (1, 1, 1, 3), (1, 3))
    with pytest.raises(ModelError, match=r"values from 0 to 1\.1 on a test input"):
        check_output_range(card, np.array([0.0, 1.1], np.float32), (1, 1, 1, 2))


# ---------------------------------------------------------------- channel order and meaning
@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"outputs": ["background", "foreground"]},
         r"channel 0 is 'background' but seeded-watershed reads foreground there"),
        ({"outputs": ["Seeds", "foreground"]},
         r"channel 0 is 'Seeds' but seeded-watershed reads foreground there"),
        ({"outputs": ["foreground", "boundary"]},
         r"channel 1 is 'boundary' but seeded-watershed reads seeds there"),
        ({"outputs": ["foreground"], "postprocessing": {"method": "boundary-label"}},
         r"channel 0 is 'foreground' but boundary-label reads boundary there"),
    ],
)
def test_outputs_named_for_other_channels_are_refused_at_card_load(
    tmp_path: Path, changes: dict[str, Any], needle: str
) -> None:
    shutil.copy(MODELS_DIR / "nuclei.onnx", tmp_path / "nuclei.onnx")
    with pytest.raises(ModelError, match=needle) as info:
        load_model_card(_card(tmp_path, "nuclei.onnx", **changes))
    assert "outputs names are labels" in str(info.value)


def test_outputs_with_other_names_are_labels_and_load() -> None:
    card = ModelCard(name="x", outputs=["cell", "centre_probability"])
    assert card.outputs == ["cell", "centre_probability"]
    ModelCard(name="y", outputs=["grain_edges_p"],
              postprocessing={"method": "boundary-label"})  # type: ignore[arg-type]


def test_a_channel_count_no_method_reads_is_not_told_to_switch_method() -> None:
    with pytest.raises(ValueError) as info:
        ModelCard(name="x", outputs=["background", "foreground", "seeds"])
    msg = str(info.value)
    assert "no post-processing method reads 3 channels" in msg
    assert "choose the method" not in msg
    with pytest.raises(ValueError, match=r"set postprocessing.method boundary-label only if "
                       r"it fits them \(boundary-label reads its one channel as the boundary"):
        ModelCard(name="y", outputs=["probability"])


def test_segment_and_evaluate_refuse_a_logits_model_before_any_result(tmp_path: Path) -> None:
    from livemask.evaluation import evaluate
    from livemask.offline import load_segmenter, segment_file

    _logits_model(tmp_path / "logits.onnx")
    card = _card(tmp_path, "logits.onnx")
    image = probe_image((96, 80)).astype(np.uint16)
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "in.tif", image)
    out = tmp_path / "labels.tif"
    with pytest.raises(ModelError, match=r"Sigmoid"):
        segment_file(tmp_path / "in.tif", out, model=str(card))
    assert not out.exists()  # nothing written from a model that returns logits
    with pytest.raises(ModelError, match=r"Sigmoid"):
        evaluate(load_segmenter(str(card)), [(image, np.zeros(image.shape, np.int32))], "x")
