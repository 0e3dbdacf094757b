"""Control client: JSON requests to a livemask service, with Lazy Pirate retries."""

from __future__ import annotations

import logging
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
REPEATABLE = frozenset({"status", "snapshot", "stop"})


def safe_to_repeat(cmd: str, args: Mapping[str, Any]) -> bool:
    """Whether running ``cmd`` twice does what running it once does."""
    return cmd in REPEATABLE or (cmd == "rules" and not args)


class ControlClient:
    """Blocking client of the control channel (REQ socket, Lazy Pirate pattern).

    Each request waits ``timeout_s`` for its reply; when none comes the socket is thrown
    away and, for a request that is safe to repeat (``status``, ``snapshot``, ``stop``,
    ``rules`` without arguments), resent on a fresh one, up to ``retries`` attempts in all;
    then :class:`ControlTimeout` is raised. Other requests (``start``, ``enqueue``, ``set``,
    ``rules`` that change the rules) are sent once: the service answers one request at a
    time, so a reply late behind a slow one (a ``stop`` waiting for a long exposure) would
    otherwise have the request run twice. After a :class:`ControlTimeout` such a request
    may still have been executed: check ``status``. An ``ok: false`` reply raises
    :class:`ControlError` with the service's code and message. Not thread-safe.
    """

    def __init__(
        self,
        address: str = DEFAULT_CONTROL_ADDRESS,
        *,
        timeout_s: float = 2.0,
        retries: int = 3,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if retries < 1:
            raise ValueError(f"retries must be >= 1, got {retries}")
        self.address = address
        self.timeout_s = timeout_s
        self.retries = retries
        self._context = context if context is not None else zmq.Context.instance()
        self._socket: zmq.Socket[Any] | None = None
        self._last_id = 0
        self._closed = False

    def _connect(self) -> zmq.Socket[Any]:
        if self._socket is None:
            sock = self._context.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # writable only once connected to the service
            allow_ipv6(sock, self.address)
            sock.connect(self.address)
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
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        if wait_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {wait_s}")
        self._last_id += 1
        req_id = self._last_id
        payload = protocol.encode_request(req_id, cmd, args)
        timeout_ms = max(1, round(wait_s * 1000))
        # no connection within the client's own timeout: no service there (a long wait, as
        # stop's 30 s, is for a service that is slow to answer, not for one that is absent)
        connect_ms = max(1, round(min(wait_s, self.timeout_s) * 1000))
        attempts = self.retries if safe_to_repeat(cmd, args) else 1
        sent = False
        for attempt in range(1, attempts + 1):
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
        if not sent:
            raise ControlTimeout(
                f"no connection to {self.address} for {cmd!r} after {attempts} attempt(s) of "
                f"{connect_ms / 1000:g} s: no service there; check that `livemask serve` is "
                "running and that its --control address matches this one"
            )
        maybe_run = "" if attempts > 1 else (
            f"; {cmd!r} is not resent, and the service may still run it: check status")
        raise ControlTimeout(
            f"no reply to {cmd!r} from {self.address} after {attempts} attempt(s) of "
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

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> Any:
        """Stop the running acquisition. Waits up to ``timeout_s`` (or the client's timeout,
        if longer) for the reply: the service waits for the frame being taken, at least
        5 s or two exposures and 1 s, before it answers ``still_running``. A service that
        is not there is given up on after the client's ``timeout_s`` per attempt, as for
        any request."""
        return self.request("stop", timeout_s=max(timeout_s, self.timeout_s))

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
