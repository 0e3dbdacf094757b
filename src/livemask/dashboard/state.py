"""What the dashboard knows about the stream: pure bookkeeping, no sockets, no HTTP.

:class:`DashboardState` is fed decoded :class:`~livemask.protocol.Message` objects and
keeps what browsers are shown: a bounded history of per-frame summary points (for the
plots), the newest grain statistics, the newest status with frame rates derived from
consecutive heartbeats, the recent events as one-line summaries, and the newest few
``frame`` and ``labels`` messages, paired by ``frame_id`` when an image is sent.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import OrderedDict, deque
from pathlib import PurePath
from typing import Any

from livemask.protocol import Message

__all__ = ["DashboardState", "event_summary", "published_unit", "significant",
           "status_rates", "summary_point"]

#: Status fields not forwarded to browsers (large or of no use there).
_STATUS_DROP = ("units", "core", "t", "arrays", "v", "topic")
#: Event fields left out of the one-line text (large, or shown separately).
_EVENT_SKIP = {"v", "topic", "seq", "arrays", "t", "kind", "config", "units", "index",
               "position", "events", "sequence", "frame_id"}
_TEXT_MAX = 200
#: Frame rates are averaged over the status messages of about this many seconds.
RATE_WINDOW_S = 2.0
#: No status for this long, and for three of its usual intervals: the service is gone.
STALE_S = 3.0
#: The heartbeat interval assumed while neither the status says it (``heartbeat_s``) nor
#: an interval between two statuses has been measured (services publish every 1 s by
#: default; ``publish.heartbeat_s`` may be longer: no "silent" for those after one status).
UNKNOWN_HEARTBEAT_S = 5.0


def published_unit(units: Any, key: str, default: str) -> str:
    """The unit the service publishes for the measurement ``key`` (its status ``units``),
    without its note: ``"px²"`` for ``area_um2`` where the pixel size is not calibrated
    (the µm values are then pixel values); ``default`` where it does not say."""
    unit = units.get(key) if isinstance(units, dict) else None
    return unit.split(" (", 1)[0] if isinstance(unit, str) and unit else default


def summary_point(header: dict[str, Any]) -> list[Any]:
    """``[frame_id, t_acquired, count, mean_area_um2, mean_intensity, stream]`` of a
    measurements header (``mean_area_px`` when no µm² value; ``None`` for what is missing);
    ``stream`` (:func:`stream_label`) keeps the positions, channels and planes of a run
    apart in the plots."""
    summary = header.get("summary") or {}
    stamps = header.get("t") or {}
    t = stamps.get("acquired") or stamps.get("published") or time.time()
    area = summary.get("mean_area_um2")
    if area is None:
        area = summary.get("mean_area_px")
    return [header.get("frame_id"), round(float(t), 4), summary.get("count"),
            significant(area), significant(summary.get("mean_intensity")),
            stream_label(header.get("index"))]


def stream_label(index: Any) -> str:
    """The frame's stream as a short label: its MDA index keys but ``t`` and ``g``, e.g.
    ``"c1 p0"`` (``""`` for a time-lapse alone): frames of several positions, channels or
    planes are plotted as a series each, not as one zigzag; the tiles of a grid scan
    (``g``) are one series, not one per tile. Feedback actions' frames (``fb``, a number
    per action; they carry no ``c``) are one series per position (``"fb p1"``; and plane, for
    a Z-stack action's), not one per action."""
    if not isinstance(index, dict):
        return ""
    return " ".join(key if key == "fb" else f"{key}{value}"
                    for key, value in sorted(index.items()) if key not in ("t", "g"))


def significant(value: Any, digits: int = 6) -> float | None:
    """``value`` to ``digits`` significant digits (None when it is not a number): decimal
    places would round the intensities of float frames (0.00406) to nothing."""
    if not isinstance(value, int | float):
        return None
    return float(f"{float(value):.{digits}g}")


def status_rates(prev: dict[str, Any] | None, cur: dict[str, Any]) -> dict[str, float | None]:
    """Frames per second (acquired, analysed, skipped) between two status snapshots."""
    out: dict[str, float | None] = {"acquired_fps": None, "analysed_fps": None,
                                    "skipped_fps": None}
    if not prev:
        return out
    dt = float(cur.get("uptime_s") or 0.0) - float(prev.get("uptime_s") or 0.0)
    if dt <= 0:
        return out
    for key in ("acquired", "analysed", "skipped"):
        a, b = prev.get(f"frames_{key}"), cur.get(f"frames_{key}")
        if isinstance(a, int | float) and isinstance(b, int | float) and b >= a:
            out[f"{key}_fps"] = round((b - a) / dt, 2)
    return out


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"),
                                                           default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def event_summary(header: dict[str, Any]) -> dict[str, Any]:
    """A one-line, browser-sized view of an ``event`` message: ``{kind, t, text, level}``."""
    kind = str(header.get("kind", "?"))
    stamps = header.get("t") or {}
    t = stamps.get("sent") or stamps.get("published") or time.time()
    level = "error" if kind in ("error", "frame_failed", "acquisition_stalled") else (
        "warn" if kind in ("feedback_refused", "frame_missing") else "info")
    h = header
    if kind == "acquisition_started":
        n = h.get("events")
        text = f"{n if n is not None else 'unbounded'} events, {h.get('mode', '?')}"
        if h.get("enqueued") is not None:
            text = f"{h['enqueued']} enqueued events, {h.get('mode', '?')}"
    elif kind == "acquisition_finished":
        missing, not_run = h.get("frames_missing"), h.get("events_not_run")
        text = (f"after {h.get('duration_s', '?')} s"
                + (f", {missing} frames missing" if missing else "")
                + (f", {not_run} events not run" if not_run else "")
                + (f", error: {h['error']}" if h.get("error") else ""))
        level = "error" if h.get("error") else level
    elif kind == "feedback_action":
        action = h.get("action") or {}
        ms = h.get("reaction_ms")
        text = (f"rule {h.get('rule')!s}: {action.get('kind', '?')} on frame {h.get('frame_id')}"
                + (f", reaction {ms:.0f} ms" if isinstance(ms, int | float) else ""))
    elif kind == "feedback_refused":
        text = f"rule {h.get('rule')!s}: {h.get('reason') or h.get('limit') or 'refused'}"
    elif kind in ("error", "frame_failed"):
        text = str(h.get("detail", ""))
        if kind == "frame_failed" and h.get("frame_id") is not None:
            text = f"frame {h['frame_id']}: {text}"
    elif kind == "service_started":
        m = (h.get("config") or {}).get("model") or {}
        model = m.get("name") or (PurePath(str(m["path"])).stem if m.get("path") else None)
        text = f"model {model}" if model else "service started"
    else:
        text = ", ".join(f"{k}={_short(v)}" for k, v in h.items() if k not in _EVENT_SKIP)
    if len(text) > _TEXT_MAX:
        text = text[: _TEXT_MAX - 3] + "..."
    return {"kind": kind, "t": round(float(t), 3), "text": text, "level": level}


class DashboardState:
    """The dashboard's view of one livemask stream (see the module docstring)."""

    def __init__(self, *, history: int = 3000, events: int = 100, keep_frames: int = 8) -> None:
        self.series: deque[list[Any]] = deque(maxlen=history)
        # points not yet sent to browsers: bounded like the series, since nothing takes
        # them while no browser is connected (a day at 100 frames/s was 1.8 GB)
        self.pending: deque[list[Any]] = deque(maxlen=history)
        self.events: deque[dict[str, Any]] = deque(maxlen=events)
        self.status: dict[str, Any] | None = None
        self.status_at: float | None = None  # monotonic time the last status came
        # the last intervals between statuses (their smallest is the heartbeat; one spanning
        # an outage is not)
        self._status_gaps: deque[float] = deque(maxlen=5)
        self._stale_told_at: float | None = None  # when browsers were last told "silent"
        self.started_at = time.monotonic()  # (no status since: "waiting" after STALE_S)
        self.rates: dict[str, float | None] = status_rates(None, {})
        self.summary: dict[str, Any] | None = None
        self.grains: dict[str, Any] | None = None
        self.grains_changed = False
        self.measured_frame_id: int | None = None
        self.frames: OrderedDict[int, tuple[Message, float]] = OrderedDict()
        self.labels: OrderedDict[int, Message] = OrderedDict()
        self.last_image_id: int | None = None
        self.last_analysed_at = time.monotonic()
        self._keep = keep_frames
        self._rate_base: deque[dict[str, Any]] = deque(maxlen=256)
        self.restarted = False  # the service restarted; not yet told (take_restart)
        self._uptime_s = 0.0  # of the last status of this run: less in the next, a restart

    # ------------------------------------------------------------ intake
    def add(self, msg: Message) -> dict[str, Any] | None:
        """Take one message; returns a JSON message to push to browsers now, if any
        (``status`` and ``event``; measurements are batched by :meth:`update`)."""
        topic, header = msg.topic, msg.header
        if topic == "measurements":
            point = summary_point(header)
            self.series.append(point)
            self.pending.append(point)
            self.summary = header.get("summary")
            self.measured_frame_id = header.get("frame_id")
            if header.get("grains") is not None:
                self.grains = header["grains"]
                self.grains_changed = True
        elif topic == "status":
            cur = {k: v for k, v in header.items() if k not in _STATUS_DROP}
            units = header.get("units")  # (sizes in px where the pixel size is not known)
            cur["length_unit"] = published_unit(units, "equivalent_diameter_um", "µm")
            cur["area_unit"] = published_unit(units, "area_um2", "µm²")
            uptime = float(cur.get("uptime_s") or 0.0)
            if uptime < self._uptime_s:  # (service_started missed)
                sent = (header.get("t") or {}).get("sent")
                self._restart(started_at=float(sent) - uptime
                              if isinstance(sent, int | float) else None)
            self._uptime_s = uptime
            self.rates = status_rates(self._base_for(cur), cur)
            self._rate_base.append(cur)
            self.status = cur
            now = time.monotonic()
            if self.status_at is not None and now - self.status_at > 0.05:  # not 2 at once
                self._status_gaps.append(now - self.status_at)
            self.status_at, self._stale_told_at = now, None
            return self.status_message()
        elif topic == "event":
            if header.get("kind") == "service_started":
                self._restart()
            if header.get("kind") == "acquisition_started":
                self.grains = None  # cumulative statistics restart with the acquisition
                self.grains_changed = True
            ev = event_summary(header)
            self.events.append(ev)
            return {"type": "event", "event": ev}
        elif topic == "frame":
            self._keep_newest(self.frames, int(header["frame_id"]), (msg, time.monotonic()))
        elif topic == "labels":
            self._keep_newest(self.labels, int(header["frame_id"]), msg)
            self.last_analysed_at = time.monotonic()
        return None

    def _restart(self, started_at: float | None = None) -> None:
        """The service restarted: forget its old run. Frame ids start again at 0, so the
        kept frames must go (the newest id would pick them); its plot points, summary and
        grain statistics (maybe in other units) are not the new run's; the heartbeat may
        come at another interval. ``started_at`` (wall clock; known where a status showed
        the restart): points acquired since are the new run's and stay. :meth:`take_restart`
        tells it once."""
        self._rate_base.clear()
        self._status_gaps.clear()
        self.last_image_id = None
        self.reset_frames()
        new = [p for p in self.series if started_at is not None and p[1] >= started_at]
        self.series.clear()
        self.series.extend(new)
        kept = {id(p) for p in new}
        self.pending = deque((p for p in self.pending if id(p) in kept),
                             maxlen=self.pending.maxlen)
        if not new or self.measured_frame_id != new[-1][0]:
            self.summary = None
            self.measured_frame_id = None
        self.grains = None
        self.grains_changed = False
        self._uptime_s = 0.0  # (the new run's first status is no second restart)
        self.restarted = True

    def take_restart(self) -> bool:
        """Whether the service restarted since the last call (browsers then need a fresh
        :meth:`hello`)."""
        restarted, self.restarted = self.restarted, False
        return restarted

    def _base_for(self, cur: dict[str, Any]) -> dict[str, Any] | None:
        """The newest kept status at least ``RATE_WINDOW_S`` older than ``cur`` (the
        oldest kept one while none is that old yet)."""
        now = float(cur.get("uptime_s") or 0.0)
        base = self._rate_base
        while len(base) > 1 and now - float(base[1].get("uptime_s") or 0.0) >= RATE_WINDOW_S:
            base.popleft()
        return base[0] if base else None

    def _keep_newest(self, store: OrderedDict[int, Any], key: int, value: Any) -> None:
        store[key] = value
        store.move_to_end(key)
        while len(store) > self._keep:
            store.popitem(last=False)

    # ------------------------------------------------------------ output
    def heartbeat_s(self) -> float:
        """The service's status interval: as its status says (``heartbeat_s``), else the
        smallest of the last measured intervals, else :data:`UNKNOWN_HEARTBEAT_S`."""
        said = (self.status or {}).get("heartbeat_s")
        if isinstance(said, int | float) and not isinstance(said, bool) and said > 0:
            return float(said)
        return min(self._status_gaps, default=UNKNOWN_HEARTBEAT_S)

    def silent_s(self) -> float | None:
        """Seconds since the last status when the service has gone silent (no status for
        ``STALE_S`` and three of its intervals, :meth:`heartbeat_s`), else None."""
        if self.status_at is None:
            return None
        quiet = time.monotonic() - self.status_at
        return quiet if quiet > max(STALE_S, 3 * self.heartbeat_s()) else None

    def waiting_s(self) -> float | None:
        """Seconds since the dashboard started while no status has come at all, once that
        is more than ``STALE_S`` (a service not (yet) there, or a mistyped address), else
        None."""
        if self.status_at is not None:
            return None
        waited = time.monotonic() - self.started_at
        return waited if waited > STALE_S else None

    def status_message(self) -> dict[str, Any]:
        """``{"type": "status", "status", "rates", "silent_s", "waiting_s"}``
        (``silent_s``: see :meth:`silent_s`; the status and rates are then the last ones
        received; ``waiting_s``: see :meth:`waiting_s`)."""
        silent = self.silent_s()
        return {"type": "status", "status": self.status, "rates": self.current_rates(silent),
                "silent_s": silent, "waiting_s": self.waiting_s()}

    def current_rates(self, silent: float | None = None) -> dict[str, float | None] | None:
        """The frame rates, or None while the service is silent (``silent``: if known)."""
        if silent is None:
            silent = self.silent_s()
        return self.rates if silent is None else None

    def stale_message(self) -> dict[str, Any] | None:
        """The status message to push while the service is silent (or no status came yet,
        :meth:`waiting_s`): when it has just gone silent, then once a second (its
        ``silent_s`` or ``waiting_s`` counts up on the page)."""
        if self.silent_s() is None and self.waiting_s() is None:
            return None
        now = time.monotonic()
        if self._stale_told_at is not None and now - self._stale_told_at < 1.0:
            return None
        self._stale_told_at = now
        return self.status_message()

    def update(self) -> dict[str, Any] | None:
        """The batched ``update`` message since the last call (None when nothing new)."""
        if not self.pending and not self.grains_changed:
            return None
        msg: dict[str, Any] = {"type": "update", "points": list(self.pending),
                               "summary": self.summary, "frame_id": self.measured_frame_id}
        if self.grains_changed:
            msg["grains"] = self.grains
            self.grains_changed = False
        self.pending.clear()
        return msg

    def hello(self, config: dict[str, Any]) -> dict[str, Any]:
        """Everything a newly connected browser needs."""
        sent = len(self.series) - len(self.pending)  # the pending ones come with the update
        silent = self.silent_s()
        return {
            "type": "hello",
            "config": config,
            "points": list(itertools.islice(self.series, max(0, sent))),
            "summary": self.summary,
            "frame_id": self.measured_frame_id,
            "grains": self.grains,
            "events": list(self.events),
            "status": self.status,
            "rates": self.current_rates(silent),
            "silent_s": silent,
            "waiting_s": self.waiting_s(),
        }

    def pick_frame(self, *, stale_s: float = 1.0) -> tuple[Message, Message | None] | None:
        """The frame to show next, with its labels, or None if nothing newer than the last.

        Prefers the newest frame that has its labels (outlines); falls back to the newest
        frame without them: a skipped frame when no labels came for ``stale_s`` seconds
        (analysis off or far behind), another frame when its labels did not come within
        ``stale_s`` (its analysis failed, or labels are not published for it).
        """
        last = self.last_image_id if self.last_image_id is not None else -1
        both = [fid for fid in self.frames if fid in self.labels and fid > last]
        if both:
            fid = max(both)
            self.last_image_id = fid
            return self.frames[fid][0], self.labels[fid]
        newer = [fid for fid in self.frames if fid > last]
        if not newer:
            return None
        fid = max(newer)
        frame, received = self.frames[fid]
        now = time.monotonic()
        since = self.last_analysed_at if frame.header.get("skipped") else received
        if now - since < stale_s:
            return None  # its labels (or those of a frame soon after) are probably on their way
        self.last_image_id = fid
        return frame, None

    def reset_frames(self) -> None:
        """Forget kept frames and labels (no browser watches any more, or a new run)."""
        self.frames.clear()
        self.labels.clear()
        self.last_analysed_at = time.monotonic()
