"""What a rule sees of one analysed frame, and the per-object features it can test.

:class:`FrameContext` is built once per analysed frame from the published measurements.
:class:`FeatureTracker` adds derived per-object features, some relative to the frame
(``area_rel``, ``mean_intensity_rel``) and some relative to the previous frame of the same
stream, i.e. stage position, grid tile, channel and plane (``mean_intensity_change``,
``area_change`` and their product ``integrated_change``, the ratio of background-subtracted
integrated intensities; intensities relative to each frame's median object signal), pairing
objects by nearest centroid (within ``match_radius_px``, one-to-one: objects that share their
nearest previous object, e.g. a merge that splits, get none). Pure numpy/scipy.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from livemask.analysis.tracking import signal_intensities

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
)
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
        compared only with itself, and an action's frames only with that action's."""
        x, y = self.position.get("x_um"), self.position.get("y_um")
        return (
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
        cls, message: Mapping[str, Any], image_shape: tuple[int, ...] = (0, 0)
    ) -> FrameContext:
        """Build from a ``measurements`` message header (as published or received).

        The context holds a read-only view of it (:func:`read_only`): the service records
        and serves the same message, so a rule that writes into ``objects``, ``summary`` or
        ``measurements`` raises (TypeError, AttributeError) instead of changing them."""
        view = read_only(message)
        return cls(
            frame_id=int(view.get("frame_id", -1)),
            index=view.get("index") or _EMPTY,
            position=view.get("position") or _EMPTY,
            t=view.get("t") or _EMPTY,
            summary=view.get("summary") or _EMPTY,
            objects=view.get("objects") or (),
            measurements=view,
            image_shape=(int(image_shape[0]), int(image_shape[1])),
            pixel_size_um=float(view.get("pixel_size_um") or 1.0),
            **_camera_roi(view.get("settings")),
        )


_EMPTY: Mapping[str, Any] = MappingProxyType({})
#: Value types :func:`read_only` passes as they are.
_IMMUTABLE = (int, float, str, bool, type(None))


def read_only(value: Any) -> Any:
    """A read-only view of a message value: each mapping a ``MappingProxyType`` (of a copy
    of its top level, holding the views of its values), each list or tuple a tuple of
    views, each numpy array a read-only view of it (its data not copied); other values as
    they are. ``dict(view)`` gives a (shallow) copy to change."""
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    if kind is dict or isinstance(value, Mapping):
        return MappingProxyType(
            {k: v if type(v) in _IMMUTABLE else read_only(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple([v if type(v) in _IMMUTABLE else read_only(v) for v in value])
    if kind is np.ndarray:
        view = value.view()
        view.flags.writeable = False
        return view
    return value


def _camera_roi(settings: Any) -> dict[str, Any]:
    """``roi_offset_yx`` from a header's ``settings``: none without a ``roi`` (the default,
    (0, 0)), the ``roi``'s ``(offset_y, offset_x)``, or None for a null or malformed one."""
    if not isinstance(settings, Mapping) or "roi" not in settings:
        return {}
    roi = settings.get("roi")
    if isinstance(roi, Mapping) and _counts(roi.get("offset_y"), roi.get("offset_x")):
        return {"roi_offset_yx": (int(roi["offset_y"]), int(roi["offset_x"]))}
    return {"roi_offset_yx": None}


def _counts(*values: Any) -> bool:
    """Whether every value is an int (not a bool) >= 0."""
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


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

    def reset(self) -> None:
        """Forget all previous frames (a new acquisition)."""
        self._previous.clear()

    def compute(self, ctx: FrameContext) -> list[dict[str, float | None]]:
        """Fill and return ``ctx.features`` (one dict per object, in table order)."""
        objs = ctx.objects
        n = len(objs)
        if n == 0:
            ctx.features = []
            self._remember(ctx.stage_key, np.zeros((0, 2)), np.zeros(0), np.zeros(0))
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
        change_i, change_a, change_int = self._changes(ctx.stage_key, cent, intensity_rel, area)
        self._remember(ctx.stage_key, cent, intensity_rel, area)
        features: list[dict[str, float | None]] = []
        for k, o in enumerate(objs):
            f: dict[str, float | None] = {name: _raw(o.get(name)) for name in RAW_FEATURES}
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
