"""``livemask segment --grains`` and ``--roi``: grain statistics of micrographs offline, and
a rectangle that leaves out an SEM data bar."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from livemask.acquisition.simulated.grains import GrainParams, GrainSample
from livemask.acquisition.simulated.nuclei import NucleiSample
from livemask.analysis.grains import grain_statistics
from livemask.cli import app
from livemask.offline import segment_file
from livemask.roi import Roi

PIXEL_UM = 0.5
BAR_ROWS = 72  # the data bar: the bottom rows of the micrograph


def _field(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A simulated polycrystal field and its true labels (a world twice the field)."""
    sample = GrainSample(GrainParams(world_shape_px=(2 * size, 2 * size)), seed=seed)
    render = sample.render((0.0, 0.0), (size, size))
    return render.image, render.labels


def _micrograph(tmp_path: Path, seed: int = 3, *, bar: bool = True) -> tuple[Path, np.ndarray]:
    """A 512² polycrystal micrograph (a TIFF without a pixel size), with a bright data bar
    over its bottom rows where ``bar``; and the true grain labels."""
    image, labels = _field(seed, 512)
    if bar:
        image[-BAR_ROWS:, :] = 60000
    path = tmp_path / f"micrograph-{seed}.tif"
    tifffile.imwrite(path, image)
    return path, labels


def _messages(records: list[logging.LogRecord]) -> str:
    return "\n".join(r.getMessage() for r in records)


