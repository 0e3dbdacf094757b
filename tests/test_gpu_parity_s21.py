"""Session 21: the device (torch) path normalises and measures as the CPU path does (run on
torch CPU): the outlier rule for bright debris that is not saturated, and ``saturated_px``."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

torch = pytest.importorskip("torch")

from livemask.acquisition.simulated.nuclei import NucleiSample, random_field  # noqa: E402
from livemask.analysis import normalize  # noqa: E402
from livemask.analysis.measure import measure_objects  # noqa: E402
from livemask.analysis.normalize import percentile_normalize  # noqa: E402
from livemask.inference.models import load_model_card  # noqa: E402
from livemask.inference.segmenter import DeviceProbabilities, Segmenter  # noqa: E402
from livemask.inference.torch_analysis import TorchAnalysis  # noqa: E402
from livemask.inference.torch_backend import TorchBackend  # noqa: E402

#: The nuclei card's normalisation (nuclei.yaml).
CARD = {"min_span_noise": 25.0, "clip": (-1.0, 2.0), "exclude_saturated": True}


@pytest.fixture(scope="module")
def ta() -> TorchAnalysis:
    return TorchAnalysis("cpu")


@pytest.fixture(scope="module")
def field() -> np.ndarray:
    """A 512² field of the default time-lapse sample (10 ms, uint16)."""
    sample = NucleiSample(seed=11)
    for _ in range(5):
        sample.step()
    image: np.ndarray = sample.render((0.0, 0.0), (512, 512), exposure_ms=10.0).image
    return image


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: int) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.asarray((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2)


def _blob(
    shape: tuple[int, int], level: float, discs: list[tuple[int, int, int]]
) -> np.ndarray:
    """Discs (row, col, radius) ``level`` bright, blurred with σ 1.3 px (float64)."""
    mask = np.zeros(shape, bool)
    for r, c, radius in discs:
        mask |= _disc(shape, (r, c), radius)
    blob: np.ndarray = ndimage.gaussian_filter(mask.astype(np.float64), 1.3) * level
    return blob


def _debris(image: np.ndarray, level: float, discs: list[tuple[int, int, int]]) -> np.ndarray:
    """``image`` plus blurred discs of debris ``level`` counts bright, uint16 (no plateau)."""
    return np.clip(image + _blob(image.shape, level, discs), 0, 65535).astype(np.uint16)


def _device(ta: TorchAnalysis, image: np.ndarray) -> np.ndarray:
    """The device path's normalisation of ``image`` with the card's settings."""
    grey = normalize.grey_level(image.dtype)
    out: np.ndarray = ta.normalize(ta.upload(image), 1.0, 99.8, min_span_noise=25.0,
                                   grey_level=grey, clip=(-1.0, 2.0),
                                   exclude_saturated=True).numpy()
    return out


CENTRE = [(256, 256, 20)]
FOUR = [(100, 100, 12), (100, 400, 12), (400, 100, 12), (400, 400, 12)]


@pytest.mark.parametrize(("level", "discs", "acts"), [
    (40000.0, CENTRE, True), (10000.0, CENTRE, True), (2000.0, CENTRE, False),
    (40000.0, FOUR, True)])
def test_device_normalize_leaves_unsaturated_debris_out_like_cpu(
    ta: TorchAnalysis, field: np.ndarray, monkeypatch: pytest.MonkeyPatch, level: float,
    discs: list[tuple[int, int, int]], acts: bool,
) -> None:
    """The outlier rule (``_outlier_free_range``) on the device: a 512² frame with a blurred
    r = 20 px disc 40,000 counts above the background (no plateau) was the top of the
    device's range (the nuclei near 0.02) while the CPU path left it out (0.4). Now the
    same model input, bit for bit (a +2,000 disc stays below the rule's level)."""
    dirty = _debris(field, level, discs)
    assert _rule_acts(dirty, monkeypatch) is acts
    want = percentile_normalize(dirty, 1.0, 99.8, **CARD)  # type: ignore[arg-type]
    np.testing.assert_array_equal(_device(ta, dirty), want)
    _, batch = ta.preprocess(dirty, 1.0, 99.8, size_multiple=16, min_span_noise=25.0,
                             clip=(-1.0, 2.0), exclude_saturated=True)
    np.testing.assert_array_equal(batch[0, 0].numpy(), want)


def test_the_rule_acts_on_the_device(ta: TorchAnalysis, field: np.ndarray) -> None:
    """The nuclei of the debris frame keep (within 10 %) their level without the debris."""
    dirty = _debris(field, 40000.0, CENTRE)
    nuclei = (field > np.percentile(field, 95)) & ~_disc(field.shape, (256, 256), 40)
    clean = float(np.median(_device(ta, field)[nuclei]))
    assert float(np.median(_device(ta, dirty)[nuclei])) == pytest.approx(clean, rel=0.1)
    assert clean > 0.2


def _rule_acts(image: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Whether the CPU path's outlier rule changes the normalisation of ``image``."""
    with_rule = percentile_normalize(image, 1.0, 99.8, **CARD)  # type: ignore[arg-type]
    with monkeypatch.context() as m:
        m.setattr(normalize, "OUTLIER_RATIO", float("inf"))
        without = percentile_normalize(image, 1.0, 99.8, **CARD)  # type: ignore[arg-type]
    return not np.array_equal(with_rule, without)


@pytest.mark.parametrize(("case", "acts"), [
    ("uint8", True), ("float32", True), ("plateau and debris", True),
    ("black background", True), ("no objects", False), ("few objects", False)])
def test_device_outlier_rule_edge_cases_like_cpu(
    ta: TorchAnalysis, field: np.ndarray, monkeypatch: pytest.MonkeyPatch, case: str,
    acts: bool,
) -> None:
    """Other pixel types (a grey level of 1 or 0), saturated and unsaturated debris together,
    debris on a black background (no noise: 5 grey levels make an object), and frames
    where the rule has no reference: as on the CPU."""
    rng = np.random.default_rng(1)
    if case == "uint8":  # the background at 7 grey levels, the debris at 252 (no plateau)
        image = np.clip(field // 16 + _blob(field.shape, 245.0, CENTRE), 0, 254)
        image = image.astype(np.uint8)
    elif case == "float32":
        image = _debris(field, 40000.0, CENTRE).astype(np.float32) / 65535.0
    elif case == "plateau and debris":
        image = _debris(field, 40000.0, [(400, 100, 12)])
        image[:30, :30] = 65535
    elif case == "black background":
        image = np.zeros((256, 256), np.uint16)
        image[100:110, 100:140] = 300  # 0.6 %: the objects
        image[200:210, 200:220] = 60000 + np.arange(200).reshape(10, 20)  # 0.3 %
    else:
        image = rng.normal(100.0, 5.0, (256, 256)).astype(np.uint16)
        if case == "few objects":  # 16 sampled pixels above the noise: no reference
            image[:16:4, :16:4] = 1000
            image[40:44:4, 40:56:4] = 30000
    assert _rule_acts(image, monkeypatch) is acts
    want = percentile_normalize(image, 1.0, 99.8, **CARD)  # type: ignore[arg-type]
    # float32 frames: numpy takes the top below the level in float32 (a float64 top here)
    exact = 0.0 if image.dtype.kind in "ui" else 1e-6
    np.testing.assert_allclose(_device(ta, image), want, rtol=0.0, atol=exact)


def _seg() -> Segmenter:
    card = load_model_card("nuclei")
    backend = TorchBackend(threads=1, device="cpu")
    backend.load(card)
    return Segmenter(card, backend, device_resident=True)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.float32])
def test_device_path_counts_saturated_pixels(dtype: type) -> None:
    """Segmenter.analyse on the device path gave saturated_px None (the torch analysis was
    not given the camera's saturation level): now as measure_objects on the same labels,
    None only for float frames."""
    image, _ = random_field(np.random.default_rng(6), (200, 232))
    if dtype == np.uint8:  # (a background near 420 counts)
        image = (image - image.min()).clip(0, 255)
    image = image.astype(dtype)
    top = 1.0 if dtype == np.float32 else float(np.iinfo(dtype).max)
    image[image > np.percentile(image, 99.0)] = top  # the brightest 1 %: saturated
    seg = _seg()
    out = seg.infer(image)
    assert isinstance(out, DeviceProbabilities)
    labels, objects, summary = seg.analyse(out, image, pixel_size_um=0.65)
    assert (objects, summary) == measure_objects(labels, image, pixel_size_um=0.65)
    if dtype == np.float32:
        assert summary["saturated_objects"] is None
    else:
        assert summary["saturated_objects"] >= 3
        assert sum(o["saturated_px"] for o in objects) > 0
