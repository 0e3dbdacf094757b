"""Tiled inference for frames larger than a model's tile: overlap, batching and blending.

The frame is padded at the bottom and right by reflection to a multiple of the model's
``size_multiple`` (exactly as an untiled :meth:`Segmenter.predict` pads it) and covered by a
grid of equal tiles, spread evenly from edge to edge, that overlap their neighbours by at
least ``overlap_px``. The tiles go through the backend in batches of up to ``max_batch`` as
one (N, 1, th, tw) array each, and the model outputs are blended back into one (C, H, W) map
with a smooth separable window:

- along each axis, a tile's weight is 1 except in the bands it shares with a neighbour;
- in a shared band of ``k`` pixels, the quarter nearest the tile's own edge has weight 0
  (outputs there see the tile's zero padding, not the real neighbourhood) and the middle
  half ramps as sin², mirrored by the neighbour's cos², so the two add up to 1;
- weights are normalised to sum to 1 at every pixel, so a constant output stays constant.

Sides of a tile at the frame border get no ramp, and the border tiles see the same padded
frame edge as an untiled call: for a model whose output at a pixel depends only on the input
within ``overlap_px // 4`` pixels (a "local" model), the blended map equals the untiled
output up to float rounding, borders included. A real network's receptive field is wider,
so its tiled output differs slightly near seams (see tests/test_tiling.py for the measured
effect on the shipped nuclei model).

Instance labels are computed once, from the blended full-frame probabilities, so objects
are never split or duplicated at tile seams.

Tiles start on multiples of ``size_multiple``, so a network's pooling grid lies on the
frame as in an untiled call (a stride-8 network shifted by 4 pixels gives other outputs).
The tiles are as small as the fewest tiles of at most ``tile_px`` allow: a 2048-pixel axis
with ``tile_px=1024``, a 64 px overlap and ``size_multiple=8`` takes three 728-pixel tiles at
0, 656 and 1320, not three of 1024.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AxisTiles",
    "TilePlan",
    "blend_weights_1d",
    "needs_tiling",
    "plan_tiles",
    "predict_tiled",
]

#: A backend's ``run``: (N, 1, H, W) float32 → (N, C, H, W) float32.
RunFn = Callable[[np.ndarray], np.ndarray]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True, eq=False)
class AxisTiles:
    """The tiles along one axis of a frame: ``starts[i]`` to ``starts[i] + size``."""

    length: int  # frame length along the axis
    size: int  # tile extent (a multiple of size_multiple)
    starts: tuple[int, ...]
    overlap: int
    weights: np.ndarray  # (n, size) float32 blend weights, normalised over the tiles
    # per tile, in tile coordinates: [lo, hi) where its weight is > 0 (support), and
    # [lo, hi) where no other tile has weight, so its weight is exactly 1 (core)
    support: tuple[tuple[int, int], ...]
    core: tuple[tuple[int, int], ...]

    @property
    def padded(self) -> int:
        """Length the tiles cover: ``length`` padded to size_multiple."""
        return self.starts[-1] + self.size


@dataclass(frozen=True, eq=False)
class TilePlan:
    """A grid of equal tiles over a frame of ``shape``."""

    shape: tuple[int, int]
    y: AxisTiles
    x: AxisTiles
    max_batch: int

    @property
    def tile_shape(self) -> tuple[int, int]:
        """(th, tw) of every tile: the spatial shape of each backend batch."""
        return self.y.size, self.x.size

    @property
    def count(self) -> int:
        """Number of tiles."""
        return len(self.y.starts) * len(self.x.starts)

    @property
    def batch_sizes(self) -> list[int]:
        """N of each backend call, in order."""
        full, rest = divmod(self.count, self.max_batch)
        return [self.max_batch] * full + ([rest] if rest else [])

    def positions(self) -> list[tuple[int, int]]:
        """(iy, ix) grid index of every tile, row by row."""
        return [(i, j) for i in range(len(self.y.starts)) for j in range(len(self.x.starts))]


def needs_tiling(shape: tuple[int, int], tile_px: int, size_multiple: int = 1) -> bool:
    """Whether a frame of ``shape``, padded to ``size_multiple``, exceeds the tile."""
    m = max(1, int(size_multiple))
    return any(_round_up(int(n), m) > tile_px for n in shape)


def blend_weights_1d(size: int, overlap_start: int, overlap_end: int) -> np.ndarray:
    """Blend window (float64, length ``size``) of one tile along one axis, before normalising.

    ``overlap_start``/``overlap_end``: how many of the tile's first/last pixels it shares
    with a neighbour (0 at the frame border). In a shared band of ``k`` pixels the weight is
    0 for the ``k // 4`` pixels nearest the edge, then rises as sin² to 1 over the middle
    ``k - 2 * (k // 4)`` pixels; the neighbour's mirror-image ramp is cos² of the same
    angle, so the two add up to 1 across the band.
    """
    w = np.ones(size, dtype=np.float64)
    for k, at_start in ((overlap_start, True), (overlap_end, False)):
        if k <= 0:
            continue
        dead = k // 4
        d = np.arange(k, dtype=np.float64)  # distance from the tile edge
        ramp = np.sin(0.5 * np.pi * np.clip((d - dead + 0.5) / (k - 2 * dead), 0.0, 1.0)) ** 2
        ramp[d < dead] = 0.0
        if at_start:
            w[:k] *= ramp
        else:
            w[size - k :] *= ramp[::-1]
    return w


def _axis(length: int, tile_px: int, overlap: int, size_multiple: int) -> AxisTiles:
    """The fewest equal tiles of at most ``tile_px`` that cover the padded ``length``.

    The axis is padded to ``size_multiple`` (as for an untiled call), the tiles are as
    small as covering it with ``overlap`` allows, and they are spread evenly from one end
    to the other (neighbours overlap by ``overlap`` or a few pixels more).
    """
    m = size_multiple
    padded = _round_up(length, m)
    if padded <= tile_px:  # one tile: the whole axis
        whole = ((0, padded),)
        ones = np.ones((1, padded), dtype=np.float32)
        return AxisTiles(length, padded, (0,), overlap, ones, whole, whole)
    # Tiles start on multiples of m, like the model's pooling grid in an untiled call (a
    # network with stride-8 pooling gives other outputs for an input shifted by 4 pixels).
    # Fewest tiles first, then the smallest tile for which the widest step between
    # neighbours (in units of m) still leaves them ``overlap`` in common.
    n = math.ceil((padded - overlap) / (tile_px - overlap))
    size = _round_up(math.ceil((padded - overlap) / n) + overlap, m)
    while size > tile_px or m * math.ceil((padded - size) / m / (n - 1)) > size - overlap:
        if size >= tile_px:
            n, size = n + 1, _round_up(math.ceil((padded - overlap) / (n + 1)) + overlap, m)
        else:
            size += m
    steps = (padded - size) // m
    starts = tuple(m * round(i * steps / (n - 1)) for i in range(n))
    shared = [starts[i] + size - starts[i + 1] for i in range(n - 1)]  # each >= overlap
    raw = [
        blend_weights_1d(size, shared[i - 1] if i > 0 else 0, shared[i] if i < n - 1 else 0)
        for i in range(n)
    ]
    total = np.zeros(padded, dtype=np.float64)
    for s, w in zip(starts, raw, strict=True):
        total[s : s + size] += w
    if not np.all(total > 0):  # cannot happen for overlap <= size / 4
        raise AssertionError(f"tile blend weights leave pixels uncovered: {starts}, {size}")
    norm = np.stack([w / total[s : s + size] for s, w in zip(starts, raw, strict=True)])
    support, core = [], []
    for s, w in zip(starts, raw, strict=True):
        pos = np.flatnonzero(w > 0)
        alone = np.flatnonzero((w > 0) & (total[s : s + size] == w))  # others add exactly 0
        support.append((int(pos[0]), int(pos[-1]) + 1))
        core.append((int(alone[0]), int(alone[-1]) + 1) if alone.size else (int(pos[0]),) * 2)
    return AxisTiles(
        length, size, starts, overlap, norm.astype(np.float32), tuple(support), tuple(core)
    )


def plan_tiles(
    shape: tuple[int, int],
    *,
    tile_px: int,
    overlap_px: int = 64,
    max_batch: int = 4,
    size_multiple: int = 1,
) -> TilePlan:
    """The tile grid for a frame of ``shape`` (H, W).

    ``tile_px`` is the largest tile side (rounded down to a multiple of ``size_multiple``);
    ``overlap_px`` the least overlap of neighbouring tiles, at most a quarter of the tile.
    Raises ValueError for impossible settings.
    """
    h, w = (int(n) for n in shape)
    m = max(1, int(size_multiple))
    tile = (int(tile_px) // m) * m
    if h < 1 or w < 1:
        raise ValueError(f"cannot tile an empty frame of shape {shape}")
    if tile < m or tile < 1:
        raise ValueError(f"tile_px={tile_px} is smaller than size_multiple={m}")
    if overlap_px < 0 or 4 * overlap_px > tile:
        raise ValueError(
            f"tile_overlap_px={overlap_px} must be >= 0 and at most a quarter of the tile ({tile})"
        )
    if tile - overlap_px < m:
        raise ValueError(
            f"tile_px={tile} less tile_overlap_px={overlap_px} must be at least size_multiple={m}"
        )
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return TilePlan(
        (h, w), _axis(h, tile, overlap_px, m), _axis(w, tile, overlap_px, m), int(max_batch)
    )


def predict_tiled(
    run: RunFn,
    image: np.ndarray,
    *,
    tile_px: int | None = None,
    overlap_px: int = 64,
    max_batch: int = 4,
    size_multiple: int = 1,
    plan: TilePlan | None = None,
) -> np.ndarray:
    """Model outputs (C, H, W) float32 for a normalised 2-D ``image``, computed tile by tile.

    ``run`` is a backend's ``run`` (e.g. ``backend.run``); it gets (N, 1, th, tw) float32
    batches of N <= ``max_batch`` tiles and must return (N, C, th, tw). See the module
    docstring for the layout and blending. Give either ``tile_px`` (and optionally
    ``overlap_px``, ``max_batch``, ``size_multiple``) or a ``plan`` from :func:`plan_tiles`
    for this image's shape. The result is a new C-contiguous array.
    """
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {x.shape}")
    if plan is None:
        if tile_px is None:
            raise ValueError("predict_tiled needs tile_px or a plan")
        plan = plan_tiles(
            x.shape,
            tile_px=tile_px,
            overlap_px=overlap_px,
            max_batch=max_batch,
            size_multiple=size_multiple,
        )
    elif plan.shape != x.shape:
        raise ValueError(f"tile plan is for shape {plan.shape}, image has {x.shape}")
    h, w = x.shape
    ph, pw = plan.y.padded - h, plan.x.padded - w
    if ph or pw:  # to size_multiple, exactly as an untiled call pads
        x = np.pad(x, ((0, ph), (0, pw)), mode="reflect")
    th, tw = plan.tile_shape
    positions = plan.positions()
    out: np.ndarray | None = None
    batch = np.empty((min(plan.max_batch, len(positions)), 1, th, tw), dtype=np.float32)
    for first in range(0, len(positions), plan.max_batch):
        group = positions[first : first + plan.max_batch]
        for k, (iy, ix) in enumerate(group):
            y0, x0 = plan.y.starts[iy], plan.x.starts[ix]
            batch[k, 0] = x[y0 : y0 + th, x0 : x0 + tw]
        pred = np.asarray(run(batch[: len(group)]))
        if pred.ndim != 4 or pred.shape[0] != len(group) or pred.shape[2:] != (th, tw):
            raise ValueError(
                f"backend returned shape {pred.shape} for a batch of shape "
                f"{(len(group), 1, th, tw)}; expected (N, C, {th}, {tw})"
            )
        if out is None:
            out = np.zeros((pred.shape[1], h, w), dtype=np.float32)
        for k, (iy, ix) in enumerate(group):
            _blend_tile(out, pred[k], plan, iy, ix)
    if out is None:  # pragma: no cover - a plan always has at least one tile
        raise AssertionError("no tiles")
    return out


def _blend_tile(out: np.ndarray, pred: np.ndarray, plan: TilePlan, iy: int, ix: int) -> None:
    """Add one tile's output (C, th, tw), weighted, into ``out`` (C, H, W; zeros at first).

    Where no other tile has weight (the tile's core) the output is copied; only the bands
    shared with neighbours are multiplied by the window and added. The result does not
    depend on the order of the tiles: a tile's core gets no weight from any other tile.
    """
    h, w = out.shape[1:]
    y0, x0 = plan.y.starts[iy], plan.x.starts[ix]
    hy, wx = min(plan.y.size, h - y0), min(plan.x.size, w - x0)  # the part inside the frame
    (sy0, sy1), (cy0, cy1) = _clip(plan.y.support[iy], hy), _clip(plan.y.core[iy], hy)
    (sx0, sx1), (cx0, cx1) = _clip(plan.x.support[ix], wx), _clip(plan.x.core[ix], wx)
    out[:, y0 + cy0 : y0 + cy1, x0 + cx0 : x0 + cx1] = pred[:, cy0:cy1, cx0:cx1]
    wy, wx_ = plan.y.weights[iy], plan.x.weights[ix]
    for r0, r1, c0, c1 in (
        (sy0, cy0, sx0, sx1),  # band above the core
        (cy1, sy1, sx0, sx1),  # band below
        (cy0, cy1, sx0, cx0),  # band left of the core
        (cy0, cy1, cx1, sx1),  # band right
    ):
        if r1 > r0 and c1 > c0:
            weight = np.outer(wy[r0:r1], wx_[c0:c1])
            out[:, y0 + r0 : y0 + r1, x0 + c0 : x0 + c1] += pred[:, r0:r1, c0:c1] * weight


def _clip(bounds: tuple[int, int], limit: int) -> tuple[int, int]:
    """``bounds`` cut to [0, limit)."""
    lo, hi = bounds
    return min(lo, limit), min(hi, limit)
