"""``livemask segment`` / ``evaluate`` offline fixes (session 25): outputs that are links,
FIFOs or a process's open file are written through, not replaced; non-square pixels keep
their y size in the labels; palette PNGs give their indices (masks) or grey values (images);
OME-Zarr input is named as such."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.segmentation import relabel_sequential

import livemask
from livemask.acquisition.simulated.nuclei import NucleiSample
from livemask.evaluation import folder_pairs, load_folder
from livemask.offline import read_image, read_stack_file, segment_file


def _nuclei(size: int = 64, seed: int = 11) -> tuple[np.ndarray, np.ndarray]:
    render = NucleiSample(seed=seed).render((0.0, 0.0), (size, size))
    return render.image, render.labels


def _source(tmp_path: Path, size: int = 64) -> Path:
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, _nuclei(size)[0])
    return src


def _csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _messages(records: list[logging.LogRecord]) -> str:
    return "\n".join(r.getMessage() for r in records)


# 1. outputs written through, never replaced ------------------------------------------------


def test_symlinked_outputs_stay_links_and_their_targets_get_the_outputs(
    tmp_path: Path,
) -> None:
    """Before, ``-o`` and ``--table`` naming a symbolic link replaced the link with a regular
    file (its target kept its old contents)."""
    src = _source(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    (store / "labels.tif").write_bytes(b"old")
    (store / "objects.csv").write_text("old")
    out, table = tmp_path / "labels.tif", tmp_path / "objects.csv"
    out.symlink_to(store / "labels.tif")
    table.symlink_to(Path("store") / "objects.csv")  # a relative link
    segment_file(src, out, table=table, threads=1)
    assert out.is_symlink() and table.is_symlink()
    labels = tifffile.imread(store / "labels.tif")
    assert labels.shape == (64, 64) and labels.max() > 0
    rows = _csv_rows((store / "objects.csv").read_text(encoding="utf-8"))
    assert len(rows) == len(np.unique(labels)) - 1
    # no temporary file is left beside the link or the target
    assert sorted(p.name for p in store.iterdir()) == ["labels.tif", "objects.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "labels.tif",
                                                          "objects.csv", "store"]


def _read_fifo(path: Path, into: list[bytes]) -> threading.Thread:
    def read() -> None:
        with path.open("rb") as fh:  # blocks until the writer opens it
            into.append(fh.read())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_outputs_are_written_into_not_replaced(tmp_path: Path) -> None:
    """Before, ``--table FIFO`` replaced the FIFO with a regular file (its reader got
    nothing), and ``-o`` could not name a FIFO without a .tif name."""
    src = _source(tmp_path)
    table, out = tmp_path / "objects", tmp_path / "labels"
    os.mkfifo(table)
    os.mkfifo(out)
    got_table: list[bytes] = []
    got_labels: list[bytes] = []
    readers = [_read_fifo(table, got_table), _read_fifo(out, got_labels)]
    segment_file(src, out, table=table, threads=1)
    for reader in readers:
        reader.join(timeout=30)
    assert stat.S_ISFIFO(os.lstat(table).st_mode) and stat.S_ISFIFO(os.lstat(out).st_mode)
    assert got_table and got_labels
    labels = tifffile.imread(io.BytesIO(got_labels[0]))
    assert labels.shape == (64, 64) and labels.max() > 0
    assert len(_csv_rows(got_table[0].decode("utf-8"))) == len(np.unique(labels)) - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "labels", "objects"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="no /proc/self/fd here")
def test_a_pipe_named_by_proc_self_fd_gets_the_table(tmp_path: Path) -> None:
    """``--table /dev/stdout`` names the process's open file (here: a pipe, by
    /proc/self/fd/N, as /dev/stdout leads to). Before, segment wrote a file beside it and
    renamed it there, which fails (or replaces the link /dev/stdout)."""
    src = _source(tmp_path)
    read, write = os.pipe()
    try:
        segment_file(src, tmp_path / "labels.tif", table=Path(f"/proc/self/fd/{write}"),
                     threads=1)
        os.close(write)
        write = -1
        with os.fdopen(read, "rb") as fh:
            read = -1
            text = fh.read().decode("utf-8")
    finally:
        for fd in (read, write):
            if fd >= 0:
                os.close(fd)
    labels = tifffile.imread(tmp_path / "labels.tif")
    assert text.startswith("plane,label,")
    assert len(_csv_rows(text)) == len(np.unique(labels)) - 1


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="no /dev/fd here")
def test_segment_table_to_its_stdout_gets_only_the_csv(tmp_path: Path) -> None:
    """``segment --table /dev/fd/1 | ...`` (as ``/dev/stdout``): the CSV on stdout, the
    ``wrote`` line on stderr. Before, the rename into /dev/fd failed (exit 2)."""
    src = _source(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(livemask.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "livemask.cli", "segment", str(src), "-o",
         str(tmp_path / "labels.tif"), "--table", "/dev/fd/1", "--threads", "1"],
        capture_output=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()
    text = done.stdout.decode("utf-8")
    labels = tifffile.imread(tmp_path / "labels.tif")
    assert text.startswith("plane,label,") and "wrote" not in text
    assert len(_csv_rows(text)) == len(np.unique(labels)) - 1
    assert "wrote " in done.stderr.decode()


def test_a_link_to_a_fifo_is_written_through(tmp_path: Path) -> None:
    """A link leading to a FIFO: written into, the link and the FIFO both stay."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    src = _source(tmp_path)
    fifo, link = tmp_path / "fifo", tmp_path / "objects.csv"
    os.mkfifo(fifo)
    link.symlink_to(fifo)
    got: list[bytes] = []
    reader = _read_fifo(fifo, got)
    segment_file(src, tmp_path / "labels.tif", table=link, threads=1)
    reader.join(timeout=30)
    assert link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert got and got[0].startswith(b"plane,label,")


