"""The web dashboard: an aiohttp server fed by a ZeroMQ subscriber like any other.

:class:`DashboardServer` connects SUB sockets to a service's PUB address and serves a page
(``assets/``, shipped in the package: no CDN, works offline) that shows the live frame with
the object outlines, plots of the per-frame summary, the grain statistics, the service
status and the recent events. Browsers get a WebSocket (``/ws``) carrying JSON text
messages and binary image messages (:func:`~livemask.dashboard.preview.encode_preview`).

Keeping the service fast:

- ``measurements``, ``status`` and ``event`` (small JSON) are always read;
- ``frame`` and ``labels`` (the big arrays) only while a browser wants images: then every
  one is read as it comes (the state keeps the newest few), and at most ``update_hz`` times
  a second the newest frame not shown yet with its labels (same ``frame_id``) is sent, so
  a run's last frame is shown too; while no browser wants images the image subscriber is
  unsubscribed and the publisher does not even send them to the dashboard;
- that frame is decimated once (:func:`make_preview`, ~0.5 ms for 512×512) and offered to
  every browser; each browser has a one-image slot that a newer image replaces, so a slow
  browser gets fewer images and never stalls the others or the loop. A page that
  acknowledges its images (the shipped one does) gets the next only once it has the one
  before: over a slow link the socket's buffers would otherwise fill with images that are
  seconds old by the time they arrive.

In the service (``dashboard.enabled``) it runs on the service's event loop; ``livemask
dashboard --connect`` runs it on its own for a service elsewhere. Routes: ``/`` (the page),
``/assets/<file>``, ``/ws`` (the stream), ``/api/state`` (the current state as JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import html
import ipaddress
import json
import logging
import math
import re
import socket
import time
from collections import deque
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import zmq
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError

from livemask import __version__
from livemask.client.subscriber import AsyncSubscriber
from livemask.dashboard.preview import encode_preview, make_preview
from livemask.dashboard.state import DashboardState
from livemask.errors import ConfigError, ProtocolError
from livemask.log import http_logger, is_power_of_ten
from livemask.protocol import Message, dumps_json
from livemask.transport._sockets import local_connect_address

__all__ = ["ASSETS", "DashboardServer", "local_connect_address", "parse_listen"]

log = logging.getLogger("livemask")

#: Files served under ``/assets/`` and their content types (nothing else is served).
ASSETS = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
_CLIENT_QUEUE = 500  # JSON messages a browser may lag behind before the oldest are dropped
_IMAGE_TOPICS = ("frame", "labels")
#: A Host header that may go into the CSP: a name or IPv4 address, or a bracketed IPv6
#: address, and an optional port
_PLAIN_HOST = re.compile(r"([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")
_IMAGE_HWM = 16  # frame/labels messages queued for the image reader (it drains them)
_DRAIN_MAX = 64  # messages taken in one go before the loop gets a turn
#: Open HTTP and WebSocket connections served at once (a browser uses a few); more are
#: answered 503 and closed, so that connections cannot use up the service's descriptors.
#: Connections accepted in one go (at most the listen backlog, 64) may pass it a little.
MAX_CONNECTIONS = 64
#: Seconds a connection may stay without a complete request: idle between requests, or
#: still sending its request headers (aiohttp's keep-alive timeout; its default, 3630 s,
#: let idle connections pile up).
KEEPALIVE_S = 10.0
#: Seconds at most between two messages to the pages: while nothing else goes out, an
#: ``{"type": "alive"}``. A page that hears nothing for 3 of them (3 s at least) says so
#: (the service with its embedded dashboard frozen, a hung loop, a dropped tunnel).
ALIVE_S = 1.0
#: WebSocket ping interval (s); a browser that does not answer within half of it is dropped.
WS_HEARTBEAT_S = 20.0
#: Seconds a browser may take no data at all while there is some to send before it is
#: dropped (one that never reads fills the socket's buffers; its connection is aborted).
WS_SEND_TIMEOUT_S = 30.0
#: Seconds to wait for a page's acknowledgement of an image before sending the next anyway
#: (a page that announced acknowledgements but stopped sending them is not left without).
ACK_TIMEOUT_S = 5.0
#: Images sent to an acknowledging page and not acknowledged yet, at most.
IMAGES_IN_FLIGHT = 1
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
         b"Content-Length: 49\r\nRetry-After: 10\r\nConnection: close\r\n\r\n"
         b"too many connections to the livemask dashboard\r\n\r\n")


def parse_listen(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``"HOST:PORT"``, ``"[V6]:PORT"`` or ``"PORT"`` → ``(host, port)``."""
    text = value.strip()
    host, sep, port_s = text.rpartition(":")
    if not sep:
        host, port_s = default_host, text
    host = host.strip("[]") or default_host
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(
            f"dashboard address {value!r}: expected HOST:PORT (e.g. 127.0.0.1:8080; port 0 "
            "picks a free one)"
        ) from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"dashboard address {value!r}: port must be 0..65535")
    return host, port


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind_advice(exc: OSError, hint: str | None = None) -> str:
    """What to change when binding the dashboard failed with ``exc``: the address when it
    does not resolve or is not this machine's, else the port; ``hint`` names the option
    that sets them (None: ``livemask serve``'s key and flag)."""
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        where = hint or "dashboard.address / --dashboard HOST:PORT"
        return (f"Choose another {where}: an address of this machine, e.g. 127.0.0.1 "
                "(loopback) or 0.0.0.0 (every interface)")
    where = hint or "dashboard.port / --dashboard HOST:PORT"
    return f"Choose another {where} (port 0 picks a free one)"


