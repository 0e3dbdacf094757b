"""A terminal view of the live measurement stream (``livemask watch``, ``serve --view``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from livemask.analysis.metrics import MatchResult, aggregate, match_instances
from livemask.client.subscriber import AsyncSubscriber, Subscriber
from livemask.dashboard.state import published_unit
from livemask.errors import ProtocolError
from livemask.protocol import Message

log = logging.getLogger("livemask")


class TruthScore:
    """Pairs published labels with ground truth by ``frame_id`` and scores them."""

    def __init__(self, keep: int = 64) -> None:
        self._labels: OrderedDict[int, np.ndarray] = OrderedDict()
        self._truth: OrderedDict[int, np.ndarray] = OrderedDict()
        self._keep = keep
        self._total: MatchResult | None = None  # running micro-average (a long run stays cheap)
        self.frames_scored = 0

    def add(self, msg: Message) -> MatchResult | None:
        """Take a ``labels`` or ``truth`` message; returns a score when a pair completes."""
        fid = int(msg.header["frame_id"])
        mine, other = (
            (self._labels, self._truth) if msg.topic == "labels" else (self._truth, self._labels)
        )
        mine[fid] = msg.arrays["labels"].copy()
        while len(mine) > self._keep:
            mine.popitem(last=False)
        if fid not in other:
            return None
        pred = self._labels.pop(fid)
        truth = self._truth.pop(fid)
        result = match_instances(truth, pred, iou_threshold=0.5)
        self._total = result if self._total is None else aggregate([self._total, result])
        self.frames_scored += 1
        return result

    def total(self) -> MatchResult | None:
        """Micro-averaged score over all scored frames."""
        return self._total


_ENVELOPE = {"v", "topic", "seq", "arrays", "t", "kind", "units", "config", "sequence"}


def _describe_event(header: dict[str, Any]) -> str:
    """One line per event: its kind and its own fields."""
    stamp = time.strftime("%H:%M:%S", time.localtime(header.get("t", {}).get("sent", 0)))
    fields = ", ".join(
        f"{k}={v}" for k, v in header.items() if k not in _ENVELOPE and v is not None
    )
    return f"{stamp} {header.get('kind')}" + (f": {fields}" if fields else "")[:110]


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _fmt_intensity(value: Any) -> str:
    """An intensity: tenths of ADU from 100 on, else 4 significant digits (a float
    frame's 0.004057 is not 0.0)."""
    if isinstance(value, float) and abs(value) < 100:
        return format(value, ".4g")
    return _fmt(value)


class Units:
    """The units sizes are shown in: those the service publishes (its status ``units``),
    px and px² where the pixel size is not calibrated (µm values are then pixel values)."""

    def __init__(self, units: Any = None) -> None:
        self.length = published_unit(units, "equivalent_diameter_um", "µm")
        self.area = published_unit(units, "area_um2", "µm²")
        self.calibrated = self.length != "px"
        #: grains per mm², or per 10⁶ px² (the same number) without a calibration
        self.density = "grains/mm²" if self.calibrated else "grains/10⁶ px²"


def _astm_g(stats: dict[str, Any], units: Units) -> str:
    """The ASTM G numbers of grain statistics (none without a pixel size: G needs µm)."""
    if not units.calibrated and stats.get("astm_g_planimetric") is None:
        return "ASTM G - (no pixel size)"
    return (f"ASTM G {_fmt(stats.get('astm_g_planimetric'), '.2f')} planimetric, "
            f"{_fmt(stats.get('astm_g_intercept'), '.2f')} intercept")


def _scan_tiles(scan: dict[str, Any]) -> str:
    """"4 tiles", and the tiles that skipped analysis (not in the statistics) where any."""
    skipped = scan.get("tiles_skipped")
    return f"{_fmt(scan.get('tiles'))} tiles" + (f", {skipped} skipped" if skipped else "")


def _grain_rows(grains: dict[str, Any], units: Units | None = None) -> list[tuple[str, str]]:
    """The view's rows for a grains model's statistics (``measurements.grains``): sizes of
    the grains inside the field (those cut by its edge count half in N_A, see grains.md)."""
    tile, scan = grains.get("tile") or {}, grains.get("cumulative") or {}
    u = units or Units()
    return [
        ("grains", f"{_fmt(tile.get('count_inside'))} inside, "
                   f"{_fmt(tile.get('count_edge'))} cut by the edge"),
        ("mean area", f"{_fmt(tile.get('mean_area_um2'))} {u.area} (grains inside), "
                      f"{_fmt(tile.get('n_a_per_mm2'), '.0f')} {u.density}"),
        ("tile", _astm_g(tile, u)),
        (f"scan ({_scan_tiles(scan)})",
         f"{_astm_g(scan, u)}; mean area {_fmt(scan.get('mean_area_um2'))} {u.area}, "
         f"{_fmt(scan.get('n_a_per_mm2'), '.0f')} {u.density}"),
    ]


FINISHED_HINT = (
    "acquisition finished: Ctrl-C stops the service; `start` over the control channel runs it "
    "again"
)
#: Said while the service starts (opens the microscope, loads and warms up the model).
STARTING_LINE = "the service is starting: opening the microscope and warming up the model"
#: Said last, after the final counts, when the last status said the service was stopping
#: (it still sends its last frames then), or once a stopping service went quiet.
STOPPED_LINE = "the service stopped"


#: Seconds without a status heartbeat (every ``publish.heartbeat_s``, 1 s by default) after
#: which the view says the service is gone.
STALE_S = 3.0
#: Seconds without any message after which ``watch`` says what to check.
NOTHING_YET_S = 5.0


#: What ``watch --truth`` shows where the service publishes no truth.
NO_TRUTH = ("none: the service publishes no truth (start it with livemask serve --truth; "
            "simulated microscope only)")


class ConsoleView:
    """Keeps the latest state of the stream and renders it as rich tables."""

    def __init__(self, address: str = "", *, nothing_hint: bool = True) -> None:
        """``nothing_hint``: say what to check when nothing comes (not while a service that
        started this view is still starting)."""
        self.address = address
        self.nothing_hint_on = nothing_hint
        self.measurements: dict[str, Any] | None = None
        self.status: dict[str, Any] = {}
        self.events: deque[str] = deque(maxlen=5)
        self.arrivals: deque[float] = deque(maxlen=50)
        self.score = TruthScore()
        self.gaps: dict[str, int] = {}
        self.status_at: float | None = None  # monotonic time of the last status message
        self.messages = 0  # taken into the view
        self.bad_messages = 0  # that could not be decoded or made no sense (left out)
        self.started_at = time.monotonic()
        self.over = False  # the view has taken its last message (set as it ends)
        #: truth was asked for (``--truth``) but the service publishes none
        self.truth_unavailable = False

    def update(self, msg: Message) -> None:
        """Fold one message into the view; one that makes no sense is counted and left out."""
        try:
            self._update(msg)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.reject(f"a {msg.topic!r} message that makes no sense ({exc!r})")
        else:
            self.messages += 1

    def reject(self, what: str) -> None:
        """Count a message left out (warned the first time)."""
        self.bad_messages += 1
        if self.bad_messages == 1:
            log.warning("watch: left out %s; further bad messages are only counted", what)

    def receive(self, msg: Message | None) -> None:
        """:meth:`update` for what a subscriber's ``recv`` gave (None: nothing came)."""
        if msg is not None:
            self.update(msg)

    def nothing_yet(self) -> bool:
        """Whether no message has come for ``NOTHING_YET_S`` since the view started."""
        return (self.nothing_hint_on and not self.messages
                and time.monotonic() - self.started_at > NOTHING_YET_S)

    def end_line(self) -> str | None:
        """What the last status says ended: the service (:data:`STOPPED_LINE`, once the view
        is over or the service went quiet: a stopping service still sends its last frames),
        or the acquisition (:data:`FINISHED_HINT`); None while it acquires."""
        if self.stopping():
            return STOPPED_LINE if self.over or self.silent_s() is not None else None
        if self.status.get("state") == "starting":  # (heartbeats come during start-up)
            return STARTING_LINE
        return None if self.status.get("acquiring", True) else FINISHED_HINT

    def stopping(self) -> bool:
        """Whether the last status said the service is stopping (or closed)."""
        return self.status.get("state") in ("stopping", "closed")

    def _update(self, msg: Message) -> None:
        if msg.topic == "measurements":
            self.measurements = msg.header
            self.arrivals.append(time.monotonic())
        elif msg.topic == "status":
            self.status = msg.header
            self.status_at = time.monotonic()
        elif msg.topic == "event":
            self.events.append(_describe_event(msg.header))
        elif msg.topic in ("labels", "truth"):
            self.score.add(msg)

    def silent_s(self) -> float | None:
        """Seconds since the last status heartbeat, when more than ``STALE_S`` (else None)."""
        if self.status_at is None:
            return None
        quiet = time.monotonic() - self.status_at
        return quiet if quiet > STALE_S else None

    def fps(self) -> float | None:
        """Measurement messages per second over the recent window (None once stale, or once
        measurements stopped coming for three of their intervals and at least 2 s)."""
        if len(self.arrivals) < 2 or self.silent_s() is not None:
            return None
        span = self.arrivals[-1] - self.arrivals[0]
        if span <= 0:
            return None
        interval = span / (len(self.arrivals) - 1)
        if time.monotonic() - self.arrivals[-1] > max(2.0, 3 * interval):
            return None  # e.g. the acquisition finished: no rate, not the last one
        return 1 / interval

    def render(self) -> Group:
        """The current view."""
        top = Table(title="livemask — live measurements", show_header=False, expand=False)
        top.add_column("what", style="bold cyan")
        top.add_column("value")
        st = self.status
        m = self.measurements or {}
        summary = m.get("summary") or {}
        lat = (st.get("latency_ms") or {}).get("end_to_end") or {}
        silent = None if self.stopping() else self.silent_s()  # (stopping: as it said)
        state = (f"no status for {silent:.0f} s: the service is gone or unreachable"
                 if silent is not None else f"{st.get('state', '?')} ({st.get('mode', '?')})")
        top.add_row("state", f"{state}, model {st.get('model', '?')} on "
                    f"{st.get('backend', '?')}")
        top.add_row("frame", f"{m.get('frame_id', '-')}  index {m.get('index', {})}")
        units = Units(st.get("units"))
        grains = m.get("grains")
        if isinstance(grains, dict):
            for row in _grain_rows(grains, units):
                top.add_row(*row)
        else:
            top.add_row("nuclei", _fmt(summary.get("count")))
            top.add_row("mean area", f"{_fmt(summary.get('mean_area_px'))} px²" + (
                f"  ({_fmt(summary.get('mean_area_um2'))} µm²)" if units.calibrated else ""))
            top.add_row("mean intensity", _fmt_intensity(summary.get("mean_intensity")))
        top.add_row("rate", f"{_fmt(self.fps())} frames/s")
        top.add_row("latency e2e", f"p50 {_fmt(lat.get('p50'))} ms, p99 {_fmt(lat.get('p99'))} ms")
        top.add_row(
            "frames",
            f"acquired {st.get('frames_acquired', 0)}, analysed {st.get('frames_analysed', 0)}, "
            f"skipped {st.get('frames_skipped', 0)}",
        )
        total = self.score.total()
        if total is not None:
            top.add_row("vs truth", f"F1@0.5 {total.f1:.3f} (P {total.precision:.3f}, "
                        f"R {total.recall:.3f}) over {self.score.frames_scored} frames")
        elif self.truth_unavailable:
            top.add_row("vs truth", NO_TRUTH)
        objects = Table(title="largest objects", expand=False)
        for col in ("label", f"area {units.area}", "centroid (y, x)", "mean int."):
            objects.add_column(col, justify="right")
        objs = sorted(m.get("objects") or [], key=lambda o: -o.get("area_px", 0))[:5]
        for o in objs:
            cy, cx = o.get("centroid_yx", [0, 0])
            objects.add_row(str(o.get("label")), _fmt(o.get("area_um2")),
                            f"{cy:.0f}, {cx:.0f}", _fmt_intensity(o.get("mean_intensity")))
        end = self.end_line()
        hint = f"\n{end}" if end else ""
        if self.nothing_yet():
            hint += f"\n{self.nothing_hint()}"
        if self.bad_messages:
            hint += f"\n{self.bad_messages} message(s) left out (not livemask's protocol)"
        events = Text(("\n".join(self.events) or "no events yet") + hint, style="dim")
        return Group(top, objects, events)


    def nothing_hint(self) -> str:
        """What to check when nothing has come (see :meth:`nothing_yet`)."""
        return (f"no messages from {self.address or 'the service'} after "
                f"{time.monotonic() - self.started_at:.0f} s: is a service running there "
                "(livemask serve), and is --pub its publish.pub_address?")

    def summary_line(self) -> str:
        """One plain line of the current state (for logs and pipes, where tables can't redraw)."""
        st = self.status
        m = self.measurements or {}
        summary = m.get("summary") or {}
        lat = (st.get("latency_ms") or {}).get("end_to_end") or {}
        grains = m.get("grains")
        units = Units(st.get("units"))
        if isinstance(grains, dict):  # inside grains: those cut by the edge are no sizes
            tile, scan = grains.get("tile") or {}, grains.get("cumulative") or {}
            g = (f"scan G {_fmt(scan.get('astm_g_planimetric'), '.2f')}" if units.calibrated
                 else "scan G - (no pixel size)")
            what = (f"{_fmt(tile.get('count_inside'))} grains inside (+"
                    f"{_fmt(tile.get('count_edge'))} cut by the edge), mean area "
                    f"{_fmt(tile.get('mean_area_um2'))} {units.area}, {g} over "
                    f"{_scan_tiles(scan)}")
        else:
            what = (f"{_fmt(summary.get('count'))} objects, "
                    f"mean area {_fmt(summary.get('mean_area_um2'))} {units.area}")
        line = (
            f"frame {m.get('frame_id', '-')}: {what}, {_fmt(self.fps())} frames/s, "
            f"e2e p99 {_fmt(lat.get('p99'))} ms, acquired {st.get('frames_acquired', 0)} / "
            f"analysed {st.get('frames_analysed', 0)} / skipped {st.get('frames_skipped', 0)}"
        )
        total = self.score.total()
        if total is not None:
            line += f", F1@0.5 vs truth {total.f1:.3f}"
        elif self.truth_unavailable:
            line += f", vs truth: {NO_TRUTH}"
        silent = self.silent_s()
        if silent is not None and not self.stopping():  # (stopping: it stopped, as said)
            line += f" (no status for {silent:.0f} s: the service is gone or unreachable)"
        return line


class _Display:
    """Redraws the view in a terminal (rich Live); elsewhere prints a line every few seconds."""

    def __init__(self, view: ConsoleView, line_every_s: float = 2.0) -> None:
        self.view = view
        self.console = Console()
        self.live = Live(view.render(), refresh_per_second=4, console=self.console) \
            if self.console.is_terminal else None
        self.line_every_s = line_every_s
        self._last_line = time.monotonic()
        self._printed = ""  # last summary line printed (pipes: unchanged lines not repeated)
        self._ended: str | None = None  # the end line printed last (each end said once)
        self._told_nothing = False

    def __enter__(self) -> _Display:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.view.over = True
        if self.live is not None:
            self.live.update(self.view.render())
            self.live.transient = not self.view.messages  # nothing came: leave no empty view
            self.live.__exit__(None, None, None)
        else:
            self._print_changes()

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.view.render())
        elif time.monotonic() - self._last_line >= self.line_every_s:
            self._last_line = time.monotonic()
            self._print_changes()

    def _print_changes(self) -> None:
        """Print the summary line if it changed, and the end of an acquisition once."""
        if self.view.measurements is None:
            if self.view.nothing_yet() and not self._told_nothing:
                print(self.view.nothing_hint(), flush=True)
                self._told_nothing = True
            return
        line = self.view.summary_line()
        if line != self._printed:
            print(line, flush=True)
            self._printed = line
        end = self.view.end_line()
        if end is not None and end != self._ended:
            print(end, flush=True)
        self._ended = end


def topics_for(truth: bool) -> tuple[str, ...]:
    """Topics the view subscribes to."""
    base = ("measurements", "status", "event")
    return (*base, "labels", "truth") if truth else base


def watch(
    address: str, *, truth: bool = False, duration_s: float | None = None,
    on_ready: Callable[[], None] | None = None, nothing_hint: bool = True,
    stop_when: Callable[[], bool] | None = None,
) -> ConsoleView:
    """Show the stream at ``address`` until Ctrl-C, ``duration_s`` or ``stop_when()`` (checked
    after each message or 0.25 s); ``on_ready`` is called once the subscriber is connected.
    Ctrl-C (or ``stop_when``) first takes what already came, so the last view is the
    stream's last state."""
    view = ConsoleView(address, nothing_hint=nothing_hint)
    end = time.monotonic() + duration_s if duration_s else None
    with Subscriber(address, topics_for(truth)) as sub, _Display(view) as display, \
            _ctrl_c_as_flag() as interrupted:
        try:
            if on_ready is not None:
                on_ready()
            while end is None or time.monotonic() < end:
                _receive(sub, view, timeout_s=0.25)
                truth = truth and _keep_truth(sub, view)
                display.refresh()
                if interrupted.is_set() or (stop_when is not None and stop_when()):
                    _drain(sub, view)  # the last messages
                    break
        except KeyboardInterrupt:  # (outside the main thread Ctrl-C still raises)
            _drain(sub, view)
    return view