# 2. non-square pixels ----------------------------------------------------------------------


def _physical_sizes(path: Path) -> dict[str, str]:
    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata or ""
    return dict(re.findall(r'\b(PhysicalSize[XY])="([^"]+)"', xml))


@pytest.mark.parametrize("how", ["ome", "resolution"])
def test_non_square_pixels_keep_their_y_size_in_the_labels(tmp_path: Path, how: str) -> None:
    """Before, the labels' OME metadata said PhysicalSizeY = PhysicalSizeX (the x size)
    for an input with non-square pixels; docs/models.md promises the input's X/Y sizes."""
    image, _ = _nuclei()
    src = tmp_path / "aniso.tif"
    if how == "ome":
        tifffile.imwrite(src, image, ome=True, metadata={
            "axes": "YX", "PhysicalSizeX": 0.65, "PhysicalSizeY": 1.3})
    else:  # 0.65 µm and 1.3 µm per pixel, in pixels per cm
        tifffile.imwrite(src, image, resolution=(1e4 / 0.65, 1e4 / 1.3),
                         resolutionunit=tifffile.RESUNIT.CENTIMETER)
    out = tmp_path / "labels.tif"
    segment_file(src, out, threads=1)
    sizes = _physical_sizes(out)
    assert float(sizes["PhysicalSizeX"]) == pytest.approx(0.65)
    assert float(sizes["PhysicalSizeY"]) == pytest.approx(1.3)
    given = tmp_path / "given.tif"  # --pixel-size-um: square, as given
    segment_file(src, given, pixel_size_um=0.5, threads=1)
    assert {k: float(v) for k, v in _physical_sizes(given).items()} == {
        "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}


# 3. palette PNGs ---------------------------------------------------------------------------


def _palette_png(path: Path, indices: np.ndarray, palette: np.ndarray) -> Path:
    im = Image.fromarray(indices.astype(np.uint8), mode="P")
    im.putpalette(palette.astype(np.uint8).ravel().tolist())
    im.save(path)
    with Image.open(path) as back:
        assert back.mode == "P"
    return path


def _random_palette(n: int = 256, seed: int = 3) -> np.ndarray:
    colours = np.random.default_rng(seed).integers(0, 256, (n, 3))
    colours[0] = 0
    return colours


def test_a_palette_png_mask_gives_its_indices(tmp_path: Path) -> None:
    """Before, a palette PNG mask (as many annotation tools save labels: each label a
    colour) was refused as "RGB": it was read through its palette."""
    image, labelled = _nuclei()
    truth = relabel_sequential(labelled)[0]
    assert 3 < truth.max() < 256
    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    tifffile.imwrite(tmp_path / "img" / "a.tif", image)
    mask = _palette_png(tmp_path / "mask" / "a.png", truth, _random_palette())
    assert np.array_equal(read_image(mask, invert_min_is_white=False), truth)
    ((_, labels),) = load_folder(tmp_path / "img", tmp_path / "mask")
    assert np.array_equal(labels > 0, truth > 0)
    assert len(np.unique(labels)) == len(np.unique(truth))


def test_a_grey_palette_png_image_is_segmented_with_its_grey_values(tmp_path: Path) -> None:
    """Before, an 8-bit image saved with a grey palette (R = G = B) was refused as colour.
    Its grey values are used (here the palette is not the identity: value = 255 - index)."""
    image, _ = _nuclei()
    grey = np.clip(image.astype(float) / image.max() * 255, 0, 255).astype(np.uint8)
    ramp = np.repeat((255 - np.arange(256))[:, None], 3, axis=1)
    src = _palette_png(tmp_path / "grey.png", 255 - grey, ramp)
    assert np.array_equal(read_stack_file(src).data, grey)
    out = tmp_path / "labels.tif"
    segment_file(src, out, threads=1)
    assert tifffile.imread(out).max() > 0


def test_a_colour_palette_png_image_is_still_refused(tmp_path: Path) -> None:
    image, _ = _nuclei()
    src = _palette_png(tmp_path / "lut.png", (image % 256).astype(np.uint8),
                       _random_palette())
    with pytest.raises(ValueError, match=r"looks like colour"):
        read_stack_file(src)


# 4. OME-Zarr -------------------------------------------------------------------------------


def _zarr(path: Path) -> Path:
    (path / "0").mkdir(parents=True)
    (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    return path


def test_segment_says_that_it_does_not_read_ome_zarr(tmp_path: Path) -> None:
    """Before: "is a folder; give one image file", as for any folder."""
    store = _zarr(tmp_path / "img.ome.zarr")
    with pytest.raises(IsADirectoryError) as info:
        segment_file(store, tmp_path / "labels.tif", threads=1)
    text = str(info.value)
    assert "OME-Zarr" in text and "livemask replay" in text and "TIFF" in text
    assert "is a folder" not in text
    plain = _zarr(tmp_path / "recording")  # zarr metadata, no .zarr name
    with pytest.raises(IsADirectoryError, match=r"OME-Zarr"):
        segment_file(plain, tmp_path / "labels.tif", threads=1)


def test_evaluate_warns_about_the_ome_zarr_stores_it_skips(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    """Before, ``evaluate --images DIR`` skipped a .zarr store without a word."""
    image, truth = _nuclei()
    images, masks = tmp_path / "img", tmp_path / "mask"
    images.mkdir()
    masks.mkdir()
    tifffile.imwrite(images / "a.tif", image)
    tifffile.imwrite(masks / "a.tif", truth.astype(np.uint16))
    _zarr(images / "b.ome.zarr")
    _zarr(masks / "b.ome.zarr")
    assert folder_pairs(images, masks) == [(images / "a.tif", masks / "a.tif")]
    said = _messages(livemask_log)
    assert f"1 OME-Zarr store(s) in {images} skipped (b.ome.zarr)" in said
    assert f"1 OME-Zarr store(s) in {masks} skipped (b.ome.zarr)" in said
    assert "livemask replay" in said


def test_a_json_report_is_appended_to_an_open_file_and_kept_behind_a_link(
    tmp_path: Path,
) -> None:
    """evaluate --json /dev/stdout >> log.json truncated the log (opened for writing), and a
    --json link was written in place rather than its file replaced whole."""
    from livemask.cli import _write_json

    log_path = tmp_path / "log.json"
    with log_path.open("a") as log_file:
        log_file.write("earlier\n")
        log_file.flush()
        _write_json(Path(f"/proc/self/fd/{log_file.fileno()}"), {"f1": 0.9})
    assert log_path.read_text() == 'earlier\n{\n  "f1": 0.9\n}\n'
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    _write_json(link, {"f1": 0.8})
    assert link.is_symlink() and json.loads(real.read_text()) == {"f1": 0.8}


def test_a_table_to_a_reader_that_goes_away_ends_quietly(tmp_path: Path) -> None:
    """segment --table /dev/stdout | head -1 ended with "error: [Errno 32] Broken pipe" and
    exit 2 (review)."""
    image = NucleiSample(seed=1).render((0.0, 0.0), (512, 512), exposure_ms=10.0).image
    tifffile.imwrite(tmp_path / "in.tif", np.stack([image] * 8))  # a CSV of ≈ 110 KB: more
    # than a pipe holds, so the write meets the reader gone
    cmd = (f"{sys.executable} -m livemask segment {tmp_path / 'in.tif'} "
           f"-o {tmp_path / 'out.tif'} --table /dev/stdout | head -1")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.startswith("plane,"), done.stdout
    assert "Broken pipe" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.tif").exists()


def test_a_grey_palette_png_with_transparency_is_refused_as_grey_and_alpha(
    tmp_path: Path,
) -> None:
    palette = [v for g in range(0, 256, 16) for v in (g, g, g)]
    im = Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64) % 16, mode="P")
    im.putpalette(palette)
    im.save(tmp_path / "grey.png", transparency=0)
    from livemask.offline import check_image, read_image_file

    with pytest.raises(ValueError, match="alpha"):
        check_image(tmp_path / "grey.png", read_image_file(tmp_path / "grey.png"))
