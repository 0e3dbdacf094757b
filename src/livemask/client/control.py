"""Control client: JSON requests to a livemask service, with Lazy Pirate retries."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import zmq

from livemask import protocol
from livemask.errors import ControlError, ControlTimeout
from livemask.transport._sockets import allow_ipv6

__all__ = ["DEFAULT_CONTROL_ADDRESS", "ControlClient"]

DEFAULT_CONTROL_ADDRESS = "tcp://127.0.0.1:5556"

logger = logging.getLogger("livemask")


def _plain(obj: Any) -> Any:
    """pydantic models (e.g. ``useq.MDASequence``) to JSON-ready dicts; others unchanged."""
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    return obj


#: How long :meth:`ControlClient.stop` waits for its reply by default (s).
STOP_TIMEOUT_S = 30.0
#: Commands that change nothing, or nothing more when repeated: resent after a timeout.
REPEATABLE = frozenset({"status", "snapshot"})
#: Commands tried again on a fresh socket while no connection took them, but never resent
#: once sent: a ``stop`` resent behind a slow one stopped the acquisition another client
#: had started meanwhile (``stop(acquisition=n)`` stops only acquisition n).
RETRIED_UNTIL_SENT = frozenset({"stop"})
#: The form of an address, for errors.
ADDRESS_FORM = (
    "give tcp://HOST:PORT (e.g. tcp://127.0.0.1:5556) or ipc://PATH; `livemask serve` "
    "prints its addresses as it starts ('serving: pub tcp://..., control tcp://...')"
)


def safe_to_repeat(cmd: str, args: Mapping[str, Any]) -> bool:
    """Whether running ``cmd`` twice does what running it once does."""
    return cmd in REPEATABLE or (cmd == "rules" and not args)


def check_timeout(value: float, name: str = "timeout_s") -> float:
    """``value`` if it is a finite number of seconds > 0; else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0 and finite (seconds), got {value!r}")
    return value


def connect_or_explain(sock: zmq.Socket[Any], address: str, argument: str = "address") -> None:
    """Connect ``sock`` to ``address``; for an address ZeroMQ refuses, close ``sock`` and
    raise a ValueError naming ``argument`` and the form expected."""
    try:
        if not isinstance(address, str):
            raise TypeError(f"{type(address).__name__}, not str")
        check_connect_form(address)
        allow_ipv6(sock, address)
        sock.connect(address)
    except (zmq.ZMQError, TypeError, ValueError) as exc:
        sock.close(linger=0)
        why = zmq.strerror(exc.errno or 0) if isinstance(exc, zmq.ZMQError) else str(exc)
        raise ValueError(
            f"{argument} {address!r} is not an address to connect to ({why}): {ADDRESS_FORM}"
        ) from None


def check_connect_form(address: str) -> None:
    """ValueError for what libzmq would take but cannot reach a service: a TCP port 0, ``*``
    or above 65535 (libzmq wraps it: 115086 connects to 49550); ipc and inproc (a publisher
    in this process) are left to libzmq."""
    if address.startswith(("ipc://", "inproc://")):
        return
    if not address.startswith("tcp://"):
        raise ValueError("not tcp://, ipc:// or inproc://")
    port = address.rpartition(":")[2]
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"port {port!r} is not 1 to 65535")


