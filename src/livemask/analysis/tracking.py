"""Online tracking of segmented objects: frame-to-frame linking, gap closing and divisions.

Each analysed frame is linked to the tracks alive before it, right away (online: no look
ahead, no re-linking of the past), so a subscriber sees a ``track_id`` on every object of
every frame as it is published.

Linking is a linear assignment (``scipy.optimize.linear_sum_assignment``) between the live
tracks and this frame's objects. A pair may link if the object lies within
``max_distance_px * sqrt(dt)`` of the track's last centroid (``dt``: time points since the
track was last seen; Brownian motion spreads with the square root of time). Its cost, in
units of that radius, is::

    (d / R)**2 + area_weight * |ln(area ratio)| + gap_penalty * missed - 1

and only pairs with a negative cost are candidates (``missed``: analysed frames the track
went without an object). Minimising the summed cost over a one-to-one matching with zero
cost for "not linked" is the usual LAP with a birth/death cost (linking beats not linking
exactly when it is cheaper than the radius). Isolated one-to-one candidate pairs (most of
them) are linked without the solver; the rest go to ``linear_sum_assignment``, in one matrix
when at most ``_DENSE_MAX`` tracks and objects are ambiguous, else per connected component
of the candidate graph (the optimum of a block-diagonal problem is the union of the blocks'
optima; the small components, nearly all, are solved together by trying every permutation).
Candidate pairs come from a k-d tree, so the time grows with the number of objects and the
crowding, not with ``tracks x objects``.

Gap closing: a track that finds no object stays alive for ``max_gap_frames`` analysed
frames and can be linked again; after that it is dropped, so memory stays bounded by the
objects in view. With ``gap_penalty`` per missed frame (which prefers recently seen tracks)
its reach is ``R * sqrt(1 - gap_penalty * missed)`` (``area_weight`` 0), so
``gap_penalty * max_gap_frames`` must be < 1 (:class:`TrackerParams` refuses more: such a
track could never link again).

Divisions: an object that started no link (a birth) near a track is a daughter when, with a
sister, the pair looks like a split of that track's last object: the sister is either the
object the track just linked to (when it lies within the division reach), or another
birth; both daughters lie within
``division_distance_px * sqrt(dt)`` of the parent, their midpoint within half that, each
has ``division_area_ratio`` (low, high) of the parent's area and the smaller has at least
``daughter_area_similarity`` of the larger's area, and (when mean intensities are given
and ``division_intensity_ratio`` is set) the daughters' mean intensity is at most that
fraction of the parent's brightest view in its last 3 frames: condensed mitotic chromatin is
bright in nuclear stains, while a nucleus that is merely over-segmented keeps its intensity.
The intensities must be signal only (a ratio of raw camera values depends on the camera
offset and the background): :class:`PositionTrackers` gives each object's mean intensity
above its local background, per ms of exposure when the exposure is known.
The parent track then ends and both daughters start new tracks whose ``parent_track_id`` is
the parent's id (carried on every frame of the daughter tracks). Candidates are accepted
greedily, best midpoint first, each object and parent once.

:class:`PositionTrackers` keeps one :class:`Tracker` per image stream: the stage position
(MDA index ``p``; without one, the stage position rounded to a grid) with every other MDA
index key but ``t`` (grid tile ``g``, channel ``c``, plane ``z``, feedback action ``fb``, a
client's own key such as ``ext``) and the frame's pixel geometry (:func:`frame_geometry`:
pixel size, camera ROI offset and image shape, so a binning, objective or ROI change starts
new tracks rather than linking other objects by their pixel positions), with track ids
unique across all of them, and writes the results into the measurement dicts.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import permutations
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

if TYPE_CHECKING:
    from livemask.config import TrackingConfig

__all__ = [
    "TIME_AXIS",
    "TRACK_UNITS",
    "PositionTrackers",
    "TrackStep",
    "Tracker",
    "TrackerParams",
    "camera_roi_offset",
    "frame_geometry",
    "largest_gap_frames",
    "pixel_to_stage_at",
    "positive_number",
    "signal_intensities",
]

log = logging.getLogger("livemask")

#: Units of the per-object fields tracking adds (merged into the measurement unit descriptor).
TRACK_UNITS: dict[str, str] = {"track_id": "1", "parent_track_id": "1"}
#: The MDA index axis along which a stream's frames follow each other (every other key tells
#: the stream, as for ``publish.frame_every``).
TIME_AXIS = "t"
#: Pixel sizes within this relative difference are one geometry in a stream's key
#: (:func:`frame_geometry`): a binning or objective change is a step of at least ~25 %,
#: while a zoom's or magnifier's reading may wobble in its last digits from frame to frame.
PIXEL_SIZE_TOLERANCE = 0.01


class StreamPixelSizes:
    """Each stream's pixel size in its key. A frame whose reading is within
    :data:`PIXEL_SIZE_TOLERANCE` of the last reading of a size the stream has had (the
    nearest) keeps that size's key, and moves its last reading along: a reading that
    wobbles in its last digits or drifts slowly keeps one stream, and a return to an
    earlier size (a magnifier switched back) continues that size's stream; a jump of more
    than that starts a new one. Per owner (a tracker, the feedback features), thread-safe;
    the least recently seen of more than ``max_streams`` streams is forgotten (size it as
    the owner's own stream limit)."""

    def __init__(self, max_streams: int = 4096) -> None:
        #: per stream: [key size, last reading] of each size it has had
        self._sizes: OrderedDict[Hashable, list[list[float]]] = OrderedDict()
        self._max = max_streams
        self._lock = threading.Lock()

    def geometry(self, stream: Hashable, geometry: tuple[Any, ...]) -> tuple[Any, ...]:
        """``geometry`` (:func:`frame_geometry`) of a frame of ``stream`` with the pixel size
        the stream keeps for it."""
        size, roi, shape = geometry
        if size is None:
            return geometry
        base = (stream, roi, shape)
        with self._lock:
            sizes = self._sizes.setdefault(base, [])
            near = [s for s in sizes if abs(size - s[1]) <= PIXEL_SIZE_TOLERANCE * s[1]]
            if near:
                entry = min(near, key=lambda s: abs(size - s[1]))
                entry[1] = size
                size = entry[0]
                sizes.remove(entry)  # the most recently seen last: the oldest go first
                sizes.append(entry)
            else:
                sizes.append([size, size])
                del sizes[:-8]  # (a stream's last 8 sizes)
            self._sizes.move_to_end(base)
            while len(self._sizes) > self._max:
                self._sizes.popitem(last=False)
        return (size, roi, shape)

    def clear(self) -> None:
        with self._lock:
            self._sizes.clear()


def camera_roi_offset(settings: Any) -> tuple[int, int] | None:
    """The (row, col) offset of a frame's camera ROI from its header's ``settings``: (0, 0)
    without a ``roi`` (the camera's image at open), the ``roi``'s ``(offset_y, offset_x)``,
    or None for a null (not known) or malformed one."""
    if not isinstance(settings, Mapping) or "roi" not in settings:
        return (0, 0)
    roi = settings.get("roi")
    if not isinstance(roi, Mapping):
        return None
    y, x = roi.get("offset_y"), roi.get("offset_x")
    if _count(y) and _count(x):
        return (y, x)
    return None


def _count(value: Any) -> TypeGuard[int]:
    """Whether ``value`` is an int (not a bool) >= 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def frame_geometry(
    pixel_size_um: float | None, roi_offset_yx: tuple[int, int] | None, shape: Sequence[int]
) -> tuple[Any, ...]:
    """Where a frame's pixels lie on the sample, for a stream's key: its pixel size (None
    where not known; :class:`StreamPixelSizes` keeps a stream's within
    :data:`PIXEL_SIZE_TOLERANCE`), camera ROI offset (:func:`camera_roi_offset`) and image
    shape (rows, cols). Frames of another geometry (a binning, objective or ROI change)
    start new streams: their centroids and areas in pixels do not compare with the old
    ones'."""
    size = None
    if pixel_size_um is not None and math.isfinite(float(pixel_size_um)):
        size = float(pixel_size_um)
    return (size, roi_offset_yx, tuple(int(n) for n in shape[:2]))


#: Pixels to stage, ``((dx/dcol, dx/drow), (dy/dcol, dy/drow))`` µm per pixel
#: (``feedback.pixel_to_stage``).
PixelToStage = tuple[tuple[float, float], tuple[float, float]]


def pixel_to_stage_at(
    matrix: PixelToStage | None, matrix_pixel_size_um: float | None, pixel_size_um: Any
) -> PixelToStage | None:
    """``matrix``, given for ``matrix_pixel_size_um`` (the pixel size at open), for a frame
    of ``pixel_size_um``: scaled by their ratio (the camera's binning or the objective
    changed), where both are known and positive; as given otherwise (None: None). Feedback
    centring and the grain tiles' stage footprints map pixels to the stage with it."""
    if (matrix is None or matrix_pixel_size_um is None or pixel_size_um == matrix_pixel_size_um
            or not (positive_number(matrix_pixel_size_um) and positive_number(pixel_size_um))):
        return matrix
    k = float(pixel_size_um) / float(matrix_pixel_size_um)
    (a, b), (c, d) = matrix
    return (a * k, b * k), (c * k, d * k)


def positive_number(value: Any) -> bool:
    """Whether ``value`` is a finite real number > 0 (a numpy one too; not a bool)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and 0 < float(value) < math.inf)


def largest_gap_frames(gap_penalty: float) -> int:
    """The largest ``max_gap_frames`` with ``gap_penalty * max_gap_frames < 1`` (a track that
    missed ``1 / gap_penalty`` frames could never link: its cost is never negative)."""
    if gap_penalty <= 0:
        raise ValueError("any max_gap_frames is allowed without a gap penalty")
    frames = max(math.ceil(1.0 / gap_penalty) - 1, 0)
    while gap_penalty * (frames + 1) < 1:  # float rounding of 1 / gap_penalty
        frames += 1
    while frames and gap_penalty * frames >= 1:
        frames -= 1
    return frames


@dataclass(frozen=True)
class TrackerParams:
    """Linking, gap-closing and division parameters (lengths in pixels)."""

    max_distance_px: float = 20.0
    max_gap_frames: int = 3
    gap_penalty: float = 0.25
    area_weight: float = 0.0
    division: bool = True
    division_distance_px: float | None = None  # None: max_distance_px
    division_area_ratio: tuple[float, float] = (0.3, 1.6)
    daughter_area_similarity: float = 0.4
    division_intensity_ratio: float | None = 0.9

    def __post_init__(self) -> None:
        lo, hi = self.division_area_ratio
        if self.max_distance_px <= 0:
            raise ValueError(f"max_distance_px must be > 0, got {self.max_distance_px}")
        if self.max_gap_frames < 0:
            raise ValueError(f"max_gap_frames must be >= 0, got {self.max_gap_frames}")
        if self.gap_penalty < 0 or self.area_weight < 0:
            raise ValueError("gap_penalty and area_weight must be >= 0")
        if self.gap_penalty * self.max_gap_frames >= 1:
            raise ValueError(
                f"gap_penalty * max_gap_frames must be < 1 (a track that missed 1/gap_penalty "
                f"frames can never link), got {self.gap_penalty} * {self.max_gap_frames}: give "
                f"max_gap_frames at most {largest_gap_frames(self.gap_penalty)} or gap_penalty "
                f"below {1 / self.max_gap_frames:.4g}")
        if self.division_distance_px is not None and self.division_distance_px <= 0:
            raise ValueError(f"division_distance_px must be > 0, got {self.division_distance_px}")
        if not 0 < lo < hi:
            raise ValueError(f"division_area_ratio must be (low, high) with 0 < low < high, "
                             f"got {self.division_area_ratio}")
        if not 0 <= self.daughter_area_similarity <= 1:
            raise ValueError("daughter_area_similarity must be in [0, 1]")
        if self.division_intensity_ratio is not None and self.division_intensity_ratio <= 0:
            raise ValueError("division_intensity_ratio must be > 0 (or None: not used)")

    @property
    def division_radius_px(self) -> float:
        """The division search radius (``division_distance_px`` or ``max_distance_px``)."""
        return self.division_distance_px or self.max_distance_px


@dataclass
class TrackStep:
    """What one :meth:`Tracker.update` decided, per object of the frame (input order)."""

    track_ids: np.ndarray  # int64
    parent_ids: np.ndarray  # int64, -1 = no parent (not a daughter track)
    divisions: list[tuple[int, tuple[int, int]]]  # (parent track id, (daughter ids))
    active: int  # tracks alive after this frame, including those waiting in a gap


class _Ids:
    """Track id source (shared by the trackers of one acquisition: ids never repeat)."""

    def __init__(self) -> None:
        self.next = 1

    def take(self, n: int) -> np.ndarray:
        ids = np.arange(self.next, self.next + n, dtype=np.int64)
        self.next += n
        return ids


@dataclass
class _Tracks:
    """Structure-of-arrays state of the live tracks."""

    ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    parent: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    yx: np.ndarray = field(default_factory=lambda: np.empty((0, 2)))
    area: np.ndarray = field(default_factory=lambda: np.empty(0))
    # mean intensity in the last _MEMORY frames the track was seen (newest first; NaN: none)
    intensity: np.ndarray = field(default_factory=lambda: np.empty((0, _MEMORY)))
    last_t: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    missed: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    def __len__(self) -> int:
        return int(self.ids.size)


_EMPTY_I = np.empty(0, np.intp)
_MEMORY = 3  # frames of intensity history a parent is compared with


class Tracker:
    """Online linker of one image stream (one stage position). Not thread-safe."""

    def __init__(self, params: TrackerParams | None = None, *, ids: _Ids | None = None) -> None:
        self.params = params or TrackerParams()
        self._ids = ids or _Ids()
        self._tracks = _Tracks()
        self._last_t: int | None = None
        #: The frame id of the frame linked last, where the caller gives one
        #: (:meth:`PositionTrackers.apply`: the clock of frames without ``t``)
        self.last_frame_id: int | None = None

    @property
    def last_t(self) -> int | None:
        """The time point of the frame linked last (None before the first)."""
        return self._last_t

    def __len__(self) -> int:
        """Live tracks (seen in the last frame or waiting in a gap)."""
        return len(self._tracks)

    def reset(self) -> None:
        """Forget every track (ids keep counting up)."""
        self._tracks = _Tracks()
        self._last_t = None
        self.last_frame_id = None

    # ------------------------------------------------------------------ update
    def update(
        self,
        centroids_yx: Any,
        areas: Any,
        t: int | None = None,
        intensities: Any = None,
    ) -> TrackStep:
        """Link one frame's objects (centroids (n, 2) in px, areas (n,) in px) at time ``t``.

        ``t`` is the time-point index (MDA ``t``); it may jump (frames that skipped analysis);
        None means the frame after the last one. A ``t`` at or before the last (a feedback
        burst's frames share their trigger's; a frame without ``t`` in a planned stream can
        run ahead of its next ``t``) is linked as one time point on. ``intensities`` (mean
        intensity per object) feed the division intensity rule; without them it is skipped.
        """
        yx = np.asarray(centroids_yx, dtype=np.float64).reshape(-1, 2)
        area = np.asarray(areas, dtype=np.float64).reshape(-1)
        if yx.shape[0] != area.size:
            raise ValueError(f"{yx.shape[0]} centroids but {area.size} areas")
        if intensities is None:
            inten = np.full(area.size, np.nan)
        else:
            inten = np.asarray(intensities, dtype=np.float64).reshape(-1)
            if inten.size != area.size:
                raise ValueError(f"{area.size} objects but {inten.size} intensities")
        if t is None:
            t = 0 if self._last_t is None else self._last_t + 1
        t = int(t)
        self._last_t = t
        p = self.params
        tr = self._tracks
        n = area.size
        dt = np.maximum(t - tr.last_t, 1).astype(np.float64)
        radius = p.max_distance_px * np.sqrt(dt)

        track_of_obj = np.full(n, -1, np.intp)  # index into tr, -1 = birth
        if len(tr) and n:
            ti, oj = self._link(yx, area, radius)
            track_of_obj[oj] = ti

        # new ids for births; linked objects keep their track's id and parent
        track_ids = np.empty(n, np.int64)
        parent_ids = np.full(n, -1, np.int64)
        linked = track_of_obj >= 0
        track_ids[linked] = tr.ids[track_of_obj[linked]]
        parent_ids[linked] = tr.parent[track_of_obj[linked]]

        divisions: list[tuple[int, tuple[int, int]]] = []
        ended = np.zeros(len(tr), bool)  # parents that divided
        daughter = np.zeros(n, bool)
        births = np.flatnonzero(~linked)
        if p.division and births.size and len(tr):
            for parent, *pair in self._divisions(yx, area, inten, track_of_obj, births, dt):
                a, b = sorted(pair)  # daughter ids follow the objects' order
                ended[parent] = True
                track_of_obj[[a, b]] = -1  # a sister that continued the parent starts anew
                daughter[[a, b]] = True
                pid = int(tr.ids[parent])
                parent_ids[[a, b]] = pid
                new = self._ids.take(2)
                track_ids[[a, b]] = new
                divisions.append((pid, (int(new[0]), int(new[1]))))
        if divisions:  # a division ends its parent: an object it linked to starts anew
            orphans = np.flatnonzero(track_of_obj >= 0)
            orphans = orphans[ended[track_of_obj[orphans]]]
            track_of_obj[orphans] = -1
            parent_ids[orphans] = -1
        fresh = np.flatnonzero((track_of_obj < 0) & ~daughter)
        track_ids[fresh] = self._ids.take(fresh.size)

        # bookkeeping: linked tracks move on, missing ones wait, old and divided ones go
        seen = np.zeros(len(tr), bool)
        cont = track_of_obj >= 0
        seen[track_of_obj[cont]] = True
        missed = tr.missed + ~seen
        keep = ~seen & ~ended & (missed <= p.max_gap_frames)
        objs_cont = np.flatnonzero(cont)
        objs_new = np.flatnonzero(~cont)
        order = np.concatenate([objs_cont, objs_new])
        t_keep = np.flatnonzero(keep)
        history = np.full((order.size, _MEMORY), np.nan)
        history[:, 0] = inten[order]
        history[: objs_cont.size, 1:] = tr.intensity[track_of_obj[objs_cont], :-1]
        self._tracks = _Tracks(
            ids=np.concatenate([track_ids[order], tr.ids[t_keep]]),
            parent=np.concatenate([parent_ids[order], tr.parent[t_keep]]),
            yx=np.concatenate([yx[order], tr.yx[t_keep]]),
            area=np.concatenate([area[order], tr.area[t_keep]]),
            intensity=np.concatenate([history, tr.intensity[t_keep]]),
            last_t=np.concatenate([np.full(n, t, np.int64), tr.last_t[t_keep]]),
            missed=np.concatenate([np.zeros(n, np.int64), missed[t_keep]]),
        )
        return TrackStep(track_ids, parent_ids, divisions, len(self._tracks))

    def _link(
        self, yx: np.ndarray, area: np.ndarray, radius: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Optimal one-to-one links: (track indices, object indices)."""
        p, tr = self.params, self._tracks
        pairs = cKDTree(tr.yx).sparse_distance_matrix(
            cKDTree(yx), float(radius.max()), output_type="ndarray"
        )
        if pairs.size == 0:
            return _EMPTY_I, _EMPTY_I
        ti = pairs["i"].astype(np.intp)
        oj = pairs["j"].astype(np.intp)
        cost = (pairs["v"] / radius[ti]) ** 2 - 1.0
        if p.area_weight:
            ratio = area[oj] / np.maximum(tr.area[ti], 1e-9)
            cost += p.area_weight * np.abs(np.log(np.maximum(ratio, 1e-9)))
        if p.gap_penalty:
            cost += p.gap_penalty * tr.missed[ti]
        ok = cost < 0
        ti, oj, cost = ti[ok], oj[ok], cost[ok]
        if ti.size == 0:
            return _EMPTY_I, _EMPTY_I
        return _assign(ti, oj, cost)

    def _divisions(
        self,
        yx: np.ndarray,
        area: np.ndarray,
        inten: np.ndarray,
        track_of_obj: np.ndarray,
        births: np.ndarray,
        dt: np.ndarray,
    ) -> list[tuple[int, int, int]]:
        """Accepted splits as (parent track index, daughter object, daughter object)."""
        p, tr = self.params, self._tracks
        reach = p.division_radius_px * np.sqrt(dt)  # per track
        obj_of_track = np.full(len(tr), -1, np.intp)
        cont = track_of_obj >= 0
        obj_of_track[track_of_obj[cont]] = np.flatnonzero(cont)
        lo, hi = p.division_area_ratio
        similar = p.daughter_area_similarity
        max_int = p.division_intensity_ratio
        # brightest recent view of each track (mitotic chromatin is condensed and bright)
        with np.errstate(invalid="ignore"):
            peak = np.fmax.reduce(tr.intensity, axis=1) if len(tr) else np.empty(0)
        peak_l: list[float] = peak.tolist()
        inten_l: list[float] = inten.tolist()
        # births within reach of each track (reach differs per track)
        near = cKDTree(yx[births]).query_ball_point(tr.yx, reach)
        yx_l: list[list[float]] = yx.tolist()
        area_l: list[float] = area.tolist()
        candidates: list[tuple[float, int, int, int]] = []
        for k in np.flatnonzero([len(b) > 0 for b in near]).tolist():
            objs = [int(births[i]) for i in near[k]]
            py, px = tr.yx[k].tolist()
            r_k = float(reach[k])
            linked_to = int(obj_of_track[k])  # the object this track just linked to, if near
            if linked_to >= 0 and math.hypot(yx_l[linked_to][0] - py,
                                             yx_l[linked_to][1] - px) <= r_k:
                objs.append(linked_to)
            if len(objs) < 2:
                continue
            pa = float(tr.area[k])
            p_int = peak_l[k]
            check_int = max_int is not None and p_int == p_int and p_int > 0  # not NaN
            for i, a in enumerate(objs):
                ra = area_l[a] / pa
                if not lo <= ra <= hi:
                    continue
                for b in objs[i + 1 :]:
                    rb = area_l[b] / pa
                    if not lo <= rb <= hi or min(ra, rb) < similar * max(ra, rb):
                        continue
                    my = 0.5 * (yx_l[a][0] + yx_l[b][0])
                    mx = 0.5 * (yx_l[a][1] + yx_l[b][1])
                    off = math.hypot(my - py, mx - px)
                    if off > 0.5 * r_k:
                        continue
                    if check_int and max_int is not None:
                        i_ab = 0.5 * (inten_l[a] + inten_l[b])
                        if i_ab == i_ab and i_ab > max_int * p_int:
                            continue
                    candidates.append((off / r_k, k, a, b))
        accepted: list[tuple[int, int, int]] = []
        used_tracks: set[int] = set()
        used_objs: set[int] = set()
        for _, k, a, b in sorted(candidates):
            if k in used_tracks or a in used_objs or b in used_objs:
                continue
            used_tracks.add(k)
            used_objs.update((a, b))
            accepted.append((k, a, b))
        return accepted


def _assign(ti: np.ndarray, oj: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one links among candidate pairs (all costs < 0; 0: not linked).

    Isolated one-to-one pairs link at once. The rest go to ``linear_sum_assignment`` in one
    matrix when it has at most ``_DENSE_MAX`` rows and columns; a larger one is cut into the
    connected components of the candidate graph (the optimum of a block-diagonal problem is
    the union of the blocks' optima), so the time grows with the crowding, not with the
    number of ambiguous pairs squared; unless at most ``_FALLBACK_MAX`` are ambiguous and one
    component holds nearly all of them (a crowded field of a few hundred objects: cutting
    gains nothing and costs its fixed ~1 ms; for more, solving that one component alone is
    still faster than one matrix of them all).
    """
    row_n = np.bincount(ti)
    col_n = np.bincount(oj)
    alone = (row_n[ti] == 1) & (col_n[oj] == 1)
    out_t, out_o = [ti[alone]], [oj[alone]]
    rest = ~alone
    if rest.any():
        rows, r_inv = np.unique(ti[rest], return_inverse=True)
        cols, c_inv = np.unique(oj[rest], return_inverse=True)
        cut = None
        if max(rows.size, cols.size) > _DENSE_MAX:
            cut = _assign_components(r_inv, c_inv, cost[rest], rows.size, cols.size)
        if cut is None:
            sub = np.zeros((rows.size, cols.size))
            sub[r_inv, c_inv] = cost[rest]
            ri, ci = linear_sum_assignment(sub)
            hit = sub[ri, ci] < 0
            ri, ci = ri[hit], ci[hit]
        else:
            ri, ci = cut
        out_t.append(rows[ri])
        out_o.append(cols[ci])
    return np.concatenate(out_t), np.concatenate(out_o)


_DENSE_MAX = 256  # ambiguous tracks or objects solved in one matrix (faster below ~300)
# one matrix after all for at most this many ambiguous tracks or objects of which one
# component holds this share (reviews: 300-600 such objects, 1.1-2x faster; at 8,000 with
# 60-87 % in one component, solving it alone was 1.5-5x faster than one matrix)
_FALLBACK_MAX = 1000
_FALLBACK_SHARE = 0.9
_BRUTE_MAX = 4  # components up to this many rows and columns: all permutations (24 at 4)
_PERMS = {k: np.array(list(permutations(range(k))), np.intp) for k in range(1, _BRUTE_MAX + 1)}


def _assign_components(
    r_inv: np.ndarray, c_inv: np.ndarray, cost: np.ndarray, nr: int, nc: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Optimal links (rows, columns) of an ``nr x nc`` sparse problem, per connected component;
    None where the problem is small and one component has nearly all of it (one matrix is
    faster then: :data:`_FALLBACK_MAX`).

    Components of up to ``_BRUTE_MAX`` rows and columns (nearly all) are solved together by
    trying every permutation (vectorised), larger ones by ``linear_sum_assignment`` each.
    """
    graph = csr_matrix((np.ones(cost.size, bool), (r_inv, nr + c_inv)), shape=(nr + nc,) * 2)
    n_comp, label = connected_components(graph, directed=False)
    r_comp, c_comp = label[:nr], label[nr:]
    size = np.maximum(np.bincount(r_comp, minlength=n_comp), np.bincount(c_comp, minlength=n_comp))
    if max(nr, nc) <= _FALLBACK_MAX and size.max() >= _FALLBACK_SHARE * max(nr, nc):
        return None
    r_rank, c_rank = _rank_in_group(r_comp), _rank_in_group(c_comp)
    e_comp = r_comp[r_inv]
    out_r: list[np.ndarray] = [_EMPTY_I]
    out_c: list[np.ndarray] = [_EMPTY_I]
    for k in np.unique(size).tolist():  # components of k rows or columns, together
        comps = np.flatnonzero(size == k)
        batch = np.full(n_comp, -1, np.intp)
        batch[comps] = np.arange(comps.size)
        edges = np.flatnonzero(batch[e_comp] >= 0)
        cube = np.zeros((comps.size, k, k))
        cube[batch[e_comp[edges]], r_rank[r_inv[edges]], c_rank[c_inv[edges]]] = cost[edges]
        row_of = np.full((comps.size, k), -1, np.intp)
        col_of = np.full((comps.size, k), -1, np.intp)
        in_r = np.flatnonzero(batch[r_comp] >= 0)
        in_c = np.flatnonzero(batch[c_comp] >= 0)
        row_of[batch[r_comp[in_r]], r_rank[in_r]] = in_r
        col_of[batch[c_comp[in_c]], c_rank[in_c]] = in_c
        b, ri, ci = _solve_cube(cube)
        out_r.append(row_of[b, ri])
        out_c.append(col_of[b, ci])
    return np.concatenate(out_r), np.concatenate(out_c)


def _rank_in_group(group: np.ndarray) -> np.ndarray:
    """Each element's position among the elements of its group (in index order)."""
    order = np.argsort(group, kind="stable")
    sorted_group = group[order]
    start = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    first = np.repeat(start, np.diff(np.r_[start, group.size]))
    rank = np.empty(group.size, np.intp)
    rank[order] = np.arange(group.size) - first
    return rank


def _solve_cube(cube: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal links of a stack of (k, k) cost matrices (0: not linked): (matrix, row, col)."""
    n, k, _ = cube.shape
    if k <= _BRUTE_MAX:
        perms = _PERMS[k]  # (P, k): row i links column perm[i]
        totals = cube[:, np.arange(k), perms].sum(axis=2)  # (n, P)
        ci = perms[np.argmin(totals, axis=1)]  # (n, k)
        b = np.repeat(np.arange(n), k)
        ri = np.tile(np.arange(k), n)
        ci = ci.reshape(-1)
    else:
        found = [linear_sum_assignment(m) for m in cube]
        b = np.repeat(np.arange(n), [r.size for r, _ in found])
        ri = np.concatenate([r for r, _ in found])
        ci = np.concatenate([c for _, c in found])
    hit = cube[b, ri, ci] < 0
    return b[hit], ri[hit], ci[hit]


class PositionTrackers:
    """One :class:`Tracker` per image stream, with ids unique across all of them.

    A stream is the MDA position index ``p`` (or, without one, the stage position rounded
    to ``position_grid_um``) together with every other index key but ``t``: the grid tile
    ``g``, the channel ``c``, the plane ``z``, the feedback action ``fb`` and any key of a
    client's own (``ext``) when the index has them (each action's or client burst's frames
    are a stream of their own: another channel, plane or a centred field), and the frame's
    pixel geometry (:func:`frame_geometry`) when given: after a binning, objective or camera
    ROI change the same place is a new stream, whose objects get new track ids. At most
    ``max_positions`` streams are kept; the least recently used goes first (with a warning,
    once, when it still had live tracks).
    """

    def __init__(
        self,
        params: TrackerParams | None = None,
        *,
        max_positions: int = 4096,
        position_grid_um: float = 5.0,
    ) -> None:
        if max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        self.params = params or TrackerParams()
        self.max_positions = max_positions
        self.position_grid_um = position_grid_um
        self._ids = _Ids()
        self._trackers: OrderedDict[Hashable, Tracker] = OrderedDict()
        self._pixel_sizes = StreamPixelSizes(max(4096, max_positions))
        #: Streams dropped while they still had live tracks (their objects get new ids).
        self.dropped_live = 0

    @classmethod
    def from_config(cls, cfg: TrackingConfig) -> PositionTrackers:
        """Trackers for the service's ``tracking:`` config section."""
        params = TrackerParams(
            max_distance_px=cfg.max_distance_px,
            max_gap_frames=cfg.max_gap_frames,
            gap_penalty=cfg.gap_penalty,
            area_weight=cfg.area_weight,
            division=cfg.division,
            division_distance_px=cfg.division_distance_px,
            division_area_ratio=cfg.division_area_ratio,
            daughter_area_similarity=cfg.daughter_area_similarity,
            division_intensity_ratio=cfg.division_intensity_ratio,
        )
        return cls(params, max_positions=cfg.max_positions)

    def __len__(self) -> int:
        """Streams with a tracker."""
        return len(self._trackers)

    def reset(self) -> None:
        """Drop every tracker; ids start again at 1 (call when an acquisition starts)."""
        self._trackers.clear()
        self._ids = _Ids()
        self._pixel_sizes.clear()
        self.dropped_live = 0

    def key(
        self,
        index: Mapping[str, int],
        position: Mapping[str, float | None],
        geometry: Hashable = None,
    ) -> Hashable:
        """The stream a frame belongs to: its position ``p`` (else its stage position) and
        every other index key but ``t``: grid tile ``g`` (a grid plan inside a position images
        other fields), channel ``c``, plane ``z``, the feedback action ``fb`` that took it
        and keys of a client's own (``ext``), as ``publish.frame_every``'s streams; and its
        pixel ``geometry`` (:func:`frame_geometry`; None: not told)."""
        if "p" in index:
            where: Hashable = ("p", int(index["p"]))
        else:
            grid = self.position_grid_um
            x, y = position.get("x_um"), position.get("y_um")
            where = (
                "xy",
                None if x is None else round(float(x) / grid),
                None if y is None else round(float(y) / grid),
            )
        rest = tuple(sorted(
            (str(k), int(v)) for k, v in index.items() if k not in (TIME_AXIS, "p")
        ))
        if isinstance(geometry, tuple) and len(geometry) == 3:
            geometry = self._pixel_sizes.geometry((where, rest), geometry)
        return (where, rest, geometry)

    def tracker(self, key: Hashable) -> Tracker:
        """The tracker of stream ``key`` (created on first use)."""
        tracker = self._trackers.get(key)
        if tracker is None:
            tracker = self._trackers[key] = Tracker(self.params, ids=self._ids)
            while len(self._trackers) > self.max_positions:
                _, dropped = self._trackers.popitem(last=False)
                if len(dropped):
                    self._warn_dropped()
        else:
            self._trackers.move_to_end(key)
        return tracker

    def _warn_dropped(self) -> None:
        self.dropped_live += 1
        if self.dropped_live == 1:
            log.warning(
                "tracking: more than tracking.max_positions (%d) streams (positions x grid "
                "tiles x channels x planes, each feedback action and each client key such "
                "as ext apart) are imaged; the least recently used stream is "
                "dropped with its live tracks, so its objects get new track ids when it is "
                "imaged again. Raise tracking.max_positions to at least the number of streams",
                self.max_positions)

    def apply(
        self,
        objects: list[dict[str, Any]],
        summary: dict[str, Any],
        *,
        index: Mapping[str, int],
        position: Mapping[str, float | None] | None = None,
        frame_id: int | None = None,
        exposure_ms: float | None = None,
        geometry: Hashable = None,
    ) -> TrackStep:
        """Track one frame's measurements in place.

        Adds ``track_id`` and ``parent_track_id`` (None unless the track is a daughter) to
        every object dict and ``divisions`` (``[{"parent": id, "children": [a, b]}]``) and
        ``tracks_active`` to ``summary``. The time point is ``index["t"]``; without one, the
        stream's last time point + the frames since its last frame (``frame_id``s; +1 where
        not given): frames that skipped analysis count, and a frame without ``t`` in a
        planned stream (an enqueued event without an index shares the stream at its
        position) is one time point on, where its frame id alone, another clock, made its
        ``dt`` and search radius huge.
        The division intensity rule gets :func:`signal_intensities` (``exposure_ms``: the
        frame's camera exposure, when known). ``geometry``: the frame's
        :func:`frame_geometry` (part of its stream's key).
        """
        tracker = self.tracker(self.key(index, position or {}, geometry))
        t = index.get(TIME_AXIS)
        if t is None and tracker.last_t is not None:
            since = (1 if frame_id is None or tracker.last_frame_id is None
                     else frame_id - tracker.last_frame_id)
            t = tracker.last_t + max(1, since)
        tracker.last_frame_id = frame_id
        if objects:
            yx = np.array([o["centroid_yx"] for o in objects], dtype=np.float64)
            area = np.array([o["area_px"] for o in objects], dtype=np.float64)
            inten = signal_intensities(objects, summary, exposure_ms)
        else:
            yx, area, inten = np.empty((0, 2)), np.empty(0), np.empty(0)
        step = tracker.update(yx, area, t, inten)
        for obj, tid, pid in zip(
            objects, step.track_ids.tolist(), step.parent_ids.tolist(), strict=True
        ):
            obj["track_id"] = tid
            obj["parent_track_id"] = pid if pid >= 0 else None
        summary["divisions"] = [
            {"parent": parent, "children": list(children)} for parent, children in step.divisions
        ]
        summary["tracks_active"] = step.active
        return step


def signal_intensities(
    objects: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    exposure_ms: float | None = None,
) -> np.ndarray:
    """Each object's mean intensity above the background, for the division intensity rule.

    ``mean_intensity`` less the object's ``local_background``, else less the frame's
    ``background_mean``, else raw (neither known); per ms of ``exposure_ms`` when it is
    given (> 0). A ratio of raw means depends on the camera offset and the background
    (daughters with half of a parent's 200 ADU signal over an offset of 1000 ADU have 92 %
    of its raw mean), and of means at different exposures on the exposure. NaN where no
    mean is known. (Feedback's ``signal`` feature is this, without ``exposure_ms``.) A value
    that is not a number (None, a bool) counts as unknown.
    """
    mean = np.array([_number(o.get("mean_intensity")) for o in objects], dtype=np.float64)
    local = np.array([_number(o.get("local_background")) for o in objects], dtype=np.float64)
    frame_bg = _number(summary.get("background_mean"))
    fallback = frame_bg if math.isfinite(frame_bg) else 0.0
    signal = mean - np.where(np.isfinite(local), local, fallback)
    if exposure_ms is not None and exposure_ms > 0:
        signal /= float(exposure_ms)
    return signal


def _number(value: Any) -> float:
    """``value`` as a float; NaN where it is not a number (None, a bool, text)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return math.nan
