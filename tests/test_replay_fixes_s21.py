"""Replay and ``segment`` of compressed TIFFs (a decoder that is missing named as such, zstd
too), a TIFF without pages, a multi-file OME-TIFF without its other file (a long ImageJ
stack not read page by page for it), OME-XML cut off a TIFF cut short, the pixel size of an
OME-Zarr's multiscale, and ``start`` with a sequence in a replay (a time plan alone taken)."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from livemask.acquisition.replay import ReplaySource, open_stack
from livemask.acquisition.simulated.nuclei import NucleiSample
from livemask.errors import ControlError, ReplayError
from livemask.evaluation import load_folder
from livemask.offline import read_image_file, segment_file
from livemask.service.app import Service
from tests.conftest import make_config
from tests.test_acquisition_end import control
from tests.test_replay_runs import play_all


def _nuclei(frames: int, size: int = 96) -> np.ndarray:
    """``frames`` simulated nuclei images (uint16), the sample moving between them."""
    sample = NucleiSample(seed=11)
    images = []
    for _ in range(frames):
        images.append(sample.render((0.0, 0.0), (size, size)).image)
        sample.step()
    return np.stack(images)


def _play(path: Path) -> tuple[int, list[str | None]]:
    """How many frames a replay of ``path`` hands over, and its end (error or None)."""
    got, done = play_all(ReplaySource(open_stack(path), interval_s=0.0))
    return len(got), done


def _without_imagecodecs(monkeypatch: pytest.MonkeyPatch) -> None:
    """tifffile as without the imagecodecs package: its own codecs only (zlib, lzma,
    packbits; zstd only from Python 3.14, whose ``compression.zstd`` it imports when a page
    is decoded; no LZW, no JPEG), and imagecodecs not importable."""
    import tifffile._imagecodecs as fallback
    import tifffile.tifffile as module

    monkeypatch.setitem(sys.modules, "imagecodecs", None)
    monkeypatch.setattr(module, "imagecodecs", fallback)
    monkeypatch.setattr(module.TIFF, "DECOMPRESSORS", module.CompressionCodec(encode=False))


@pytest.fixture
def no_imagecodecs(monkeypatch: pytest.MonkeyPatch) -> None:
    """:func:`_without_imagecodecs` for the whole test."""
    _without_imagecodecs(monkeypatch)


# ------------------------------------------------------------------ compressed TIFFs
@pytest.mark.parametrize("compression", ["lzw", "zstd", "zlib"])
def test_a_compressed_multi_page_tiff_replays_and_segments(
    tmp_path: Path, compression: str
) -> None:
    """Before imagecodecs was a dependency, an intact LZW stack was called corrupt: every
    replayed frame skipped, and segment refused it."""
    data = _nuclei(3)
    src = tmp_path / f"{compression}.tif"
    tifffile.imwrite(src, data, photometric="minisblack", compression=compression,
                     metadata={"axes": "TYX"})
    stack = open_stack(src)
    assert stack.frames == 3
    for i in range(3):
        np.testing.assert_array_equal(stack.plane(i), data[i])
    assert _play(src) == (3, [None])
    done = segment_file(src, tmp_path / "labels.tif", threads=1)
    labels = tifffile.imread(tmp_path / "labels.tif")
    assert done.planes == 3 and labels.shape == data.shape
    assert all(plane.max() > 3 for plane in labels)  # nuclei found in every plane


def test_a_missing_decoder_is_named_at_open_not_called_corrupt(
    tmp_path: Path, no_imagecodecs: None
) -> None:
    """Before: replay skipped every frame as "corrupt (ValueError: <COMPRESSION.LZW: 5>
    requires the 'imagecodecs' package)" and segment said the same of plane 0."""
    src = tmp_path / "lzw.tif"
    tifffile.imwrite(src, _nuclei(2, 32), photometric="minisblack", compression="lzw")
    need = r"compressed with LZW, which needs the 'imagecodecs' package \(pip install imagecodecs\)"
    with pytest.raises(ReplayError, match=rf"lzw\.tif is {need}$"):
        open_stack(src)
    with pytest.raises(ValueError, match=rf"lzw\.tif cannot be read as an image: it is {need}$"):
        segment_file(src, tmp_path / "labels.tif")
    assert not (tmp_path / "labels.tif").exists()


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="Python 3.14 decodes zstd itself")
def test_zstd_without_imagecodecs_is_named_at_open_and_when_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: open passed (tifffile hands out its own zstd decoder, which imports Python
    3.14's compression.zstd when called) and every plane was "corrupt
    (ModuleNotFoundError: No module named 'compression')"."""
    src = tmp_path / "zstd.tif"
    tifffile.imwrite(src, _nuclei(2, 32), photometric="minisblack", compression="zstd")
    stack = open_stack(src)  # with imagecodecs
    _without_imagecodecs(monkeypatch)
    need = r"which needs the 'imagecodecs' package \(pip install imagecodecs\)$"
    with pytest.raises(ReplayError, match=r"the file's plane 1 is compressed with a codec "
                       r"that tifffile has no working decoder for here \(No module named "
                       rf"'compression'\), {need}"):
        stack.plane(1)
    stack.close()
    with pytest.raises(ReplayError, match=rf"zstd\.tif is compressed with ZSTD, {need}"):
        open_stack(src)
    with pytest.raises(ValueError, match=r"zstd\.tif cannot be read as an image: it is "
                       rf"compressed with ZSTD, {need}"):
        segment_file(src, tmp_path / "labels.tif")
    assert not (tmp_path / "labels.tif").exists()


def test_a_tiff_without_pages_is_said_to_hold_no_image(tmp_path: Path) -> None:
    """Before: "... cannot be read as a TIFF stack (is it corrupt or cut short?): 0" and
    "... cannot be read as an image: 0" (the IndexError of its missing first page)."""
    src = tmp_path / "nopage.tif"
    src.write_bytes(b"II*\x00\x08\x00\x00\x00")  # a header whose first page is missing
    with pytest.raises(ReplayError, match=r"nopage\.tif holds no image series$"):
        open_stack(src)
    with pytest.raises(ValueError, match=r"nopage\.tif cannot be read as an image: it holds "
                       r"no image series$"):
        segment_file(src, tmp_path / "labels.tif")


def test_a_plane_without_a_decoder_is_named_so_when_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page read later (after open) whose decoder is missing: not "corrupt"."""
    src = tmp_path / "lzw.tif"
    tifffile.imwrite(src, _nuclei(2, 32), photometric="minisblack", compression="lzw")
    stack = open_stack(src)
    _without_imagecodecs(monkeypatch)
    with pytest.raises(ReplayError, match=r"the file's plane 1 is compressed with LZW, which "
                       r"needs the 'imagecodecs' package \(pip install imagecodecs\)$"):
        stack.plane(1)
    stack.close()


def _corrupt_pages(path: Path, frames: int = 3) -> None:
    """A zlib stack of ``frames`` pages, each overwritten in its middle."""
    tifffile.imwrite(path, _nuclei(frames, 32), photometric="minisblack", compression="zlib",
                     rowsperstrip=32)
    with tifffile.TiffFile(path) as tif:
        offsets = [int(page.dataoffsets[0]) for page in tif.pages]
    raw = bytearray(path.read_bytes())
    for offset in offsets:
        raw[offset + 10:offset + 60] = b"\xff" * 50
    path.write_bytes(bytes(raw))


def test_a_replay_whose_frames_were_all_skipped_says_none_was_replayed(
    tmp_path: Path,
) -> None:
    """Before: "3 of 3 frame(s) could not be read and were skipped; the others were
    replayed" (there were none)."""
    src = tmp_path / "bad.tif"
    _corrupt_pages(src)
    played, done = _play(src)
    assert played == 0
    assert done[0] is not None and done[0].startswith(
        "none of its frames could be read: 3 of 3 frame(s) were skipped and none was "
        "replayed. First: frame 0 of")


def test_evaluate_names_a_corrupt_plane_without_segment_advice(tmp_path: Path) -> None:
    """Before, evaluate's error ended "segment reads every plane of a file: save the
    others as a file of their own to segment them"."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    _corrupt_pages(tmp_path / "images" / "a.tif", frames=1)
    tifffile.imwrite(tmp_path / "masks" / "a.tif", np.zeros((32, 32), np.uint16))
    with pytest.raises(ValueError, match=r"a\.tif cannot be read as an image: the file's "
                       r"plane 0 is corrupt \([^)]*\)$") as info:
        load_folder(tmp_path / "images", tmp_path / "masks")
    assert "segment" not in str(info.value)


# ------------------------------------------------------------------ multi-file OME-TIFF
def _two_file_ome(folder: Path, data: np.ndarray) -> None:
    """a.ome.tif (planes t 0-1) and b.ome.tif (t 2-3) of one image, as Bio-Formats and
    Micro-Manager write a set: each file's OME-XML names the planes of both."""
    ids = {name: f"urn:uuid:{uuid.uuid4()}" for name in ("a.ome.tif", "b.ome.tif")}
    rows, cols = data.shape[-2:]
    tiffdata = "".join(
        f'<TiffData FirstT="{2 * k}" FirstZ="0" FirstC="0" IFD="0" PlaneCount="2">'
        f'<UUID FileName="{name}">{ids[name]}</UUID></TiffData>'
        for k, name in enumerate(ids))
    for k, name in enumerate(ids):
        xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.'
               f'org/Schemas/OME/2016-06" UUID="{ids[name]}"><Image ID="Image:0" Name="x">'
               f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint16" SizeX="{cols}" '
               f'SizeY="{rows}" SizeC="1" SizeZ="1" SizeT="4"><Channel ID="Channel:0:0" '
               f'SamplesPerPixel="1"/>{tiffdata}</Pixels></Image></OME>')
        with tifffile.TiffWriter(folder / name) as tw:
            tw.write(data[2 * k], description=xml, metadata=None, contiguous=False)
            tw.write(data[2 * k + 1], metadata=None, contiguous=False)


