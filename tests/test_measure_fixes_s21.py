"""Session 21 measurement fixes: saturated pixels per object (CPU, torch, CSV columns) and
intensities of float frames in small units kept to significant digits."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from livemask.acquisition.simulated.nuclei import NucleiSample
from livemask.analysis.measure import UNITS, measure_objects, saturation_level
from livemask.cli import app
from livemask.recording import Recorder
from livemask.service.frames import Frame

SHAPE = (256, 256)


def _bright_field(
    exposure_ms: float, shape: tuple[int, int] = SHAPE
) -> tuple[np.ndarray, np.ndarray]:
    """A simulated uint16 frame at ``exposure_ms`` and its ground-truth labels."""
    result = NucleiSample(seed=21).render((0.0, 0.0), shape, exposure_ms=exposure_ms)
    return result.image, result.labels


def _saturated_per_label(image: np.ndarray, labels: np.ndarray, level: float) -> dict[int, int]:
    ids = labels[image >= level]
    return {int(k): int((ids == k).sum()) for k in np.unique(labels) if k}


def test_saturated_pixels_are_counted_per_object_and_in_the_summary() -> None:
    """Before, an object with pixels at the camera's ceiling (65535) was measured too low
    (26 % median at 6 s exposure, simulated) and nothing said so: no field, no count."""
    image, labels = _bright_field(3000.0)
    objects, summary = measure_objects(labels, image)
    expected = _saturated_per_label(image, labels, 65535)
    assert [o["saturated_px"] for o in objects] == [expected[o["label"]] for o in objects]
    n_saturated = sum(1 for v in expected.values() if v)
    assert 0 < n_saturated < len(objects)  # some nuclei reach the ceiling, not all
    assert summary["saturated_objects"] == n_saturated
    dim, dim_summary = measure_objects(labels, _bright_field(10.0)[0])
    assert {o["saturated_px"] for o in dim} == {0} and dim_summary["saturated_objects"] == 0
    assert UNITS["saturated_px"] == "px"


def test_saturation_level_by_dtype_and_given() -> None:
    """Integer frames saturate at the dtype's maximum; float frames have no known level
    (None, not 0) unless one is given, e.g. a 12-bit camera's 4095 in uint16 frames."""
    assert saturation_level(np.uint16) == 65535.0 and saturation_level(np.uint8) == 255.0
    assert saturation_level(np.float32) is None
    image, labels = _bright_field(3000.0)
    objects, summary = measure_objects(labels, image.astype(np.float32))
    assert {o["saturated_px"] for o in objects} == {None}
    assert summary["saturated_objects"] is None
    _, empty = measure_objects(np.zeros_like(labels), image.astype(np.float32))
    assert empty["saturated_objects"] is None
    twelve_bit = np.minimum(_bright_field(200.0)[0], 4095)
    objects, summary = measure_objects(labels, twelve_bit, saturation=4095)
    expected = _saturated_per_label(twelve_bit, labels, 4095)
    assert [o["saturated_px"] for o in objects] == [expected[o["label"]] for o in objects]
    assert summary["saturated_objects"] == sum(1 for v in expected.values() if v) > 0


def test_torch_path_counts_saturated_pixels_as_the_cpu_path() -> None:
    """The device path (here on torch CPU) gives the same objects and summary, saturation
    included, when it is given the frame's saturation level."""
    torch = pytest.importorskip("torch")
    from livemask.inference.models import load_model_card
    from livemask.inference.segmenter import Segmenter
    from livemask.inference.select import load_backend
    from livemask.inference.torch_analysis import LabelParams, TorchAnalysis

    card = load_model_card("nuclei")
    segmenter = Segmenter(card, load_backend("onnxruntime", card, threads=1))
    image, _ = _bright_field(3000.0, (128, 128))  # torch on the CPU: seconds at 256²
    p = segmenter.predict(image)
    ta = TorchAnalysis("cpu")
    labels, objects, summary = ta.analyse(
        torch.from_numpy(p[0]), torch.from_numpy(p[1]), ta.upload(image), LabelParams(),
        saturation=saturation_level(image.dtype))
    assert summary["saturated_objects"] > 0
    assert (objects, summary) == measure_objects(labels, image)
    _, unknown, unknown_summary = ta.analyse(
        torch.from_numpy(p[0]), torch.from_numpy(p[1]), ta.upload(image), LabelParams())
    assert {o["saturated_px"] for o in unknown} == {None}
    assert unknown_summary["saturated_objects"] is None