def _csp(host: str) -> str:
    """The Content-Security-Policy of every response; the WebSocket's ``host`` only when it
    is a plain ``name[:port]`` or ``[v6]:port`` (the Host header is the client's text)."""
    ws = f" ws://{host} wss://{host}" if _PLAIN_HOST.fullmatch(host) else ""
    return ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            f"connect-src 'self'{ws}; frame-ancestors 'none'")


def _read_asset(name: str) -> bytes:
    return (resources.files("livemask.dashboard") / "assets" / name).read_bytes()


class _Busy(asyncio.Protocol):
    """A connection past :data:`MAX_CONNECTIONS`: answered 503 and closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY)
        transport.close()


def _abort(transport: asyncio.BaseTransport | None) -> None:
    """Drop a connection now, unsent data and all: ``close()`` waits until the peer took
    what is still queued, for ever when it reads nothing (its descriptor stayed open)."""
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()


def _unsent(transport: asyncio.BaseTransport | None) -> int:
    """Bytes queued on ``transport`` that the peer has not taken yet."""
    if isinstance(transport, asyncio.WriteTransport):
        return transport.get_write_buffer_size()
    return 0


class _Browser:
    """One connected WebSocket: a bounded queue of JSON texts and a one-image slot.

    A browser that acknowledges images (:meth:`acked`) has at most
    :data:`IMAGES_IN_FLIGHT` sent and not acknowledged; one that never does gets them as
    fast as its connection takes them (older clients)."""

    def __init__(
        self, ws: web.WebSocketResponse, peer: str,
        transport: asyncio.BaseTransport | None = None,
    ) -> None:
        self.ws = ws
        self.peer = peer
        self.transport = transport
        self.texts: deque[str] = deque(maxlen=_CLIENT_QUEUE)
        self.image: bytes | None = None
        self.wake = asyncio.Event()
        self.images_sent = 0
        self.images_replaced = 0
        self.wants_images = True  # false while the page is hidden or its image is paused
        self.acks = False  # it acknowledges every image it gets
        self.unacked = 0  # images sent and not acknowledged yet
        self._sent_at = 0.0  # monotonic time the last image was sent
        self.task: asyncio.Task[None] | None = None

    def send_text(self, text: str) -> None:
        self.texts.append(text)
        self.wake.set()

    def send_json(self, obj: dict[str, Any]) -> None:
        self.send_text(dumps_json(obj).decode("utf-8"))

    def offer_image(self, data: bytes) -> None:
        if self.image is not None:
            self.images_replaced += 1  # the browser did not take the previous one yet
        self.image = data
        self.wake.set()

    def acked(self) -> None:
        """The page has an image: it may get the next (and acknowledges from now on)."""
        self.acks = True
        self.unacked = max(0, self.unacked - 1)
        self.wake.set()

    def _image_held(self) -> bool:
        """An image waits for the page's acknowledgement of those in flight."""
        return self.image is not None and self.acks and self.unacked >= IMAGES_IN_FLIGHT

    async def _wait(self) -> None:
        """Until there is something to send; an image held for an acknowledgement goes
        after :data:`ACK_TIMEOUT_S` without it."""
        if not self._image_held():
            await self.wake.wait()
            return
        left = self._sent_at + ACK_TIMEOUT_S - time.monotonic()
        try:
            await asyncio.wait_for(self.wake.wait(), max(left, 0.0))
        except TimeoutError:
            log.debug("dashboard: browser %s acknowledged no image for %g s: sending the "
                      "next anyway", self.peer, ACK_TIMEOUT_S)
            self.unacked = 0

    async def pump(self) -> None:
        """Send what is queued, newest image last, as fast as the browser takes it (and,
        for one that acknowledges images, as fast as it acknowledges them); drop the
        browser when it takes nothing for :data:`WS_SEND_TIMEOUT_S`."""
        try:
            while not self.ws.closed:
                await self._wait()
                self.wake.clear()
                while self.texts:
                    await asyncio.wait_for(self.ws.send_str(self.texts.popleft()),
                                           WS_SEND_TIMEOUT_S)
                if self.image is not None and not self._image_held():
                    data, self.image = self.image, None
                    # announced: over a slow link the page hears nothing else while an
                    # image arrives, and must not take that for a frozen server
                    await asyncio.wait_for(self.ws.send_str(
                        f'{{"type": "image", "bytes": {len(data)}}}'), WS_SEND_TIMEOUT_S)
                    await asyncio.wait_for(self.ws.send_bytes(data), WS_SEND_TIMEOUT_S)
                    self.images_sent += 1
                    self.unacked += 1
                    self._sent_at = time.monotonic()
        except TimeoutError:
            log.info("dashboard: browser %s took no data for %g s: dropped", self.peer,
                     WS_SEND_TIMEOUT_S)
            _abort(self.transport)


