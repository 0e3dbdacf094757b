"""Offline segmentation of image files (``livemask segment``)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import tifffile

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
    "equivalent_diameter_um", "eccentricity",
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


def read_image(path: Path) -> np.ndarray:
    """An image file as an array: TIFF with tifffile, other formats (PNG, …) with
    scikit-image. ValueError naming the file if it cannot be read."""
    from skimage import io

    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return np.asarray(tifffile.imread(path))
        return np.asarray(io.imread(path))
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # the OS's message names the file
    except Exception as exc:  # each reader has its own errors for a corrupt file
        raise ValueError(f"{path} cannot be read as an image: {exc}") from exc


def read_stack(path: Path) -> np.ndarray:
    """Read a grayscale image or stack (..., H, W), checked for segmentation."""
    if not path.is_file():
        raise FileNotFoundError(f"input image {path} does not exist")
    data = read_image(path)
    problem = image_problem(data.shape, data.dtype)
    if problem is not None:
        raise ValueError(f"{path} {problem}")
    if data.ndim == 3 and data.shape[-1] in (3, 4):
        raise ValueError(f"{path} looks like an RGB image {data.shape}; give a grayscale image")
    return data


def read_planes(path: Path) -> np.ndarray:
    """Read an image or stack as (N, H, W); a 2-D image gives N = 1."""
    data = read_stack(path)
    return data.reshape(-1, *data.shape[-2:])


#: File name endings ``segment`` writes its label image to (always a TIFF).
LABEL_SUFFIXES = (".tif", ".tiff")


def segment_file(
    input_path: Path,
    output: Path,
    *,
    model: str = "nuclei",
    table: Path | None = None,
    pixel_size_um: float = 1.0,
    threads: int = 2,
) -> int:
    """Segment every plane of ``input_path``; write labels of the input's shape (a TIFF)
    and a CSV (``plane`` counts the planes in C order). Returns the plane count."""
    if output.suffix.lower() not in LABEL_SUFFIXES:
        raise ValueError(f"{output}: labels are written as an int32 TIFF; give an output "
                         "file name ending in .tif or .tiff")
    stack = read_stack(input_path)
    planes = stack.reshape(-1, *stack.shape[-2:])
    seg = load_segmenter(model, threads)
    labels = np.zeros(planes.shape, dtype=np.int32)
    rows: list[dict[str, object]] = []
    for i, plane in enumerate(planes):
        where = f"{input_path}" + (f" plane {i}" if len(planes) > 1 else "")
        bad = plane.size - np.count_nonzero(np.isfinite(plane)) if plane.dtype.kind == "f" else 0
        if 0 < bad < plane.size:  # none finite: segment raises below
            log.warning("%s: %d NaN/infinite pixels, segmented as background", where, bad)
        try:
            labels[i] = seg.segment(plane)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if table is not None:
            objects, _ = measure_objects(labels[i], plane, pixel_size_um=pixel_size_um)
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
                })
    output.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(output, labels.reshape(stack.shape), photometric="minisblack",
                     compression="zlib")
    if table is not None:
        with table.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=TABLE_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return len(planes)