class ControlClient:
    """Blocking client of the control channel (REQ socket, Lazy Pirate pattern).

    Each request waits ``timeout_s`` (finite, > 0) for its reply; when none comes the
    socket is thrown away and, for a request that is safe to repeat (``status``,
    ``snapshot``, ``rules`` without arguments), resent on a fresh one, up to ``retries``
    attempts in all; then :class:`ControlTimeout` is raised. Other requests (``start``,
    ``stop``, ``enqueue``, ``set``, ``rules`` that change the rules) are sent once: the
    service answers one request at a time, so a reply late behind a slow one (a ``stop``
    waiting for a long exposure) would otherwise have the request run twice, and a second
    ``stop`` would stop whatever runs when it is handled, e.g. an acquisition another
    client started meanwhile (``stop(acquisition=n)`` stops only acquisition ``n``). A
    ``stop`` is tried again only while no connection takes it. After a
    :class:`ControlTimeout` such a request may still have been executed: check
    ``status``. An ``ok: false`` reply raises :class:`ControlError` with the service's
    code and message. ``address`` is ``tcp://HOST:PORT`` or ``ipc://PATH`` (a
    ValueError otherwise). Not thread-safe.
    """

    def __init__(
        self,
        address: str = DEFAULT_CONTROL_ADDRESS,
        *,
        timeout_s: float = 2.0,
        retries: int = 3,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        check_timeout(timeout_s)
        if retries < 1:
            raise ValueError(f"retries must be >= 1, got {retries}")
        self.address = address
        self.timeout_s = timeout_s
        self.retries = retries
        self._context = context if context is not None else zmq.Context.instance()
        # refuse a malformed address now, not at the first request (the socket is
        # connected for each attempt: Lazy Pirate)
        trial = self._context.socket(zmq.REQ)
        connect_or_explain(trial, address)
        trial.close(linger=0)
        self._socket: zmq.Socket[Any] | None = None
        self._last_id = 0
        self._closed = False

    def _connect(self) -> zmq.Socket[Any]:
        if self._socket is None:
            sock = self._context.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # writable only once connected to the service
            connect_or_explain(sock, self.address)
            self._socket = sock
        return self._socket

    def _drop_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def request(self, cmd: str, /, *, timeout_s: float | None = None, **args: Any) -> Any:
        """Send ``cmd`` with ``args`` and return the reply's ``result``, waiting
        ``timeout_s`` per attempt (default: the client's)."""
        if self._closed:
            raise RuntimeError("control client is closed")
        wait_s = self.timeout_s if timeout_s is None else check_timeout(timeout_s)
        self._last_id += 1
        req_id = self._last_id
        payload = protocol.encode_request(req_id, cmd, args)
        timeout_ms = max(1, round(wait_s * 1000))
        # no connection within the client's own timeout: no service there (a long wait, as
        # stop's 30 s, is for a service that is slow to answer, not for one that is absent)
        connect_ms = max(1, round(min(wait_s, self.timeout_s) * 1000))
        resend = safe_to_repeat(cmd, args)
        attempts = self.retries if resend or cmd in RETRIED_UNTIL_SENT else 1
        sent = False
        tried = 0
        for attempt in range(1, attempts + 1):
            tried = attempt
            sock = self._connect()
            try:
                raw = None
                if sock.poll(connect_ms, zmq.POLLOUT):  # (IMMEDIATE: once connected)
                    try:  # (the connection may have gone since the poll: never block)
                        sock.send(payload, zmq.NOBLOCK)
                        sent = True
                    except zmq.Again:
                        pass
                if sent:
                    ready = sock.poll(timeout_ms, zmq.POLLIN)
                    raw = sock.recv() if ready else None
            except BaseException:
                self._drop_socket()  # a REQ socket mid-request can't be reused
                raise
            if raw is not None:
                reply = protocol.parse_reply(raw)
                if reply.get("id") == req_id:
                    if reply["ok"]:
                        return reply.get("result")
                    err = reply["error"]
                    raise ControlError(err["code"], err["message"])
                logger.warning(
                    "discarding control reply with id %r (expected %r)", reply.get("id"), req_id
                )
            else:
                logger.debug(
                    "no reply to %r from %s (attempt %d/%d)",
                    cmd,
                    self.address,
                    attempt,
                    attempts,
                )
            self._drop_socket()  # Lazy Pirate: retry on a fresh socket
            if sent and not resend:
                break  # (it may still run: not sent twice)
        if not sent:
            raise ControlTimeout(
                f"no connection to {self.address} for {cmd!r} after {tried} attempt(s) of "
                f"{connect_ms / 1000:g} s: no service there; check that `livemask serve` is "
                "running and that its --control address matches this one"
            )
        maybe_run = "" if resend else (
            f"; {cmd!r} is not resent, and the service may still run it: check status")
        raise ControlTimeout(
            f"no reply to {cmd!r} from {self.address} after {tried} attempt(s) of "
            f"{wait_s:g} s; check that `livemask serve` is running and that its "
            "--control address matches this one (or raise the timeout; a service still "
            "starting, opening the rig and warming up its model, answers requests only "
            f"once it has started){maybe_run}"
        )

    # Convenience wrappers for the service's commands (see docs/protocol.md).

    def status(self) -> Any:
        """The service status (state, mode, counters, latencies)."""
        return self.request("status")

    def start(self, sequence: Mapping[str, Any] | Any | None = None) -> Any:
        """Start acquiring; ``sequence`` is a ``useq.MDASequence`` (or its JSON dict)."""
        if sequence is None:
            return self.request("start")
        return self.request("start", sequence=_plain(sequence))

    def stop(self, timeout_s: float = STOP_TIMEOUT_S, *, acquisition: int | None = None) -> Any:
        """Stop the running acquisition; with ``acquisition`` (its number, as in
        ``acquisition_started``), only if that one is running: the reply then also has
        ``acquisition``, the running (or last) one's number. Waits up to ``timeout_s`` (or
        the client's timeout, if longer) for the reply: the service waits for the frame
        being taken, at least 5 s or two exposures and 1 s, before it answers
        ``still_running``. Sent once (see the class): after a :class:`ControlTimeout`
        check ``status``, or stop again with ``acquisition``. A service that is not there
        is given up on after the client's ``timeout_s`` per attempt, as for any request."""
        wait_s = max(check_timeout(timeout_s), self.timeout_s)
        if acquisition is None:
            return self.request("stop", timeout_s=wait_s)
        return self.request("stop", timeout_s=wait_s, acquisition=acquisition)

    def enqueue(self, events: Iterable[Mapping[str, Any] | Any]) -> Any:
        """Append ``useq.MDAEvent`` s (or their JSON dicts) to the running acquisition."""
        return self.request("enqueue", events=[_plain(e) for e in events])

    def snapshot(self) -> Any:
        """Latest frame/labels/measurements headers and per-topic seq numbers."""
        return self.request("snapshot")

    def set(self, **settings: Any) -> Any:
        """Change settings, e.g. ``set(exposure_ms=20, mode="synchronized")``."""
        return self.request("set", **settings)

    def close(self) -> None:
        """Close the socket; idempotent."""
        self._closed = True
        self._drop_socket()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
