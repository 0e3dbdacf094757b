"""TIFF inputs of ``replay`` and ``segment``: a corrupt page, a file cut short, BigTIFF
suffixes, and the label OME-TIFF that ``segment`` writes."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import useq

from livemask.acquisition.replay import ReplaySource, open_stack
from livemask.acquisition.simulated.nuclei import NucleiSample
from livemask.offline import read_image_file, segment_file
from tests.test_recording import _wait

FRAMES, SHAPE = 10, (48, 64)


def _frames() -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.integers(100, 4000, (FRAMES, *SHAPE)).astype(np.uint16)


def _corrupt_stack(path: Path, bad: int = 5) -> np.ndarray:
    """A zlib-compressed stack of FRAMES pages, page ``bad`` overwritten in the middle."""
    data = _frames()
    tifffile.imwrite(path, data, photometric="minisblack", compression="zlib",
                     rowsperstrip=SHAPE[0])
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[bad].dataoffsets[0]
    raw = bytearray(path.read_bytes())
    raw[offset + 10:offset + 60] = b"\xff" * 50
    path.write_bytes(bytes(raw))
    with tifffile.TiffFile(path) as tif, pytest.raises(Exception):  # noqa: B017
        tif.pages[bad].asarray()  # the page is corrupt indeed
    return data


def _cut_stack(path: Path, fraction: float = 0.55) -> np.ndarray:
    """An uncompressed stack of FRAMES planes (tifffile: in a row), cut at ``fraction``."""
    data = _frames()
    tifffile.imwrite(path, data, photometric="minisblack")
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * fraction)])
    return data


def _play(path: Path) -> tuple[list[tuple[int, np.ndarray]], list[str | None], ReplaySource]:
    """(t, image) of every frame a replay of ``path`` plays, and its end (error or None)."""
    source = ReplaySource(open_stack(path), interval_s=0.0)
    got: list[tuple[int, np.ndarray]] = []
    done: list[str | None] = []
    source.connect(lambda raw: got.append((raw.event.index["t"], raw.image)))
    source.start([useq.MDAEvent()] * FRAMES, mode="free-run", on_done=done.append)
    _wait(lambda: bool(done))
    source.close()
    return got, done, source


def test_replay_skips_a_corrupt_page_and_plays_the_others(tmp_path: Path) -> None:
    """Before, every page was read at open: one corrupt page refused the whole file
    ("cannot be read as a TIFF stack: Error -3 while decompressing data")."""
    src = tmp_path / "zlib.tif"
    data = _corrupt_stack(src)
    got, done, source = _play(src)
    assert [t for t, _ in got] == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    for t, image in got:
        np.testing.assert_array_equal(image, data[t])
    assert source.unreadable == 1
    (error,) = done
    assert error is not None and "1 of 10 frame(s) could not be read" in error
    assert re.search(r"frame 5 of .*zlib\.tif cannot be read: the file's plane 5 is corrupt",
                     error), error


def test_replay_plays_the_complete_frames_of_a_file_cut_short(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    """Before: "failed to read 1310720 bytes, got 721602", nothing played (exit 2)."""
    src = tmp_path / "cut.tif"
    data = _cut_stack(src)
    stack = open_stack(src)
    assert stack.frames == 5
    got, done, _ = _play(src)
    assert done == [None] and [t for t, _ in got] == [0, 1, 2, 3, 4]
    for t, image in got:
        np.testing.assert_array_equal(image, data[t])
    assert any("is cut short (truncated" in r.getMessage() and "only its first 5 of 10 frames "
               "are complete; replaying those" in r.getMessage() for r in livemask_log)


def test_replay_cli_goes_on_past_a_corrupt_page(tmp_path: Path) -> None:
    """The reported run: exit 2 and no frame played; now 9 frames play, then exit 1."""
    from typer.testing import CliRunner

    from livemask.cli import app

    src = tmp_path / "zlib.tif"
    _corrupt_stack(src)
    result = CliRunner().invoke(app, [
        "replay", str(src), "--exit-when-done", "--interval", "0", "--mode", "synchronized",
        "--pub", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1, output
    assert "1 of 10 frame(s) could not be read and were skipped; the others were replayed" \
        in output


def test_segment_names_a_corrupt_plane_and_a_file_cut_short(tmp_path: Path) -> None:
    """Before: zlib's or tifffile's own text ("Error -3 while decompressing data",
    "failed to read 1310720 bytes, got 721602")."""
    _corrupt_stack(tmp_path / "zlib.tif")
    with pytest.raises(ValueError, match=r"zlib\.tif cannot be read as an image: the file's "
                       r"plane 5 is corrupt \(.*\); segment reads every plane of a file"):
        segment_file(tmp_path / "zlib.tif", tmp_path / "labels.tif")
    _cut_stack(tmp_path / "cut.tif")
    with pytest.raises(ValueError, match=r"cut\.tif cannot be read as an image: it is cut short "
                       r"\(truncated.*only 5 of its 10 planes are complete in the file"):
        segment_file(tmp_path / "cut.tif", tmp_path / "labels.tif")
    assert not (tmp_path / "labels.tif").exists()


@pytest.mark.parametrize("suffix", [".ome.btf", ".tf8", ".tf2"])
def test_segment_reads_bigtiff_suffixes_as_tiff(tmp_path: Path, suffix: str) -> None:
    """Before, segment sent .btf/.tf8/.tf2 to scikit-image: one series of three positions,
    and no pixel size (replay read them with tifffile)."""
    src = tmp_path / f"positions{suffix}"
    with tifffile.TiffWriter(src, ome=True, bigtiff=True) as tw:
        for p in range(3):
            tw.write(_frames()[:2] + p, metadata={"axes": "TYX", "PhysicalSizeX": 0.5,
                                                  "PhysicalSizeY": 0.5},
                     photometric="minisblack")
    image = read_image_file(src)
    assert (image.data.shape, image.axes) == ((2, 3, *SHAPE), "TPYX")
    assert image.pixel_size_um == 0.5
    assert open_stack(src).frames == 6


def test_segment_says_a_folder_is_a_folder(tmp_path: Path) -> None:
    """Before: "input image … does not exist" for a folder that does."""
    from typer.testing import CliRunner

    from livemask.cli import app

    with pytest.raises(IsADirectoryError, match=r"is a folder; give one image file"):
        segment_file(tmp_path, tmp_path / "labels.tif")
    result = CliRunner().invoke(app, ["segment", str(tmp_path), "-o",
                                      str(tmp_path / "labels.tif")])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "is a folder" in output and "not exist" not in output


def _nuclei(size: int = 64) -> np.ndarray:
    return NucleiSample(seed=11).render((0.0, 0.0), (size, size)).image


def _ome_size(tif: tifffile.TiffFile) -> float | None:
    found = re.search(r'PhysicalSizeX="([^"]+)"', tif.ome_metadata or "")
    return float(found.group(1)) if found else None


@pytest.mark.parametrize(("how", "axes", "size"), [
    ("imagej", "TZCYX", 0.5), ("positions", "TPYX", 0.25), ("plain", "QYX", None),
])
def test_segment_labels_are_an_ome_tiff_with_the_inputs_axes_and_pixel_size(
    tmp_path: Path, how: str, axes: str, size: float | None
) -> None:
    """Before, a plain TIFF: an ImageJ TZCYX input's labels read back as QQQYX, with no
    pixel size, so Fiji and napari showed them flat and uncalibrated."""
    image = _nuclei()
    src = tmp_path / "in.tif"
    if how == "imagej":
        shape: tuple[int, ...] = (2, 2, 2, *image.shape)
        tifffile.imwrite(src, np.broadcast_to(image, shape), imagej=True,
                         resolution=(2.0, 2.0), metadata={"axes": "TZCYX", "unit": "um"})
    elif how == "positions":
        with tifffile.TiffWriter(src, ome=True) as tw:
            for _ in range(3):
                tw.write(np.stack([image, image]), photometric="minisblack",
                         metadata={"axes": "TYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
        shape = (2, 3, *image.shape)
    else:
        tifffile.imwrite(src, np.stack([image, image]), photometric="minisblack")
        shape = (2, *image.shape)
    out = tmp_path / "labels.tif"
    done = segment_file(src, out, threads=1)
    with tifffile.TiffFile(out) as tif:
        series = tif.series[0]
        assert tif.is_ome and series.axes == axes and series.shape == shape
        assert series.dtype == np.int32 and series.asarray().max() > 0
        assert _ome_size(tif) == size
    assert done.axes == axes

    segment_file(src, out, pixel_size_um=0.8, threads=1)  # the given size, as the CSV's
    with tifffile.TiffFile(out) as tif:
        assert _ome_size(tif) == 0.8


def test_labels_of_axes_ome_cannot_name_are_a_plain_tiff(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    """A plain 4-D tifffile stack has two unnamed axes (QQYX), which OME cannot hold."""
    src, out = tmp_path / "in.tif", tmp_path / "labels.tif"
    tifffile.imwrite(src, np.broadcast_to(_nuclei(), (2, 2, 64, 64)), photometric="minisblack")
    segment_file(src, out, threads=1)
    with tifffile.TiffFile(out) as tif:
        assert not tif.is_ome and tif.series[0].shape == (2, 2, 64, 64)
    assert any("written as a plain TIFF" in r.getMessage() for r in livemask_log)


# ------------------------------------------------------------------ cut short: every layout
#: (writer options, frames complete) of a stack of 8 planes cut at 60 %: uncompressed
#: ImageJ and OME-TIFF (tifffile: the planes in a row, the IFDs after them) and zlib pages
#: (each page's IFD after its data, so the cut takes the IFDs of the pages after it)
CUT_LAYOUTS = {
    "imagej-raw": (dict(imagej=True), 5),
    "ome-raw": (dict(ome=True), 5),
    "plain-zlib": (dict(photometric="minisblack", compression="zlib"), 4),
    "imagej-zlib": (dict(imagej=True, compression="zlib"), 4),
}


def _cut_layout(path: Path, options: dict[str, object], fraction: float = 0.6) -> np.ndarray:
    data = np.random.default_rng(3).integers(0, 60000, (8, 32, 40)).astype(np.uint16)
    tifffile.imwrite(path, data, **options)  # type: ignore[arg-type]
    raw = path.read_bytes()
    with open(path, "r+b") as f:
        f.truncate(int(len(raw) * fraction))
    return data


@pytest.mark.parametrize("layout", list(CUT_LAYOUTS))
def test_replay_plays_the_complete_frames_of_any_tiff_cut_short(
    tmp_path: Path, livemask_log: list[logging.LogRecord], layout: str
) -> None:
    """Before: ImageJ, OME-TIFF and zlib stacks cut short replayed one frame without a word
    (tifffile then reads the first page as the file), or (ImageJ zlib) nothing at all."""
    options, complete = CUT_LAYOUTS[layout]
    src = tmp_path / f"{layout}.tif"
    data = _cut_layout(src, options)
    stack = open_stack(src)
    assert stack.frames == complete
    for i in range(complete):
        np.testing.assert_array_equal(stack.plane(i), data[i])
    assert any(f"only its first {complete} of 8 frames are complete; replaying those"
               in r.getMessage() and "is cut short (truncated" in r.getMessage()
               for r in livemask_log)


@pytest.mark.parametrize("layout", list(CUT_LAYOUTS))
def test_segment_refuses_any_tiff_cut_short_saying_how_much_is_there(
    tmp_path: Path, layout: str
) -> None:
    """Before: `segment` of an ImageJ or OME-TIFF stack cut short wrote 1-plane labels and
    exited 0; of an ImageJ zlib one it gave zlib's "Error -5 while decompressing data"."""
    options, complete = CUT_LAYOUTS[layout]
    src = tmp_path / f"{layout}.tif"
    _cut_layout(src, options)
    with pytest.raises(ValueError, match=rf"it is cut short \(truncated.*only {complete} of "
                       r"its 8 planes are complete in the file"):
        read_image_file(src)


