"""``livemask segment`` (livemask.offline): NaN pixels, colour images, the file's pixel size."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import io as skimage_io

from livemask.acquisition.simulated.nuclei import NucleiSample
from livemask.offline import read_image_file, read_stack, segment_file


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
    assert (f"{n_bad} NaN/infinite pixels, filled from their nearest finite neighbours for the "
            "model, then label 0 (left out of the measurements)") in _messages(livemask_log)


def test_objects_lying_mostly_on_nan_pixels_are_left_out(tmp_path: Path) -> None:
    """Before, only the NaN pixels got label 0: a nucleus under a NaN strip (the border of
    a registered image) left a sliver of a few pixels beside it as an object of its own."""
    from livemask.offline import load_segmenter

    image, _ = _nuclei()
    img = image.astype(np.float32)
    img[:, :12] = np.nan
    bad = ~np.isfinite(img)
    seg = load_segmenter("nuclei", 1)
    seen = seg.labels(seg.predict(img))  # what the model makes of it (the strip filled)
    area = np.bincount(seen.ravel())
    on_nan = np.bincount(seen[bad], minlength=area.size)
    mostly = {int(n) for n in np.flatnonzero(2 * on_nan > area) if n}
    slivers = [int(area[n] - on_nan[n]) for n in mostly if area[n] > on_nan[n]]
    assert slivers and min(slivers) < 10  # the case: a few pixels left beside the strip

    src, out = tmp_path / "strip.tif", tmp_path / "labels.tif"
    tifffile.imwrite(src, img)
    segment_file(src, out, table=tmp_path / "m.csv", threads=1)
    labels = tifffile.imread(out)
    assert not labels[bad].any()
    for n in range(1, area.size):  # each object: left out if mostly on NaN, else kept
        finite_part = labels[(seen == n) & ~bad]
        assert (finite_part > 0).all() if n not in mostly else not finite_part.any(), n
    assert len(_rows(tmp_path / "m.csv")) == len(np.unique(labels)) - 1


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


def _segment_cli(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from livemask.cli import app

    result = CliRunner().invoke(app, ["segment", *args, "--threads", "1"])
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


def test_segment_refuses_to_overwrite_its_input(tmp_path: Path) -> None:
    """Before, ``segment in.tif -o in.tif`` replaced the raw image with its labels (exit 0),
    and ``--table`` equal to ``-o`` replaced the labels with the CSV."""
    image, _ = _nuclei(64)
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, image)
    raw = src.read_bytes()
    (tmp_path / "sub").mkdir()
    for out, table, needle in [
        (src, None, r"-o .*in\.tif is the input image"),
        (tmp_path / "sub" / ".." / "in.tif", None, r"-o .*in\.tif is the input image"),
        (tmp_path / "l.tif", src, r"--table .*in\.tif is the input image"),
        (tmp_path / "l.tif", tmp_path / "l.tif", r"--table .*l\.tif is also the label TIFF"),
    ]:
        with pytest.raises(ValueError, match=needle):
            segment_file(src, out, table=table, threads=1)
    code, output = _segment_cli(str(src), "-o", str(src))
    assert code == 2 and "is the input image, which it would overwrite; give -o another" in output
    link = tmp_path / "link.tif"
    link.symlink_to(src)
    code, output = _segment_cli(str(src), "-o", str(tmp_path / "l.tif"), "--table", str(link))
    assert code == 2 and "--table" in output and "is the input image" in output
    assert src.read_bytes() == raw
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "link.tif", "sub"]


def _positions(tmp_path: Path, axes: str) -> tuple[Path, np.ndarray]:
    """An OME-TIFF of three stage positions, one image series each (as Micro-Manager)."""
    image, _ = _nuclei(64)
    data = np.stack([np.roll(image, 20 * p, axis=0) for p in range(3)])  # (p, y, x)
    if axes == "TYX":
        data = np.stack([data, data[:, ::-1]], axis=1)  # (p, t, y, x)
    src = tmp_path / f"positions-{axes}.ome.tif"
    with tifffile.TiffWriter(src, ome=True) as tw:
        for p in range(3):
            tw.write(data[p], metadata={"axes": axes}, photometric="minisblack")
    return src, data


@pytest.mark.parametrize(("axes", "shape", "labels_axes"), [
    ("TYX", (2, 3, 64, 64), "TPYX"), ("YX", (3, 64, 64), "PYX"),
])
def test_segment_labels_every_position_of_a_multi_series_tiff(
    tmp_path: Path, livemask_log: list[logging.LogRecord], axes: str,
    shape: tuple[int, ...], labels_axes: str,
) -> None:
    """Before, only the first image series (position 0) was read and labelled, silently."""
    src, data = _positions(tmp_path, axes)
    out = tmp_path / "labels.tif"
    done = segment_file(src, out, table=tmp_path / "m.csv", threads=1)
    labels = tifffile.imread(out)
    assert labels.shape == shape
    assert (done.shape, done.axes, done.planes) == (shape, labels_axes, data[..., 0, 0].size)
    assert {r["plane"] for r in _rows(tmp_path / "m.csv")} == {str(i) for i in range(done.planes)}
    by_position = np.moveaxis(labels, 1, 0) if axes == "TYX" else labels
    single = tmp_path / "one.tif"
    for p in range(3):  # each position's labels are those of its image alone
        tifffile.imwrite(single, data[p])
        segment_file(single, tmp_path / "one-labels.tif", threads=1)
        assert np.array_equal(by_position[p], tifffile.imread(tmp_path / "one-labels.tif"))
    assert f"its 3 image series are segmented as positions: axis P of the labels (shape " \
        f"{shape}, axes {labels_axes})" in _messages(livemask_log)
    code, output = _segment_cli(str(src), "-o", str(out))
    assert code == 0 and f"labels of shape {shape}, axes {labels_axes}" in output


def test_tiff_series_that_differ_segment_the_first_with_a_warning(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    src = tmp_path / "mixed.ome.tif"
    with tifffile.TiffWriter(src, ome=True) as tw:
        tw.write(np.ones((5, 32, 32), np.uint16), metadata={"axes": "TYX"},
                 photometric="minisblack")
        tw.write(np.zeros((16, 16), np.uint8), metadata={"axes": "YX"},
                 photometric="minisblack")
    image = read_image_file(src)
    assert image.data.shape == (5, 32, 32) and image.axes == "TYX"
    assert ("holds 2 image series of different shapes or types ((5, 32, 32) uint16, (16, 16) "
            "uint8); only the first is segmented") in _messages(livemask_log)


def test_a_failing_table_write_leaves_no_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the label TIFF was written first: a CSV that failed left it behind (exit 2)."""
    import livemask.offline

    image, _ = _nuclei(64)
    src, out, table = tmp_path / "in.tif", tmp_path / "labels.tif", tmp_path / "m.csv"
    tifffile.imwrite(src, image)

    class FailingWriter(csv.DictWriter):
        def writerows(self, rows: object) -> None:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(livemask.offline.csv, "DictWriter", FailingWriter)
    with pytest.raises(OSError, match=r"No space left"):
        segment_file(src, out, table=table, threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]
    out.write_bytes(b"old labels")  # an earlier run's outputs stay as they were
    table.write_text("old table")
    with pytest.raises(OSError, match=r"No space left"):
        segment_file(src, out, table=table, threads=1)
    assert out.read_bytes() == b"old labels" and table.read_text() == "old table"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "labels.tif", "m.csv"]


