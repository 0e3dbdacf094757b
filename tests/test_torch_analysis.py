"""The device (torch) labelling and measuring path against the CPU path, run on torch CPU."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from livemask.acquisition.simulated.nuclei import random_field  # noqa: E402
from livemask.analysis.measure import measure_objects, saturation_level  # noqa: E402
from livemask.analysis.metrics import aggregate, match_instances  # noqa: E402
from livemask.analysis.normalize import percentile_normalize  # noqa: E402
from livemask.inference import torch_analysis  # noqa: E402
from livemask.inference.models import load_model_card  # noqa: E402
from livemask.inference.segmenter import DeviceProbabilities, Segmenter  # noqa: E402
from livemask.inference.select import load_backend  # noqa: E402
from livemask.inference.torch_analysis import LabelParams, TorchAnalysis  # noqa: E402
from livemask.inference.torch_backend import TorchBackend  # noqa: E402


@pytest.fixture(scope="module")
def ta() -> TorchAnalysis:
    return TorchAnalysis("cpu")


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    card = load_model_card("nuclei")
    return Segmenter(card, load_backend("onnxruntime", card, threads=1))


def test_components_use_4_connectivity(ta: TorchAnalysis) -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: two components
    mask[4:7, 4] = mask[6, 4:7] = mask[4:7, 6] = True  # a U: one component
    lab = ta.components(torch.from_numpy(mask)).numpy()
    assert lab[1, 1] != lab[2, 2]
    u = lab[mask & (np.arange(8)[:, None] >= 4)]
    assert np.unique(u).size == 1
    assert (lab[~mask] == 0).all()


def test_seeded_growth_splits_touching_objects(ta: TorchAnalysis) -> None:
    fg = np.zeros((20, 40), dtype=np.float32)
    fg[5:15, 5:35] = 1.0  # one foreground bar ...
    seeds = np.zeros_like(fg)
    seeds[8:12, 8:12] = 1.0  # ... with two seeds and a saddle between them
    seeds[8:12, 28:32] = 1.0
    seeds[5:15, 12:28] = np.linspace(0.4, 0.0, 8).tolist() + np.linspace(0.0, 0.4, 8).tolist()
    lab, n = ta.labels_from_probabilities(torch.from_numpy(fg), torch.from_numpy(seeds),
                                          min_area_px=5)
    lab_np = lab.numpy()
    assert n == 2
    assert lab_np[10, 6] != lab_np[10, 33]
    assert (lab_np[5:15, 5:35] > 0).all()  # every foreground pixel assigned
    cut = np.flatnonzero(np.diff(lab_np[10, 5:35]))
    assert cut.size == 1 and 12 <= cut[0] + 5 <= 22  # the split is near the saddle


def _long_seed_and_wide_object() -> tuple[np.ndarray, np.ndarray]:
    fg = np.zeros((100, 220), dtype=np.float32)
    fg[10:20, 10:80] = 1.0  # object 1: a long thin seed of 60 px
    seeds = np.zeros_like(fg)
    seeds[13:17, 15:75] = 1.0
    fg[5:95, 110:200] = 1.0  # object 2: 90 px wide with a 4 px seed in the middle
    seeds[48:52, 153:157] = 1.0
    fg[60:70, 20:30] = 1.0  # object 3: foreground without a seed
    return fg, seeds


def test_long_seeds_and_wide_objects_converge(ta: TorchAnalysis) -> None:
    fg, seeds = _long_seed_and_wide_object()
    lab, n = ta.labels_from_probabilities(torch.from_numpy(fg), torch.from_numpy(seeds))
    lab_np = lab.numpy()
    assert n == 3
    assert np.unique(lab_np[10:20, 10:80]).size == 1
    assert np.unique(lab_np[5:95, 110:200]).size == 1
    assert np.unique(lab_np[60:70, 20:30]).size == 1
    assert (lab_np[fg > 0] > 0).all()


def _analyse_equals_exact(ta: TorchAnalysis, fg: np.ndarray, seeds: np.ndarray,
                          image: np.ndarray, params: LabelParams) -> np.ndarray:
    """analyse() (fixed steps) returns what the exact labels plus measure() return."""
    f, s = torch.from_numpy(fg), torch.from_numpy(seeds)
    img = ta.upload(image)
    labels, objects, summary = ta.analyse(f, s, img, params, pixel_size_um=0.5,
                                          saturation=saturation_level(image.dtype))
    exact, n = ta.labels_from_probabilities(
        f, s, foreground_threshold=params.foreground_threshold,
        seed_threshold=params.seed_threshold, min_area_px=params.min_area_px,
        flood_levels=params.flood_levels)
    np.testing.assert_array_equal(labels, exact.numpy())
    assert labels.dtype == np.int32 and int(labels.max()) == n == len(objects)
    assert (objects, summary) == measure_objects(labels, image, pixel_size_um=0.5)
    return labels


def test_analyse_fixed_steps_equal_exact_path(ta: TorchAnalysis, segmenter: Segmenter) -> None:
    rng = np.random.default_rng(8)
    params = LabelParams(flood_levels=16)
    objects = 0
    for _ in range(3):
        image, _truth = random_field(rng, (256, 224))
        p = segmenter.predict(image)
        objects += int(_analyse_equals_exact(ta, p[0], p[1], image, params).max())
    assert objects > 30


def test_analyse_continues_beyond_fixed_steps(
    ta: TorchAnalysis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 90 px wide object outgrows the fixed flooding steps, and with one fixed component
    step neither seeds nor unseeded areas converge: the stages then run one by one, each
    continued until done, with the exact path's result."""
    fg, seeds = _long_seed_and_wide_object()
    image = (fg * 500 + 100).astype(np.uint16)
    params = LabelParams(min_area_px=5)
    calls: list[str] = []
    run = ta._run

    def counted(key: tuple[object, ...], *rest: object) -> object:
        calls.append(str(key[0]))
        return run(key, *rest)

    monkeypatch.setattr(ta, "_run", counted)
    _analyse_equals_exact(ta, fg, seeds, image, params)
    assert calls[:3] == ["all", "seeds", "grow"] and calls.count("flood") >= 2
    assert "more" not in calls and calls[-2:] == ["rest", "measure"]
    monkeypatch.setattr(torch_analysis, "_SEED_STEPS", 1)
    calls.clear()
    _analyse_equals_exact(ta, fg, seeds, image, params)
    assert calls[:3] == ["all", "seeds", "more"]
    assert calls.index("rest") < len(calls) - 2 and calls[calls.index("rest") + 1] == "more"