def test_segment_refuses_a_multi_file_ome_tiff_whose_other_file_is_missing(
    tmp_path: Path,
) -> None:
    """Before: segment wrote empty labels for the planes in the missing b.ome.tif (tifffile
    reads them as zeros) and exited 0; replay called them "not in the file"."""
    data = _nuclei(4)
    _two_file_ome(tmp_path, data)
    whole = read_image_file(tmp_path / "a.ome.tif").data  # both files there: all planes
    np.testing.assert_array_equal(whole, data)
    (tmp_path / "b.ome.tif").unlink()
    src, out = tmp_path / "a.ome.tif", tmp_path / "labels.tif"
    with pytest.raises(ValueError, match=(
            r"a\.ome\.tif cannot be read as an image: the file's planes 2, 3 \(2 of 4\) are "
            r"missing: its OME metadata names pages of b\.ome\.tif, which is not in .+: copy "
            r"b\.ome\.tif beside a\.ome\.tif$")):
        segment_file(src, out)
    assert not out.exists()
    stack = open_stack(src)
    np.testing.assert_array_equal(stack.plane(1), data[1])
    with pytest.raises(ReplayError, match=r"the file's plane 2 is missing: its OME metadata "
                       r"names pages of b\.ome\.tif, .*copy b\.ome\.tif beside a\.ome\.tif$"):
        stack.plane(2)
    stack.close()


