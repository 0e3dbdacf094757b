"""The pixel size an image file's metadata gives: OME, ImageJ and TIFF resolution tags.

Shared by ``livemask replay`` (:mod:`livemask.acquisition.replay`) and ``livemask segment``
(:mod:`livemask.offline`), so that both read the same files the same way. Measurements
assume square pixels: where a file's y size differs from its x size by more than
:data:`SQUARE_TOLERANCE`, a warning says so and the x size is used.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

log = logging.getLogger("livemask")

__all__ = ["SQUARE_TOLERANCE", "UM_PER_UNIT", "check_square", "tiff_pixel_size",
           "tiff_pixel_size_xy", "um_per_unit"]

#: µm per unit of the length units found in OME(-Zarr), ImageJ and TIFF metadata (lower case;
#: "µm" with the micro sign U+00B5 and with the Greek mu U+03BC, which OME writers use too).
UM_PER_UNIT = {
    "µm": 1.0, "\u03bcm": 1.0, "\\u00b5m": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
    "micrometer": 1.0, "nm": 1e-3, "nanometer": 1e-3, "å": 1e-4, "angstrom": 1e-4, "pm": 1e-6,
    "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6,
}
#: ImageJ's units of an image without a calibration (not worth a log line).
_NO_UNIT = frozenset({"", "pixel", "pixels", "px"})
#: TIFF ResolutionUnit values with a length (2, inch, is left out: it is nearly always a
#: print or screen resolution, 72 or 300 dpi, not the sample's pixel size).
_RESOLUTION_UNIT_UM = {3: 1e4, 4: 1e3, 5: 1.0}  # centimeter, millimeter, micrometer
#: Relative difference of the y and x pixel sizes above which a warning says that the
#: measurements assume square pixels.
SQUARE_TOLERANCE = 0.01


def um_per_unit(unit: str, path: object, what: str) -> float | None:
    """µm per ``unit`` (any case); None, logged naming the unit, when it is not a length
    unit livemask knows (``what``: the metadata that gives the size, for the log)."""
    factor = UM_PER_UNIT.get(unit.strip().lower())
    if factor is None:
        log.warning("%s: its %s is in unit %r, which livemask does not know, so it gives no "
                    "pixel size (known: µm, nm, mm, cm, m and their names)",
                    path, what, unit)
    return factor


def check_square(path: object, x_um: float, y_um: float | None, what: str) -> None:
    """Warn when the y pixel size ``y_um`` differs from ``x_um`` by more than
    :data:`SQUARE_TOLERANCE`: measurements assume square pixels and use the x size."""
    if y_um is None or not (math.isfinite(y_um) and y_um > 0):
        return
    if abs(y_um - x_um) <= SQUARE_TOLERANCE * x_um:
        return
    log.warning("%s: its pixels are not square (%s: %g µm in x, %g µm in y); measurements "
                "assume square pixels and use the x size, %g µm/px, so µm values along y and "
                "areas are off by a factor of %.3g: resample the image to square pixels for "
                "true µm values", path, what, x_um, y_um, x_um, y_um / x_um)


def tiff_pixel_size(
    tif: Any, *, resolution_tags: bool = True, path: object = None
) -> tuple[float, str] | None:
    """µm per pixel along x of an open ``tifffile.TiffFile`` and where it was found: OME
    ``PhysicalSizeX``, else ImageJ's unit and resolution, else (``resolution_tags``) the TIFF
    resolution tags in cm/mm/µm; None if the file has none (odd metadata is logged at DEBUG,
    never raised; a size in an unknown unit is logged naming it). Where the y size differs
    from x, a warning says that measurements use the x size (:func:`check_square`). Plain
    resolution tags are often a print setting; in inches they are ignored, in cm/mm/µm they
    count, and both commands log where the size came from. ``path``: for the log (default:
    the file's name). :func:`tiff_pixel_size_xy` gives the y size too."""
    found = tiff_pixel_size_xy(tif, resolution_tags=resolution_tags, path=path)
    return None if found is None else (found[0], found[2])


def tiff_pixel_size_xy(
    tif: Any, *, resolution_tags: bool = True, path: object = None
) -> tuple[float, float | None, str] | None:
    """:func:`tiff_pixel_size` with the y size: (x µm, y µm, where found); y is None where
    the file gives no usable y size (then take the pixels as square). Warns as
    :func:`tiff_pixel_size` does where y differs from x."""
    path = path if path is not None else getattr(tif, "filename", tif)
    found: list[tuple[float, float | None, str]] = []
    try:
        if tif.is_ome and tif.ome_metadata:
            found.extend(_ome_size(tif.ome_metadata, path))
        page = tif.pages.first
        if "XResolution" in page.tags:
            found.extend(_resolution_size(tif, page, path, resolution_tags))
    except Exception:  # the pixel size is a nicety: odd metadata never fails a read
        log.debug("no pixel size read from %s", path, exc_info=True)
    for x_um, y_um, source in found:
        if math.isfinite(x_um) and x_um > 0:
            check_square(path, x_um, y_um, source)
            usable = y_um is not None and math.isfinite(y_um) and y_um > 0
            return x_um, y_um if usable else None, source
    return None


def _ome_size(xml: str, path: object) -> list[tuple[float, float | None, str]]:
    """The OME ``Pixels`` element's (x, y) size in µm (y None where it has none)."""
    pixels = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml)
    if not pixels:
        return []
    sizes: dict[str, float | None] = {}
    for axis in ("X", "Y"):
        size = re.search(rf'\bPhysicalSize{axis}="([^"]+)"', pixels.group(0))
        unit = re.search(rf'\bPhysicalSize{axis}Unit="([^"]+)"', pixels.group(0))
        factor = (um_per_unit(unit.group(1), path, f"OME PhysicalSize{axis}")
                  if size and unit else 1.0)  # OME's default unit: µm
        sizes[axis] = float(size.group(1)) * factor if size and factor is not None else None
    x_um = sizes["X"]
    return [] if x_um is None else [(x_um, sizes["Y"], "OME PhysicalSizeX")]


def _resolution_size(
    tif: Any, page: Any, path: object, resolution_tags: bool
) -> list[tuple[float, float | None, str]]:
    """The (x, y) size in µm from the resolution tags: ImageJ's unit, else (with
    ``resolution_tags``) the TIFF ResolutionUnit in cm/mm/µm."""
    per_px_x = _per_pixel(page.tags["XResolution"].value)
    per_px_y = (_per_pixel(page.tags["YResolution"].value) if "YResolution" in page.tags
                else None)
    res_unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 2
    if tif.is_imagej:
        unit = str((tif.imagej_metadata or {}).get("unit", ""))
        if unit.strip().lower() not in _NO_UNIT:
            factor = um_per_unit(unit, path, "ImageJ resolution")
            if factor is not None:
                return [(per_px_x * factor, _scaled(per_px_y, factor), "ImageJ resolution")]
    if resolution_tags and res_unit in _RESOLUTION_UNIT_UM:
        factor = _RESOLUTION_UNIT_UM[res_unit]
        return [(per_px_x * factor, _scaled(per_px_y, factor), "TIFF resolution")]
    return []


def _per_pixel(value: Any) -> float:
    """Units per pixel of a TIFF resolution tag (pixels per unit, a rational)."""
    num, den = value
    return den / num if num else 0.0


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor
