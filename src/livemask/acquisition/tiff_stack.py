"""TIFF stacks read plane by plane, and TIFF files cut short detected.

:func:`tiff_planes` reads one image series of a TIFF a plane at a time (a compressed or
scattered page is decoded when its frame is read; a corrupt page is one unreadable plane), and
:func:`tiff_data` picks how to read a series (memory-mapped, plane by plane, or whole).
:func:`white_level` and :func:`min_is_black` turn an image stored MinIsWhite (0 is white) into
the usual bright-is-signal values, in every reader of TIFF frames (not of masks or labels, whose
stored values are the labels, nor of ImageJ files, whose MinIsWhite is an inverting LUT).
:func:`tiff_cut` finds a TIFF cut short (truncated: its IFD chain or a page's data run past
the end of the file, or it has fewer planes than its own metadata names) and reads the
planes before the cut; :func:`readable_frames` counts the complete frames of series read
with :func:`tiff_data`. :func:`position_series` and :class:`PositionSeries` take a file's
same-shaped series as stage positions. Used by ``livemask replay``
(:mod:`livemask.acquisition.replay`) and ``livemask segment`` (:mod:`livemask.offline`).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from livemask.errors import ReplayError

log = logging.getLogger("livemask")

__all__ = [
    "MIN_IS_WHITE", "TIFF_SUFFIXES", "MinIsBlack", "PositionSeries", "TiffCut", "TiffPlanes",
    "decoder_needed", "decoder_problem", "min_is_black", "missing_pages", "position_series",
    "readable_frames", "tiff_axes", "tiff_cut", "tiff_data", "tiff_planes", "white_level",
]


#: File name endings read as TIFF (with tifffile) by ``replay`` and ``segment``: BigTIFF too.
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")

_TIFF_AXES = {"T": "t", "Z": "z", "C": "c"}

#: TIFF PhotometricInterpretation 0, MinIsWhite: 0 is white and 2**BitsPerSample - 1 black
#: (scanned documents, some SEM and EBSD software), inverted contrast for the models. ImageJ
#: writes it for an image shown with an inverting LUT: there it is a display setting only.
MIN_IS_WHITE = 0


def white_level(page: Any, path: Path, *, imagej: bool = False) -> int | None:
    """For a TIFF stored MinIsWhite (``page``: tifffile's first page of the series read):
    the value its planes are inverted from (2 ** BitsPerSample - 1: 255 for 8 bits, 4095
    for 12, 65535 for 16), so that they read as a viewer shows them (:func:`min_is_black`),
    logged; None for any other TIFF, and for an ImageJ file (``imagej``: tifffile's
    ``is_imagej``), whose MinIsWhite is an inverting LUT over the measured values (logged).
    :class:`ReplayError` (a ValueError) where inverting is not sound: floating-point or
    signed pixels, whose white has no fixed value."""
    if int(getattr(page, "photometric", -1)) != MIN_IS_WHITE:
        return None
    if imagej:
        log.info("%s is an ImageJ file with an inverting LUT (stored MinIsWhite, TIFF "
                 "PhotometricInterpretation 0): a display setting only; its stored values "
                 "are used", path)
        return None
    dtype = np.dtype(page.dtype)
    if dtype.kind == "b":  # bilevel
        level = 1
    elif dtype.kind == "u":
        level = 2 ** min(int(page.bitspersample), 8 * dtype.itemsize) - 1
    else:
        raise ReplayError(
            f"{path} is stored MinIsWhite (TIFF PhotometricInterpretation 0: 0 is white) with "
            f"{dtype} pixels, whose white has no fixed value to invert from; invert it and "
            "save it as MinIsBlack (e.g. Fiji: Edit > Invert, then save as TIFF), or save "
            "it as unsigned integers")
    log.warning("%s is stored MinIsWhite (TIFF PhotometricInterpretation 0: 0 is white): its "
                "values are inverted (%d - value) so that bright is signal, as a viewer shows "
                "it; intensities are of the inverted image", path, level)
    return level


def min_is_black(plane: np.ndarray, white: int | None) -> np.ndarray:
    """``plane`` of a MinIsWhite TIFF (``white``: :func:`white_level`) as MinIsBlack values:
    ``white - value``, in its dtype; unchanged where ``white`` is None."""
    if white is None:
        return plane
    values = np.asarray(plane)
    if values.dtype.kind == "b":
        return np.logical_not(values)
    return (white - np.minimum(values, white)).astype(values.dtype, copy=False)


class MinIsBlack:
    """An array-like of MinIsWhite planes (a memory map, :class:`TiffPlanes`) read as
    MinIsBlack values (:func:`min_is_black`) plane by plane; its other attributes are the
    wrapped one's."""

    def __init__(self, data: Any, white: int) -> None:
        self._data = data
        self.white = white
        self.shape = tuple(int(n) for n in data.shape)
        self.dtype = np.dtype(data.dtype)

    def __getitem__(self, where: Any) -> np.ndarray:
        return min_is_black(np.asarray(self._data[where]), self.white)

    def __getattr__(self, name: str) -> Any:  # e.g. TiffPlanes.complete
        if name == "_data":  # (not set yet, e.g. while copied)
            raise AttributeError(name)
        return getattr(self._data, name)


class PositionSeries:
    """Same-shaped series of a TIFF as one array, with a position axis ``p`` at ``at``."""

    def __init__(self, arrays: Sequence[Any], at: int) -> None:
        self.arrays = arrays
        self.at = at
        shape = tuple(int(n) for n in arrays[0].shape)
        self.shape = (*shape[:at], len(arrays), *shape[at:])
        self.dtype = arrays[0].dtype

    def __getitem__(self, where: tuple[int, ...]) -> Any:
        return self.arrays[where[self.at]][(*where[:self.at], *where[self.at + 1:])]

    def readable(self) -> int:
        """Frames (C order of the leading axes) before the first one cut off a truncated
        file."""
        lead, first = self.shape[:-2], math.prod(self.shape[:-2])
        for k, array in enumerate(self.arrays):
            complete = getattr(array, "complete", None)
            if complete is not None and complete < math.prod(array.shape[:-2]):
                where = [int(n) for n in np.unravel_index(complete, array.shape[:-2])]
                where.insert(self.at, k)
                first = min(first, int(np.ravel_multi_index(where, lead)))
        return first


class TiffPlanes:
    """One series of a TIFF, read a plane at a time: ``[where]`` (an index of its leading
    axes) reads that plane. Planes from ``complete`` on (in the file's order, C order of the
    leading axes) lie past the end of a truncated file."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any],
                 read: Callable[[int], np.ndarray], complete: int | None = None) -> None:
        self.name = name  # "the file's" or "the file's series 2,"
        self.shape = shape
        self.dtype = dtype
        self.planes = math.prod(shape[:-2])
        self.complete = self.planes if complete is None else complete
        self._read = read

    def __getitem__(self, where: tuple[int, ...]) -> np.ndarray:
        lead = self.shape[:-2]
        j = int(np.ravel_multi_index(where, lead)) if lead else 0
        if j >= self.complete:
            raise ReplayError(f"{self.name} plane {j} is past its end: the file is cut short "
                              f"(truncated) after {self.complete} of {self.planes} planes")
        try:
            return self._read(j)
        except ReplayError:
            raise
        except Exception as exc:  # zlib, imagecodecs, tifffile: each has its own errors
            needs = decoder_needed(exc)
            if needs is not None:  # intact, but not decodable here
                raise ReplayError(f"{self.name} plane {j} is {needs}") from None
            raise ReplayError(f"{self.name} plane {j} is corrupt ({type(exc).__name__}: "
                              f"{exc})") from None


#: tifffile's error for a codec it has no decoder for ("<COMPRESSION.LZW: 5> requires the
#: 'imagecodecs' package"), raised when a page is decoded
_NEEDS_PACKAGE = re.compile(r"<(COMPRESSION|PREDICTOR)\.(\w+): \d+> requires the '([\w.-]+)' "
                            r"package")


def decoder_needed(exc: BaseException) -> str | None:
    """For tifffile's error that a page's codec has no decoder here (it "requires the 'X'
    package", or its own fallback decoder needs a module this Python lacks: zstd before
    Python 3.14): what to install, e.g. "compressed with LZW, which needs the 'imagecodecs'
    package (pip install imagecodecs)"; None for other errors (a corrupt page)."""
    if isinstance(exc, ImportError):  # (tifffile's zstd without imagecodecs: compression.zstd)
        return _install(f"compressed with a codec that tifffile has no working decoder for "
                        f"here ({exc})", "imagecodecs")
    found = _NEEDS_PACKAGE.search(str(exc))
    if found is None:
        return None
    kind, codec, package = found.groups()
    what = (f"compressed with {codec}" if kind == "COMPRESSION"
            else f"stored with the {codec} predictor")
    return _install(what, package)


def _install(what: str, package: str) -> str:
    """``what`` (how the file is stored), "which needs ``package``" and how to install it
    (upgrade it where it is installed, without that codec)."""
    if importlib.util.find_spec(package) is not None:  # installed, without that codec
        return (f"{what}, which the installed {package!r} package cannot decode (a build "
                f"without it: pip install -U {package})")
    return f"{what}, which needs the {package!r} package (pip install {package})"


def decoder_problem(tif: Any) -> str | None:
    """Why the open TIFF ``tif`` cannot be decoded here, from its first page's compression
    and predictor (cheap: no pixel is read): e.g. "compressed with LZW, which needs the
    'imagecodecs' package (pip install imagecodecs)"; None when tifffile can decode it, and
    for a file without pages (the caller says it holds no image)."""
    import tifffile

    try:
        page = tif.pages.first
    except IndexError:  # no page (its message is "0")
        return None
    for codecs, key in ((tifffile.TIFF.DECOMPRESSORS, int(page.compression)),
                        (tifffile.TIFF.UNPREDICTORS, int(page.predictor))):
        if key == 1:  # none
            continue
        try:
            codec = codecs[key]
        except KeyError as exc:
            why = str(exc.args[0]) if exc.args else str(exc)
            return decoder_needed(ValueError(why)) or (
                f"stored in a form tifffile cannot decode ({why}); save it uncompressed or "
                "with zlib or LZW compression")
        if codecs is tifffile.TIFF.DECOMPRESSORS and _fallback_lacks_module(codec):
            return _install(f"compressed with {_compression_name(key)}", "imagecodecs")
    return None


def _fallback_lacks_module(codec: Any) -> bool:
    """Whether ``codec`` is one of tifffile's own (pure-Python) decoders whose module this
    Python lacks (its zstd needs ``compression.zstd``, Python 3.14+): it raises ImportError
    on every page. Tried on no data; other codecs are not called."""
    if getattr(codec, "__module__", "") != "tifffile._imagecodecs":
        return False
    try:
        codec(b"")
    except ImportError:
        return True
    except Exception:  # (no data: the codec's own error, e.g. zlib.error)
        return False
    return False


def _compression_name(key: int) -> str:
    """tifffile's name of TIFF compression ``key`` (e.g. ZSTD), else the number."""
    import tifffile

    try:
        return str(tifffile.COMPRESSION(key).name)
    except ValueError:
        return f"compression {key}"


def tiff_planes(tif: Any, path: Path, k: int) -> TiffPlanes | None:
    """Series ``k`` of the open TIFF ``tif``, read plane by plane where it is stored so: one
    page per plane (compressed or scattered pages), or uncompressed planes in a row that the
    file cuts short (those before the cut are memory-mapped); None otherwise."""
    series = tif.series[k]
    shape = tuple(int(n) for n in series.shape)
    if len(shape) < 2:
        return None
    rows, cols = shape[-2:]
    planes = math.prod(shape[:-2])
    offset = series.dataoffset
    if offset is not None and offset + series.nbytes > path.stat().st_size:
        return _truncated_planes(tif, path, k, offset)
    name = f"the file's series {k}," if len(tif.series) > 1 else "the file's"
    keyframe = getattr(series, "keyframe", None)
    if len(series) != planes or keyframe is None or keyframe.size != rows * cols:
        return None

    def read(j: int) -> np.ndarray:
        page = series[j]
        if page is None:
            raise ReplayError(f"{name} plane {j} is missing: {_where_missing(tif, path)}")
        return np.asarray(page.asarray()).reshape(rows, cols)

    size, complete = path.stat().st_size, planes  # pages from the first cut off on: cut short
    while complete and not _whole(series[complete - 1], size):
        complete -= 1
    return TiffPlanes(name, shape, series.dtype, read, complete)


def missing_pages(tif: Any, path: Path, k: int) -> str | None:
    """Why series ``k`` of the open TIFF ``tif`` is not all in the file: the planes its
    metadata names that are not (a multi-file OME-TIFF whose other file is missing, which
    tifffile would read as zeros) and the file they are in; None when every page is there.

    Only a series whose pages tifffile lists one by one (an OME-TIFF's: None for a page not
    in the file) can miss any: one that its first page stands for (an ImageJ or contiguous
    stack, whose pages follow it in the file) is not read page by page, which would load
    every page's IFD (seconds for 20,000 planes)."""
    series = tif.series[k]
    listed = getattr(series, "_pages", None)  # (tifffile's list, as it built the series)
    if not isinstance(listed, list) or len(listed) != len(series):
        return None
    gone = [j for j, page in enumerate(listed) if page is None]
    if not gone:
        return None
    name = f"the file's series {k}," if len(tif.series) > 1 else "the file's"
    shown = ", ".join(str(j) for j in gone[:5]) + (", …" if len(gone) > 5 else "")
    return (f"{name} planes {shown} ({len(gone)} of {len(series)}) are missing: "
            f"{_where_missing(tif, path)}")


def _where_missing(tif: Any, path: Path) -> str:
    """Where the pages that the metadata of ``tif`` names, and that are not in it, are:
    the files of a multi-file OME-TIFF that are not beside it, and what to do."""
    files = _missing_companions(tif, path)
    if not files:
        return "its metadata names pages that are not in the file"
    listed = ", ".join(files)
    return (f"its OME metadata names pages of {listed}, which "
            f"{'is' if len(files) == 1 else 'are'} not in {path.parent}: copy {listed} "
            f"beside {path.name}")


def _missing_companions(tif: Any, path: Path) -> list[str]:
    """The files a multi-file OME-TIFF's XML names (``UUID FileName``) that are not beside
    ``path``, in its order; [] for other files."""
    from xml.etree import ElementTree

    text = str(tif.pages.first.description or "")
    if not text.lstrip().startswith("<") or "OME" not in text[:1000]:
        return []
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError:
        return []
    names = (e.get("FileName") for e in root.iter() if str(e.tag).endswith("UUID"))
    gone = [n for n in dict.fromkeys(names) if n and not (path.parent / n).is_file()]
    return gone


def _truncated_planes(tif: Any, path: Path, k: int, offset: int) -> TiffPlanes:
    """Series ``k`` of ``tif``, uncompressed planes in a row from ``offset`` that the file
    cuts short: the complete ones memory-mapped."""
    series = tif.series[k]
    shape = tuple(int(n) for n in series.shape)
    rows, cols = shape[-2:]
    plane_bytes = max(1, rows * cols * series.dtype.itemsize)
    complete = max(0, min(math.prod(shape[:-2]), (path.stat().st_size - offset) // plane_bytes))
    stored = np.dtype(tif.byteorder + series.dtype.char)  # the file's byte order
    mapped = (np.memmap(path, dtype=stored, mode="r", offset=offset,
                        shape=(complete, rows, cols)) if complete else np.empty((0, rows, cols)))

    def read(j: int) -> np.ndarray:
        return np.asarray(mapped[j], dtype=series.dtype)

    name = f"the file's series {k}," if len(tif.series) > 1 else "the file's"
    return TiffPlanes(name, shape, series.dtype, read, complete)


#: ImageJ's plane orders (``order=`` in its metadata) as tifffile reads them: the axes of
#: its planes, outermost first
_IMAGEJ_ORDERS = {"czt": "TZC", "ctz": "ZTC", "zct": "TCZ", "ztc": "CTZ", "tcz": "ZCT",
                  "tzc": "CZT"}


@dataclass
class TiffCut:
    """A TIFF cut short (truncated): its planes (pages, in the file's order) as its own
    metadata or layout names them, and how many are complete in the file."""

    lead: tuple[int, ...]  # the planes' axes (outermost first) as its metadata names them
    letters: str  # their tifffile letters ("TZC", "I", …)
    complete: int  # planes complete in the file, in its order
    total: int | None  # planes it names; None: the file does not say
    images: int  # image series (positions) its metadata names
    read: Callable[[int], np.ndarray]  # plane j (j < complete), (rows, cols)
    #: its first page's ImageDescription (OME-XML, ImageJ's or tifffile's metadata) lay
    #: past the cut: what its planes are is not known
    metadata_lost: bool = False

    def why(self, noun: str = "frames") -> str:
        """What is wrong, e.g. "cut short (truncated: …): only its first 2 of 8 frames are
        complete"."""
        of = f" of {self.total}" if self.total is not None else ""
        unknown = "" if self.total is not None else " (it does not say how many it had)"
        return ("cut short (truncated: its writer did not finish, or it was copied in part): "
                f"only its first {self.complete}{of} {noun} are complete{unknown}")

    def axes_unknown(self) -> str | None:
        """Why its planes cannot be told apart, where its metadata was cut off and it has
        several ("its metadata … lay past the cut: …"); None otherwise."""
        if not self.metadata_lost or self.complete < 2:
            return None
        return ("its metadata (its ImageDescription, written at its end: OME-XML or ImageJ's) "
                f"lay past the cut, so what its {self.complete} planes are (time points, "
                "channels, z planes or positions) is not known")


@dataclass(frozen=True)
class _Declared:
    """The planes a TIFF's metadata names: its first image's axes (shape, tifffile letters,
    outermost first), its images (series, positions) and their planes in all."""

    lead: tuple[int, ...]
    letters: str
    images: int
    total: int


def _imagej_declared(tif: Any) -> _Declared | None:
    """The planes an ImageJ TIFF's metadata names (frames, slices, channels; else images)."""
    meta = tif.imagej_metadata
    if not meta:
        return None
    sizes = {"T": meta.get("frames", 1), "Z": meta.get("slices", 1),
             "C": meta.get("channels", 1)}
    if not all(isinstance(n, int) and n >= 1 for n in sizes.values()):
        return None
    letters = _IMAGEJ_ORDERS.get(str(meta.get("order", "czt")).lower(), "TZC")
    lead = tuple(sizes[a] for a in letters)
    images = meta.get("images", 1)
    if math.prod(lead) == 1 and isinstance(images, int) and images > 1:
        return _Declared((images,), "I", 1, images)
    return _Declared(lead, letters, 1, math.prod(lead))


def _ome_declared(tif: Any, path: Path) -> _Declared | None:
    """The planes an OME-TIFF's XML names (its images' SizeZ, SizeC, SizeT); None where it
    names planes in other files (a multi-file set) or RGB planes."""
    from xml.etree import ElementTree

    text = str(tif.pages.first.description or "")
    if not text.lstrip().startswith("<") or "OME" not in text[:1000]:
        return None
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError:
        return None

    def local(e: Any) -> str:
        return str(e.tag).rsplit("}", 1)[-1]

    if any(local(e) == "UUID" and e.get("FileName", path.name) != path.name
           for e in root.iter()):
        return None
    pixels = [p for e in root if local(e) == "Image" for p in e if local(p) == "Pixels"]
    leads: list[tuple[int, ...]] = []
    try:
        for px in pixels:
            if any(int(c.get("SamplesPerPixel", "1")) > 1 for c in px if local(c) == "Channel"):
                return None  # RGB: planes are not pages
            order = str(px.get("DimensionOrder", "XYZCT"))[2:][::-1]
            leads.append(tuple(int(px.get(f"Size{a}", "1")) for a in order))
    except ValueError:
        return None
    if not leads:
        return None
    order = str(pixels[0].get("DimensionOrder", "XYZCT"))[2:][::-1]
    return _Declared(leads[0], order, len(leads), sum(math.prod(s) for s in leads))


def _shaped_declared(tif: Any, rows: int, cols: int, chain_cut: bool) -> _Declared | None:
    """The planes tifffile's shaped metadata names (its series of one frame shape); None
    where it names several series and the IFD chain is cut (a series names itself in its
    first page: those of the series cut off are lost with them)."""
    meta = tif.shaped_metadata
    if not meta or (chain_cut and len(meta) > 1):
        return None
    shapes = [tuple(m.get("shape", ())) for m in meta]
    if not all(len(s) >= 2 and tuple(s[-2:]) == (rows, cols) for s in shapes):
        return None  # samples (RGB) or frames of other shapes
    axes = str(meta[0].get("axes", ""))
    lead = tuple(int(n) for n in shapes[0][:-2])
    letters = axes[:-2] if len(axes) == len(shapes[0]) else "Q" * len(lead)
    return _Declared(lead, letters.upper(), len(shapes),
                     sum(math.prod(int(n) for n in s[:-2]) for s in shapes))


def _next_ifd(tif: Any, offset: int) -> int | None:
    """The offset of the IFD after the one at ``offset`` (0: none), as that IFD names it;
    None where the file ends before it says."""
    import struct

    fh, tiff = tif.filehandle, tif.tiff
    fh.seek(offset)
    raw = fh.read(tiff.tagnosize)
    if len(raw) < tiff.tagnosize:
        return None
    fh.seek(offset + tiff.tagnosize + int(struct.unpack(tiff.tagnoformat, raw)[0]) * tiff.tagsize)
    raw = fh.read(tiff.offsetsize)
    if len(raw) < tiff.offsetsize:
        return None
    return int(struct.unpack(tiff.offsetformat, raw)[0])


def _found(tif: Any, size: int) -> tuple[int, int | None]:
    """The IFDs of ``tif`` that tifffile finds and reads, and where the chain runs past the
    end of the file (the offset of the next IFD, which is not, or is not whole, in the
    file), else None."""
    n = len(tif.pages)
    try:
        last = tif.pages[n - 1]
    except Exception:  # the cut goes through it (tifffile: "corrupted IFD structure")
        if n < 2:
            raise
        return n - 1, _next_ifd(tif, tif.pages[n - 2].offset) or size
    after = _next_ifd(tif, last.offset)
    if after is None:
        return n, size
    return n, after if after and after + tif.tiff.tagnosize > size else None


def _description_cut(tif: Any, size: int) -> bool:
    """Whether the first page's ImageDescription (tag 270) lies past the end of the file,
    as its IFD names it (tifffile then drops it, with OME-XML written at the end of a file
    that was cut short)."""
    import struct

    fh, tiff = tif.filehandle, tif.tiff
    fh.seek(tif.pages.first.offset)
    raw = fh.read(tiff.tagnosize)
    if len(raw) < tiff.tagnosize:
        return False
    count = int(struct.unpack(tiff.tagnoformat, raw)[0])
    entries = fh.read(count * tiff.tagsize)
    for i in range(len(entries) // tiff.tagsize):
        code, _, n, value = struct.unpack(
            tiff.tagheaderformat, entries[i * tiff.tagsize:(i + 1) * tiff.tagsize])
        if code == 270:  # ASCII: n bytes, inline up to the offset size
            at = int(struct.unpack(tiff.offsetformat, value)[0])
            return n > tiff.tagoffsetthreshold and at + n > size
    return False


def _whole(page: Any, size: int) -> bool:
    """Whether a page's data lie in the file (sparse segments of offset and size 0 do; a
    page that is missing is not cut off)."""
    return page is None or all(
        n == 0 or o + n <= size
        for o, n in zip(page.dataoffsets, page.databytecounts, strict=False))


def _block(tif: Any, n: int, total: int | None, dangling: int | None) -> int | None:
    """Planes of one uncompressed run from the first page's data, where the pages found are
    in it and its layout names more (the next IFD after that run, or fewer IFDs than the
    metadata names planes, as ImageJ and tifffile write them); None otherwise."""
    first, last = tif.pages.first, tif.pages[n - 1]
    plane = first.nbytes
    if not (plane and first.is_contiguous and last.is_contiguous):
        return None
    start = int(first.dataoffsets[0])
    if int(last.dataoffsets[0]) != start + (n - 1) * plane:
        return None
    if dangling is not None:
        planes = (dangling - start) // plane
        return planes if planes > n else None
    return total if total is not None and total > n else None


def tiff_cut(tif: Any, path: Path) -> TiffCut | None:
    """The open TIFF ``tif`` cut short: its IFD chain points past its end, a page's data
    or its first page's ImageDescription (OME-XML written last: ``TiffCut.metadata_lost``)
    lie past it, or it has fewer complete planes than its own metadata (ImageJ, OME-XML,
    tifffile's shape) names; None when it is whole (or is not one image of grayscale pages,
    or the check fails: tifffile then reads it as before)."""
    try:
        return _tiff_cut(tif, path)
    except Exception as exc:  # tifffile's own errors: the diagnosis must not refuse a file
        log.debug("%s: the check for a cut short TIFF failed: %r", path, exc)
        return None


def _tiff_cut(tif: Any, path: Path) -> TiffCut | None:
    first = tif.pages.first
    if first.samplesperpixel != 1:
        return None
    rows, cols = int(first.imagelength), int(first.imagewidth)
    size = int(tif.filehandle.size)
    n, dangling = _found(tif, size)
    lost = _description_cut(tif, size)
    declared = (_imagej_declared(tif) or _ome_declared(tif, path)
                or _shaped_declared(tif, rows, cols, dangling is not None))
    if declared is not None and declared.total < n:
        declared = _Declared((n,), "I", 1, n)  # the metadata does not count the pages
    total = declared.total if declared is not None else None
    block = _block(tif, n, total, dangling)
    if block is not None:
        total = max(total or 0, block)
        start = first.dataoffsets[0]
        complete = min(total, (size - start) // first.nbytes)
        read = _mapped(tif, path, start, complete, rows, cols)
    else:
        complete = n
        while complete and not _whole(tif.pages[complete - 1], size):
            complete -= 1
        if total is None and dangling is None and complete == n and not lost:
            return None
        read = _paged(tif, rows, cols)
    if total is not None and complete >= total:
        return None  # only IFDs after the data are lost: every plane is there
    if declared is None or declared.total != total:
        declared = _Declared((total or complete,), "I", 1, total or complete)
    kept = [(k, a) for k, a in zip(declared.lead, declared.letters, strict=True) if k > 1]
    return TiffCut(tuple(k for k, _ in kept), "".join(a for _, a in kept), complete, total,
                   declared.images, read, lost)


def _mapped(tif: Any, path: Path, start: int, complete: int, rows: int,
            cols: int) -> Callable[[int], np.ndarray]:
    """Plane j of the ``complete`` uncompressed planes in a row from ``start``."""
    dtype = np.dtype(tif.pages.first.dtype)
    stored = dtype.newbyteorder(tif.byteorder)  # the file's byte order
    mapped = (np.memmap(path, dtype=stored, mode="r", offset=start,
                        shape=(complete, rows, cols)) if complete else np.empty((0, rows, cols)))

    def read(j: int) -> np.ndarray:
        return np.asarray(mapped[j], dtype=dtype)

    return read


def _paged(tif: Any, rows: int, cols: int) -> Callable[[int], np.ndarray]:
    """Plane j: page j of the file, decoded."""
    def read(j: int) -> np.ndarray:
        return np.asarray(tif.pages[j].asarray()).reshape(rows, cols)

    return read


def position_series(series: Sequence[Any]) -> tuple[list[Any], str | None]:
    """The image series of a TIFF (tifffile's ``TiffFile.series``, at least one) that are
    its stage positions, and None; or, when they differ in shape or pixel type, the first
    alone and every series' shape and type, for a warning.

    An OME-TIFF holds one series per position (as Micro-Manager and tifffile write them);
    series that differ are something else (a slide scanner's label or overview image)."""
    kinds = {(tuple(s.shape), np.dtype(s.dtype).str) for s in series}
    if len(kinds) <= 1:
        return list(series), None
    return [series[0]], ", ".join(f"{tuple(s.shape)} {np.dtype(s.dtype)}" for s in series)


def tiff_axes(path: Path, letters: str, shape: tuple[int, ...]) -> list[str]:
    """The replay axes of a TIFF series' leading axes (``letters`` without Y, X)."""
    if len(letters) != 1:
        return [_TIFF_AXES.get(a, a) for a in letters]
    if letters != "T":  # ImageJ saves a plain stack as Z, tifffile a 3-D one as C or Q
        log.info("%s: its one stack axis %r (%d planes) is replayed as time points (t)",
                 path, letters, shape[0])
    return ["t"]


def readable_frames(path: Path, data: Any) -> int | None:
    """How many frames of a truncated TIFF are complete before the first one cut off
    (logged); None when the file is whole. ReplayError when none is."""
    frames = math.prod(data.shape[:-2])
    readable = (data.readable() if isinstance(data, PositionSeries)
                else getattr(data, "complete", frames))
    if readable >= frames:
        return None
    if readable == 0:
        raise ReplayError(f"{path} is cut short (truncated): not one of its {frames} frames is "
                          "complete in the file; copy it again or give the complete file")
    log.warning("%s is cut short (truncated: its writer did not finish, or it was copied in "
                "part): only its first %d of %d frames are complete; replaying those",
                path, readable, frames)
    return readable


def tiff_data(tif: Any, path: Path, k: int, shape: tuple[int, ...],
              white: int | None = None) -> Any:
    """Series ``k`` of ``tif``: memory-mapped where it is uncompressed and contiguous, else
    read a plane at a time (:func:`tiff_planes`: a corrupt plane is then one unreadable
    frame), else read whole; read as MinIsBlack (:class:`MinIsBlack`) where ``white`` (the
    file's :func:`white_level`) is given."""
    data = _tiff_data(tif, path, k, shape)
    return data if white is None else MinIsBlack(data, white)


def _tiff_data(tif: Any, path: Path, k: int, shape: tuple[int, ...]) -> Any:
    import tifffile

    try:
        return np.asarray(tifffile.memmap(path, series=k, mode="r")).reshape(shape)
    except (ValueError, OSError):  # compressed, not contiguous, or cut short
        pass
    planes = tiff_planes(tif, path, k)
    if planes is not None:
        return planes
    return np.asarray(tif.series[k].asarray()).reshape(shape)
