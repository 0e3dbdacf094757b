"""Prometheus metrics of a running service (opt-in: ``metrics.enabled``).

Nothing is counted twice: :class:`StatusCollector` is a custom prometheus-client collector
that turns the service's own :meth:`~livemask.service.app.Service.status` snapshot into
metric families at scrape time. Each :class:`MetricsServer` has its own
``CollectorRegistry`` (never the process-global one), so several services, e.g. in tests,
can run in one process.

Scrapes are served on a thread of their own by a small WSGI server around
``prometheus_client.make_wsgi_app``: ``/metrics`` answers with the metrics, ``/`` with a line
pointing there, any other path with 404 (``start_http_server`` answers every path). The
status snapshot is taken on the service's event loop (the pipeline's counters and latency
windows belong to it), with a timeout, so a scrape never races the pipeline and a stuck
loop never hangs the scraper: such a scrape is answered 503, so Prometheus' ``up`` drops to
0. A client that has not sent its whole request (line and headers) within
``client_timeout_s`` of connecting is dropped, however it trickles bytes, and at most
``max_connections`` are served at once (each holds a thread); refused connections are
logged as a WARNING, at most once a minute.

Exposed (all prefixed ``livemask_``):

=======================================  =======  ================================
name                                     type     labels
=======================================  =======  ================================
frames_{acquired,analysed,skipped,       counter
published,failed,missing,
publish_failed}_total
messages_published_total                 counter  topic (handed to the PUB socket)
queue_depth                              gauge    stage (infer, analyse, publish)
stage_latency_seconds                    gauge    stage, percentile (50, 95, 99)
acquiring                                gauge
uptime_seconds                           gauge
acquisitions_finished_total              counter
gc_collections_total                     counter  generation (0, 1, 2)
gc_pause_seconds_total                   counter  generation (0, 1, 2)
recording_{enabled,failing,stopped}      gauge    (1 or 0)
recording_{frames_queued,queued_bytes}   gauge
recording_{frames_written,               counter
frames_rejected,frames_rows_lost,
measurement_rows,errors}_total
state                                    gauge    state (1 for the current one, else 0)
mode                                     gauge    mode (1 for the current one, else 0)
info                                     info     version, model, backend, device
=======================================  =======  ================================

There is no count of messages dropped: PUB drops for a slow subscriber at its high-water
mark without telling the sender; subscribers see those drops as ``seq`` gaps.
``gc_*`` count Python's garbage collections and the time they held the GIL
(``livemask.service.gc_policy``). ``stage_latency_seconds`` holds the percentiles over the
pipeline's latency window (the most recent 2000 analysed frames), the same figures as
``status.latency_ms``: a gauge with a ``percentile`` label, not a summary, because the window
has no running sum and count (``quantile`` is reserved for summaries). State and mode change
while the service runs, so they are gauges of their own; ``info`` keeps the labels that do
not change (a join on it stays valid). ``recording_*`` are ``status.recording``'s figures
(only ``recording_enabled``, 0, while the service does not record): a full disk shows as
``recording_failing`` 1 and ``recording_frames_rejected_total`` rising.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import io
import logging
import socket
import socketserver
import threading
import time
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from livemask.acquisition.mode import Mode
from livemask.errors import ConfigError

log = logging.getLogger("livemask")

__all__ = ["MetricsServer", "ScrapeError", "StatusCollector", "metric_families"]

PREFIX = "livemask"
FRAME_COUNTERS = (
    "acquired", "analysed", "skipped", "published", "failed", "missing", "publish_failed",
)
PERCENTILES = (("p50", "50"), ("p95", "95"), ("p99", "99"))
#: The service's states (``status.state``) and modes; the current one is 1, the others 0.
STATES = ("starting", "idle", "running", "stopping", "closed")
MODES: tuple[str, ...] = typing.get_args(Mode)
#: Seconds a metrics client has, from connecting, to send its request line and headers
#: before it is dropped: an idle connection, or one sending a byte every few seconds, held
#: its thread for ever.
CLIENT_TIMEOUT_S = 10.0
#: Connections served at once (one thread each); more are closed at once.
MAX_CONNECTIONS = 32
#: Seconds between two warnings about refused connections (the others are counted).
REFUSED_WARNING_EVERY_S = 60.0

#: ``status.recording`` counters exported as ``livemask_recording_<name>_total``, with
#: what each counts (the recording's own: from its start).
RECORDING_COUNTERS = (
    ("frames_written", "Frames the recording stored."),
    ("frames_rejected", "Frames the recording could not store (a full disk, a deleted "
                        "folder, another frame shape)."),
    ("frames_rows_lost", "Analysed frames whose measurement rows could not be written."),
    ("measurement_rows", "Rows written to the recording's measurements.csv."),
    ("errors", "Write errors of the recording."),
)

#: A status with every field that gives a metric family: :meth:`StatusCollector.describe`
#: names the families from it without reading the service.
_EVERY_FAMILY: dict[str, Any] = {
    **{f"frames_{name}": 0 for name in FRAME_COUNTERS},
    "acquiring": False, "uptime_s": 0.0, "acquisitions_finished": 0,
    "gc": {"collections": {}}, "state": STATES[0], "mode": MODES[0],
    "recording": {"failing": False, "stopped": None, "frames_queued": 0, "queued_mb": 0.0,
                  **{name: 0 for name, _ in RECORDING_COUNTERS}, "errors_total": 0},
}

StatusFn = Callable[[], Mapping[str, Any]]
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Any]
METRICS_PATH = "/metrics"


def _import_prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - it is a runtime dependency
        raise ConfigError(
            "metrics.enabled needs prometheus-client: pip install 'prometheus-client>=0.20' "
            "(or set metrics.enabled: false)"
        ) from exc
    return prometheus_client


def metric_families(status: Mapping[str, Any]) -> list[Any]:
    """Prometheus metric families for one status snapshot (pure: no I/O)."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        InfoMetricFamily,
    )

    out: list[Any] = []
    for name in FRAME_COUNTERS:
        value = status.get(f"frames_{name}")
        if value is not None:
            out.append(
                CounterMetricFamily(
                    f"{PREFIX}_frames_{name}",
                    f"Frames {name.replace('_', ' ')} since the service started.",
                    value=float(value),
                )
            )
    publisher = status.get("publisher") or {}
    sent = CounterMetricFamily(
        f"{PREFIX}_messages_published",
        "Messages handed to the PUB socket per topic (a slow subscriber may miss some: "
        "seq gaps).",
        labels=["topic"],
    )
    for topic, n in sorted((publisher.get("sent") or {}).items()):
        sent.add_metric([str(topic)], float(n))
    out.append(sent)
    if publisher.get("sndhwm") is not None:
        out.append(GaugeMetricFamily(
            f"{PREFIX}_publish_queue_limit_messages",
            "Messages queued at most for one subscriber that does not read (the PUB "
            "high-water mark, from publish.sndhwm and publish.max_queued_mb).",
            value=float(publisher["sndhwm"]),
        ))
    queues = GaugeMetricFamily(
        f"{PREFIX}_queue_depth", "Frames waiting in front of each stage.", labels=["stage"]
    )
    for stage, depth in (status.get("queues") or {}).items():
        queues.add_metric([str(stage)], float(depth))
    out.append(queues)
    out.append(_latency_family(status.get("latency_ms")))
    if "acquiring" in status:
        out.append(
            GaugeMetricFamily(
                f"{PREFIX}_acquiring",
                "1 while an acquisition runs.",
                value=float(bool(status["acquiring"])),
            )
        )
    if "uptime_s" in status:
        out.append(
            GaugeMetricFamily(
                f"{PREFIX}_uptime_seconds",
                "Seconds since the service started.",
                value=float(status["uptime_s"]),
            )
        )
    if "acquisitions_finished" in status:
        out.append(
            CounterMetricFamily(
                f"{PREFIX}_acquisitions_finished",
                "Acquisitions that ended.",
                value=float(status["acquisitions_finished"]),
            )
        )
    out.extend(_gc_families(status.get("gc")))
    if "recording" in status:
        out.extend(_recording_families(status["recording"]))
    out.extend(_one_hot("state", "The service's state: 1 for the current one.", status, STATES))
    out.extend(_one_hot("mode", "The acquisition mode: 1 for the current one.", status, MODES))
    info = {
        k: str(status[k])
        for k in ("version", "model", "backend", "device")
        if status.get(k) is not None
    }
    out.append(
        InfoMetricFamily(f"{PREFIX}", "The service's version, model and backend.", value=info)
    )
    return out