def test_a_long_imagej_stack_is_read_without_loading_every_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the check for pages of a missing companion file loaded every page's IFD of
    an ImageJ stack (tifffile reads it from its first page): 10-50x slower to read."""
    import tifffile.tifffile as module

    data = np.arange(400 * 8 * 8, dtype=np.uint16).reshape(400, 8, 8)
    src = tmp_path / "ij.tif"
    tifffile.imwrite(src, data, imagej=True, metadata={"axes": "TYX"})
    loaded: list[int] = []
    for cls in (module.TiffPage, module.TiffFrame):
        init = cls.__init__

        def counted(self: Any, *args: Any, _init: Any = init, **kwargs: Any) -> None:
            loaded.append(1)
            _init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counted)
    image = read_image_file(src)
    np.testing.assert_array_equal(image.data, data)
    assert len(loaded) < 20  # (the first and last pages; 400 and more before)


# ------------------------------------------------------------------ OME-XML cut off
def _ome_cut(path: Path, keep: float | int) -> None:
    """A 2-position OME-TIFF (t 2, c 2, z 2 each: tifffile writes its OME-XML at the end)
    cut to ``keep`` (a fraction of its size, or bytes to drop from its end)."""
    with tifffile.TiffWriter(path, ome=True) as tw:
        for p in range(2):
            tw.write(_nuclei(8, 32).reshape(2, 2, 2, 32, 32) + p, metadata={"axes": "TCZYX"})
    raw = path.read_bytes()
    size = int(len(raw) * keep) if isinstance(keep, float) else len(raw) - keep
    path.write_bytes(raw[:size])


@pytest.mark.parametrize("keep", [0.75, 40], ids=["data-cut", "xml-only-cut"])
def test_a_tiff_whose_ome_xml_was_cut_off_says_its_axes_are_unknown(
    tmp_path: Path, livemask_log: list[logging.LogRecord], keep: float | int
) -> None:
    """Before: its planes (channels, z, both positions) replayed as one time series with
    only an INFO line; cut in its XML alone, it was not even seen as cut short (segment
    wrote labels of one 16-plane axis)."""
    src = tmp_path / "mp.ome.tif"
    _ome_cut(src, keep)
    stack = open_stack(src)
    stack.close()
    unknown = ("its metadata (its ImageDescription, written at its end: OME-XML or "
               "ImageJ's) lay past the cut, so what its")
    assert any(r.levelno == logging.WARNING and unknown in r.getMessage()
               and "channels, z planes or positions" in r.getMessage()
               and "copy it again or give the complete file" in r.getMessage()
               for r in livemask_log)
    with pytest.raises(ValueError, match=r"mp\.ome\.tif cannot be read as an image: it is cut "
                       r"short \(truncated.*, and its metadata \(its ImageDescription.*lay "
                       r"past the cut, .* is not known; copy it again"):
        segment_file(src, tmp_path / "labels.tif")
    assert not (tmp_path / "labels.tif").exists()


# ------------------------------------------------------------------ OME-Zarr scale
@pytest.mark.parametrize(("dataset", "overall", "expected"), [
    ([1.0, 1.0, 1.0], [1.0, 0.65, 0.65], 0.65),
    ([1.0, 2.0, 2.0], [1.0, 0.25, 0.25], 0.5),
    ([1.0, 0.4, 0.4], None, 0.4),
])
def test_an_ome_zarr_multiscale_scale_multiplies_the_datasets(
    tmp_path: Path, dataset: list[float], overall: list[float] | None, expected: float
) -> None:
    """Before, the scale in ``multiscales[0].coordinateTransformations`` (NGFF: applied
    after every dataset's) was ignored: 1 µm/px instead of 0.65, areas 2.4x too large."""
    import zarr

    group = zarr.open_group(tmp_path / "img.ome.zarr", mode="w", zarr_format=3)
    group.create_array("0", data=np.zeros((2, 16, 16), np.uint16), chunks=(1, 16, 16))
    ms: dict[str, Any] = {
        "axes": [{"name": "t", "type": "time"},
                 {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": dataset}]}]}
    if overall is not None:
        ms["coordinateTransformations"] = [{"type": "scale", "scale": overall}]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    stack = open_stack(tmp_path / "img.ome.zarr")
    assert stack.pixel_size_um == pytest.approx(expected)


# ------------------------------------------------------------------ start in a replay
def _ports(count: int) -> list[int]:
    """``count`` loopback ports of the block 48250-48374 that are free now."""
    free = []
    for port in range(48250, 48375):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        free.append(port)
        if len(free) == count:
            return free
    raise AssertionError("no free loopback ports in 48250-48374")


async def _start_and_play(svc: Service, **args: Any) -> tuple[Any, int]:
    """``start`` with ``args`` in a replay: its reply and the frames it played."""
    before = svc.pipeline.counters.counts["acquired"]
    reply = await control(svc, "start", **args)
    for _ in range(400):  # (a few frames: well within this)
        if not svc.acquiring:
            break
        await asyncio.sleep(0.02)
    assert not svc.acquiring
    return reply, svc.pipeline.counters.counts["acquired"] - before


async def test_a_replay_takes_a_time_plan_and_refuses_the_rest_of_a_sequence(
    tmp_path: Path, livemask_log: list[logging.LogRecord]
) -> None:
    """A time plan's loops limit the frames a replay plays (as before 2026-11-29, when a
    sequence was refused outright, saying its time plan would be ignored); channels,
    positions, z, grid and autofocus plans are refused, named; events are at most the
    file's frames (loops 500 replied events 500 for a 3-frame file)."""
    src = tmp_path / "s.tif"
    tifffile.imwrite(src, _nuclei(3, 32), photometric="minisblack", metadata={"axes": "TYX"})
    pub, ctl = _ports(2)
    cfg = make_config(
        publish={"pub_address": f"tcp://127.0.0.1:{pub}",
                 "control_address": f"tcp://127.0.0.1:{ctl}"},
        acquisition={"sequence": {"time_plan": {"interval": 0, "loops": 500}}})
    async with Service(cfg, source=ReplaySource(open_stack(src), interval_s=0.0)) as svc:
        sequence = {"channels": [{"config": "Cy5", "exposure": 5}],
                    "z_plan": {"range": 2, "step": 1},
                    "time_plan": {"interval": 1, "loops": 2}}
        with pytest.raises(ControlError, match=(
                r"start: a replay plays the file's frames and cannot run a sequence's "
                r"channels and a z plan \(sequence\.channels, sequence\.z_plan\), which it "
                r"would ignore; remove them \(a time plan alone is taken: its loops limit "
                r"the frames played\), send start without a sequence")) as info:
            await control(svc, "start", sequence=sequence)
        assert info.value.code == "invalid_args"
        assert not svc.acquiring and svc.pipeline.counters.counts["acquired"] == 0
        for refused in ({"stage_positions": [{"x": 1, "y": 2}]},
                        {"grid_plan": {"rows": 2, "columns": 1}}):
            with pytest.raises(ControlError, match=rf"sequence\.{next(iter(refused))}\)"):
                await control(svc, "start", sequence=refused)
        reply, played = await _start_and_play(
            svc, sequence={"time_plan": {"interval": 1, "loops": 2}})
        assert (reply["events"], played) == (2, 2)
        assert any("the time plan's interval is not used" in r.getMessage()
                   for r in livemask_log)
        reply, played = await _start_and_play(
            svc, sequence={"time_plan": {"interval": 0, "loops": 500}})
        assert (reply["events"], played) == (3, 3)
        reply, played = await _start_and_play(svc)  # the config's: 500 loops
        assert (reply["events"], played) == (3, 3)
