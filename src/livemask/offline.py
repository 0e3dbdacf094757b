"""Offline segmentation of image files (``livemask segment``)."""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from livemask.acquisition.pixel_size import tiff_pixel_size
from livemask.analysis.measure import measure_objects
from livemask.analysis.normalize import image_problem
from livemask.errors import ConfigError
from livemask.inference.models import load_model_card
from livemask.inference.segmenter import Segmenter
from livemask.inference.select import load_backend

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


def read_image(path: Path, *, invert_min_is_white: bool = True) -> np.ndarray:
    """An image file as an array: TIFF with tifffile, other formats (PNG, …) with
    scikit-image. ValueError naming the file if it cannot be read. Masks and label images
    are read with ``invert_min_is_white=False`` (see :func:`read_image_file`)."""
    return read_image_file(path, invert_min_is_white=invert_min_is_white).data


def read_image_file(path: Path, *, invert_min_is_white: bool = True) -> ImageFile:
    """An image file with its axes and pixel size where the file has them (TIFF, BigTIFF
    included: OME, ImageJ or resolution tags); ValueError naming the file if it cannot be
    read (a TIFF's: the codec and package it needs, missing planes and the file they are in,
    the file cut short; :class:`UnreadablePlane` naming a corrupt plane).

    An image TIFF stored MinIsWhite (not an ImageJ one) is read inverted, as ``replay``
    reads it (``tiff_stack.white_level``); with ``invert_min_is_white=False`` (masks and
    label images, whose stored values are the labels) every TIFF gives its stored values.

    A TIFF of several image series of one shape and pixel type (an OME-TIFF with one series
    per stage position, as ``livemask replay`` reads it) gives them all, stacked along a
    position axis ``P``: after the time axis when the series start with one (``TPYX``),
    else first (``PZYX``, ``PYX``). Series that differ: the first, with a warning."""
    from skimage import io

    from livemask.acquisition.tiff_stack import TIFF_SUFFIXES

    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                return _read_tiff(tif, path, invert_min_is_white)
        return ImageFile(np.asarray(io.imread(path)))
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # the OS's message names the file
    except UnreadablePlane as exc:  # (segment adds what to do)
        raise UnreadablePlane(f"{path} cannot be read as an image: {exc}") from exc
    except Exception as exc:  # each reader has its own errors for a corrupt file
        raise ValueError(f"{path} cannot be read as an image: {exc}") from exc


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
    pixel = tiff_pixel_size(tif, path=path)  # as `livemask replay` reads it
    return ImageFile(
        data, axes=axes, axes_named=bool(tif.is_ome or tif.is_imagej),
        pixel_size_um=pixel[0] if pixel else None,
        pixel_size_from=pixel[1] if pixel else "",
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


def read_stack_file(path: Path) -> ImageFile:
    """:func:`read_image_file`, checked for segmentation: a grayscale image or stack
    (..., H, W); ValueError for colour images and stacks and unusable shapes or dtypes."""
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


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (links and case-insensitive names included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


def check_outputs(input_path: Path, output: Path, table: Path | None) -> None:
    """ValueError, before anything is read or written, if ``output`` (``-o``) or ``table``
    (``--table``) cannot be written: not a TIFF name, the input file, a folder, or both
    one file; then makes their folders."""
    if output.suffix.lower() not in LABEL_SUFFIXES:
        raise ValueError(f"-o {output}: labels are written as an int32 TIFF; give an output "
                         "file name ending in .tif or .tiff")
    for option, path in (("-o", output), ("--table", table)):
        if path is None:
            continue
        if _same_file(path, input_path):
            raise ValueError(f"{option} {path} is the input image, which it would overwrite; "
                             f"give {option} another file name")
        if path.is_dir():
            raise ValueError(f"{option} {path} is a folder; give a file path in it")
    if table is not None and _same_file(table, output):
        raise ValueError(f"--table {table} is also the label TIFF (-o); give the measurements "
                         "CSV another file name")
    for path in (output, table):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)


def _temporary(path: Path) -> Path:
    """A file beside ``path`` to write first (same folder: renamed into place at once)."""
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def segment_file(
    input_path: Path,
    output: Path,
    *,
    model: str = "nuclei",
    table: Path | None = None,
    pixel_size_um: float | None = None,
    threads: int = 2,
) -> Segmented:
    """Segment every plane of ``input_path``; write labels of the input's shape (a TIFF;
    a TIFF's position series add an axis P, see :func:`read_image_file`) and a CSV
    (``plane`` counts the planes in C order).

    ``pixel_size_um`` (µm per pixel, for the CSV's µm columns and the labels' OME
    metadata): None takes the file's (OME, ImageJ or TIFF resolution in cm/mm/µm), else 1
    (and none in the labels). NaN/infinite pixels get label 0, and so do objects lying
    mostly on them (``Segmenter.segment``, see
    :func:`livemask.inference.segmenter.without_non_finite`). The outputs are checked first
    (:func:`check_outputs`) and written beside their places, then renamed into them once
    both are written: an error leaves neither half-written.
    """
    check_outputs(input_path, output, table)
    try:
        image = read_stack_file(input_path)
    except UnreadablePlane as exc:
        raise ValueError(f"{exc}; segment reads every plane of a file: save the others as a "
                         "file of their own to segment them") from exc
    stack = image.data
    planes = stack.reshape(-1, *stack.shape[-2:])
    scale = pixel_size_um if pixel_size_um is not None else image.pixel_size_um
    if table is not None:
        pixel_size_um = _log_pixel_size(input_path, pixel_size_um, image)
    seg = load_segmenter(model, threads)
    seg.check_frame((int(planes.shape[1]), int(planes.shape[2])))  # refuses e.g. logits
    labels = np.zeros(planes.shape, dtype=np.int32)
    rows: list[dict[str, object]] = []
    for i, plane in enumerate(planes):
        where = f"{input_path}" + (f" plane {i}" if len(planes) > 1 else "")
        finite = np.isfinite(plane) if plane.dtype.kind == "f" else None
        bad = 0 if finite is None else plane.size - np.count_nonzero(finite)
        if 0 < bad < plane.size:  # none finite: segment raises below
            log.warning("%s: %d NaN/infinite pixels, filled from their nearest finite "
                        "neighbours for the model, then label 0 (left out of the measurements)",
                        where, bad)
        try:
            labels[i] = seg.segment(plane)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if table is not None:
            objects, _ = measure_objects(labels[i], plane, pixel_size_um=pixel_size_um or 1.0)
            for o in objects:
                cy, cx = o["centroid_yx"]
                b = o["bbox"]
                rows.append({
                    "plane": i, "label": o["label"], "area_px": o["area_px"],
                    "area_um2": o["area_um2"], "centroid_y": cy, "centroid_x": cx,
                    "bbox_min_row": b[0], "bbox_min_col": b[1], "bbox_max_row": b[2],
                    "bbox_max_col": b[3], "mean_intensity": o["mean_intensity"],
                    "integrated_intensity": o["integrated_intensity"],
                    "equivalent_diameter_um": o["equivalent_diameter_um"],
                    "eccentricity": o["eccentricity"],
                    "touches_edge": o["touches_edge"],
                    "local_background": o["local_background"],
                    "corrected_intensity": o["corrected_intensity"],
                    "saturated_px": o["saturated_px"],
                })
    labels_tmp = _temporary(output)
    table_tmp = _temporary(table) if table is not None else None
    try:
        write_labels(labels_tmp, labels.reshape(stack.shape), image.axes, scale)
        if table is not None and table_tmp is not None:
            with table_tmp.open("w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=TABLE_COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(table_tmp, table)
        os.replace(labels_tmp, output)
    finally:
        for tmp in (labels_tmp, table_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    return Segmented(len(planes), tuple(stack.shape), image.axes)


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


def write_labels(path: Path, labels: np.ndarray, axes: str | None,
                 pixel_size_um: float | None) -> None:
    """``labels`` as a zlib OME-TIFF with the input's ``axes`` and pixel size (µm, square),
    so that Fiji (Bio-Formats) and napari open it with both; a plain TIFF where OME cannot
    name the axes (two of one kind), with an INFO line."""
    metadata: dict[str, Any] = {}
    ome_axes = _ome_axes(axes, labels.ndim)
    if ome_axes is not None:
        metadata["axes"] = ome_axes
        types = {a: t for a, t in _OME_TYPES.items() if a in ome_axes[:-2]}
        if types:
            metadata["TypeDescription"] = types
    if pixel_size_um is not None:
        metadata.update(PhysicalSizeX=pixel_size_um, PhysicalSizeXUnit="µm",
                        PhysicalSizeY=pixel_size_um, PhysicalSizeYUnit="µm")
    try:
        tifffile.imwrite(path, labels, ome=True, metadata=metadata,
                         photometric="minisblack", compression="zlib")
    except (tifffile.OmeXmlError, ValueError) as exc:
        log.info("%s: labels of axes %s written as a plain TIFF, without axes or pixel size "
                 "(OME-TIFF cannot hold them: %s)", path, ome_axes, exc)
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