def test_a_last_page_cut_short_is_named_so_not_corrupt(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    """Before: a zlib stack cut in its last page replayed it as a corrupt frame and
    `segment` called it "plane 7 is corrupt"."""
    src = tmp_path / "last.tif"
    data = _cut_layout(src, dict(photometric="minisblack", compression="zlib"), 0.97)
    stack = open_stack(src)
    assert stack.frames == 7
    np.testing.assert_array_equal(stack.plane(6), data[6])
    assert any("only its first 7 of 8 frames are complete" in r.getMessage()
               for r in livemask_log)
    with pytest.raises(ValueError, match=r"cut short \(truncated.*only 7 of its 8 planes"):
        read_image_file(src)


def test_segment_cli_exits_2_on_an_imagej_stack_cut_short(tmp_path: Path) -> None:
    """The reported run: "labels of shape (32, 40); 1 plane", exit 0."""
    from typer.testing import CliRunner

    from livemask.cli import app

    src = tmp_path / "ij.tif"
    _cut_layout(src, dict(imagej=True))
    result = CliRunner().invoke(app, ["segment", str(src), "-o", str(tmp_path / "labels.tif"),
                                      "--threads", "1"])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, output
    assert "only 5 of its 8 planes are complete in the file" in output
    assert not (tmp_path / "labels.tif").exists()


def test_whole_stacks_of_every_layout_are_not_taken_as_cut(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    """The checks read the file's own plane count: whole files play all 8 frames."""
    for layout, (options, _) in CUT_LAYOUTS.items():
        src = tmp_path / f"{layout}.tif"
        data = _cut_layout(src, options, 1.0)
        assert open_stack(src).frames == 8, layout
        np.testing.assert_array_equal(read_image_file(src).data, data)
    assert not any("cut short" in r.getMessage() for r in livemask_log)