def test_analyse_empty_frame(ta: TorchAnalysis) -> None:
    zeros = np.zeros((40, 48), dtype=np.float32)
    image = np.full((40, 48), 9, dtype=np.uint16)
    labels, objects, summary = ta.analyse(torch.from_numpy(zeros), torch.from_numpy(zeros),
                                          ta.upload(image), LabelParams())
    assert not labels.any() and objects == [] and summary["count"] == 0
    assert summary["background_mean"] == 9.0


def test_device_labels_agree_with_cpu_path(ta: TorchAnalysis, segmenter: Segmenter) -> None:
    rng = np.random.default_rng(3)
    results = []
    for _ in range(4):
        image, _truth = random_field(rng, (256, 256))
        p = segmenter.predict(image)
        cpu = segmenter.labels(p)
        dev, n = ta.labels_from_probabilities(torch.from_numpy(p[0]), torch.from_numpy(p[1]))
        assert n == int(dev.max())
        results.append(match_instances(cpu, dev.numpy()))
    total = aggregate(results)
    assert total.n_true > 50
    assert total.f1 >= 0.95
    assert total.mean_matched_iou >= 0.9


@pytest.mark.parametrize("floor", [None, 25.0, 3.0])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.float32])
def test_device_normalize_matches_cpu(ta: TorchAnalysis, dtype: type, floor: float | None) -> None:
    rng = np.random.default_rng(5)
    image = (rng.random((200, 300)) * 200 + 60000 * (dtype == np.uint16)).astype(dtype)
    got = ta.normalize(ta.upload(image), 1.0, 99.8, min_span_noise=floor).numpy()
    want = percentile_normalize(image, 1.0, 99.8, min_span_noise=floor)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("clip", [None, (-1.0, 3.0)])