@contextlib.contextmanager
def _ctrl_c_as_flag() -> Iterator[threading.Event]:
    """In the main thread, Ctrl-C (and SIGTERM, which ``livemask watch`` and ``serve --view``
    stop it with, where it raises ``KeyboardInterrupt`` too) sets the flag instead of raising
    wherever the view happens to be (between taking a message and showing it, it was lost);
    the view stops after the message in hand. Elsewhere, and for a signal under a handler
    of the caller's own, nothing changes."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    taken = [sig for sig in (signal.SIGINT, signal.SIGTERM)
             if signal.getsignal(sig) is signal.default_int_handler]
    for sig in taken:
        signal.signal(sig, lambda *_: flag.set())
    try:
        yield flag
    finally:
        for sig in taken:
            signal.signal(sig, signal.default_int_handler)


def _receive(sub: Subscriber, view: ConsoleView, timeout_s: float) -> bool:
    """Fold the next message into ``view``; False when none came within ``timeout_s``."""
    try:
        msg = sub.recv(timeout_s=timeout_s)
    except ProtocolError as exc:  # a foreign publisher, another protocol version
        view.reject(f"a message that is not livemask's protocol ({exc})")
        return True
    view.receive(msg)
    return msg is not None


def _keep_truth(sub: Subscriber, view: ConsoleView) -> bool:
    """Whether to go on taking labels for the truth score: not once the status says the
    service publishes no truth (a rig that is not simulated, or a simulated one without
    ``simulation.truth``), as label images cost."""
    if view.status.get("truth") is not False:
        return True
    for topic in ("labels", "truth"):
        sub.unsubscribe(topic)
    view.truth_unavailable = True  # said in the view: the score would just be missing
    return False


#: At most this long (s) :func:`watch` takes what is left after Ctrl-C, e.g. a stopping
#: service's last messages, before its last view.
DRAIN_S = 1.0


def _drain(sub: Subscriber, view: ConsoleView) -> None:
    """Take the messages already sent, until none comes for 0.1 s (or ``DRAIN_S``)."""
    end = time.monotonic() + DRAIN_S
    while time.monotonic() < end and _receive(sub, view, timeout_s=0.1):
        pass


async def watch_async(address: str, *, truth: bool, stop: asyncio.Event) -> ConsoleView:
    """The same view, inside a running event loop (``serve --view``)."""
    view = ConsoleView(address)
    async with AsyncSubscriber(address, topics_for(truth)) as sub:
        with _Display(view) as display:
            last = 0.0
            while not stop.is_set():
                try:
                    view.receive(await sub.recv(timeout_s=0.25))
                except ProtocolError as exc:
                    view.reject(f"a message that is not livemask's protocol ({exc})")
                if time.monotonic() - last > 0.25:
                    display.refresh()
                    last = time.monotonic()
    return view
