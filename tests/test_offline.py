"""``livemask segment`` (livemask.offline): NaN pixels, colour images, the file's pixel size."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import io as skimage_io

from livemask.acquisition.simulated.nuclei import NucleiSample
from livemask.offline import read_image_file, read_stack, segment_file


@pytest.fixture
def livemask_log() -> Iterator[list[logging.LogRecord]]:
    """The records of the ``livemask`` logger (which need not propagate to the root)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("livemask")
    handler, level = Keep(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _messages(records: list[logging.LogRecord]) -> str:
    return "\n".join(r.getMessage() for r in records)


def _nuclei(size: int = 128, seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    render = NucleiSample(seed=seed).render((0.0, 0.0), (size, size))
    return render.image, render.labels


def _rows(table: Path) -> list[dict[str, str]]:
    with table.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_nan_pixels_are_background_and_left_out_of_the_table(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    """Before, NaN pixels inside nuclei stayed in the objects ("segmented as background"
    was logged all the same) and gave their rows mean_intensity = nan."""
    image, truth = _nuclei()
    img = image.astype(np.float32)
    ys, xs = np.nonzero(truth)
    img[ys[::97], xs[::97]] = np.nan  # inside nuclei
    img[0, 0] = np.inf
    src, out, table = tmp_path / "nan.tif", tmp_path / "labels.tif", tmp_path / "m.csv"
    tifffile.imwrite(src, img)
    segment_file(src, out, table=table, threads=1)
    labels = tifffile.imread(out)
    bad = ~np.isfinite(img)
    assert labels.max() > 5
    assert not (labels[bad] > 0).any()
    rows = _rows(table)
    assert len(rows) == len(np.unique(labels)) - 1
    for row in rows:
        for key in ("mean_intensity", "integrated_intensity"):
            assert math.isfinite(float(row[key])), row
    n_bad = int(bad.sum())
    assert (f"{n_bad} NaN/infinite pixels, segmented as background (label 0; left out of the "
            "measurements)") in _messages(livemask_log)


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((2, 64, 64, 3), {"photometric": "rgb"}),
        ((2, 64, 64, 4), {"photometric": "rgb"}),
        ((2, 3, 64, 64, 3), {"photometric": "rgb"}),
        ((2, 64, 64, 3), {"photometric": "rgb", "imagej": True}),
        ((2, 64, 64, 3), {"photometric": "rgb", "ome": True}),
        ((64, 64, 3), {"photometric": "rgb"}),
    ],
    ids=["rgb-stack", "rgba-stack", "rgb-tz-stack", "imagej-rgb", "ome-rgb", "rgb"],
)
def test_colour_images_and_stacks_are_refused(
    tmp_path: Path, shape: tuple[int, ...], kwargs: dict[str, object]
) -> None:
    """Before, only a 3-D (y, x, 3|4) array was refused: an RGB stack (2, 256, 256, 3) was
    segmented as 512 strips of 256 x 3 px."""
    src = tmp_path / "rgb.tif"
    tifffile.imwrite(src, np.zeros(shape, np.uint8), **kwargs)
    with pytest.raises(ValueError, match=r"colour samples per pixel .*grayscale"):
        read_stack(src)
    with pytest.raises(ValueError, match=r"colour"):
        segment_file(src, tmp_path / "labels.tif")
    assert not (tmp_path / "labels.tif").exists()


def test_colour_stack_without_axes_is_refused(tmp_path: Path) -> None:
    """No samples axis in the file (declared grayscale): a last axis of 3 or 4 values, much
    shorter than the one before it, is colour all the same."""
    src = tmp_path / "rgb-as-grey.tif"
    tifffile.imwrite(src, np.zeros((2, 64, 64, 3), np.uint16), photometric="minisblack")
    with pytest.raises(ValueError, match=r"looks like colour \(RGB/RGBA\)"):
        read_stack(src)
    png = tmp_path / "grey-alpha.png"
    skimage_io.imsave(png, np.zeros((64, 64, 2), np.uint8), check_contrast=False)
    with pytest.raises(ValueError, match=r"or gray \+ alpha pixels: its last axis has 2 values"):
        read_stack(png)


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((2, 3, 64, 64), {"photometric": "minisblack", "metadata": {"axes": "TZYX"}}),
        ((2, 3, 64, 64), {"imagej": True, "metadata": {"axes": "TZYX"}}),
        ((2, 4, 64, 64), {"ome": True, "metadata": {"axes": "TZYX"}}),
        ((5, 64, 64), {}),
        ((3, 64, 64), {"photometric": "minisblack"}),
        ((64, 64), {}),
    ],
    ids=["tzyx", "imagej-tzyx", "ome-tzyx", "t", "three-planes", "2d"],
)
def test_grey_stacks_keep_their_shape(
    tmp_path: Path, shape: tuple[int, ...], kwargs: dict[str, object]
) -> None:
    src = tmp_path / "grey.tif"
    tifffile.imwrite(src, np.zeros(shape, np.uint16), **kwargs)
    assert read_stack(src).shape == shape