@pytest.mark.parametrize(("dtype", "top"), [(np.uint8, 255), (np.uint16, 4095),
                                            (np.uint16, 65535), (np.float32, 1.0)])
def test_device_normalize_matches_cpu_with_saturated_pixels(
    ta: TorchAnalysis, dtype: type, top: float, clip: tuple[float, float] | None
) -> None:
    """The saturated plateau and the clip as on the CPU: hot pixels, then debris over more
    than 100 - high percent, then no plateau (a few pixels at the top), then a flat frame."""
    rng = np.random.default_rng(8)
    image = (rng.normal(0.1, 0.02, (200, 300)).clip(0, 0.2) * top).astype(dtype)
    image[100:104, 150:154] = 0.2 * top  # a nucleus
    hot = image.copy()
    hot[rng.random(image.shape) < 0.005] = top
    debris = image.copy()
    debris[:30, :30] = top
    few = image.copy()
    few[0, :2] = top
    grey = 0.0 if dtype == np.float32 else 1.0
    for case in (hot, debris, few, np.full((70, 90), top, dtype)):
        for floor in (None, 25.0):
            got = ta.normalize(ta.upload(case), 1.0, 99.8, min_span_noise=floor,
                               grey_level=grey, clip=clip, exclude_saturated=True).numpy()
            want = percentile_normalize(case, 1.0, 99.8, min_span_noise=floor,
                                        clip=clip or False, exclude_saturated=True)
            np.testing.assert_allclose(got, want, atol=1e-4)
    _, batch = ta.preprocess(debris, 1.0, 99.8, size_multiple=8, min_span_noise=25.0,
                             clip=clip, exclude_saturated=True)
    want = percentile_normalize(debris, 1.0, 99.8, min_span_noise=25.0,
                                clip=clip or False, exclude_saturated=True)
    np.testing.assert_allclose(batch[0, 0, :200, :300].numpy(), want, atol=1e-4)
    clean = percentile_normalize(image, 1.0, 99.8, min_span_noise=25.0)
    nucleus = np.s_[101:103, 151:153]  # as without the debris, not squashed below it
    np.testing.assert_allclose(want[nucleus], clean[nucleus], rtol=0.1)


def test_device_normalize_matches_cpu_on_a_black_background(ta: TorchAnalysis) -> None:
    image = np.zeros((128, 128), np.uint16)
    image[10:14, 20:24] = 900  # 0.1 % of the pixels: both percentiles are 0
    got = ta.normalize(ta.upload(image), 1.0, 99.8, min_span_noise=25.0).numpy()
    np.testing.assert_allclose(got, percentile_normalize(image, 1.0, 99.8, min_span_noise=25))
    assert got.max() == 1.0
    image[10:14, 20:24] = 3  # a few counts of debris: the noise floor holds it down
    for dtype in (np.uint16, np.uint32, np.int64, np.int8):  # (some upload as float32)
        _, batch = ta.preprocess(image.astype(dtype), 1.0, 99.8, min_span_noise=25.0)
        assert not batch.numpy().any(), dtype
        assert not percentile_normalize(image.astype(dtype), 1.0, 99.8,
                                        min_span_noise=25).any()


