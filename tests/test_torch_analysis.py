"""The device (torch) labelling and measuring path against the CPU path, run on torch CPU."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from livemask.acquisition.simulated.nuclei import random_field  # noqa: E402
from livemask.analysis.measure import measure_objects  # noqa: E402
from livemask.analysis.metrics import aggregate, match_instances  # noqa: E402
from livemask.analysis.normalize import percentile_normalize  # noqa: E402
from livemask.inference.models import load_model_card  # noqa: E402
from livemask.inference.segmenter import DeviceProbabilities, Segmenter  # noqa: E402
from livemask.inference.select import load_backend  # noqa: E402
from livemask.inference.torch_analysis import TorchAnalysis  # noqa: E402
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


def test_long_seeds_and_wide_objects_converge(ta: TorchAnalysis) -> None:
    """Beyond the fixed steps (a 60 px seed, a 90 px wide object) the exact loops finish."""
    fg = np.zeros((100, 220), dtype=np.float32)
    fg[10:20, 10:80] = 1.0  # object 1: a long thin seed of 60 px
    seeds = np.zeros_like(fg)
    seeds[13:17, 15:75] = 1.0
    fg[5:95, 110:200] = 1.0  # object 2: 90 px wide with a 4 px seed in the middle
    seeds[48:52, 153:157] = 1.0
    lab, n = ta.labels_from_probabilities(torch.from_numpy(fg), torch.from_numpy(seeds))
    lab_np = lab.numpy()
    assert n == 2
    assert np.unique(lab_np[10:20, 10:80]).size == 1
    assert np.unique(lab_np[5:95, 110:200]).size == 1
    assert (lab_np[fg > 0] > 0).all()


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


def test_device_measurements_equal_cpu(ta: TorchAnalysis) -> None:
    rng = np.random.default_rng(4)
    image, truth = random_field(rng, (128, 160))
    lab = torch.from_numpy(truth.astype(np.int32))
    objects, summary = ta.measure(lab, int(truth.max()), ta.upload(image), pixel_size_um=0.5)
    ref_objects, ref_summary = measure_objects(truth, image, pixel_size_um=0.5)
    present = {o["label"] for o in ref_objects}
    assert [o for o in objects if o["label"] in present] == ref_objects
    assert summary == ref_summary


def test_device_measure_without_objects(ta: TorchAnalysis) -> None:
    image = np.full((32, 32), 7, dtype=np.uint16)
    objects, summary = ta.measure(torch.zeros((32, 32), dtype=torch.int32), 0, ta.upload(image))
    assert objects == [] and summary["count"] == 0 and summary["background_mean"] == 7.0


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.float32])
def test_device_normalize_matches_cpu(ta: TorchAnalysis, dtype: type) -> None:
    rng = np.random.default_rng(5)
    image = (rng.random((200, 300)) * 200 + 60000 * (dtype == np.uint16)).astype(dtype)
    got = ta.normalize(ta.upload(image), 1.0, 99.8).numpy()
    np.testing.assert_allclose(got, percentile_normalize(image, 1.0, 99.8), atol=1e-4)


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


def test_device_path_refused_for_cpu_backends() -> None:
    card = load_model_card("nuclei")
    with pytest.raises(ValueError, match="only the torch backend"):
        Segmenter(card, load_backend("onnxruntime", card, threads=1), device_resident=True)