def test_planar_samples_are_segmented_as_planes(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    """tifffile stores a (3, y, x) stack as planar RGB unless told otherwise: kept as three
    grayscale planes, with a warning."""
    src = tmp_path / "three.tif"
    with pytest.warns(DeprecationWarning):
        tifffile.imwrite(src, np.zeros((3, 64, 64), np.uint16))
    assert read_stack(src).shape == (3, 64, 64)
    assert "are segmented as grayscale planes" in _messages(livemask_log)


def _write(path: Path, image: np.ndarray, how: str, px: float) -> None:
    if how == "ome":
        tifffile.imwrite(path, image, ome=True,
                         metadata={"axes": "YX", "PhysicalSizeX": px * 1000,
                                   "PhysicalSizeXUnit": "nm", "PhysicalSizeY": px * 1000})
    elif how == "imagej":
        tifffile.imwrite(path, image, imagej=True, resolution=(1 / px, 1 / px),
                         metadata={"unit": "micron"})
    elif how == "resolution-cm":
        tifffile.imwrite(path, image, resolution=(1e4 / px, 1e4 / px),
                         resolutionunit="CENTIMETER")
    elif how == "resolution-inch":  # a print resolution: not a pixel size
        tifffile.imwrite(path, image, resolution=(72, 72), resolutionunit="INCH")
    else:
        tifffile.imwrite(path, image)


@pytest.mark.parametrize(
    ("how", "found"),
    [("ome", "OME PhysicalSizeX"), ("imagej", "ImageJ resolution"),
     ("resolution-cm", "TIFF resolution"), ("resolution-inch", None), ("plain", None)],
)
def test_pixel_size_is_read_from_the_file(tmp_path: Path, how: str, found: str | None) -> None:
    src = tmp_path / f"{how}.tif"
    _write(src, np.zeros((64, 64), np.uint16), how, 0.325)
    image = read_image_file(src)
    if found is None:
        assert image.pixel_size_um is None
    else:
        assert image.pixel_size_um == pytest.approx(0.325, rel=1e-6)
        assert image.pixel_size_from == found


def test_segment_uses_the_files_pixel_size_unless_given(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    """Before, segment's µm columns always used 1 µm/px, whatever the file said."""
    image, _ = _nuclei()
    src, out, table = tmp_path / "ome.tif", tmp_path / "labels.tif", tmp_path / "m.csv"
    _write(src, image, "ome", 0.65)
    segment_file(src, out, table=table, threads=1)
    rows = _rows(table)
    assert rows
    for row in rows:
        assert float(row["area_um2"]) == pytest.approx(int(row["area_px"]) * 0.65**2, rel=1e-5)
    assert "pixel size 0.65 µm/px, from the file's OME PhysicalSizeX" in _messages(livemask_log)

    segment_file(src, out, table=table, pixel_size_um=2.0, threads=1)  # the user's value wins
    for row in _rows(table):
        assert float(row["area_um2"]) == pytest.approx(int(row["area_px"]) * 4.0)
    assert ("pixel size 2 µm/px (given); the file's OME PhysicalSizeX says 0.65 µm/px"
            in _messages(livemask_log))

    plain = tmp_path / "plain.tif"
    _write(plain, image, "plain", 1.0)
    segment_file(plain, out, table=table, threads=1)
    for row in _rows(table):
        assert float(row["area_um2"]) == float(row["area_px"])
    assert "the file has no pixel size; the µm columns use 1 µm/px" in _messages(livemask_log)


def test_segment_command_takes_the_files_pixel_size(tmp_path: Path) -> None:
    """The command passed its default of 1 µm/px every time, so the file's never counted."""
    from typer.testing import CliRunner

    from livemask.cli import app

    image, _ = _nuclei()
    src, out, table = tmp_path / "ome.tif", tmp_path / "labels.tif", tmp_path / "m.csv"
    _write(src, image, "ome", 0.65)
    result = CliRunner().invoke(app, ["segment", str(src), "-o", str(out), "--table",
                                      str(table), "--threads", "1"])
    assert result.exit_code == 0, result.output
    rows = _rows(table)
    assert rows and all(float(r["area_um2"]) == pytest.approx(int(r["area_px"]) * 0.4225,
                                                               rel=1e-5) for r in rows)
