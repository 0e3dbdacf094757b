"""What a rule sees of one analysed frame, and the per-object features it can test.

:class:`FrameContext` is built once per analysed frame from the published measurements.
:class:`FeatureTracker` adds derived per-object features, some relative to the frame
(``area_rel``, ``mean_intensity_rel``) and some relative to the previous frame of the same
stream, i.e. stage position, grid tile, channel, plane and pixel geometry
(``mean_intensity_change``, ``area_change`` and their product ``integrated_change``, the
ratio of background-subtracted integrated intensities; intensities relative to each frame's
median object signal), pairing objects by nearest centroid (within ``match_radius_px``,
one-to-one: objects that share their nearest previous object, e.g. a merge that splits, get
none). The pixel geometry is the pixel size, camera ROI offset and image shape: after a
binning, objective or ROI change a stream starts again, with no previous frame. Pure
numpy/scipy.

:func:`read_only_copy` copies a message into :class:`ReadOnlyDict` / :class:`ReadOnlyList`
(dicts and lists that refuse changes): what user rules are given
(:meth:`FrameContext.read_only_view`), so that they cannot change the recorded message.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, SupportsIndex, TypeVar, cast

import numpy as np
from scipy.spatial import cKDTree

from livemask.analysis.tracking import (
    StreamPixelSizes,
    camera_roi_offset,
    frame_geometry,
    signal_intensities,
)

_T = TypeVar("_T")

#: Index key that marks frames produced by feedback actions (value: the action id).
FEEDBACK_INDEX_KEY = "fb"

#: A previous object larger than this multiple of its frame's median area is taken for two
#: nuclei segmented as one, and is no baseline for the ``*_change`` features.
MERGED_AREA_REL = 1.8

#: Raw numeric object fields of the measurements table usable as features.
RAW_FEATURES = (
    "label",
    "area_px",
    "area_um2",
    "mean_intensity",
    "integrated_intensity",
    "local_background",
    "corrected_intensity",
    "equivalent_diameter_um",
    "eccentricity",
    "saturated_px",
    "track_id",  # (with tracking on: tracking.enabled)
    "parent_track_id",  # (with tracking on: the mother's track, or none)
)
#: Features an object has only where tracking is on (a target without tracking has none).
TRACK_FEATURES = ("track_id", "parent_track_id")
#: Derived features added by :class:`FeatureTracker`.
DERIVED_FEATURES = (
    "centroid_y",
    "centroid_x",
    "signal",
    "area_rel",
    "mean_intensity_rel",
    "edge_distance_px",
    "centre_distance_px",
    "mean_intensity_change",
    "area_change",
    "integrated_change",
)
FEATURES = RAW_FEATURES + DERIVED_FEATURES


@dataclass
class FrameContext:
    """One analysed frame as the rules see it."""

    frame_id: int
    index: Mapping[str, int]  # MDA event index, e.g. {"t": 3, "p": 1}; feedback frames: "fb"
    position: Mapping[str, float | None]  # x_um, y_um, z_um of the frame's event
    t: Mapping[str, float]  # stage timestamps (epoch s): acquired, ..., published
    summary: Mapping[str, Any]
    objects: Sequence[Mapping[str, Any]]
    measurements: Mapping[str, Any] = field(default_factory=dict)  # the whole message
    image_shape: tuple[int, int] = (0, 0)
    pixel_size_um: float = 1.0
    features: list[dict[str, float | None]] = field(default_factory=list)  # per object
    #: (row, col) offset of the frame's camera ROI (its ``settings.roi``; (0, 0) for a frame
    #: without one), None where the camera did not give it (``roi`` null)
    roi_offset_yx: tuple[int, int] | None = (0, 0)
    #: the camera ROI ``(offset_x, offset_y, width, height)`` in effect for the frames an
    #: action will take (set by the controller), None where not known: then every frame of
    #: the run has this frame's ROI
    action_roi: tuple[int, int, int, int] | None = None

    def aim_yx(self) -> tuple[float, float] | None:
        """Where centring aims, in this frame's pixels (row, col): the centre of
        :attr:`action_roi` placed by this frame's ROI offset; the frame's centre where
        ``action_roi`` is not known; None where not known (no image size, or a frame whose
        own ROI the camera did not give)."""
        if self.action_roi is None:
            h, w = self.image_shape
            return ((h - 1) / 2, (w - 1) / 2) if h > 0 and w > 0 else None
        if self.roi_offset_yx is None:
            return None
        (ty, tx), (x, y, width, height) = self.roi_offset_yx, self.action_roi
        return y - ty + (height - 1) / 2, x - tx + (width - 1) / 2

    @property
    def is_feedback(self) -> bool:
        """Whether a feedback action produced this frame."""
        return FEEDBACK_INDEX_KEY in self.index

    @property
    def acquired(self) -> float:
        """Acquisition time (epoch s)."""
        return float(self.t.get("acquired", 0.0))

    @property
    def position_key(self) -> str:
        """The stage position this frame counts for: ``p<i>`` or rounded ``x,y``."""
        return position_key(self.index, self.position.get("x_um"), self.position.get("y_um"))

    @property
    def stage_key(self) -> tuple[Any, ...]:
        """The stream for pairing objects across frames: the exact stage place (position
        index and x, y) and the frame's grid tile ``g``, channel ``c``, plane ``z`` and
        feedback action ``fb`` indices (as tracking's streams), so a channel or plane is
        compared only with itself, and an action's frames only with that action's; and its
        pixel geometry (:func:`~livemask.analysis.tracking.frame_geometry`: pixel size,
        camera ROI offset and image shape), so that pixel centroids and areas are compared
        only between frames whose pixels lie alike on the sample (not across a binning,
        objective or ROI change)."""
        x, y = self.position.get("x_um"), self.position.get("y_um")
        return (
            frame_geometry(self.pixel_size_um, self.roi_offset_yx, self.image_shape),
            self.index.get("p"),
            None if x is None else round(float(x), 2),
            None if y is None else round(float(y), 2),
            self.index.get("g"),
            self.index.get("c"),
            self.index.get("z"),
            self.index.get(FEEDBACK_INDEX_KEY),
        )

    def value(self, path: str) -> Any:
        """A value of the measurements message by dotted path (None if absent)."""
        node: Any = self.measurements
        for part in path.split("."):
            if isinstance(node, Mapping):
                node = node.get(part)
            elif isinstance(node, list | tuple) and part.lstrip("-").isdigit():
                i = int(part)
                node = node[i] if -len(node) <= i < len(node) else None
            else:
                return None
            if node is None:
                return None
        return node

    @classmethod
    def from_measurements(
        cls,
        message: Mapping[str, Any],
        image_shape: tuple[int, ...] | None = None,
        *,
        read_only: bool = False,
    ) -> FrameContext:
        """Build from a ``measurements`` message header (as published or received), of a
        frame of ``image_shape`` (rows, columns; default: the message's ``image_shape``,
        else (0, 0): unknown).

        The context holds the message as it is (``index`` ... ``summary`` and the list of
        ``objects`` are shallow copies of its parts). With ``read_only`` it holds a
        read-only copy of it instead (:func:`read_only_copy`), so that code that writes
        into ``objects``, ``summary`` or ``measurements`` raises instead of changing what
        is recorded and served: it costs a copy of the message on every frame, which the
        engine makes only for user rules (:meth:`read_only_view`)."""
        if read_only:
            view = read_only_copy(message)
            return cls._of(view, image_shape, index=view.get("index") or ReadOnlyDict(),
                           position=view.get("position") or ReadOnlyDict(),
                           t=view.get("t") or ReadOnlyDict(),
                           summary=view.get("summary") or ReadOnlyDict(),
                           objects=view.get("objects") or ReadOnlyList())
        return cls._of(message, image_shape, index=dict(message.get("index") or {}),
                       position=dict(message.get("position") or {}),
                       t=dict(message.get("t") or {}),
                       summary=dict(message.get("summary") or {}),
                       objects=list(message.get("objects") or []))

    @classmethod
    def _of(
        cls, message: Mapping[str, Any], image_shape: tuple[int, ...] | None, **parts: Any
    ) -> FrameContext:
        """A context of ``message`` with its ``parts`` (index, position, t, summary, objects)."""
        if image_shape is None:
            image_shape = _shape_of(message.get("image_shape"))
        return cls(
            frame_id=int(message.get("frame_id", -1)),
            measurements=message,
            image_shape=(int(image_shape[0]), int(image_shape[1])),
            pixel_size_um=float(message.get("pixel_size_um") or 1.0),
            **parts,
            **_camera_roi(message.get("settings")),
        )

    def read_only_view(self) -> FrameContext:
        """A copy of this context whose message (``measurements`` and the parts of it in
        ``index``, ``position``, ``t``, ``summary``, ``objects``) and ``features`` are
        read-only copies (:func:`read_only_copy`): what user rules are given. A part that
        is read-only already is kept as it is."""
        memo: dict[int, Any] = {}  # objects in both ``measurements`` and ``objects``: once
        return replace(
            self,
            measurements=read_only_copy(self.measurements, memo),
            index=read_only_copy(self.index, memo),
            position=read_only_copy(self.position, memo),
            t=read_only_copy(self.t, memo),
            summary=read_only_copy(self.summary, memo),
            objects=read_only_copy(self.objects, memo),
            features=_read_only_features(self.features),
        )


#: How the mutating operators are written, for the error message.
_SPELLED = {"__setitem__": "x[...] = ...", "__delitem__": "del x[...]", "__ior__": "|=",
            "__iadd__": "+=", "__imul__": "*="}


def _refusing(kind: str, name: str, copy_hint: str) -> Callable[..., NoReturn]:
    """A method ``name`` of a read-only ``kind`` that raises TypeError saying how to copy."""
    what = _SPELLED.get(name, f"{name}()")

    def refuse(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(
            f"{what} on a read-only {kind} x: rules are given a read-only copy of the "
            "frame's measurements and features (the service records and publishes them); "
            f"change a copy: {copy_hint}, or copy.deepcopy(x) to copy the values in it too"
        )

    refuse.__name__ = name
    return refuse


def _read_only(kind: str, copy_hint: str, *names: str) -> Callable[[type[_T]], type[_T]]:
    """Class decorator: each method in ``names`` raises TypeError (see :func:`_refusing`)."""

    def decorate(cls: type[_T]) -> type[_T]:
        for name in names:
            setattr(cls, name, _refusing(kind, name, copy_hint))
        return cls

    return decorate


@_read_only("dict", "dict(x)", "__setitem__", "__delitem__", "__ior__", "pop", "popitem",
            "clear", "update", "setdefault")
class ReadOnlyDict(dict[Any, Any]):
    """A ``dict`` whose mutating methods raise TypeError: a part of a message rules read
    (see :func:`read_only_copy`). It is a dict for everything else (``isinstance``, JSON,
    ``==``, ``|``, ``{**o}``); ``dict(o)``, ``o.copy()``, ``copy.copy`` and pickling give
    a plain dict, ``copy.deepcopy`` a plain dict of plain copies of its values."""

    __slots__ = ()

    def __copy__(self) -> dict[Any, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        memo[id(self)] = out
        for k, v in self.items():
            out[copy.deepcopy(k, memo)] = copy.deepcopy(v, memo)
        return out

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        return dict, (dict(self),)


@_read_only("list", "list(x)", "__setitem__", "__delitem__", "__iadd__", "__imul__",
            "append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse")
class ReadOnlyList(list[Any]):
    """A ``list`` whose mutating methods raise TypeError (see :class:`ReadOnlyDict`):
    ``list(x)``, ``x + [...]``, slices, ``copy.copy`` and pickling give a plain list,
    ``copy.deepcopy`` a plain list of plain copies."""

    __slots__ = ()

    def __copy__(self) -> list[Any]:
        return list(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        out: list[Any] = []
        memo[id(self)] = out
        out.extend(copy.deepcopy(v, memo) for v in self)
        return out

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        return list, (list(self),)


#: Value types :func:`read_only_copy` passes as they are.
_IMMUTABLE = frozenset({int, float, str, bool, type(None), ReadOnlyDict, ReadOnlyList})


def read_only_copy(value: Any, memo: dict[int, Any] | None = None) -> Any:
    """A read-only copy of a message value: each mapping a :class:`ReadOnlyDict` and each
    list a :class:`ReadOnlyList` (a tuple a tuple) of read-only copies of its values, each
    numpy array a read-only view of it (its data not copied); other values (and ones that
    are read-only already) as they are. ``memo`` (id -> copy): a mapping met again is
    copied once."""
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    if kind is dict:  # (the usual types first: isinstance of an ABC takes longer)
        return _read_only_mapping(value, memo)
    if kind is list or kind is tuple or isinstance(value, list | tuple):
        items = [v if type(v) in _IMMUTABLE else read_only_copy(v, memo) for v in value]
        return ReadOnlyList(items) if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        return _read_only_mapping(value, memo)
    if isinstance(value, np.ndarray):
        view = value.view()
        view.flags.writeable = False
        return view
    return value


def _read_only_features(features: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A read-only copy of per-object features (numbers and None only: a C copy each)."""
    if type(features) is ReadOnlyList:
        return features
    return ReadOnlyList([f if type(f) is ReadOnlyDict else ReadOnlyDict(f) for f in features])


def _read_only_mapping(value: Mapping[Any, Any], memo: dict[int, Any] | None) -> ReadOnlyDict:
    """:func:`read_only_copy` of a mapping: a (C) copy, then its values that can change
    replaced by read-only copies of them."""
    if memo is not None and (done := memo.get(id(value))) is not None:
        return cast(ReadOnlyDict, done)
    out = ReadOnlyDict(value)
    for k, v in value.items():
        if type(v) not in _IMMUTABLE:
            dict.__setitem__(out, k, read_only_copy(v, memo))
    if memo is not None:
        memo[id(value)] = out
    return out


def _shape_of(value: Any) -> tuple[int, int]:
    """A header's ``image_shape`` as (rows, columns); (0, 0) (unknown) where it has none or
    a malformed one (a message from before the field, or not the service's)."""
    if not (isinstance(value, list | tuple) and len(value) == 2 and all(
            isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in value)):
        return 0, 0
    rows, columns = int(value[0]), int(value[1])  # (numpy integers too: built in-process)
    return (rows, columns) if rows >= 0 and columns >= 0 else (0, 0)


def _camera_roi(settings: Any) -> dict[str, Any]:
    """``roi_offset_yx`` from a header's ``settings`` (:func:`camera_roi_offset`): (0, 0)
    without a ``roi``, the ``roi``'s ``(offset_y, offset_x)``, or None for a null or
    malformed one."""
    return {"roi_offset_yx": camera_roi_offset(settings)}


def position_key(index: Mapping[str, int], x_um: float | None, y_um: float | None) -> str:
    """``p<i>`` for planned position ``i``, else the rounded stage ``xy<x>,<y>`` (or ``here``).

    Limits and persistence are kept per key; feedback frames keep their trigger's ``p``.
    """
    p = index.get("p")
    if p is not None:
        return f"p{int(p)}"
    if x_um is None or y_um is None or not math.isfinite(float(x_um) + float(y_um)):
        return "here"  # (a stage that reads back NaN must not end the acquisition)
    return f"xy{round(float(x_um))},{round(float(y_um))}"


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)
    return out


