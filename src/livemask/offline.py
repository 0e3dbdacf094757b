"""Offline segmentation of image files (``livemask segment``)."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tifffile

from livemask.acquisition.pixel_size import tiff_pixel_size_xy
from livemask.analysis.grains import (
    BIG_REGION_FRACTION,
    CumulativeGrainStats,
    grain_field,
    grain_statistics,
    largest_region_fraction,
)
from livemask.analysis.measure import measure_objects
from livemask.analysis.normalize import image_problem
from livemask.errors import ConfigError
from livemask.inference.models import load_model_card
from livemask.inference.segmenter import Segmenter
from livemask.inference.select import load_backend
from livemask.roi import ROI_FORMAT, Roi

log = logging.getLogger("livemask")

TABLE_COLUMNS = (
    "plane", "label", "area_px", "area_um2", "centroid_y", "centroid_x", "bbox_min_row",
    "bbox_min_col", "bbox_max_row", "bbox_max_col", "mean_intensity", "integrated_intensity",
    "equivalent_diameter_um", "eccentricity", "touches_edge", "local_background",
    "corrected_intensity", "saturated_px",
)


def load_segmenter(model: str, threads: int = 2, *, task: str | None = None) -> Segmenter:
    """A segmenter for a shipped model name or a card path, on the default backend;
    ConfigError if ``task`` is given and the model is for another task."""
    card = load_model_card(model)
    if task is not None and card.task != task:
        raise ConfigError(
            f"model {model!r} segments {card.task}, not {task}: pick a {task} model "
            f"(e.g. {task}, {task}_rf or {task}_classical)"
        )
    backend = load_backend("auto", card, threads=threads)
    return Segmenter(card, backend)


@dataclass
class ImageFile:
    """An image file's pixels and what its metadata says about them."""

    data: np.ndarray
    #: tifffile's axes of the data (``"TZYX"``, ``"YXS"`` for RGB, …); None: not known
    axes: str | None = None
    #: whether ``axes`` names the axes (OME or ImageJ metadata), not just guesses them
    axes_named: bool = False
    #: µm per pixel (x) from the file's metadata, and where it was found; None: none
    pixel_size_um: float | None = None
    pixel_size_from: str = ""
    #: µm per pixel along y where the file gives one (non-square pixels keep it: the
    #: labels' OME metadata records it); None: none (square, or no pixel size)
    pixel_size_y_um: float | None = None


def read_image(path: Path, *, invert_min_is_white: bool = True) -> np.ndarray:
    """An image file as an array: TIFF with tifffile, other formats (PNG, …) with
    scikit-image. ValueError naming the file if it cannot be read. Masks and label images
    are read with ``invert_min_is_white=False`` (see :func:`read_image_file`)."""
    return read_image_file(path, invert_min_is_white=invert_min_is_white).data


def read_image_file(path: Path, *, invert_min_is_white: bool = True) -> ImageFile:
    """An image file with its axes and pixel size where the file has them (TIFF, BigTIFF
    included: OME, ImageJ or resolution tags); ValueError naming the file if it cannot be
    read (a TIFF's: the codec and package it needs, missing planes and the file they are in,
    the file cut short; :class:`UnreadablePlane` naming a corrupt plane). A palette PNG
    gives its grey values where its palette is grey, else its colours (refused as colour by
    :func:`check_image`); read with ``invert_min_is_white=False`` (a mask), its stored
    indices (:func:`_palette_png`).

    An image TIFF stored MinIsWhite (not an ImageJ one) is read inverted, as ``replay``
    reads it (``tiff_stack.white_level``); with ``invert_min_is_white=False`` (masks and
    label images, whose stored values are the labels) every TIFF gives its stored values.

    A TIFF of several image series of one shape and pixel type (an OME-TIFF with one series
    per stage position, as ``livemask replay`` reads it) gives them all, stacked along a
    position axis ``P``: after the time axis when the series start with one (``TPYX``),
    else first (``PZYX``, ``PYX``). Series that differ: the first, with a warning."""
    from skimage import io as skio

    from livemask.acquisition.tiff_stack import TIFF_SUFFIXES

    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                return _read_tiff(tif, path, invert_min_is_white)
        indexed = _palette_png(path, stored=not invert_min_is_white)
        if indexed is not None:
            return ImageFile(indexed)
        return ImageFile(np.asarray(skio.imread(path)))
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # the OS's message names the file
    except UnreadablePlane as exc:  # (segment adds what to do)
        raise UnreadablePlane(f"{path} cannot be read as an image: {exc}") from exc
    except Exception as exc:  # each reader has its own errors for a corrupt file
        raise ValueError(f"{path} cannot be read as an image: {exc}") from exc