async def _close_browser(browser: _Browser) -> None:
    """Stop ``browser``'s pump and close its WebSocket (within 0.5 s; errors ignored).

    A browser that does not read leaves the pump waiting in aiohttp's drain, on a future
    that the WebSocket shares: cancelling the pump cancels that future, and ``ws.close()``,
    draining on it too, then raises CancelledError. That one is not ours to pass on (it
    ended the whole shutdown); one that cancels the task closing the dashboard is."""
    task = asyncio.current_task()
    cancels = task.cancelling() if task is not None else 0  # requests already under way
    if browser.task is not None:
        browser.task.cancel()
    try:
        await asyncio.wait_for(
            browser.ws.close(code=WSCloseCode.GOING_AWAY, message=b"service stopping"), 0.5)
    except asyncio.CancelledError:
        _abort(browser.transport)
        if task is not None and task.cancelling() > cancels:
            raise
    except Exception:  # the browser is gone, or too slow to take the close frame
        _abort(browser.transport)


class DashboardServer:
    """Serve the dashboard of the stream published at ``pub_address``.

    ``port=0`` picks a free port (:attr:`url` tells which). Use ``await start()`` and
    ``await close()``, or ``async with``. ``hint`` names the option that sets the address
    and port in the errors of a failed bind (None: ``livemask serve``'s, ``dashboard.port /
    --dashboard HOST:PORT``; ``livemask dashboard`` gives ``--listen HOST:PORT``).
    """

    def __init__(
        self,
        pub_address: str,
        *,
        address: str = "127.0.0.1",
        port: int = 8080,
        update_hz: float = 5.0,
        max_image_px: int = 512,
        title: str = "livemask",
        hint: str | None = None,
    ) -> None:
        if not (math.isfinite(update_hz) and update_hz > 0):
            raise ConfigError(f"dashboard.update_hz must be a finite number > 0, got {update_hz}")
        if max_image_px < 1:
            raise ConfigError(f"dashboard.max_image_px must be >= 1, got {max_image_px}")
        self.pub_address = pub_address
        self.address = address
        self.port = port
        self.update_hz = update_hz
        self.max_image_px = max_image_px
        self.title = title
        self.hint = hint
        self.state = DashboardState()
        self.browsers: set[_Browser] = set()
        self.images_encoded = 0
        self.encode_ms: deque[float] = deque(maxlen=100)
        self._last_image: bytes | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._sock: socket.socket | None = None
        self.connections_refused = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: AsyncSubscriber | None = None
        self._image_sub: AsyncSubscriber | None = None
        self._watched = asyncio.Event()  # set while a browser wants images
        self._told_at = 0.0  # monotonic time of the last message to every page
        self.samples = 0  # times the image subscriber subscribed to frame and labels
        self._loopback = _is_loopback(address)

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> DashboardServer:
        """Bind the HTTP port, connect the subscriber, start the update loop."""
        if self._runner is not None:
            return self
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._index)
        app.router.add_get("/assets/{name}", self._asset)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/api/state", self._api_state)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
            keepalive_timeout=KEEPALIVE_S, logger=http_logger((HttpProcessingError,)))
        await runner.setup()
        try:
            self._sock = self._bind()
            # (not a web.SockSite: it has no way to refuse connections past a number)
            self._listener = await asyncio.get_running_loop().create_server(
                self._connection, sock=self._sock, backlog=64)
            self._sub = AsyncSubscriber(self.pub_address, ("measurements", "status", "event"),
                                        rcvhwm=1000)
        except BaseException:  # e.g. a pub_address the subscriber refuses
            await self._release(runner)
            raise
        self._runner = runner
        self._tasks = [
            asyncio.create_task(self._read(self._sub), name="livemask-dashboard-sub"),
            asyncio.create_task(self._updates(), name="livemask-dashboard-updates"),
            asyncio.create_task(self._images(), name="livemask-dashboard-images"),
        ]
        log.info("dashboard: %s (data from %s)", self.url, self.pub_address)
        return self

    async def _release(self, runner: web.AppRunner) -> None:
        """Undo a :meth:`start` that failed part way: the listener, the HTTP port and the
        runner, so that the port is free again."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        await runner.cleanup()

    def _connection(self) -> asyncio.BaseProtocol:
        """The protocol of a new connection: aiohttp's, or a 503 past MAX_CONNECTIONS."""
        server = self._runner.server if self._runner is not None else None
        if server is not None and len(server.connections) < MAX_CONNECTIONS:
            return server()
        self.connections_refused += 1
        if is_power_of_ten(self.connections_refused):
            log.warning("dashboard: %d connections open; refused a new one (%d so far)",
                        MAX_CONNECTIONS, self.connections_refused)
        return _Busy()

    def _bind(self) -> socket.socket:
        try:
            infos = socket.getaddrinfo(self.address, self.port, type=socket.SOCK_STREAM)
            family = infos[0][0]
            addr = infos[0][4][:2]
            sock = socket.create_server(addr, family=family, backlog=64)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve the dashboard on {self.address}:{self.port}: {exc}. "
                f"{_bind_advice(exc, self.hint)}"
            ) from exc
        self.port = int(sock.getsockname()[1])
        return sock

    @property
    def url(self) -> str | None:
        """``http://ADDRESS:PORT/`` while serving, else None."""
        if self._runner is None:
            return None
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/"

    async def close(self) -> None:
        """Close browsers, subscribers and the HTTP port (idempotent)."""
        runner, self._runner = self._runner, None
        for task in self._tasks:
            task.cancel()
        for browser in list(self.browsers):
            await _close_browser(browser)
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        for sub in (self._sub, self._image_sub):
            if sub is not None:
                sub.close()
        self._sub = self._image_sub = None
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()  # no new connections (the open ones: runner.cleanup)
        if runner is not None:
            await runner.cleanup()
            log.info("dashboard stopped")
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def __aenter__(self) -> DashboardServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ stream
    async def _recv(self, sub: AsyncSubscriber, timeout_s: float) -> Message | None:
        """The next message of ``sub``; None on timeout, for a malformed message, when
        ``sub`` was closed meanwhile or on a socket error (logged: the dashboard goes on)."""
        try:
            return await sub.recv(timeout_s=timeout_s)
        except ProtocolError as exc:
            log.warning("dashboard: dropped a malformed message: %s", exc)
            return None
        except (RuntimeError, zmq.ZMQError):
            if not sub.closed:
                log.exception("dashboard: receiving from %s failed", self.pub_address)
        await asyncio.sleep(timeout_s)
        return None

    def _take(self, msg: Message) -> dict[str, Any] | None:
        try:
            return self.state.add(msg)
        except Exception:  # a message we do not understand must not stop the dashboard
            log.exception("dashboard: could not use a %s message", msg.topic)
            return None

    async def _read(self, sub: AsyncSubscriber) -> None:
        """Feed every measurements/status/event message to the state; push status and
        events to browsers as they come."""
        while True:
            msg = await self._recv(sub, 0.5)
            if msg is None:
                continue
            out = self._take(msg)
            if msg.topic == "event" and msg.header.get("kind") == "acquisition_started":
                self._last_image = None  # the last run's: not the newest once this one runs
            if self.state.take_restart():
                self._restarted()
                if out is not None and out["type"] == "event":
                    out = None  # (in the hello's events)
            if out is not None and self.browsers:
                if out["type"] == "status":
                    out = {**out, "dashboard": self.report()}
                self._broadcast(out)

    def _restarted(self) -> None:
        """The service restarted: no image of its old run for anyone (a page opened now
        would get it as the newest), and every page starts again from a fresh hello."""
        self._last_image = None
        hello = self.state.hello(self._config())
        for browser in self.browsers:
            browser.image = None
            browser.send_json(hello)

    async def _images(self) -> None:
        """While a browser watches: read every ``frame`` and ``labels`` message as it comes
        (the state keeps the newest few) and, at most ``update_hz`` times a second, send
        the newest frame that was not sent yet. Unsubscribed while no browser watches.

        (Sampling, i.e. subscribing only for a moment now and then, lost the last frame
        of a run when it was published between two such moments.)"""
        period = 1.0 / self.update_hz
        sent_at = -period
        while True:
            if not self._watched.is_set():
                self._unsubscribe_images()
                await self._watched.wait()
            sub = self._subscribe_images()
            wait = sent_at + period - time.monotonic()
            msg = await self._recv(sub, wait if wait > 0 else 0.25)
            for _ in range(_DRAIN_MAX):  # take what is queued: the newest decides
                if msg is None:
                    break
                self._take(msg)
                msg = await self._recv(sub, 0.0)
            if time.monotonic() - sent_at < period or not self._watched.is_set():
                continue
            picked = self.state.pick_frame()
            if picked is not None:
                sent_at = time.monotonic()
                try:
                    self._send_image(*picked)
                except Exception:
                    log.exception("dashboard: could not send a frame")

    def _subscribe_images(self) -> AsyncSubscriber:
        """The image subscriber, subscribed to ``frame`` and ``labels``."""
        sub = self._image_sub
        if sub is None:
            sub = self._image_sub = AsyncSubscriber(self.pub_address, _IMAGE_TOPICS,
                                                    rcvhwm=_IMAGE_HWM)
            self.samples += 1
        elif not sub.closed and _IMAGE_TOPICS[0] not in sub.topics:
            for topic in _IMAGE_TOPICS:
                sub.subscribe(topic)
            self.samples += 1
        return sub

    def _unsubscribe_images(self) -> None:
        """No ``frame`` and ``labels`` while no browser watches: the service sends none."""
        sub = self._image_sub
        if sub is not None and not sub.closed and _IMAGE_TOPICS[0] in sub.topics:
            for topic in _IMAGE_TOPICS:
                sub.unsubscribe(topic)

    async def _updates(self) -> None:
        """At most ``update_hz`` times a second: the new summary points and grain stats;
        at least every :data:`ALIVE_S`, something (a page hearing nothing says so)."""
        period = 1.0 / self.update_hz
        tick = min(period, ALIVE_S / 2)
        updated_at = -period
        while True:
            if self.browsers:
                now = time.monotonic()
                if now - updated_at >= period - tick / 10:
                    updated_at = now
                    update = self.state.update()
                    if update is not None:
                        self._broadcast(update)
                    stale = self.state.stale_message()  # the service went silent: say so
                    if stale is not None:
                        self._broadcast({**stale, "dashboard": self.report()})
                if time.monotonic() - self._told_at >= ALIVE_S:  # idle, yet alive
                    self._broadcast({"type": "alive"})
            await asyncio.sleep(tick)

    def _send_image(self, frame: Message, labels: Message | None) -> None:
        """Decimate ``frame`` (outlines of ``labels``) once and offer it to every browser."""
        t0 = time.perf_counter()
        preview = make_preview(
            frame.arrays["image"],
            labels.arrays["labels"] if labels is not None else None,
            max_px=self.max_image_px,
        )
        h = frame.header
        data = encode_preview(preview, {
            "frame_id": h.get("frame_id"),
            "index": h.get("index"),
            "skipped": bool(h.get("skipped", False)),
            "t": (h.get("t") or {}).get("acquired"),
            "source_shape": list(frame.arrays["image"].shape),
        })
        self.encode_ms.append((time.perf_counter() - t0) * 1e3)
        self.images_encoded += 1
        self._last_image = data
        for browser in self.browsers:
            if browser.wants_images:
                browser.offer_image(data)

    def _broadcast(self, obj: dict[str, Any]) -> None:
        self._told_at = time.monotonic()
        text = dumps_json(obj).decode("utf-8")
        for browser in self.browsers:
            browser.send_text(text)

    def report(self) -> dict[str, Any]:
        """The dashboard's own counters (shown on the page and in ``/api/state``)."""
        received: dict[str, int] = {}
        for sub in (self._sub, self._image_sub):
            for k, v in (sub.received if sub is not None else {}).items():
                received[k] = received.get(k, 0) + v
        ms = sorted(self.encode_ms)
        return {
            "browsers": len(self.browsers),
            "images_encoded": self.images_encoded,
            "images_sent": sum(b.images_sent for b in self.browsers),
            "images_replaced": sum(b.images_replaced for b in self.browsers),
            "encode_ms_p50": round(ms[len(ms) // 2], 2) if ms else None,
            "samples": self.samples,
            "received": received,
            # missed measurements/status/event messages (frames and labels: not counted)
            "gaps": dict(self._sub.gaps) if self._sub is not None else {},
        }

    def _config(self) -> dict[str, Any]:
        return {"version": __version__, "title": self.title, "update_hz": self.update_hz,
                "max_image_px": self.max_image_px, "source": self.pub_address,
                "keepalive_s": ALIVE_S}

    # ------------------------------------------------------------ HTTP
    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Loopback binds answer only to loopback host names (no DNS rebinding); every
        response gets a strict Content-Security-Policy."""
        if self._loopback:
            try:
                host = urlsplit(f"//{request.host}").hostname or ""
            except ValueError:  # e.g. "[::1" (an unclosed IPv6 bracket)
                return web.Response(status=400, text=f"bad Host header {request.host!r}\n")
            if not _is_loopback(host):
                return web.Response(status=403, text=(
                    f"the livemask dashboard is bound to {self.address}: open it as "
                    f"http://{'localhost' if ':' in self.address else self.address}:"
                    f"{self.port}/\n"))
        response: web.StreamResponse = await handler(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("Content-Security-Policy", _csp(request.host))
        return response

    async def _index(self, request: web.Request) -> web.Response:
        page = _read_asset("index.html").decode("utf-8")
        page = page.replace("{{title}}", html.escape(self.title))
        return web.Response(text=page, content_type="text/html", charset="utf-8")

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound(text=f"no asset {name!r}\n")
        return web.Response(body=_read_asset(name), content_type=ASSETS[name],
                            charset="utf-8")

    async def _api_state(self, request: web.Request) -> web.Response:
        s = self.state
        body = {
            "config": self._config(),
            "status": s.status,
            "silent_s": s.silent_s(),  # set when no status came for a while: service gone
            "waiting_s": s.waiting_s(),  # set when no status came at all since the start
            "rates": s.status_message()["rates"],
            "summary": s.summary,
            "frame_id": s.measured_frame_id,
            "grains": s.grains,
            "events": list(s.events),
            "points": len(s.series),
            "dashboard": self.report(),
        }
        return web.Response(body=dumps_json(body), content_type="application/json")

    def _update_watched(self) -> None:
        """Read frames only while some browser shows them. The last image stays for a page
        that reconnects (a reload, a network blip) until an acquisition starts: its frames
        may not be read, so the old image would not be the newest (a page opened later got
        an earlier acquisition's image)."""
        if any(b.wants_images for b in self.browsers):
            self._watched.set()
        elif self._watched.is_set():
            self._watched.clear()
            self.state.reset_frames()

    def _from_browser(self, browser: _Browser, text: str) -> None:
        """``{"type": "view", "images": bool, "ack": bool}``: the page is hidden/shown or
        its image paused (and whether it acknowledges images); ``{"type": "ack"}``: it has
        an image. Anything else is ignored."""
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, or nested past Python's parser
            return
        if not isinstance(msg, dict):
            return
        if msg.get("type") == "ack":
            browser.acked()
        elif msg.get("type") == "view":
            self._view(browser, msg)

    def _view(self, browser: _Browser, msg: dict[str, Any]) -> None:
        """Take a page's ``view`` message (see :meth:`_from_browser`)."""
        images = msg.get("images", True)
        if not isinstance(images, bool):  # e.g. "false", which bool() takes for true
            return
        if msg.get("ack") is True:
            browser.acks = True
        shown, browser.wants_images = browser.wants_images, images
        if images and not shown and self._last_image is not None:
            browser.offer_image(self._last_image)  # shown again: the newest image at once
        self._update_watched()

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin and urlsplit(origin).netloc != request.host:
            raise web.HTTPForbidden(text="cross-origin WebSocket refused\n")
        # no permessage-deflate: compressing images would cost the service CPU for little gain
        ws = web.WebSocketResponse(heartbeat=WS_HEARTBEAT_S, max_msg_size=1 << 16,
                                   compress=False)
        await ws.prepare(request)
        browser = _Browser(ws, request.remote or "?", request.transport)
        browser.send_json(self.state.hello(self._config()))
        if self.state.status is not None:
            browser.send_json({**self.state.status_message(), "dashboard": self.report()})
        if self._last_image is not None:
            browser.offer_image(self._last_image)
        self.browsers.add(browser)
        self._update_watched()
        browser.task = asyncio.create_task(browser.pump(), name="livemask-dashboard-ws")
        log.info("dashboard: browser %s connected (%d now)", browser.peer, len(self.browsers))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._from_browser(browser, msg.data)
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            self.browsers.discard(browser)
            browser.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await browser.task
            if _unsent(browser.transport):  # it stopped reading (e.g. no PONG): no waiting
                _abort(browser.transport)
            self._update_watched()
            log.info("dashboard: browser %s left (%d now)", browser.peer, len(self.browsers))
        return ws