def test_recording_csv_has_the_saturated_pixels(tmp_path: Path) -> None:
    image, labels = _bright_field(3000.0)
    objects, summary = measure_objects(labels, image)
    frame = Frame(frame_id=0, image=image, index={"t": 0}, position={"x_um": 0.0},
                  t={"acquired": time.time()})
    frame.labels, frame.objects, frame.summary = labels, objects, summary
    rec = Recorder(tmp_path / "run", pixel_size_um=0.65, units=UNITS).start()
    rec.on_frame(frame)
    rec.close(frames_acquired=1)
    with (tmp_path / "run" / "measurements.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["saturated_px"]) for r in rows] == [o["saturated_px"] for o in objects]
    assert any(int(r["saturated_px"]) > 0 for r in rows)


def _float_frame(unit: float) -> tuple[np.ndarray, np.ndarray]:
    """A simulated frame less its camera offset, in ``unit`` per count (float32)."""
    result = NucleiSample(seed=5).render((0.0, 0.0), SHAPE)
    return (result.image.astype(np.float32) - 100) * np.float32(unit), result.labels


@pytest.mark.parametrize("unit", [1e-5, 1e-6, 1e-9])
def test_float_intensities_in_small_units_keep_significant_digits(unit: float) -> None:
    """Before, intensities were rounded to 4 decimal places: in units of 1e-5 a mean of
    0.001865 read 0.0019, and at 1e-6 every local background and the frame's
    background_mean read 0.0."""
    image, labels = _float_frame(unit)
    objects, summary = measure_objects(labels, image)
    exact, exact_summary = measure_objects(labels, image, decimals=None)
    assert len(objects) > 5
    for o, e in zip(objects, exact, strict=True):
        for key in ("mean_intensity", "integrated_intensity", "local_background",
                    "corrected_intensity"):
            if e[key] is not None:
                assert o[key] == pytest.approx(e[key], rel=1e-4), key
    for key in ("mean_intensity", "total_intensity", "background_mean"):
        assert summary[key] == pytest.approx(exact_summary[key], rel=1e-4), key
    assert summary["background_mean"] != 0.0


def test_camera_count_intensities_keep_their_decimal_places() -> None:
    """Intensities of 1 count and more are rounded to ``decimals`` places as before."""
    image, labels = _bright_field(10.0)
    objects, summary = measure_objects(labels, image)
    exact, exact_summary = measure_objects(labels, image, decimals=None)
    for o, e in zip(objects, exact, strict=True):
        for key in ("mean_intensity", "integrated_intensity", "local_background"):
            assert abs(e[key]) >= 1 and o[key] == round(e[key], 4), key
    assert summary["background_mean"] == round(exact_summary["background_mean"], 4)


def test_segment_table_keeps_small_float_intensities(tmp_path: Path) -> None:
    """``livemask segment --table`` on a float32 frame in units of 1e-6 per count: the
    local backgrounds and corrected intensities were 0.0 and the mean a rounded 0.0002."""
    image, _ = _float_frame(1e-6)
    src, out, table = tmp_path / "in.tif", tmp_path / "labels.tif", tmp_path / "m.csv"
    tifffile.imwrite(src, image)
    result = CliRunner().invoke(app, ["segment", str(src), "-o", str(out), "--table",
                                      str(table)])
    assert result.exit_code == 0, result.output
    with table.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    labels = tifffile.imread(out)
    assert len(rows) > 5
    for row in rows:
        assert float(row["mean_intensity"]) == pytest.approx(
            float(image[labels == int(row["label"])].astype(np.float64).mean()), rel=1e-4)
        assert row["local_background"] == "" or float(row["local_background"]) != 0.0
        assert row["saturated_px"] == ""  # a float frame: no known saturation level


@pytest.mark.timeout(120)
@pytest.mark.parametrize("exposure_ms, said", [(3000.0, True), (10.0, False)])
async def test_the_service_says_once_per_acquisition_that_objects_saturate(
    exposure_ms: float, said: bool
) -> None:
    """Before, a run at an exposure that saturated half the nuclei logged and published
    nothing about it: ``saturated`` is sent once per acquisition, with the first frame's
    count, and not for a run that does not saturate."""
    from livemask.service.app import Service
    from tests.conftest import make_config
    from tests.test_service import collect_run

    seq = {"time_plan": {"interval": 0.0, "loops": 3}, "channels": [
        {"config": "DAPI", "exposure": exposure_ms}]}
    cfg = make_config(simulation={"truth": False}, acquisition={
        "sequence": seq, "mode": "synchronized"})
    async with Service(cfg) as svc:
        got = await collect_run(svc, ("event", "measurements"))
    events = [m.header for m in got["event"] if m.header["kind"] == "saturated"]
    counts = [m.header["summary"]["saturated_objects"] for m in got["measurements"]]
    assert len(counts) == 3
    if not said:
        assert events == [] and counts == [0, 0, 0]
        return
    assert len(events) == 1 and all(n > 0 for n in counts)
    first = next(m.header for m in got["measurements"]
                 if m.header["frame_id"] == events[0]["frame_id"])
    assert events[0]["objects"] == first["summary"]["saturated_objects"]
    assert events[0]["acquisition"] == 1
    level = events[0]["level"]  # an integer on the wire, as the docs say (65535.0 before)
    assert level == 65535 and type(level) is int
