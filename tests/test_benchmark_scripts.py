"""benchmarks/host_ceiling.py and benchmarks/gc_measurements.py run and measure what they say."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from livemask import bench
from livemask.acquisition.simulated.nuclei import NucleiParams
from livemask.analysis.measure import measure_objects
from livemask.inference.models import load_model_card
from livemask.inference.segmenter import Segmenter
from livemask.inference.select import load_backend

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_captured_sums_give_the_measurements_of_the_labels() -> None:
    host = _load("host_ceiling")
    labels = np.zeros((32, 32), np.int32)
    labels[2:6, 3:9], labels[10:20, 10:14] = 1, 2
    image = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    sums, kw = host._sums_of(labels, image)
    assert sums.area.tolist() == [24, 40]
    rebuilt = host.measure.objects_from_sums(sums, **kw)
    assert rebuilt == measure_objects(labels, image)


def test_local_background_recovers_nuclei_signal_better_than_the_frame_mean() -> None:
    """On a vignetted simulated field with strong background, against the rendered truth."""
    script = _load("local_background")
    params = replace(NucleiParams(), background=0.3, illumination_min=0.3)
    errors = script.field_errors(0, params, (256, 256))
    local, frame = errors["local_background"], errors["frame_background"]
    assert len(local) == len(frame) > 10
    assert np.median(local) < 0.01 < np.median(frame)


@pytest.mark.timeout(120)
def test_host_ceiling_runs_the_service_with_waiting_stages() -> None:
    host = _load("host_ceiling")
    settings = bench.BenchSettings(size=128, frames=6, camera_fps=20)
    r = host.run(settings, infer_ms=2.0, analyse_ms=3.0)
    assert r["frames_analysed"] == r["frames_acquired"] == 6 and r["frames_failed"] == 0
    assert r["measurements_received"] == 6
    assert r["objects_per_frame"] > 0
    # each analysed frame waited for both stage times before it was published
    assert r["latency_ms"]["end_to_end"]["p50"] >= 5.0
    assert set(r["gc"]["collections"]) == {"0", "1", "2"}


def test_gc_measurements_policy_removes_the_collections() -> None:
    gcm = _load("gc_measurements")
    sums = gcm.synthetic_sums(500)
    import gc

    threshold = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        default = gcm.measure(sums, 10)
        policy = gcm.GcPolicy(freeze=False, threshold=10_000)
        policy.apply()
        tuned = gcm.measure(sums, 10)
        policy.restore()
    finally:
        gc.set_threshold(*threshold)
    assert sum(default["collections"].values()) > 0
    assert sum(tuned["collections"].values()) == 0


@pytest.mark.timeout(120)
async def test_grain_scan_compares_the_live_statistics_with_the_truth(tmp_path: Path) -> None:
    scan = _load("grain_scan")
    text = (BENCHMARKS.parent / "configs" / "simulated-grains.yaml").read_text(encoding="utf-8")
    text = text.replace("rows: 4", "rows: 1").replace("columns: 4", "columns: 2")
    config = tmp_path / "two-tiles.yaml"
    config.write_text(text, encoding="utf-8")
    r = await scan.scan(config)
    assert (r["tiles"], r["tiles_overlapping"]) == (2, 0)
    assert r["truth"]["count_inside"] > 100 and r["live"]["count_inside"] > 100
    for key in scan.COMPARED:
        assert r["error"][key] == pytest.approx(
            (r["live"][key] - r["truth"][key]) / r["truth"][key], abs=1e-4)
    assert abs(r["error"]["mean_area_um2"]) < 0.15  # the shipped model, 2 tiles


def test_empty_fields_scores_the_card_with_and_without_its_noise_floor() -> None:
    empty = _load("empty_fields")
    card = load_model_card("nuclei")
    backend = load_backend("onnxruntime", card, threads=1)
    off = card.model_copy(update={
        "normalization": card.normalization.model_copy(update={"min_span_noise": None})})
    shipped = empty.score(Segmenter(card, backend), 1e-9, 10.0, fields=2)
    plain = empty.score(Segmenter(off, backend), 1e-9, 10.0, fields=2)
    spans = shipped.pop("span_noise_min"), shipped.pop("span_noise_max")
    assert shipped == {"f1": 1.0, "true": 0, "found": 0, "false": 0, "missed": 0}  # none, rightly
    assert 3 < spans[0] <= spans[1] < 10  # camera noise only: a few noise levels
    assert plain["true"] == 0 and plain["false"] == plain["found"] > 0  # phantoms


def test_dim_bright_makes_a_share_of_the_nuclei_dimmer(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/dim_bright.py (the nuclei card's dim/bright table), one field per case:
    the same half of the nuclei, 10 times dimmer, about 10 times less above the background."""
    script = _load("dim_bright")
    card = load_model_card("nuclei")
    seg = Segmenter(card, load_backend("onnxruntime", card, threads=1))
    plain = script.score(seg, script.Case.parse("1x0.5@10"), fields=1)
    dim = script.score(seg, script.Case.parse("10x0.5@10"), fields=1)
    assert plain["dim_true"] == dim["dim_true"] > 20
    assert dim["dim_above_background"] == pytest.approx(plain["dim_above_background"] / 10,
                                                        rel=0.3)
    assert dim["dim_normalised"] < 0.5 * plain["dim_normalised"]
    assert plain["f1"] > 0.95 and dim["dim_recall"] <= plain["dim_recall"]
    script.main(["--fields", "1", "10x0.5@10"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == script.HEADER.splitlines()
    assert lines[3] == script.row(script.Case(10.0, 0.5, 10.0), dim)
    with pytest.raises(SystemExit):
        script.main(["1:10"])
    assert "RATIOxSHARE@EXPOSURE_MS" in capsys.readouterr().err
