"""Percentile normalisation of camera images before inference."""

from __future__ import annotations

import numpy as np

__all__ = ["percentile_normalize"]

#: Fewest pixels the percentile estimate is taken over; the stride shrinks to keep at least this.
_MIN_SAMPLE_PX = 4096


def percentile_normalize(
    image: np.ndarray,
    low: float = 1.0,
    high: float = 99.8,
    *,
    subsample: int = 4,
    clip: bool = False,
) -> np.ndarray:
    """Map the ``low`` percentile of ``image`` to 0 and the ``high`` percentile to 1.

    Percentiles are estimated on the strided subsample ``image[..., ::s, ::s]`` (the stride
    shrinks for small images so that at least a few thousand pixels are used). Returns a new
    float32 array of the same shape; values outside the percentile range fall outside [0, 1]
    unless ``clip`` is true. A flat image (``high`` percentile equal to ``low``) gives zeros.
    Works for integer (uint8, uint16, ...) and float inputs.
    """
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"need 0 <= low < high <= 100, got low={low}, high={high}")
    if subsample < 1:
        raise ValueError(f"subsample must be >= 1, got {subsample}")
    arr = np.asarray(image)
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.float32)

    sample = _strided_sample(arr, subsample)
    lo, hi = (float(v) for v in np.percentile(sample, (low, high)))

    out = arr.astype(np.float32, copy=True)
    span = hi - lo
    if not np.isfinite(span) or span <= 0.0:
        out.fill(0.0)
        return out
    out -= np.float32(lo)
    out *= np.float32(1.0 / span)
    if clip:
        np.clip(out, 0.0, 1.0, out=out)
    return out


def _strided_sample(arr: np.ndarray, subsample: int) -> np.ndarray:
    """Return ``arr`` strided by ``s <= subsample`` over its last two axes (all axes if 1-D)."""
    stride = subsample
    n_axes = min(arr.ndim, 2)
    while stride > 1 and arr.size // stride**n_axes < _MIN_SAMPLE_PX:
        stride -= 1
    if stride == 1:
        return arr
    step = slice(None, None, stride)
    return arr[..., step, step] if n_axes == 2 else arr[step]
