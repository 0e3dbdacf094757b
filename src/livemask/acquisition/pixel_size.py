"""The pixel size an image file's metadata gives: OME, ImageJ and TIFF resolution tags.

Shared by ``livemask replay`` (:mod:`livemask.acquisition.replay`) and ``livemask segment``
(:mod:`livemask.offline`), so that both read the same files the same way.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

log = logging.getLogger("livemask")

__all__ = ["UM_PER_UNIT", "tiff_pixel_size"]

#: µm per unit of the length units found in OME(-Zarr), ImageJ and TIFF metadata (lower case).
UM_PER_UNIT = {
    "µm": 1.0, "\\u00b5m": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "å": 1e-4, "angstrom": 1e-4, "pm": 1e-6,
    "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6,
}
#: TIFF ResolutionUnit values with a length (2, inch, is left out: it is nearly always a
#: print or screen resolution, 72 or 300 dpi, not the sample's pixel size).
_RESOLUTION_UNIT_UM = {3: 1e4, 4: 1e3, 5: 1.0}  # centimeter, millimeter, micrometer


def tiff_pixel_size(tif: Any, *, resolution_tags: bool = True) -> tuple[float, str] | None:
    """µm per pixel along x of an open ``tifffile.TiffFile`` and where it was found: OME
    ``PhysicalSizeX``, else ImageJ's unit and resolution, else (``resolution_tags``) the TIFF
    resolution tags in cm/mm/µm; None if the file has none (odd metadata is logged at DEBUG,
    never raised). Plain resolution tags are often a print setting stored in cm (300 dpi
    reads as 84.7 µm/px): ``livemask segment`` uses them and logs where the size came from;
    a replay, which calibrates stage moves and grain statistics with it, does not."""
    found: list[tuple[float, str]] = []
    try:
        if tif.is_ome and tif.ome_metadata:
            pixels = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", tif.ome_metadata)
            size = pixels and re.search(r'\bPhysicalSizeX="([^"]+)"', pixels.group(0))
            if pixels and size:
                unit_attr = re.search(r'\bPhysicalSizeXUnit="([^"]+)"', pixels.group(0))
                factor = UM_PER_UNIT.get(unit_attr.group(1).lower() if unit_attr else "µm")
                if factor is not None:
                    found.append((float(size.group(1)) * factor, "OME PhysicalSizeX"))
        page = tif.pages.first
        if "XResolution" in page.tags:
            num, den = page.tags["XResolution"].value
            per_px = den / num if num else 0.0  # XResolution: pixels per unit
            unit = str((tif.imagej_metadata or {}).get("unit", "")).lower()
            res_unit = int(page.tags["ResolutionUnit"].value) if (
                "ResolutionUnit" in page.tags) else 2
            if tif.is_imagej and unit in UM_PER_UNIT:
                found.append((per_px * UM_PER_UNIT[unit], "ImageJ resolution"))
            elif resolution_tags and res_unit in _RESOLUTION_UNIT_UM:
                found.append((per_px * _RESOLUTION_UNIT_UM[res_unit], "TIFF resolution"))
    except Exception:  # the pixel size is a nicety: odd metadata never fails a read
        log.debug("no pixel size read from %s", getattr(tif, "filename", tif), exc_info=True)
    return next(((px, src) for px, src in found if math.isfinite(px) and px > 0), None)