def _latency_family(latency_ms: Mapping[str, Any] | None) -> Any:
    """Stage latency percentiles (a gauge: the window has no running sum and count)."""
    from prometheus_client.core import GaugeMetricFamily

    latency = GaugeMetricFamily(
        f"{PREFIX}_stage_latency_seconds",
        "Stage latency percentiles over the most recent analysed frames.",
        labels=["stage", "percentile"],
    )
    for stage, pcts in (latency_ms or {}).items():
        for key, percentile in PERCENTILES:
            value = (pcts or {}).get(key)
            if value is not None:
                latency.add_metric([str(stage), percentile], float(value) / 1e3)
    return latency


def _recording_families(report: Mapping[str, Any] | None) -> list[Any]:
    """The recording's health (``status.recording``): whether it records, fails or has
    stopped, its queue and its counters (only ``recording_enabled`` while not recording)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def gauge(name: str, doc: str, value: float) -> Any:
        return GaugeMetricFamily(f"{PREFIX}_recording_{name}", doc, value=value)

    out = [gauge("enabled", "1 while the service records (record.enabled).",
                 float(report is not None))]
    if report is None:
        return out
    out += [
        gauge("failing", "1 while a file of the recording fails to be written (e.g. a full "
              "disk); frames are rejected meanwhile.", float(bool(report.get("failing")))),
        gauge("stopped", "1 once the recording has stopped for good (its folder was deleted "
              "or moved).", float(report.get("stopped") is not None)),
        gauge("frames_queued", "Frames waiting to be written.",
              float(report.get("frames_queued") or 0)),
        gauge("queued_bytes", "Bytes of the frames waiting to be written (to 0.1 MiB).",
              float(report.get("queued_mb") or 0) * 2**20),
    ]
    for name, doc in RECORDING_COUNTERS:
        value = report.get(f"{name}_total" if name == "errors" else name)
        if value is not None:
            out.append(CounterMetricFamily(f"{PREFIX}_recording_{name}", doc,
                                           value=float(value)))
    return out


def _one_hot(name: str, doc: str, status: Mapping[str, Any], known: tuple[str, ...]) -> list[Any]:
    """``livemask_<name>{<name>="..."}``: 1 for the status' value, 0 for the other known
    ones (none when the status has no such field)."""
    from prometheus_client.core import GaugeMetricFamily

    current = status.get(name)
    if current is None:
        return []
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=[name])
    for value in dict.fromkeys((*known, str(current))):
        family.add_metric([value], float(value == str(current)))
    return [family]


def _gc_families(gc_report: Mapping[str, Any] | None) -> list[Any]:
    """Python garbage collections and the time they held the GIL, per generation."""
    from prometheus_client.core import CounterMetricFamily

    if not gc_report:
        return []
    collections = CounterMetricFamily(
        f"{PREFIX}_gc_collections",
        "Python garbage collections since the service started.",
        labels=["generation"],
    )
    paused = CounterMetricFamily(
        f"{PREFIX}_gc_pause_seconds",
        "Time spent in Python garbage collections (the GIL held) since the service started.",
        labels=["generation"],
    )
    for generation, n in (gc_report.get("collections") or {}).items():
        collections.add_metric([str(generation)], float(n))
    for generation, ms in (gc_report.get("pause_ms") or {}).items():
        paused.add_metric([str(generation)], float(ms) / 1e3)
    return [collections, paused]


class ScrapeError(RuntimeError):
    """The status could not be read for a scrape (answered 503)."""


class StatusCollector:
    """A prometheus-client collector reading the service's status at scrape time.

    ``status`` is called on ``loop`` (when given and running) and waited for at most
    ``timeout_s``; a scrape that times out, or whose status fails, is logged and raises
    :class:`ScrapeError` (the HTTP endpoint answers 503: no samples would read as a
    healthy, idle service).
    """

    def __init__(
        self,
        status: StatusFn,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout_s: float = 2.0,
    ) -> None:
        self._status = status
        self._loop = loop
        self.timeout_s = timeout_s

    def snapshot(self) -> Mapping[str, Any]:
        """The status, taken on the service's loop when it runs on another thread."""
        loop = self._loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop or loop.is_closed() or not loop.is_running():
            return self._status()

        future: concurrent.futures.Future[Mapping[str, Any]] = concurrent.futures.Future()

        def _take() -> None:
            if not future.set_running_or_notify_cancel():
                return  # the scrape gave up already
            try:
                future.set_result(self._status())
            except Exception as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(_take)
        try:
            return future.result(self.timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    def describe(self) -> list[Any]:
        """Every metric family this collector can yield, without samples: the registry
        needs their names to serve a scrape restricted with ``?name[]=...``."""
        return metric_families(_EVERY_FAMILY)

    def collect(self) -> Iterator[Any]:
        """Yield the metric families of the current status; raises :class:`ScrapeError`."""
        try:
            status = self.snapshot()
        except TimeoutError as exc:
            log.warning("metrics scrape: the service did not answer within %.1f s", self.timeout_s)
            raise ScrapeError(
                f"the service did not answer within {self.timeout_s:.1f} s (its event loop is "
                "busy)"
            ) from exc
        except Exception as exc:
            log.exception("metrics scrape: could not read the service status")
            raise ScrapeError(
                f"could not read the service status: {type(exc).__name__}: {exc}"
            ) from exc
        yield from metric_families(status)


class MetricsServer:
    """The ``/metrics`` HTTP endpoint of one service, with its own registry.

    ``port=0`` picks a free port; :attr:`url` tells which. :meth:`close` stops the server
    thread and releases the port. A client that has not sent its request within
    ``client_timeout_s`` is dropped; at most ``max_connections`` are served at once, more
    are closed unanswered (a rate-limited WARNING).
    """

    def __init__(
        self,
        status: StatusFn,
        *,
        address: str = "127.0.0.1",
        port: int = 9108,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout_s: float = 2.0,
        client_timeout_s: float = CLIENT_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        prom = _import_prometheus()
        self.address = address
        self.port = port
        self.client_timeout_s = client_timeout_s
        self.max_connections = max_connections
        self.registry = prom.CollectorRegistry(auto_describe=False)
        self.collector = StatusCollector(status, loop=loop, timeout_s=timeout_s)
        self.registry.register(self.collector)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        """Bind and serve on a daemon thread; returns ``self``."""
        if self._server is not None:
            return self
        prom = _import_prometheus()
        app = _routed(prom.make_wsgi_app(self.registry))
        try:
            server = _bind(
                self.address, self.port, app, self.client_timeout_s, self.max_connections
            )
        except OSError as exc:
            raise _bind_error(self.address, self.port, exc) from exc
        thread = threading.Thread(target=server.serve_forever, name="livemask-metrics", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        self.port = int(server.server_port)
        log.info("metrics: %s", self.url)
        return self

    @property
    def url(self) -> str | None:
        """``http://ADDRESS:PORT/metrics`` while serving, else None."""
        if self._server is None:
            return None
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}{METRICS_PATH}"

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop serving and release the port (idempotent; blocks up to ~0.5 s)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout_s)
        server.say_refused(now_anyway=True)  # (counted since the last warning)

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _routed(metrics_app: WsgiApp) -> WsgiApp:
    """``/metrics`` to prometheus-client's app (503 when the status cannot be read), ``/`` to
    a pointer there, the rest 404."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO") or "/"
        if path.rstrip("/") == METRICS_PATH:
            try:
                return metrics_app(environ, start_response)
            except ScrapeError as exc:  # raised before any response was started
                status, body = "503 Service Unavailable", f"livemask: {exc}; no metrics\n"
        elif path == "/":
            status, body = "200 OK", f"livemask: the metrics are at {METRICS_PATH}\n"
        else:
            status = "404 Not Found"
            body = f"not found: {path}; the metrics are at {METRICS_PATH}\n"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [body.encode()]

    return app


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per scrape (a slow client does not hold up the next scrape), at most
    ``max_connections`` at once; more connections are closed unanswered."""

    daemon_threads = True
    block_on_close = False  # close() does not wait for a client that stays connected
    max_connections = MAX_CONNECTIONS
    client_timeout_s = CLIENT_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._active = 0
        self._active_lock = threading.Lock()
        self._refused = 0  # since the last warning
        self._warned_at: float | None = None
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            full = self._active >= self.max_connections
            if not full:
                self._active += 1
        if full:
            self.shutdown_request(request)
            self._warn_refused()
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._active_lock:
            self._active -= 1

    def _warn_refused(self) -> None:
        """A WARNING for a refused connection, at most once per ``REFUSED_WARNING_EVERY_S``
        (the server's own thread: no lock needed); those in between are counted, and said
        when the interval has passed (:meth:`service_actions`) or the server closes."""
        self._refused += 1
        self.say_refused()

    def service_actions(self) -> None:
        """Each turn of ``serve_forever`` (~0.5 s): say refusals counted meanwhile, once the
        interval since the last warning has passed."""
        super().service_actions()
        if self._refused:
            self.say_refused()

    def say_refused(self, *, now_anyway: bool = False) -> None:
        """Log the refusals counted since the last warning, unless one was logged less
        than ``REFUSED_WARNING_EVERY_S`` ago (``now_anyway``: at close)."""
        now, last = time.monotonic(), self._warned_at
        if not self._refused or (
                not now_anyway and last is not None and now - last < REFUSED_WARNING_EVERY_S):
            return
        since = "" if last is None else f" in the last {now - last:.0f} s"
        log.warning(
            "metrics: refused %d connection(s)%s: %d are served at once at most, each until "
            "its client has sent its request (at most %.0f s); scrapes may fail while clients "
            "hold connections open",
            self._refused, since, self.max_connections, self.client_timeout_s,
        )
        self._refused, self._warned_at = 0, now


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each given only the time left until ``deadline`` (monotonic
    seconds; None: the socket's own timeout): a per-read timeout alone lets a client that
    sends a byte every few seconds hold the connection for ever."""

    def __init__(self, sock: socket.socket, deadline: float | None) -> None:
        super().__init__()
        self._sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the client did not send its request in time")
            self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _QuietHandler(WSGIRequestHandler):
    """No access line on stderr per scrape; a client that has not sent its request line and
    headers ``timeout`` seconds after connecting is dropped without a traceback (``timeout``
    None held its thread for ever; a per-read timeout, a client trickling bytes)."""

    timeout = CLIENT_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket's own reader: replaced (the socket stays open)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        self._reader = _DeadlineReader(self.connection, deadline)
        self.rfile = io.BufferedReader(self._reader)

    def parse_request(self) -> bool:
        """Parse the request line and headers, then lift the deadline (the answer is sent
        with the per-operation ``timeout``)."""
        parsed = super().parse_request()
        self._reader.deadline = None
        self.connection.settimeout(self.timeout)
        return parsed

    def handle(self) -> None:
        try:
            super().handle()
        except (TimeoutError, ConnectionError):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _bind(
    address: str, port: int, app: WsgiApp, client_timeout_s: float, max_connections: int
) -> WSGIServer:
    """A threading WSGI server for ``app`` on ``address:port`` (IPv4 or IPv6)."""
    family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type(
        "_MetricsServer",
        (_ThreadingServer,),
        {"address_family": family, "max_connections": max_connections,
         "client_timeout_s": client_timeout_s},
    )
    handler_class = type("_Handler", (_QuietHandler,), {"timeout": client_timeout_s})
    return make_server(address, port, app, server_class=server_class, handler_class=handler_class)


def _bind_error(address: str, port: int, exc: OSError) -> ConfigError:
    """A bind failure naming what to change: the address when it does not resolve or is not
    this machine's, else the port."""
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        advice = ("Choose another metrics.address: an address of this machine, e.g. 127.0.0.1 "
                  "(loopback) or 0.0.0.0 (every interface)")
    else:
        advice = "Choose another metrics.port (0 picks a free one)"
    return ConfigError(
        f"cannot serve metrics on {address}:{port}: {exc}. {advice}, or set "
        "metrics.enabled: false"
    )