def test_preprocess_normalizes_and_pads_like_cpu(ta: TorchAnalysis) -> None:
    image = (np.random.default_rng(9).random((70, 90)) * 3000).astype(np.uint16)
    img, batch = ta.preprocess(image, 1.0, 99.8, size_multiple=16)
    expected = np.pad(percentile_normalize(image, 1.0, 99.8), ((0, 10), (0, 6)), mode="reflect")
    np.testing.assert_array_equal(img.numpy(), image.astype(np.float32))
    assert batch.shape == (1, 1, 80, 96)
    np.testing.assert_allclose(batch[0, 0].numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("shape", [(3, 40), (2, 2), (1, 5), (5, 1), (17, 23)])
def test_frames_smaller_than_the_padding_pad_like_cpu(
    ta: TorchAnalysis, shape: tuple[int, int]
) -> None:
    """A thin camera ROI (3 x 40 padded to 8 x 40) failed on the device: torch's reflect
    padding must be smaller than the side, numpy's repeats the reflection."""
    image = (np.random.default_rng(3).random(shape) * 3000).astype(np.uint16)
    _, batch = ta.preprocess(image, 1.0, 99.8, size_multiple=8)
    h, w = shape
    expected = np.pad(percentile_normalize(image, 1.0, 99.8),
                      ((0, (-h) % 8), (0, (-w) % 8)), mode="reflect")
    np.testing.assert_allclose(batch[0, 0].numpy(), expected, atol=1e-4)


def test_signed_16_bit_pixels_keep_their_sign_on_the_device(ta: TorchAnalysis) -> None:
    """uint16 travels as its int16 bits; a real int16 image (offset-subtracted camera,
    replayed int16 data) read -5 as 65531 in the measured image and the normalisation."""
    image = np.array([[-5, 10, 400], [200, -300, 0]], np.int16)
    img, batch = ta.preprocess(image, 1.0, 99.8)
    np.testing.assert_array_equal(img.numpy(), image.astype(np.float32))
    np.testing.assert_allclose(batch[0, 0].numpy(), percentile_normalize(image, 1.0, 99.8),
                               atol=1e-4)
    wide = (np.arange(6, dtype=np.uint16) * 13000).reshape(2, 3)  # uint16 above 32767
    np.testing.assert_array_equal(ta.upload(wide).numpy(), wide.astype(np.float32))


def test_segmenter_device_path_end_to_end() -> None:
    """Segmenter.infer/analyse on the torch backend (CPU) kept 'on the device'."""
    card = load_model_card("nuclei")
    backend = TorchBackend(threads=1, device="cpu")
    backend.load(card)
    seg = Segmenter(card, backend, device_resident=True)
    ref = Segmenter(card, load_backend("onnxruntime", card, threads=1))
    assert seg.device_resident and not ref.device_resident
    image, _ = random_field(np.random.default_rng(6), (200, 232))
    out = seg.infer(image)
    assert isinstance(out, DeviceProbabilities)
    labels, objects, summary = seg.analyse(out, image, pixel_size_um=0.65)
    ref_labels, ref_objects, _ = ref.analyse(ref.infer(image), image, pixel_size_um=0.65)
    assert labels.shape == image.shape and labels.dtype == np.int32
    assert summary["count"] == len(objects) == int(labels.max())
    assert match_instances(ref_labels, labels).f1 >= 0.9
    assert abs(len(objects) - len(ref_objects)) <= max(2, len(ref_objects) // 10)


def test_device_path_hands_non_finite_images_to_the_host_path() -> None:
    # the device's percentiles have no NaN handling: a NaN patch zeroed the whole frame
    card = load_model_card("nuclei")
    backend = TorchBackend(threads=1, device="cpu")
    backend.load(card)
    seg = Segmenter(card, backend, device_resident=True)
    image, _ = random_field(np.random.default_rng(6), (200, 232))
    clean = seg.analyse(seg.infer(image.astype(np.float32)), image)[2]["count"]
    holed = image.astype(np.float32)
    holed[10:15, 10:15] = np.nan
    out = seg.infer(holed)
    assert not isinstance(out, DeviceProbabilities)
    assert abs(seg.analyse(out, holed)[2]["count"] - clean) <= 2 and clean >= 5


@pytest.mark.parametrize("dtype", [np.uint32, np.int32, np.float64])
def test_device_path_hands_frames_float32_cannot_hold_to_the_host_path(
    dtype: type[np.generic],
) -> None:
    """32-bit integer and float64 pixels are not exact in float32, where the device path
    normalises: a uint32 field on a 2**30 offset came out up to 0.17 off the host path's
    model input (which subtracts the offset in float64). They take the host path."""
    card = load_model_card("nuclei")
    backend = TorchBackend(threads=1, device="cpu")
    backend.load(card)
    seg = Segmenter(card, backend, device_resident=True)
    image, _ = random_field(np.random.default_rng(6), (96, 96))
    wide = image.astype(dtype) + (2**30 if dtype == np.uint32 else 0)
    assert not isinstance(seg.infer(wide), DeviceProbabilities)
    for exact in (np.uint16, np.float16):  # float16 is exact in float32 too
        assert isinstance(seg.infer(image.astype(exact)), DeviceProbabilities)


def test_device_path_refused_for_cpu_backends() -> None:
    card = load_model_card("nuclei")
    with pytest.raises(ValueError, match="only the torch backend"):
        Segmenter(card, load_backend("onnxruntime", card, threads=1), device_resident=True)


@pytest.mark.parametrize("stage_threads", ["one", "two"])
async def test_pipeline_on_the_device_path_in_either_layout(stage_threads: str) -> None:
    """The pipeline carries DeviceProbabilities from inference to analysis in both layouts
    and publishes what Segmenter.analyse gives for the same frame."""
    import time

    import useq

    from livemask.acquisition.source import RawFrame
    from livemask.service.pipeline import Pipeline
    from livemask.transport.publisher import MemoryPublisher

    card = load_model_card("nuclei")
    backend = TorchBackend(threads=1, device="cpu")
    backend.load(card)
    seg = Segmenter(card, backend, device_resident=True)
    pub = MemoryPublisher()
    pipe = Pipeline(seg, pub, mode="synchronized", stage_threads=stage_threads,  # type: ignore[arg-type]
                    pixel_size_um=0.65)
    rng = np.random.default_rng(11)
    images = [random_field(rng, (128, 160))[0] for _ in range(3)]
    pipe.start()
    for i, image in enumerate(images):
        pipe.submit(RawFrame(image, useq.MDAEvent(index={"t": i}), time.time(), {}, None))
    assert await pipe.drain(60.0)
    await pipe.close()
    published = pub.by_topic("measurements")
    assert [m.header["frame_id"] for m in published] == [0, 1, 2]
    for msg, image in zip(published, images, strict=True):
        _, objects, summary = seg.analyse(seg.infer(image), image, pixel_size_um=0.65)
        assert msg.header["summary"]["count"] == summary["count"] == len(objects) > 0


def test_captured_graphs_are_kept_for_a_bounded_number_of_frame_shapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run that changes its ROI again and again must not keep a set of frame-sized CUDA
    graphs per shape it ever saw: the least recently used shape's graphs are dropped. The
    bookkeeping of ``_run``'s CUDA branch, with the capture replaced (no GPU here)."""
    captures: list[tuple[int, ...]] = []

    class Capture:
        def __init__(self, fn: object, inputs: list[torch.Tensor], device: object) -> None:
            captures.append(tuple(inputs[0].shape))
            self.fn = fn

        def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.fn(*inputs)  # type: ignore[operator]

    monkeypatch.setattr(torch_analysis, "_CapturedCall", Capture)
    ta = TorchAnalysis("cpu", max_shapes=2)
    ta.device = torch.device("cuda")  # takes the capturing branch; nothing runs on it

    def run(h: int, w: int) -> torch.Tensor:
        out: torch.Tensor = ta._run(("stage", h, w), lambda x, _p: x + 1, [torch.zeros(h, w)],
                                    ())
        return out

    assert float(run(8, 8).sum()) == 64
    run(16, 16)
    run(8, 8)  # replayed, and now the more recent of the two
    assert captures == [(8, 8), (16, 16)]
    run(32, 32)  # a third shape: 16×16, the least recently used, is dropped
    assert ta.cached_shapes == [(8, 8), (32, 32)]
    run(16, 16)  # captured again; 8×8 goes
    assert captures == [(8, 8), (16, 16), (32, 32), (16, 16)]
    assert ta.cached_shapes == [(32, 32), (16, 16)]
    assert sorted(k[1:3] for k in ta._graphs) == [(16, 16), (32, 32)]
    with pytest.raises(ValueError, match="max_shapes"):
        TorchAnalysis("cpu", max_shapes=0)
