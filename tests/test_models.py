"""Model cards: shipped models load, bad cards give clear errors, user cards work."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from livemask.errors import ModelError
from livemask.inference.models import MODELS_DIR, list_models, load_model_card
from livemask.offline import load_segmenter


def test_shipped_nuclei_card_is_complete() -> None:
    card = load_model_card("nuclei")
    assert card.onnx_path.is_file() and card.onnx_path.stat().st_size < 5_000_000
    assert card.outputs == ["foreground", "seeds"]
    assert card.metrics["f1_iou50"] >= 0.9
    assert {"simulator_live", "simulator_varied"} <= set(card.metrics)
    assert (MODELS_DIR / "nuclei.md").is_file()


def test_every_shipped_model_has_a_markdown_card() -> None:
    names = [c.name for c in list_models()]
    assert "nuclei" in names
    for name in names:
        assert (MODELS_DIR / f"{name}.md").is_file(), name


def test_unknown_model_lists_the_shipped_ones() -> None:
    with pytest.raises(ModelError, match=r"shipped models: .*nuclei"):
        load_model_card("nucleus")


@pytest.mark.parametrize("as_path", [True, False])
def test_an_onnx_file_given_as_model_says_to_write_a_card(tmp_path: Path, as_path: bool) -> None:
    """model.path / --model pointing at the .onnx said `unknown model PosixPath(...)`."""
    onnx_file = tmp_path / "good.onnx"
    shutil.copy(MODELS_DIR / "nuclei.onnx", onnx_file)
    model = onnx_file if as_path else str(onnx_file)
    with pytest.raises(ModelError) as info:
        load_model_card(model)
    msg = str(info.value)
    assert f"{onnx_file} is a model file, not a model card" in msg
    assert "file: good.onnx" in msg and f"{tmp_path / 'good.yaml'}" in msg
    assert "PosixPath" not in msg and "unknown model" not in msg
    card = yaml.safe_load((MODELS_DIR / "nuclei.yaml").read_text())
    card.update(name="good", file="good.onnx")
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(card))  # what the message says
    with pytest.raises(ModelError, match=r"give its card .*good\.yaml as model\.path"):
        load_model_card(model)
    assert load_model_card(tmp_path / "good.yaml").name == "good"


def test_a_path_without_a_card_suffix_is_not_taken_for_a_shipped_name(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as info:
        load_model_card(tmp_path / "mycard")
    msg = str(info.value)
    assert f"{tmp_path / 'mycard'} is not a model card" in msg and ".yaml or .yml" in msg
    assert "PosixPath" not in msg


def test_user_model_card_loads_from_its_own_folder(tmp_path: Path) -> None:
    shutil.copy(MODELS_DIR / "nuclei.onnx", tmp_path / "mine.onnx")
    card = yaml.safe_load((MODELS_DIR / "nuclei.yaml").read_text())
    card.update(name="mine", file="mine.onnx")
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(card))
    seg = load_segmenter(str(tmp_path / "mine.yaml"))
    assert seg.card.name == "mine"
    assert seg.predict(np.zeros((40, 52), np.uint16)).shape == (2, 40, 52)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"file": "missing.onnx"}, "missing.onnx"),
        ({"normalization": {"low": 50, "high": 10, "kind": "zscore"}}, "normalization"),
        ({"postprocessing": {"foreground_threshold": 1.5}}, "foreground_threshold"),
        ({"colour": "blue"}, "colour"),
        ({"file": None}, "file"),
        # found by the bug hunt: both loaded, then failed on the first frame
        ({"tile_px": 64, "tile_overlap_px": 40},
         r"tile_overlap_px 40 is more than a quarter of the tile \(64 px.*at most 16"),
        ({"tile_px": 16, "size_multiple": 16, "tile_overlap_px": 2},
         r"tile_px 16 less tile_overlap_px 2 is less than size_multiple 16"),
        ({"outputs": ["foreground"]},
         r"outputs lists 1 channel.*seeded-watershed reads 2 \(foreground, seeds\)"),
        ({"normalization": {"clip": [3, -1]}}, r"normalization.clip \[3.0, -1.0\] must keep"),
        ({"normalization": {"clip": [0.5, 3]}}, r"normalization.clip .*low <= 0 and high >= 1"),
        ({"normalization": {"clip": [-1]}}, r"normalization.clip: .*at least 2"),
        ({"normalization": {"clip": [-1, 2, 3]}}, r"normalization.clip: .*at most 2"),
        ({"normalization": {"clip": [-1, ".inf"]}}, r"normalization.clip.1: "),
        ({"normalization": {"clip": "wide"}}, r"normalization.clip: "),
        ({"normalization": {"exclude_saturated": "maybe"}},
         r"normalization.exclude_saturated: "),
        ({"normalization": {"exclude_saturated": 1}}, r"normalization.exclude_saturated: "),
    ],
)
def test_invalid_cards_name_the_problem(tmp_path: Path, change: dict, needle: str) -> None:
    shutil.copy(MODELS_DIR / "nuclei.onnx", tmp_path / "nuclei.onnx")
    card = yaml.safe_load((MODELS_DIR / "nuclei.yaml").read_text())
    card.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(card))
    with pytest.raises(ModelError, match=needle):
        load_model_card(path)


def test_corrupt_onnx_file_is_a_model_error(tmp_path: Path) -> None:
    card = yaml.safe_load((MODELS_DIR / "nuclei.yaml").read_text())
    (tmp_path / "nuclei.onnx").write_bytes(b"not an onnx file")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(card))
    with pytest.raises(ModelError, match="ONNX Runtime cannot load"):
        load_segmenter(str(tmp_path / "c.yaml"))


def test_a_service_config_as_model_card_says_so(tmp_path: Path) -> None:
    # model.path pointing at a service config used to print pydantic's raw errors
    with pytest.raises(ModelError, match=r"is not a model card .*found: hardware"):
        load_model_card(Path(__file__).parents[1] / "configs" / "simulated-nuclei.yaml")
    bad = tmp_path / "card.yaml"
    bad.write_text("name: mine\nfile: nuclei.onnx\ntile_px: 4\n")
    with pytest.raises(ModelError) as info:
        load_model_card(bad)
    assert "tile_px: Input should be greater than or equal to 16" in str(info.value)
    assert "pydantic" not in str(info.value)


@pytest.mark.parametrize("model", ["nuclei", "nuclei_rf", "nuclei_classical"])
def test_warmup_at_a_size_that_is_no_multiple_of_the_card(model: str) -> None:
    # a 17x23 camera (or a replayed TIFF) used to crash the start: the model was warmed up
    # at the raw size, which its down/up-sampling cannot take
    seg = load_segmenter(model, threads=1)
    seg.warmup((17, 23))
    image = np.random.default_rng(0).integers(100, 2000, (17, 23)).astype(np.uint16)
    assert seg.segment(image).shape == (17, 23)


@pytest.mark.parametrize("name", ["nuclei", "nuclei_rf"])
def test_shipped_nuclei_models_find_no_nuclei_in_empty_fields(name: str) -> None:
    """Percentile normalisation stretched an empty field's camera noise to 0..1 and the model
    found 1-2 (U-Net) or 16-19 (forest) phantom nuclei per field in it; the card's noise
    floor (normalization.min_span_noise) keeps the noise small. benchmarks/empty_fields.py
    has the figures for sparse and dim fields too."""
    from livemask.acquisition.simulated.nuclei import NucleiParams, NucleiSample
    from livemask.analysis.metrics import match_instances
    from livemask.inference.segmenter import Segmenter
    from livemask.inference.select import load_backend

    card = load_model_card(name)
    assert card.normalization.min_span_noise == 25
    segmenter = Segmenter(card, load_backend("onnxruntime", card, threads=1))
    sample = NucleiSample(NucleiParams(density_per_mpx=1e-9), seed=5)
    for k in (0, 1, 4):  # fields without a nucleus
        render = sample.render((k * 300.0, k * 100.0), (512, 512), exposure_ms=10.0)
        assert not render.labels.any()
        assert segmenter.segment(render.image).max() == 0, f"field {k}"
    sparse = NucleiSample(NucleiParams(density_per_mpx=3.0), seed=5)
    render = sparse.render((300.0, 100.0), (512, 512), exposure_ms=3.0)
    result = match_instances(render.labels, segmenter.segment(render.image))
    assert render.labels.max() > 0 and result.fp == 0 and result.fn == 0


def test_a_card_with_an_upper_case_suffix_is_a_path(tmp_path: Path) -> None:
    """card.YAML was taken for the name of a shipped model (bug hunt)."""
    shutil.copy(MODELS_DIR / "nuclei.onnx", tmp_path / "nuclei.onnx")
    shutil.copy(MODELS_DIR / "nuclei.yaml", tmp_path / "Mine.YAML")
    assert load_model_card(tmp_path / "Mine.YAML").card_path == (tmp_path / "Mine.YAML").resolve()
    assert load_model_card(str(tmp_path / "Mine.YAML")).name == "nuclei"


def test_a_small_tile_without_an_overlap_given_gets_a_quarter_of_it(tmp_path: Path) -> None:
    """The default overlap (64 px) is more than a quarter of a 128 px tile: a card that sets
    no overlap of its own loads with 32 px (review: refusing it broke such cards, which ran
    frames up to one tile before)."""
    shutil.copy(MODELS_DIR / "nuclei.onnx", tmp_path / "nuclei.onnx")
    card = yaml.safe_load((MODELS_DIR / "nuclei.yaml").read_text())
    card.pop("tile_overlap_px", None)
    card["tile_px"] = 128
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(card))
    assert load_model_card(path).tile_overlap_px == 32
    card.update(tile_px=32, size_multiple=32)  # a tile of one size_multiple: no overlap
    path.write_text(yaml.safe_dump(card))
    assert load_model_card(path).tile_overlap_px == 0


@pytest.mark.parametrize("file", ["missing.onnx", "a\x00b.onnx"])
def test_a_card_naming_no_file_is_a_model_error(tmp_path: Path, file: str) -> None:
    """A NUL byte in `file` raised a bare ValueError (bug hunt)."""
    import yaml

    data = yaml.safe_load((MODELS_DIR / "nuclei.yaml").read_text())
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**data, "file": file}))
    with pytest.raises(ModelError, match=r"\(field 'file'\), which is not a file"):
        load_model_card(tmp_path / "mine.yaml")


def _saturated_frames(kind: str, n: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    """Live-like 512x512 frames with saturated pixels at 65535 and their truth labels
    (nuclei under the debris dropped from both, as the evaluation does)."""
    from livemask.acquisition.simulated.nuclei import NucleiSample

    sample = NucleiSample(seed=21)
    rng = np.random.default_rng(21)
    frames = []
    for k in range(n):
        render = sample.render((k * 400.0, 300.0), (512, 512), exposure_ms=10.0)
        image, truth = render.image.copy(), render.labels
        if kind == "hot":  # 0.1 % hot pixels: sCMOS hot pixels or cosmic rays
            image[rng.random(image.shape) < 1e-3] = 65535
        else:  # a saturated blob of debris over 0.5 % of the frame
            yy, xx = np.mgrid[:512, :512]
            image[(yy - 150 - 100 * k) ** 2 + (xx - 256) ** 2 <= 20**2] = 65535
        frames.append((image, truth))
    return frames


@pytest.mark.parametrize("kind", ["hot", "debris"])
def test_the_nuclei_model_segments_frames_with_saturated_pixels(kind: str) -> None:
    """Without clipping a hot pixel reached the U-Net at 100-200x a nucleus and became a
    nucleus (F1 0.35 at 0.1 % hot pixels); saturated debris over more than 0.2 % of the frame
    was the 99.8th percentile and squashed the nuclei to nothing (F1 0). The card clips the
    normalised input and takes the percentiles below the saturated plateau."""
    from livemask.analysis.metrics import aggregate, match_instances

    card = load_model_card("nuclei")
    assert card.normalization.clip is not None and card.normalization.exclude_saturated
    seg = load_segmenter("nuclei", threads=1)
    results = []
    for image, truth in _saturated_frames(kind):
        pred = seg.segment(image)
        covered = image == 65535
        for lab in (truth, pred):  # nuclei under the debris: neither right nor wrong
            lab[np.isin(lab, np.unique(lab[covered & (kind == "debris")]))] = 0
        results.append(match_instances(truth, pred))
    total = aggregate(results)
    assert total.n_true > 300
    assert total.f1 >= 0.95, total