def _palette_png(path: Path, *, stored: bool) -> np.ndarray | None:
    """A palette (indexed, PIL mode ``P``) PNG's pixels: its stored indices where ``stored``
    (masks and label images: the indices are the labels, the palette only colours them), or
    for an image the grey values where the palette is grey at every index used (R = G = B),
    e.g. an 8-bit grayscale image saved with a grey LUT; None for any other file, and for an
    image with a colour palette (read as colour: segment refuses it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.mode != "P":
                return None
            indices = np.asarray(im)
            palette = im.getpalette("RGB") or []
            transparent = "transparency" in im.info
    except (UnidentifiedImageError, OSError):
        return None  # the other reader says why
    if stored:
        return indices
    if transparent:  # grey and alpha: refused as such (check_image), as an LA PNG is
        return None
    colours = np.zeros((256, 3), dtype=np.uint8)
    given = np.asarray(palette[: 3 * 256], dtype=np.uint8).reshape(-1, 3)
    colours[: len(given)] = given
    used = colours[np.unique(indices)]
    if not ((used[:, 0] == used[:, 1]) & (used[:, 1] == used[:, 2])).all():
        return None
    return colours[:, 0][indices]


def _read_tiff(tif: tifffile.TiffFile, path: Path, invert_min_is_white: bool) -> ImageFile:
    """:func:`read_image_file` for an open TIFF: its position series stacked (axis P); a
    file stored MinIsWhite inverted where ``invert_min_is_white`` (not an ImageJ file:
    ``tiff_stack.white_level``), as ``replay`` reads it."""
    from livemask.acquisition.tiff_stack import (
        decoder_problem,
        min_is_black,
        missing_pages,
        position_series,
        tiff_cut,
        white_level,
    )

    undecodable = decoder_problem(tif)  # e.g. LZW without imagecodecs: every plane
    if undecodable is not None:
        raise ValueError(f"it is {undecodable}")
    cut = tiff_cut(tif, path)  # tifffile may then give one plane of a stack
    if cut is not None:
        raise ValueError(_cut_short(cut.complete, cut.total, cut.axes_unknown()))
    every = list(tif.series)
    if not every:
        raise ValueError("it holds no image series")
    series, shapes = position_series(every)
    for k in range(len(series)):  # tifffile reads pages in a missing file as zeros
        missing = missing_pages(tif, path, k)
        if missing is not None:
            raise ValueError(missing)
    if shapes is not None:
        log.warning("%s holds %d image series of different shapes or types (%s); only the "
                    "first is segmented (series of one shape are segmented as positions): "
                    "save the others as files of their own to segment them", path,
                    len(every), shapes)
    axes = str(series[0].axes).upper()
    page = getattr(series[0], "keyframe", None) or tif.pages.first
    white = (white_level(page, path, imagej=bool(tif.is_imagej)) if invert_min_is_white
             else None)
    data = min_is_black(_series_array(tif, path, 0), white)
    if len(series) > 1:  # one series per stage position: a position axis, as replay does
        at = 1 if axes[:1] == "T" and len(axes) > 2 else 0  # time points outermost
        rest = (min_is_black(_series_array(tif, path, k), white) for k in range(1, len(series)))
        data = np.stack([data, *rest], axis=at)
        axes = f"{axes[:at]}P{axes[at:]}"
        log.info("%s: its %d image series are segmented as positions: axis P of the labels "
                 "(shape %s, axes %s)", path, len(series), data.shape, axes)
    pixel = tiff_pixel_size_xy(tif, path=path)  # as `livemask replay` reads it
    return ImageFile(
        data, axes=axes, axes_named=bool(tif.is_ome or tif.is_imagej),
        pixel_size_um=pixel[0] if pixel else None,
        pixel_size_from=pixel[2] if pixel else "",
        pixel_size_y_um=pixel[1] if pixel else None,
    )


class UnreadablePlane(ValueError):
    """A plane of a TIFF cannot be read (it is corrupt, or no decoder here takes it); the
    message names it."""


def _series_array(tif: tifffile.TiffFile, path: Path, k: int) -> np.ndarray:
    """Series ``k`` of ``tif`` as an array; :class:`UnreadablePlane` naming the plane that
    cannot be read, or ValueError saying that the file is cut short, where that is why."""
    try:
        return np.asarray(tif.series[k].asarray())
    except Exception as exc:  # zlib, imagecodecs, tifffile: each has its own errors
        raise _why_unreadable(tif, path, k) or ValueError(str(exc)) from exc


def _why_unreadable(tif: tifffile.TiffFile, path: Path, k: int) -> ValueError | None:
    """Why series ``k`` of ``tif`` cannot be read: a plane that cannot be
    (:class:`UnreadablePlane`), or the file cut short (found plane by plane); None when
    that does not find it."""
    from livemask.acquisition.tiff_stack import tiff_planes
    from livemask.errors import ReplayError

    try:
        planes = tiff_planes(tif, path, k)
    except Exception:  # the diagnosis must not hide the first error
        return None
    if planes is None:
        return None
    if planes.complete < planes.planes:
        return ValueError(_cut_short(planes.complete, planes.planes))
    lead = planes.shape[:-2]
    for j in range(planes.planes):
        try:
            planes[tuple(int(n) for n in np.unravel_index(j, lead))]
        except ReplayError as exc:
            return UnreadablePlane(str(exc))
    return None


def _cut_short(complete: int, total: int | None, unknown: str | None = None) -> str:
    """Why a TIFF cut short (truncated) is refused: ``complete`` of its ``total`` planes;
    ``unknown``: why its planes cannot be told apart (``TiffCut.axes_unknown``)."""
    of = (f"{complete} of its {total} planes are complete in the file" if total is not None
          else f"its first {complete} planes are complete (it does not say how many it had)")
    lost = f", and {unknown}" if unknown is not None else ""
    return (f"it is cut short (truncated: its writer did not finish, or it was copied in "
            f"part): only {of}{lost}; copy it again or give the complete file")


def _colour_problem(image: ImageFile) -> str | None:
    """Why ``image`` looks like colour (RGB/RGBA) or multi-sample pixels, else None."""
    shape = image.data.shape
    fix = ("the models take one grayscale channel: convert the image to grayscale or save "
           "one channel (e.g. Fiji: Image > Color > Split Channels) and give that file")
    if image.axes is not None and image.axes.endswith("S") and len(image.axes) == len(shape):
        return (f"holds {shape[-1]} colour samples per pixel (RGB/RGBA; shape {shape}, axes "
                f"{image.axes}); {fix}")
    if (not image.axes_named and len(shape) >= 3 and shape[-1] in (2, 3, 4)
            and shape[-2] >= 4 * shape[-1]):  # (gray + alpha,) RGB, RGBA
        return (f"looks like colour (RGB/RGBA) or gray + alpha pixels: its last axis has "
                f"{shape[-1]} values (shape {shape}); {fix}")
    return None


def read_stack(path: Path) -> np.ndarray:
    """Read a grayscale image or stack (..., H, W), checked for segmentation."""
    return read_stack_file(path).data


def check_image(path: Path, image: ImageFile) -> None:
    """ValueError naming ``path`` if ``image`` cannot be segmented: colour (RGB/RGBA)
    pixels, a side under 2 px, no planes, or a pixel type the models do not take. The one
    check of ``segment`` and ``evaluate`` (``replay`` checks shape and type the same way)."""
    data = image.data
    problem = _colour_problem(image) or image_problem(data.shape, data.dtype)
    if problem is not None:
        raise ValueError(f"{path} {problem}")


def zarr_not_read(path: str = "PATH") -> str:
    """What an OME-Zarr ``path`` is and what to do with it: ``segment`` and ``evaluate``
    do not read one."""
    return ("an OME-Zarr (Zarr) image, which segment and evaluate do not read (they take "
            "image files: TIFF, PNG, JPEG): export its planes as a TIFF (e.g. in Python: "
            f"tifffile.imwrite('img.tif', zarr.open_group('{path}')['0'][:]); or Fiji, "
            f"napari), or run it through the service as if from the camera with `livemask "
            f"replay {path}` (a livemask recording too)")


def is_zarr(path: Path) -> bool:
    """Whether ``path`` is a Zarr store (OME-Zarr): a folder named ``*.zarr``, or one with
    Zarr metadata (``zarr.json``, ``.zgroup``, ``.zarray``)."""
    if not path.is_dir():
        return False
    return path.name.lower().endswith(".zarr") or any(
        (path / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray"))


def read_stack_file(path: Path) -> ImageFile:
    """:func:`read_image_file`, checked for segmentation: a grayscale image or stack
    (..., H, W); ValueError for colour images and stacks and unusable shapes or dtypes."""
    if is_zarr(path):
        raise IsADirectoryError(f"input {path} is {zarr_not_read(str(path))}")
    if path.is_dir():
        raise IsADirectoryError(f"input {path} is a folder; give one image file (a TIFF "
                                "stack, PNG or JPEG): segment takes one file per run")
    if not path.is_file():
        raise FileNotFoundError(f"input image {path} does not exist")
    image = read_image_file(path)
    check_image(path, image)
    data = image.data
    if image.axes is not None and "S" in image.axes:  # samples stored as planes (SYX)
        log.warning("%s: axes %s: its %d samples per pixel (stored as separate planes, as "
                    "tifffile stores a 3- or 4-plane stack by default) are segmented as "
                    "grayscale planes", path, image.axes, data.shape[image.axes.index("S")])
    return image


def read_planes(path: Path) -> np.ndarray:
    """Read an image or stack as (N, H, W); a 2-D image gives N = 1."""
    data = read_stack(path)
    return data.reshape(-1, *data.shape[-2:])


#: File name endings ``segment`` writes its label image to (always a TIFF).
LABEL_SUFFIXES = (".tif", ".tiff")


@dataclass
class Segmented:
    """What :func:`segment_file` wrote: the plane count and the labels' shape and axes."""

    planes: int
    shape: tuple[int, ...]
    #: tifffile's axes of the labels (``"TPYX"``: P, the file's image series); None: not known
    axes: str | None = None
    #: the grain statistics written (``--grains``: :meth:`GrainReport.report`); None: not
    #: asked for
    grains: dict[str, Any] | None = None


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (links and case-insensitive names included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


#: What each of segment's outputs holds, by its option.
_OUTPUTS = {"-o": "the label TIFF (-o)", "--table": "the measurements CSV (--table)",
            "--grains": "the grain statistics JSON (--grains)"}


def check_outputs(input_path: Path, output: Path, table: Path | None,
                  grains: Path | None = None) -> None:
    """ValueError, before anything is read or written, if ``output`` (``-o``), ``table``
    (``--table``) or ``grains`` (``--grains``) cannot be written: not a TIFF name, the input
    file, a folder, or two of them one file; then makes their folders."""
    if output.suffix.lower() not in LABEL_SUFFIXES and not not_regular_file(output):
        raise ValueError(f"-o {output}: labels are written as an int32 TIFF; give an output "
                         "file name ending in .tif or .tiff")
    if grains is not None and grains.suffix.lower() in (*LABEL_SUFFIXES, ".csv"):
        raise ValueError(f"--grains {grains}: the grain statistics are JSON; give a file "
                         "name ending in .json")
    named = [(o, p) for o, p in (("-o", output), ("--table", table), ("--grains", grains))
             if p is not None]
    for k, (option, path) in enumerate(named):
        if _same_file(path, input_path):
            raise ValueError(f"{option} {path} is the input image, which it would overwrite; "
                             f"give {option} another file name")
        if path.is_dir():
            raise ValueError(f"{option} {path} is a folder; give a file path in it")
        for other, before in named[:k]:
            if _same_file(path, before):
                raise ValueError(f"{option} {path} is also {_OUTPUTS[other]}; give "
                                 f"{option} another file name")
    for _, path in named:
        path.parent.mkdir(parents=True, exist_ok=True)


def _temporary(path: Path) -> Path:
    """A file beside ``path`` to write first (same folder: renamed into place at once)."""
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def _link_hops(path: Path) -> list[Path]:
    """``path`` (absolute) and each path its symbolic links lead to, in turn (at most 40)."""
    hops = [Path(os.path.abspath(path))]
    while hops[-1].is_symlink() and len(hops) <= 40:
        try:
            link = os.readlink(hops[-1])
        except OSError:
            break
        here = hops[-1]
        hops.append(Path(os.path.normpath(os.path.join(os.path.realpath(here.parent), link))))
    return hops


def _through_proc(path: Path) -> bool:
    """Whether ``path`` (or a link it leads through) names a process's open file:
    ``/dev/stdout``, ``/dev/fd/N``, ``/proc/self/fd/N`` (a pipe, a terminal, or a file a
    shell opened, perhaps to append to)."""
    return any(Path(os.path.realpath(hop.parent)).parts[1:2] == ("proc",)
               for hop in _link_hops(path))


def not_regular_file(path: Path) -> bool:
    """Whether ``path`` exists (links followed) and is no regular file (a FIFO, a terminal,
    ``/dev/null``, ``/dev/stdout``), or names a process's open file (:func:`_through_proc`).
    Such a path is written directly, never replaced."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return True
    except OSError:  # none yet (or a link to none): a file is made
        return False
    return _through_proc(path)


@dataclass
class _Output:
    """Where one of segment's outputs goes: ``tmp`` is written, then renamed onto
    ``target`` (``path``, or the file the link ``path`` leads to: the link stays); with
    ``tmp`` None, ``data`` is written to ``path`` directly once all are made (``append``:
    opened to append, as a FIFO, a terminal or a shell's redirection (``>>``) of
    ``/dev/stdout`` wants, not truncated)."""

    path: Path
    target: Path
    tmp: Path | None
    append: bool = False
    data: bytes | None = None

    @classmethod
    def at(cls, path: Path) -> _Output:
        """How ``path`` is written: a regular file (or none yet) through a file beside it,
        renamed into place; a link to one through a file beside the file it leads to
        (directly where that folder cannot be written); anything else (a FIFO, a device,
        ``/dev/stdout``) directly, never replaced by a file."""
        if not_regular_file(path):
            return cls(path, path, None, append=True)
        if not path.is_symlink():
            return cls(path, path, _temporary(path))
        target = Path(os.path.realpath(path))
        if not os.access(target.parent, os.W_OK):
            return cls(path, path, None)
        return cls(path, target, _temporary(target))

    def write(self, make: Callable[[BinaryIO], object]) -> None:
        """``make`` the output into its file beside the target, or into ``data``."""
        if self.tmp is not None:
            with self.tmp.open("wb") as fh:
                make(fh)
            return
        buffer = io.BytesIO()
        make(buffer)
        self.data = buffer.getvalue()

    def commit(self) -> None:
        """Put the output in place: rename its file onto the target, or write ``data``."""
        if self.tmp is not None:
            os.replace(self.tmp, self.target)
        elif self.data is not None:
            try:
                with self.path.open("ab" if self.append else "wb") as fh:
                    fh.write(self.data)
            except BrokenPipeError:  # the reader went away (`| head`): as a Unix filter,
                pass  # end quietly


def segment_file(
    input_path: Path,
    output: Path,
    *,
    model: str = "nuclei",
    table: Path | None = None,
    grains: Path | None = None,
    roi: Roi | None = None,
    pixel_size_um: float | None = None,
    threads: int = 2,
) -> Segmented:
    """Segment every plane of ``input_path``; write labels of the input's shape (a TIFF;
    a TIFF's position series add an axis P, see :func:`read_image_file`), a CSV of the
    objects (``plane`` counts the planes in C order) and, for a grains model, the grain
    statistics of each plane and of all planes pooled as fields of one specimen (JSON).

    ``roi``: only that rectangle of each plane is segmented and measured (labels 0
    outside; the CSV's coordinates are the input's; the grain statistics' test area is the
    rectangle), e.g. a micrograph without its data bar.
    ``pixel_size_um`` (µm per pixel, for the µm columns and values and the labels' OME
    metadata): None takes the file's (OME, ImageJ or TIFF resolution in cm/mm/µm), else 1
    (none in the labels, and no ASTM G numbers). NaN/infinite pixels get label 0, and so do
    objects lying mostly on them (``Segmenter.segment``, see
    :func:`livemask.inference.segmenter.without_non_finite`). The outputs are checked first
    (:func:`check_outputs`) and written beside their places, then renamed into them once
    all are written: an error leaves none half-written. A symbolic link stays: the file it
    leads to is replaced so; a FIFO, a device or a process's open file (``/dev/stdout``) is
    written into directly, last, never replaced (:class:`_Output`).
    """
    if grains is not None:  # before anything is read or written
        task = load_model_card(model).task
        if task != "grains":
            raise ValueError(f"--grains sizes grains, and model {model!r} segments {task}: "
                             "give a grains model (grains, grains_rf or grains_classical), "
                             "or leave out --grains")
    check_outputs(input_path, output, table, grains)
    try:
        image = read_stack_file(input_path)
    except UnreadablePlane as exc:
        raise ValueError(f"{exc}; segment reads every plane of a file: save the others as a "
                         "file of their own to segment them") from exc
    stack = image.data
    planes = stack.reshape(-1, *stack.shape[-2:])
    if roi is not None:
        roi.check((int(planes.shape[1]), int(planes.shape[2])))
    region = roi.slices if roi is not None else (slice(None), slice(None))
    scale = pixel_size_um if pixel_size_um is not None else image.pixel_size_um
    scale_y = image.pixel_size_y_um if pixel_size_um is None else None  # given: square
    seg = load_segmenter(model, threads)
    if table is not None or grains is not None:
        pixel_size_um = _log_pixel_size(input_path, pixel_size_um, image)
    crop_shape = planes[0][region].shape
    seg.check_frame((int(crop_shape[0]), int(crop_shape[1])))  # refuses e.g. logits
    labels = np.zeros(planes.shape, dtype=np.int32)
    rows: list[dict[str, object]] = []
    sizes = (GrainReport(input_path, seg.card.name, pixel_size_um or 1.0, scale is not None,
                         roi) if grains is not None else None)
    for i, plane in enumerate(planes):
        where = f"{input_path}" + (f" plane {i}" if len(planes) > 1 else "")
        crop = plane[region]
        finite = np.isfinite(crop) if crop.dtype.kind == "f" else None
        bad = 0 if finite is None else crop.size - np.count_nonzero(finite)
        if 0 < bad < crop.size and sizes is not None:  # the test area would have holes
            raise ValueError(f"{where}: {bad} NaN/infinite pixels in the region sized: grain "
                             "statistics need a field without holes (their test area and "
                             "lines would count them); give a --roi within the finite part")
        if 0 < bad < crop.size:  # none finite: segment raises below
            log.warning("%s: %d NaN/infinite pixels, filled from their nearest finite "
                        "neighbours for the model, then label 0 (left out of the measurements)",
                        where, bad)
        try:
            labels[i][region] = seg.segment(crop)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if table is not None:
            rows.extend(_object_rows(i, labels[i][region], crop, pixel_size_um or 1.0, roi))
        if sizes is not None:
            sizes.add(where, labels[i][region])
    report = sizes.report() if sizes is not None else None
    labels_out = _Output.at(output)
    table_out = _Output.at(table) if table is not None else None
    grains_out = _Output.at(grains) if grains is not None else None
    try:
        labels_out.write(lambda fh: write_labels(fh, labels.reshape(stack.shape), image.axes,
                                                 scale, scale_y))
        if table_out is not None:
            text = io.StringIO(newline="")
            writer = csv.DictWriter(text, fieldnames=TABLE_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
            table_out.write(lambda fh: fh.write(text.getvalue().encode("utf-8")))
        if grains_out is not None and report is not None:
            grains_text = json.dumps(report, indent=2) + "\n"
            grains_out.write(lambda fh: fh.write(grains_text.encode("utf-8")))
        # renamed into place first (the labels last), then written directly: a FIFO's
        # reader or a pipe gets its output once everything else is in place
        ordered = [o for o in (table_out, grains_out, labels_out) if o is not None]
        for out in sorted(ordered, key=lambda o: o.tmp is None):
            out.commit()
    finally:
        for made in (labels_out, table_out, grains_out):
            if made is not None and made.tmp is not None:
                made.tmp.unlink(missing_ok=True)
    return Segmented(len(planes), tuple(stack.shape), image.axes, grains=report)


def _object_rows(plane: int, labels: np.ndarray, image: np.ndarray, pixel_size_um: float,
                 roi: Roi | None) -> list[dict[str, object]]:
    """The CSV rows of one plane's objects (``labels`` of ``image``, a ``roi`` of the plane
    where given: its coordinates are moved to the plane's)."""
    dy, dx = (roi.y, roi.x) if roi is not None else (0, 0)
    objects, _ = measure_objects(labels, image, pixel_size_um=pixel_size_um)
    rows: list[dict[str, object]] = []
    for o in objects:
        cy, cx = o["centroid_yx"]
        b = o["bbox"]
        rows.append({
            "plane": plane, "label": o["label"], "area_px": o["area_px"],
            "area_um2": o["area_um2"], "centroid_y": cy + dy, "centroid_x": cx + dx,
            "bbox_min_row": b[0] + dy, "bbox_min_col": b[1] + dx, "bbox_max_row": b[2] + dy,
            "bbox_max_col": b[3] + dx, "mean_intensity": o["mean_intensity"],
            "integrated_intensity": o["integrated_intensity"],
            "equivalent_diameter_um": o["equivalent_diameter_um"],
            "eccentricity": o["eccentricity"],
            "touches_edge": o["touches_edge"],
            "local_background": o["local_background"],
            "corrected_intensity": o["corrected_intensity"],
            "saturated_px": o["saturated_px"],
        })
    return rows


#: Fewest grains a field should have for ASTM E112 sizing (fewer: a warning).
MIN_GRAINS = 50


class GrainReport:
    """The grain statistics ``segment --grains`` writes: each plane's, and all planes pooled
    as fields of one specimen (:class:`CumulativeGrainStats`, without positions: every
    plane is pooled)."""

    def __init__(self, input_path: Path, model: str, pixel_size_um: float,
                 pixel_size_known: bool, roi: Roi | None) -> None:
        self.input_path, self.model, self.roi = input_path, model, roi
        self.pixel_size_um, self.pixel_size_known = pixel_size_um, pixel_size_known
        self.planes: list[dict[str, Any]] = []
        self.pooled = CumulativeGrainStats(pixel_size_known=pixel_size_known)

    def add(self, where: str, labels: np.ndarray) -> None:
        """Add one plane's grain labels (the region analysed); warn where one region covers
        more than :data:`BIG_REGION_FRACTION` of it."""
        field = grain_field(labels, self.pixel_size_um)
        table = field.table
        largest = largest_region_fraction(table, labels.size)
        if largest > BIG_REGION_FRACTION:
            fix = ("choose a --roi within the specimen" if self.roi
                   else f"leave data bars out with --roi {ROI_FORMAT}")
            log.warning("%s: one region covers %.0f %% of the %s, and counts as one grain in "
                        "the grain statistics: a data bar (SEM), an empty or off-specimen "
                        "field, or grains too large for this magnification (ASTM sizing wants "
                        "at least ~50 grains a field); %s", where, 100 * largest,
                        "region (--roi)" if self.roi else "image", fix)
        if len(table) < MIN_GRAINS:
            log.warning("%s: %d grain(s) in the %s: ASTM E112 sizing wants at least ~%d a "
                        "field, so its G numbers say little; image a larger field or pool "
                        "more fields", where, len(table),
                        "region (--roi)" if self.roi else "image", MIN_GRAINS)
        stats = grain_statistics(labels, self.pixel_size_um, field=field,
                                 pixel_size_known=self.pixel_size_known)
        self.planes.append({"plane": len(self.planes), **stats})
        self.pooled.add(labels, self.pixel_size_um, field=field)

    def report(self) -> dict[str, Any]:
        """JSON-friendly: where the values come from, ``planes`` and ``pooled``."""
        return {
            "input": str(self.input_path),
            "model": self.model,
            "pixel_size_um": self.pixel_size_um,
            "pixel_size_known": self.pixel_size_known,
            "roi": self.roi.as_dict() if self.roi is not None else None,
            "planes": self.planes,
            "pooled": self.pooled.summary(),
        }


def _ome_axes(axes: str | None, ndim: int) -> str | None:
    """The input's axes (tifffile's letters) as OME-TIFF axes of labels with ``ndim``
    dimensions: planar samples (``S``) as channels, letters OME has no name for as ``Q``
    (other); None when not known (tifffile then names them)."""
    if axes is None or len(axes) != ndim:
        return "YX" if ndim == 2 else None
    lead = "".join(a if a in "TZCPQ" else "C" if a == "S" and "C" not in axes else "Q"
                   for a in axes[:-2])
    return f"{lead}{axes[-2:]}"


#: What OME calls the axis P that ``segment`` adds for a TIFF's position series.
_OME_TYPES = {"P": "stage position"}


def write_labels(path: Path | BinaryIO, labels: np.ndarray, axes: str | None,
                 pixel_size_um: float | None, pixel_size_y_um: float | None = None) -> None:
    """``labels`` as a zlib OME-TIFF with the input's ``axes`` and pixel size (µm; x, and
    y where given, else square), so that Fiji (Bio-Formats) and napari open it with both; a
    plain TIFF where OME cannot name the axes (two of one kind), with an INFO line.
    ``path``: a file name, or a seekable binary file (e.g. ``io.BytesIO``)."""
    metadata: dict[str, Any] = {}
    ome_axes = _ome_axes(axes, labels.ndim)
    if ome_axes is not None:
        metadata["axes"] = ome_axes
        types = {a: t for a, t in _OME_TYPES.items() if a in ome_axes[:-2]}
        if types:
            metadata["TypeDescription"] = types
    if pixel_size_um is not None:
        y_um = pixel_size_y_um if pixel_size_y_um is not None else pixel_size_um
        metadata.update(PhysicalSizeX=pixel_size_um, PhysicalSizeXUnit="µm",
                        PhysicalSizeY=y_um, PhysicalSizeYUnit="µm")
    try:
        tifffile.imwrite(path, labels, ome=True, metadata=metadata,
                         photometric="minisblack", compression="zlib")
    except (tifffile.OmeXmlError, ValueError) as exc:
        log.info("%s: labels of axes %s written as a plain TIFF, without axes or pixel size "
                 "(OME-TIFF cannot hold them: %s)", path, ome_axes, exc)
        if not isinstance(path, Path):  # a file: start again
            path.seek(0)
            path.truncate()
        tifffile.imwrite(path, labels, photometric="minisblack", compression="zlib")


def _log_pixel_size(path: Path, given: float | None, image: ImageFile) -> float:
    """The pixel size for the µm columns (``given``, else the file's, else 1), logged with
    where it came from."""
    from_file = image.pixel_size_um
    if given is not None:
        differs = from_file is not None and not math.isclose(given, from_file, rel_tol=1e-6)
        log.info("%s: pixel size %g µm/px (given)%s", path, given,
                 f"; the file's {image.pixel_size_from} says {from_file:g} µm/px"
                 if differs else "")
        return given
    if from_file is not None:
        log.info("%s: pixel size %g µm/px, from the file's %s", path, from_file,
                 image.pixel_size_from)
        return from_file
    log.warning("%s: the file has no pixel size; the µm columns use 1 µm/px (give "
                "--pixel-size-um)", path)
    return 1.0
