"""Decimating frames and labels for the browser (pure numpy, no I/O).

A browser needs far less than the camera gives: :func:`make_preview` turns one camera image
and its instance labels into an 8-bit, percentile-stretched grey image at most ``max_px``
pixels on its longer side (plain strided slicing, no interpolation) and a 1-bit outline
mask of the objects at the same size, packed 8 pixels to a byte. :func:`encode_preview`
frames both into one binary WebSocket message (layout in ``docs/dashboard.md``).

Costs a few milliseconds for a 512×512 frame; the dashboard calls it only for the frames it
actually sends (a few per second), never for every camera frame.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "MAGIC",
    "Preview",
    "decode_preview",
    "encode_preview",
    "make_preview",
    "outlines",
    "stretch_to_u8",
]

#: First 4 bytes of every binary dashboard message (``LMD1``: livemask dashboard v1).
MAGIC = b"LMD1"
_PERCENTILES = (0.5, 99.5)
_SAMPLE_PX = 128  # percentiles are taken on a strided sample at most this big per side


@dataclass
class Preview:
    """One decimated frame, ready to send."""

    grey: np.ndarray  # uint8 (h, w)
    outline: np.ndarray | None  # bool (h, w), or None when there are no labels
    step: int  # the stride used: 1 = full resolution
    stretch: tuple[float, float]  # camera values mapped to 0 and 255
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the decimated image."""
        h, w = self.grey.shape
        return int(h), int(w)


def decimation_step(shape: tuple[int, ...], max_px: int) -> int:
    """The integer stride that brings the longer side of ``shape`` to at most ``max_px``."""
    if max_px < 1:
        raise ValueError(f"max_px must be >= 1, got {max_px}")
    return max(1, math.ceil(max(shape[0], shape[1]) / max_px))


def stretch_to_u8(
    image: np.ndarray, percentiles: tuple[float, float] = _PERCENTILES
) -> tuple[np.ndarray, tuple[float, float]]:
    """Map ``image`` to uint8 so that its low/high percentiles become 0/255.

    The percentiles are estimated on a strided sample (cheap); integer images of up to
    16 bits go through a lookup table, others through float arithmetic. A flat image maps
    to 0. Returns the image and the ``(low, high)`` camera values.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    h, w = image.shape
    s = max(1, math.ceil(max(h, w) / _SAMPLE_PX))
    sample = image[::s, ::s].ravel()
    finite = sample if sample.dtype.kind in "ui" else sample[np.isfinite(sample)]
    if finite.size == 0:
        return np.zeros(image.shape, np.uint8), (0.0, 0.0)
    ranks = [round(p / 100 * (finite.size - 1)) for p in percentiles]  # nearest rank
    lo, hi = (float(v) for v in np.partition(finite, ranks)[ranks])
    if hi <= lo:
        hi = lo + 1.0
    scale = 255.0 / (hi - lo)
    if image.dtype.kind == "u" and image.dtype.itemsize <= 2:
        levels = np.arange(1 << (8 * image.dtype.itemsize), dtype=np.float32)
        lut = np.clip((levels - lo) * scale + 0.5, 0, 255).astype(np.uint8)
        return lut[image], (lo, hi)
    out = (image.astype(np.float32) - np.float32(lo)) * np.float32(scale) + np.float32(0.5)
    np.nan_to_num(out, copy=False, nan=0.0)
    return np.clip(out, 0, 255).astype(np.uint8), (lo, hi)


def outlines(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixels that have a 4-neighbour with another label.

    Both sides of every boundary are marked, the object's edge pixel and the background
    (or other object) pixel next to it: a 2-px line that stays visible on bright objects
    and after the browser scales the image. The image border is not an outline.
    """
    if labels.ndim != 2:
        raise ValueError(f"expected 2-D labels, got shape {labels.shape}")
    out = np.zeros(labels.shape, dtype=bool)
    dh = labels[:, 1:] != labels[:, :-1]
    out[:, :-1] |= dh
    out[:, 1:] |= dh
    dv = labels[1:, :] != labels[:-1, :]
    out[:-1, :] |= dv
    out[1:, :] |= dv
    return out


def make_preview(
    image: np.ndarray, labels: np.ndarray | None = None, *, max_px: int = 512
) -> Preview:
    """Decimate ``image`` (and outline ``labels``) for display, at most ``max_px`` a side.

    ``labels`` of another shape than ``image`` are ignored (no outline).
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] in (1, 3, 4):  # colour camera: show the first channel
        img = img[..., 0]
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    step = decimation_step(img.shape, max_px)
    grey, stretch = stretch_to_u8(img[::step, ::step])
    outline = None
    if labels is not None and labels.shape == img.shape:
        outline = outlines(labels[::step, ::step])
    return Preview(np.ascontiguousarray(grey), outline, step, stretch)


def encode_preview(preview: Preview, meta: dict[str, Any] | None = None) -> bytes:
    """One binary message: ``MAGIC``, header length (uint32 LE), JSON header, grey bytes,
    then the outline packed 1 bit a pixel (``np.packbits``, row-major, MSB first), if any.
    """
    h, w = preview.shape
    header = {
        **preview.meta,
        **(meta or {}),
        "width": w,
        "height": h,
        "step": preview.step,
        # significant digits, not decimals: a float frame's 0.00406 is not 0.004
        "stretch": [float(f"{v:.6g}") for v in preview.stretch],
        "outline": preview.outline is not None,
    }
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    parts = [MAGIC, struct.pack("<I", len(head)), head, preview.grey.tobytes()]
    if preview.outline is not None:
        parts.append(np.packbits(preview.outline, axis=None).tobytes())
    return b"".join(parts)


def decode_preview(data: bytes) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
    """Inverse of :func:`encode_preview` (for tests and Python clients)."""
    if data[:4] != MAGIC:
        raise ValueError("not a livemask dashboard frame (bad magic)")
    (n,) = struct.unpack_from("<I", data, 4)
    header = json.loads(data[8 : 8 + n])
    h, w = header["height"], header["width"]
    start = 8 + n
    grey = np.frombuffer(data, np.uint8, h * w, start).reshape(h, w)
    outline = None
    if header["outline"]:
        bits = np.frombuffer(data, np.uint8, (h * w + 7) // 8, start + h * w)
        outline = np.unpackbits(bits, count=h * w).reshape(h, w).astype(bool)
    return header, grey, outline