def test_roi_leaves_out_a_data_bar_and_sizes_the_grains_like_the_truth(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    """The rectangle above the bar gives G within 0.3 of the truth's over the same
    rectangle. (Without --roi the bar took over the image's contrast, 2 regions, ASTM G ≈
    1, until the grains card left saturated plateaus out of its normalisation; it is still
    counted as a grain, and its area in the test area, without --roi.)"""
    src, truth = _micrograph(tmp_path)
    keep = 512 - BAR_ROWS
    out, grains = tmp_path / "labels.tif", tmp_path / "grains.json"
    done = segment_file(src, out, model="grains", grains=grains, roi=Roi(0, 0, 512, keep),
                        pixel_size_um=PIXEL_UM, threads=1)
    report = json.loads(grains.read_text())
    want = grain_statistics(truth[:keep], PIXEL_UM)
    pooled = report["pooled"]
    assert done.grains == report
    assert report["roi"] == {"x": 0, "y": 0, "width": 512, "height": keep}
    assert report["pixel_size_known"] is True and report["pixel_size_um"] == PIXEL_UM
    assert pooled["test_area_mm2"] == pytest.approx(512 * keep * PIXEL_UM**2 * 1e-6)
    assert abs(pooled["astm_g_planimetric"] - want["astm_g_planimetric"]) < 0.3
    assert abs(pooled["astm_g_intercept"] - want["astm_g_intercept"]) < 0.3
    labels = tifffile.imread(out)
    assert labels.shape == (512, 512)
    assert not labels[keep:].any()  # nothing segmented under the bar
    assert len(np.unique(labels[:keep])) > 100
    assert "one region covers" not in _messages(livemask_log)



def test_an_off_specimen_area_is_said_to_be_one_big_region(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    """An area with no grains (off the specimen, a flat data panel) segments as one region
    that the statistics count as a grain: warned about, naming --roi."""
    image, _ = _field(3, 512)
    image[200:, :] = int(np.median(image))  # 60 % of the field: no structure
    src = tmp_path / "off.tif"
    tifffile.imwrite(src, image)
    segment_file(src, tmp_path / "l.tif", model="grains", grains=tmp_path / "g.json",
                 pixel_size_um=PIXEL_UM, threads=1)
    assert "one region covers" in _messages(livemask_log)
    assert "leave data bars out with --roi X,Y,WIDTH,HEIGHT" in _messages(livemask_log)


def test_planes_are_reported_one_by_one_and_pooled(tmp_path: Path) -> None:
    """A stack of two fields: each plane's statistics, and the pooled ones count both."""
    fields = [_field(s, 256)[0] for s in (4, 5)]
    src = tmp_path / "fields.tif"
    tifffile.imwrite(src, np.stack(fields))
    grains = tmp_path / "g.json"
    segment_file(src, tmp_path / "l.tif", model="grains", grains=grains,
                 pixel_size_um=PIXEL_UM, threads=1)
    report = json.loads(grains.read_text())
    planes, pooled = report["planes"], report["pooled"]
    assert [p["plane"] for p in planes] == [0, 1]
    assert pooled["tiles"] == 2
    assert pooled["count"] == sum(p["count"] for p in planes) > 20
    assert pooled["intercept_count"] == sum(p["intercept_count"] for p in planes)
    assert pooled["test_area_mm2"] == pytest.approx(sum(p["test_area_mm2"] for p in planes))
    assert sum(pooled["histogram"]["counts"]) == pooled["count_inside"]


def test_without_a_pixel_size_there_is_no_astm_g(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    src, _ = _micrograph(tmp_path, bar=False)
    grains = tmp_path / "g.json"
    segment_file(src, tmp_path / "l.tif", model="grains", grains=grains, threads=1)
    report = json.loads(grains.read_text())
    assert report["pixel_size_known"] is False
    for stats in (report["planes"][0], report["pooled"]):
        assert stats["astm_g_planimetric"] is None and stats["astm_g_intercept"] is None
        assert stats["count"] > 100
    assert "the file has no pixel size" in _messages(livemask_log)


def test_grains_needs_a_grains_model_and_writes_nothing_otherwise(tmp_path: Path) -> None:
    src, _ = _micrograph(tmp_path, bar=False)
    out, grains = tmp_path / "l.tif", tmp_path / "g.json"
    with pytest.raises(ValueError, match=r"give a grains model \(grains, grains_rf"):
        segment_file(src, out, model="nuclei", grains=grains, threads=1)
    assert not out.exists() and not grains.exists()


def test_the_roi_must_lie_inside_the_image(tmp_path: Path) -> None:
    src, _ = _micrograph(tmp_path, bar=False)
    out = tmp_path / "l.tif"
    with pytest.raises(ValueError, match=r"X \+ WIDTH must be <= 512"):
        segment_file(src, out, model="grains", roi=Roi(10, 0, 503, 100), threads=1)
    assert not out.exists()


@pytest.mark.parametrize(("text", "why"), [
    ("0,0,100", "is not X,Y,WIDTH,HEIGHT"),
    ("0,0,1.5,100", "whole numbers"),
    ("-1,0,100,100", "must be >= 0"),
    ("0,0,1,100", "at least 2 px"),
])
def test_roi_text_that_is_not_a_rectangle_is_refused(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Roi.parse(text)


def test_roi_text_is_x_y_width_height() -> None:
    roi = Roi.parse(" 3, 5 ,10,20")
    assert roi == Roi(3, 5, 10, 20)
    image = np.arange(100 * 100).reshape(100, 100)
    assert image[roi.slices].shape == (20, 10)  # height rows, width columns
    assert image[roi.slices][0, 0] == image[5, 3]


def test_table_coordinates_of_a_roi_are_the_input_images(tmp_path: Path) -> None:
    """The objects of a rectangle are measured there and placed in the whole image: the
    same rows as segmenting the rectangle saved as a file of its own, moved by its corner."""
    image = NucleiSample(seed=11).render((0.0, 0.0), (256, 256)).image
    roi = Roi(40, 30, 160, 200)
    whole, crop = tmp_path / "whole.tif", tmp_path / "crop.tif"
    tifffile.imwrite(whole, image)
    tifffile.imwrite(crop, image[roi.slices])
    segment_file(whole, tmp_path / "a.tif", table=tmp_path / "a.csv", roi=roi, threads=1)
    segment_file(crop, tmp_path / "b.tif", table=tmp_path / "b.csv", threads=1)
    with (tmp_path / "a.csv").open() as fa, (tmp_path / "b.csv").open() as fb:
        rows_a, rows_b = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    assert len(rows_a) == len(rows_b) > 3
    for a, b in zip(rows_a, rows_b, strict=True):
        assert float(a["centroid_y"]) == pytest.approx(float(b["centroid_y"]) + roi.y)
        assert float(a["centroid_x"]) == pytest.approx(float(b["centroid_x"]) + roi.x)
        assert int(a["bbox_min_row"]) == int(b["bbox_min_row"]) + roi.y
        assert int(a["bbox_max_col"]) == int(b["bbox_max_col"]) + roi.x
        assert a["area_px"] == b["area_px"] and a["mean_intensity"] == b["mean_intensity"]
    labels_a, labels_b = tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif")
    np.testing.assert_array_equal(labels_a[roi.slices], labels_b)
    assert not labels_a[: roi.y].any() and not labels_a[:, : roi.x].any()


def test_grains_and_table_cannot_be_one_file(tmp_path: Path) -> None:
    src, _ = _micrograph(tmp_path, bar=False)
    same = tmp_path / "out.json"
    with pytest.raises(ValueError, match=r"--grains .* is also the measurements CSV"):
        segment_file(src, tmp_path / "l.tif", model="grains", table=same, grains=same)


def test_cli_prints_the_pooled_grain_sizes(tmp_path: Path) -> None:
    src, _ = _micrograph(tmp_path)
    grains = tmp_path / "g.json"
    result = CliRunner().invoke(app, [
        "segment", str(src), "-o", str(tmp_path / "l.tif"), "--model", "grains",
        "--grains", str(grains), "--roi", f"0,0,512,{512 - BAR_ROWS}",
        "--pixel-size-um", str(PIXEL_UM), "--threads", "1"])
    assert result.exit_code == 0, result.output
    pooled = json.loads(grains.read_text())["pooled"]
    assert f"grains: {pooled['count']} ({pooled['count_inside']} inside) in 1 field(s)" in (
        result.output)
    assert f"ASTM G {pooled['astm_g_planimetric']:.2f} (planimetric)" in result.output
    bad = CliRunner().invoke(app, ["segment", str(src), "-o", str(tmp_path / "m.tif"),
                                   "--roi", "0,0,512"])
    assert bad.exit_code == 2 and "X,Y,WIDTH,HEIGHT" in bad.output


def test_holes_small_fields_and_no_pixel_size_are_said(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    """New-feature hunt: NaN pixels were counted in the test area (G 0.5 off); a 2 x 2 px
    region printed G 17 with only the data-bar warning; without a pixel size the printed
    line said µm and /mm² for pixel values."""
    image, _ = _field(3, 256)
    holes = image.astype(np.float32)
    holes[:, 200:] = np.nan
    src = tmp_path / "holes.tif"
    tifffile.imwrite(src, holes)
    with pytest.raises(ValueError, match=r"NaN/infinite pixels in the region sized"):
        segment_file(src, tmp_path / "l.tif", model="grains", grains=tmp_path / "g.json",
                     pixel_size_um=PIXEL_UM, threads=1)
    segment_file(src, tmp_path / "l.tif", model="grains", grains=tmp_path / "g.json",
                 roi=Roi(0, 0, 200, 256), pixel_size_um=PIXEL_UM, threads=1)  # the finite part
    segment_file(src, tmp_path / "s.tif", model="grains", grains=tmp_path / "s.json",
                 roi=Roi(10, 10, 40, 40), pixel_size_um=PIXEL_UM, threads=1)
    assert "ASTM E112 sizing wants at least ~50 a field" in _messages(livemask_log)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, image)
    result = CliRunner().invoke(app, ["segment", str(plain), "-o", str(tmp_path / "p.tif"),
                                      "--model", "grains", "--grains",
                                      str(tmp_path / "p.json"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("grains:"))
    assert " px, mean intercept" in line and "µm," not in line and "/mm²" not in line
    assert line.endswith("; no pixel size: give --pixel-size-um for µm and G")


def test_a_non_grains_model_is_refused_before_anything_is_read_or_made(tmp_path: Path) -> None:
    src, _ = _micrograph(tmp_path, bar=False)
    with pytest.raises(ValueError, match="give a grains model"):
        segment_file(src, tmp_path / "new" / "l.tif", model="nuclei",
                     grains=tmp_path / "new" / "g.json")
    assert not (tmp_path / "new").exists()


def test_the_grain_statistics_are_not_written_under_an_image_or_table_name(
    tmp_path: Path,
) -> None:
    src, _ = _micrograph(tmp_path, bar=False)
    with pytest.raises(ValueError, match=r"--grains .*g\.tif: the grain statistics are JSON"):
        segment_file(src, tmp_path / "l.tif", model="grains", grains=tmp_path / "g.tif")


@pytest.mark.parametrize("model", ["grains", "grains_rf"])
def test_a_scale_bar_inside_the_image_does_not_take_its_contrast(
    tmp_path: Path, model: str
) -> None:
    """New-feature hunt: a bright bar over 0.3 % of the image took the normalisation's
    99.8th percentile, and the image came out as 2 regions (G 1.1 against 8.7); the grains
    cards now leave saturated plateaus out of the percentiles."""
    image, truth = _field(4, 512)
    image[470:480, 350:480] = 60000  # a scale bar, brighter than anything else
    src = tmp_path / "bar.tif"
    tifffile.imwrite(src, image)
    grains = tmp_path / "g.json"
    segment_file(src, tmp_path / "l.tif", model=model, grains=grains,
                 pixel_size_um=PIXEL_UM, threads=1)
    pooled = json.loads(grains.read_text())["pooled"]
    want = grain_statistics(truth, PIXEL_UM)
    assert abs(pooled["astm_g_planimetric"] - want["astm_g_planimetric"]) < 0.4
    assert pooled["count"] > 100