def test_segment_checks_both_outputs_before_segmenting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, ``-o`` naming a folder failed only after the whole image was segmented, and
    ``--table`` in a folder not yet made failed after the labels were written."""
    import livemask.offline

    image, _ = _nuclei(64)
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, image)
    (tmp_path / "dir.tif").mkdir()
    (tmp_path / "dir.csv").mkdir()

    def no_segmenting(*args: object, **kwargs: object) -> None:
        raise AssertionError("segmented before the outputs were checked")

    monkeypatch.setattr(livemask.offline, "load_segmenter", no_segmenting)
    with pytest.raises(ValueError, match=r"-o .*dir\.tif is a folder; give a file path"):
        segment_file(src, tmp_path / "dir.tif")
    with pytest.raises(ValueError, match=r"--table .*dir\.csv is a folder; give a file path"):
        segment_file(src, tmp_path / "l.tif", table=tmp_path / "dir.csv")
    code, output = _segment_cli(str(src), "-o", str(tmp_path / "dir.tif"))
    assert code == 2 and "Invalid value for '-o'" in output and "is a folder" in output
    code, output = _segment_cli(str(src), "-o", str(tmp_path / "l.tif"), "--table",
                                str(tmp_path / "dir.csv"))
    assert code == 2 and "Invalid value for '--table'" in output
    monkeypatch.undo()
    out, table = tmp_path / "new" / "labels.tif", tmp_path / "other" / "sub" / "m.csv"
    code, output = _segment_cli(str(src), "-o", str(out), "--table", str(table))
    assert code == 0, output
    assert out.is_file() and _rows(table)