@dataclass
class _Previous:
    centroids: np.ndarray  # (n, 2)
    signal: np.ndarray
    area: np.ndarray
    median_area: float


class FeatureTracker:
    """Computes per-object features; remembers the last frames seen of each stream.

    The ``*_change`` features compare an object with its *baseline*: its clean match in the
    most recent of the last ``baseline_frames`` frames of the same stream
    (:attr:`FrameContext.stage_key`) that has one (see :meth:`_changes`), so that one frame
    where the segmentation merged it with a neighbour does not hide a change; the first
    frame of a stream has none (the features are None). Intensities are taken relative to
    each frame's median object signal (``mean_intensity_rel``), so that global drift,
    bleaching and exposure changes cancel out.
    """

    def __init__(
        self, match_radius_px: float = 8.0, baseline_frames: int = 1, places: int = 4096
    ) -> None:
        """``places``: streams remembered at once (positions x tiles x channels x planes);
        the least recently seen is forgotten beyond."""
        self.match_radius_px = match_radius_px
        self.baseline_frames = max(1, int(baseline_frames))
        self._places = places
        self._previous: OrderedDict[tuple[Any, ...], deque[_Previous]] = OrderedDict()
        self._pixel_sizes = StreamPixelSizes(places)

    def reset(self) -> None:
        """Forget all previous frames (a new acquisition)."""
        self._previous.clear()
        self._pixel_sizes.clear()

    def _stream(self, ctx: FrameContext) -> tuple[Any, ...]:
        """``ctx.stage_key`` with the pixel size its stream keeps (within 1 %: a wobbling
        reading keeps one stream; :class:`~livemask.analysis.tracking.StreamPixelSizes`)."""
        geometry, *place = ctx.stage_key
        return (self._pixel_sizes.geometry(tuple(place), geometry), *place)

    def compute(self, ctx: FrameContext) -> list[dict[str, float | None]]:
        """Fill and return ``ctx.features`` (one dict per object, in table order)."""
        objs = ctx.objects
        n = len(objs)
        if n == 0:
            ctx.features = []
            self._remember(self._stream(ctx), np.zeros((0, 2)), np.zeros(0), np.zeros(0))
            return ctx.features
        cent = np.array([o.get("centroid_yx") or (math.nan, math.nan) for o in objs], float)
        area = np.array([float(o.get("area_px") or 0) for o in objs])
        signal = signal_intensities(objs, ctx.summary)  # above each object's background
        area_rel = _ratio(area, np.full(n, float(np.median(area))))
        finite = signal[np.isfinite(signal)]
        med_signal = float(np.median(finite)) if finite.size else math.nan
        intensity_rel = _ratio(signal, np.full(n, med_signal))
        h, w = ctx.image_shape
        if h > 0 and w > 0:
            edge = np.minimum.reduce(
                [cent[:, 0], cent[:, 1], h - 1 - cent[:, 0], w - 1 - cent[:, 1]]
            )
        else:
            edge = np.full(n, np.nan)
        axis = ctx.aim_yx()  # where centring aims: the action's frames' centre
        if axis is not None:
            centre = np.hypot(cent[:, 0] - axis[0], cent[:, 1] - axis[1])
        else:
            centre = np.full(n, np.nan)
        # changes are of the signal relative to the frame's median object signal, so that
        # global intensity drift, bleaching and exposure changes cancel out
        stream = self._stream(ctx)
        change_i, change_a, change_int = self._changes(stream, cent, intensity_rel, area)
        self._remember(stream, cent, intensity_rel, area)
        features: list[dict[str, float | None]] = []
        for k, o in enumerate(objs):
            f: dict[str, float | None] = {
                name: _raw(o.get(name)) for name in RAW_FEATURES
                if name in o or name not in TRACK_FEATURES}
            f.update(
                centroid_y=_opt(cent[k, 0]),
                centroid_x=_opt(cent[k, 1]),
                signal=_opt(signal[k]),
                area_rel=_opt(area_rel[k]),
                mean_intensity_rel=_opt(intensity_rel[k]),
                edge_distance_px=_opt(edge[k]),
                centre_distance_px=_opt(centre[k]),
                mean_intensity_change=_opt(change_i[k]),
                area_change=_opt(change_a[k]),
                integrated_change=_opt(change_int[k]),
            )
            features.append(f)
        ctx.features = features
        return features

    def _changes(
        self, key: tuple[Any, ...], cent: np.ndarray, signal: np.ndarray, area: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ratios of signal, area and integrated signal to each object's baseline.

        The baseline is the object's clean match in the most recent of the remembered
        frames that has one: nearest centroid within ``match_radius_px``, one-to-one, and
        not an oversized object (``area`` above ``MERGED_AREA_REL`` x that frame's median,
        most likely two nuclei segmented as one).
        """
        n = len(cent)
        frames = list(self._previous.get(key, ()))
        base_signal = np.full(n, np.nan)
        base_area = np.full(n, np.nan)
        ok = np.isfinite(cent).all(axis=1)
        current = cKDTree(cent[ok]) if ok.any() else None
        for prev in reversed(frames):  # most recent first
            if not len(prev.centroids) or current is None:
                continue
            tree = cKDTree(prev.centroids)
            dist, j = tree.query(cent[ok], distance_upper_bound=self.match_radius_px)
            hit = np.isfinite(dist)
            # one-to-one only: a previous object that two current objects claim, or that
            # has two current centroids within its own radius, was a merge that has split;
            # the objects it covers get no match in that frame
            claims = np.bincount(j[hit], minlength=len(prev.centroids))
            radius = np.maximum(np.sqrt(prev.area / np.pi), 1.0)
            covered = current.query_ball_point(prev.centroids, radius, return_length=True)
            clean = (claims <= 1) & (np.asarray(covered) <= 1)
            clean &= prev.area <= MERGED_AREA_REL * prev.median_area
            hit[hit] = clean[j[hit]]
            rows = np.flatnonzero(ok)[hit]
            jj = j[hit]
            todo = np.isnan(base_area[rows])  # keep matches found in more recent frames
            base_signal[rows[todo]] = prev.signal[jj[todo]]
            base_area[rows[todo]] = prev.area[jj[todo]]
        return (
            _ratio(signal, base_signal),
            _ratio(area, base_area),
            _ratio(signal * area, base_signal * base_area),
        )

    def _remember(
        self, key: tuple[Any, ...], cent: np.ndarray, signal: np.ndarray, area: np.ndarray
    ) -> None:
        ok = np.isfinite(cent).all(axis=1) if len(cent) else np.zeros(0, bool)
        frames = self._previous.get(key)
        if frames is None:
            frames = self._previous[key] = deque(maxlen=self.baseline_frames)
        median_area = float(np.median(area[ok])) if ok.any() else 0.0
        frames.append(_Previous(cent[ok], signal[ok], area[ok], median_area))
        self._previous.move_to_end(key)
        while len(self._previous) > self._places:
            self._previous.popitem(last=False)


def _raw(value: Any) -> float | None:
    """A column of the table as a feature: integers (``label``, ``area_px``) stay ints."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return _opt(value)


def _opt(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
