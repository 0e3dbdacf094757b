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
loop never hangs the scraper.

Exposed (all prefixed ``livemask_``):

=======================================  =======  ================================
name                                     type     labels
=======================================  =======  ================================
frames_{acquired,analysed,skipped,       counter
published,failed,missing,
publish_failed}_total
messages_published_total                 counter  topic (handed to the PUB socket)
queue_depth                              gauge    stage (infer, analyse, publish)
stage_latency_seconds                    gauge    stage, quantile (0.5, 0.95, 0.99)
acquiring                                gauge
uptime_seconds                           gauge
acquisitions_finished_total              counter
gc_collections_total                     counter  generation (0, 1, 2)
gc_pause_seconds_total                   counter  generation (0, 1, 2)
info                                     info     version, model, backend, device,
                                                  mode, state
=======================================  =======  ================================

There is no count of messages dropped: PUB drops for a slow subscriber at its high-water
mark without telling the sender; subscribers see those drops as ``seq`` gaps.
``gc_*`` count Python's garbage collections and the time they held the GIL
(``livemask.service.gc_policy``). ``stage_latency_seconds`` holds the percentiles over the
pipeline's latency window (the most recent 2000 analysed frames), the same figures as
``status.latency_ms``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from livemask.errors import ConfigError

log = logging.getLogger("livemask")

__all__ = ["MetricsServer", "StatusCollector", "metric_families"]

PREFIX = "livemask"
FRAME_COUNTERS = (
    "acquired", "analysed", "skipped", "published", "failed", "missing", "publish_failed",
)
QUANTILES = (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"))

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
    queues = GaugeMetricFamily(
        f"{PREFIX}_queue_depth", "Frames waiting in front of each stage.", labels=["stage"]
    )
    for stage, depth in (status.get("queues") or {}).items():
        queues.add_metric([str(stage)], float(depth))
    out.append(queues)
    latency = GaugeMetricFamily(
        f"{PREFIX}_stage_latency_seconds",
        "Stage latency percentiles over the most recent analysed frames.",
        labels=["stage", "quantile"],
    )
    for stage, pcts in (status.get("latency_ms") or {}).items():
        for key, q in QUANTILES:
            value = (pcts or {}).get(key)
            if value is not None:
                latency.add_metric([str(stage), q], float(value) / 1e3)
    out.append(latency)
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
    info = {
        k: str(status[k])
        for k in ("version", "model", "backend", "device", "mode", "state")
        if status.get(k) is not None
    }
    out.append(InfoMetricFamily(f"{PREFIX}", "The service's model, backend and mode.", value=info))
    return out


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


class StatusCollector:
    """A prometheus-client collector reading the service's status at scrape time.

    ``status`` is called on ``loop`` (when given and running) and waited for at most
    ``timeout_s``; a scrape that times out gets no livemask samples and is logged.
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

    def collect(self) -> Iterator[Any]:
        """Yield the metric families of the current status."""
        try:
            status = self.snapshot()
        except TimeoutError:
            log.warning("metrics scrape: the service did not answer within %.1f s", self.timeout_s)
            return
        except Exception:
            log.exception("metrics scrape: could not read the service status")
            return
        yield from metric_families(status)


class MetricsServer:
    """The ``/metrics`` HTTP endpoint of one service, with its own registry.

    ``port=0`` picks a free port; :attr:`url` tells which. :meth:`close` stops the server
    thread and releases the port.
    """

    def __init__(
        self,
        status: StatusFn,
        *,
        address: str = "127.0.0.1",
        port: int = 9108,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout_s: float = 2.0,
    ) -> None:
        prom = _import_prometheus()
        self.address = address
        self.port = port
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
            server = _bind(self.address, self.port, app)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {self.address}:{self.port}: {exc}. Choose another "
                "metrics.port (0 picks a free one) or set metrics.enabled: false"
            ) from exc
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

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _routed(metrics_app: WsgiApp) -> WsgiApp:
    """``/metrics`` to prometheus-client's app, ``/`` to a pointer there, the rest 404."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO") or "/"
        if path.rstrip("/") == METRICS_PATH:
            return metrics_app(environ, start_response)
        if path == "/":
            status, body = "200 OK", f"livemask: the metrics are at {METRICS_PATH}\n"
        else:
            status = "404 Not Found"
            body = f"not found: {path}; the metrics are at {METRICS_PATH}\n"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [body.encode()]

    return app


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per scrape (a slow client does not hold up the next scrape)."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """No access line on stderr per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _bind(address: str, port: int, app: WsgiApp) -> WSGIServer:
    """A threading WSGI server for ``app`` on ``address:port`` (IPv4 or IPv6)."""
    family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("_MetricsServer", (_ThreadingServer,), {"address_family": family})
    return make_server(address, port, app, server_class=server_class, handler_class=_QuietHandler)
