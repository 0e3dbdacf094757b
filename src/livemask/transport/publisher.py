"""Publishing messages: the ZeroMQ PUB publisher and an in-memory fake for tests."""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np
import zmq

from livemask import protocol
from livemask.errors import ConfigError
from livemask.protocol import Message
from livemask.transport._sockets import (
    IpcFile,
    bind_or_explain,
    bound_endpoint,
    bound_ipc_file,
    ipc_path,
)

__all__ = [
    "CLOSE_LINGER_S", "DEFAULT_PUB_ADDRESS", "HEARTBEAT_S", "LARGEST_BYTES_PER_PIXEL",
    "MAX_SUBSCRIPTION_BYTES", "MIN_QUEUE_HWM", "MemoryPublisher", "Publisher", "ZmqPublisher",
    "queue_hwm", "set_heartbeat",
]

DEFAULT_PUB_ADDRESS = "tcp://127.0.0.1:5555"
#: How long a graceful close (``close(linger_s=CLOSE_LINGER_S)``, the service's orderly
#: shutdown) waits for queued messages to reach subscribers: the last measurements,
#: ``acquisition_finished`` and the final status; a subscriber that is not reading then
#: gets what it missed as ``seq`` gaps.
CLOSE_LINGER_S = 2.0
#: Largest message a subscriber may send (a subscription is one: a flag byte and the topic
#: prefix; the longest topic, ``measurements``, makes 13 bytes). libzmq disconnects a peer
#: that sends more: without a limit it keeps every subscription in a trie of one node per
#: byte, ≈ 45 bytes of memory per byte subscribed (1 MiB subscribed cost the service 48 MiB).
MAX_SUBSCRIPTION_BYTES = 256
#: ZeroMQ heartbeat: a PING to each peer every ``HEARTBEAT_S`` seconds; a peer that sends
#: nothing back within 3 × that (no PONG: gone, or a raw TCP client holding the connection)
#: is disconnected, so idle connections cannot use up the service's file descriptors.
#: libzmq answers PINGs in its own I/O thread: a client only misses them when its receive
#: queue has been full that long (it reconnects by itself; the missed messages show as
#: ``seq`` gaps), and then only while the TCP path has room for the PING: a stalled client
#: of large messages (images) is not dropped, and holds up to ``sndhwm`` of them here.
HEARTBEAT_S = 10.0
#: The largest message of a frame, per pixel: its ``labels`` (and ``truth``) are int32, and a
#: camera image is at most 4 bytes a pixel (uint16 in practice: then this overstates it).
LARGEST_BYTES_PER_PIXEL = 4
#: The fewest messages a subscriber may have queued whatever ``publish.max_queued_mb`` says:
#: under that a reader that keeps up but takes a frame's messages in a burst loses some.
MIN_QUEUE_HWM = 4
#: How long :meth:`ZmqPublisher.limit_queue` retries binding its endpoint again (libzmq
#: releases an unbound TCP port from its I/O thread, within milliseconds).
REBIND_TIMEOUT_S = 2.0


def queue_hwm(sndhwm: int, max_queued_mb: float, frame_shape: tuple[int, int]) -> int:
    """The high-water mark (messages per subscriber) that keeps what one stalled subscriber
    pins within ``max_queued_mb`` MB of frames of ``frame_shape``, counting every message as
    large as a frame's largest (:data:`LARGEST_BYTES_PER_PIXEL`); at most ``sndhwm``, at
    least :data:`MIN_QUEUE_HWM`; ``max_queued_mb`` 0: ``sndhwm``."""
    if max_queued_mb <= 0:
        return sndhwm
    largest = max(1, frame_shape[0] * frame_shape[1] * LARGEST_BYTES_PER_PIXEL)
    fits = int(max_queued_mb * 1e6 // largest)
    return min(sndhwm, max(MIN_QUEUE_HWM, fits))


@runtime_checkable
class Publisher(Protocol):
    """What the pipeline needs from a publisher."""

    def publish(
        self,
        topic: str,
        header: Mapping[str, Any],
        arrays: Mapping[str, np.ndarray] | None = None,
    ) -> int:
        """Send one message; return the ``seq`` it was given."""
        ...

    def close(self) -> None:
        """Release resources; idempotent."""
        ...


def set_heartbeat(sock: zmq.Socket[Any], heartbeat_s: float) -> None:
    """ZeroMQ heartbeats on ``sock``: PING every ``heartbeat_s``, drop a peer silent for
    3 × that (0: none)."""
    if heartbeat_s > 0:
        ivl_ms = max(1, round(heartbeat_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ivl_ms)


def _stamp_published(header: Mapping[str, Any], seq: int) -> dict[str, Any]:
    """Copy of ``header`` with ``seq`` and, when it has a ``t`` dict, ``t.published``."""
    out = dict(header)
    out["seq"] = seq
    stamps = out.get("t")
    if isinstance(stamps, Mapping) and "published" not in stamps:
        out["t"] = {**stamps, "published": time.time()}
    return out


class ZmqPublisher:
    """ZeroMQ PUB publisher of protocol v1 messages.

    ``publish`` never blocks and never raises because a subscriber is slow or gone: PUB
    drops messages at the high-water mark (``sndhwm`` messages per subscriber) without
    telling the sender, so the publisher cannot count drops; every message gets a per-topic
    ``seq`` so subscribers see them as gaps. ``sent`` counts messages handed to the socket.

    Without a ``context`` the publisher has a ZeroMQ context of its own, so that a graceful
    :meth:`close` can wait (at most its ``linger_s``) until queued messages are sent; an
    ``inproc://`` publisher uses ``zmq.Context.instance()`` instead, which its subscribers
    in this process must share.

    A subscriber that sends a message over :data:`MAX_SUBSCRIPTION_BYTES` (no real
    subscription does) is disconnected, and so is one that does not answer the ZeroMQ
    heartbeat (:data:`HEARTBEAT_S`; ``heartbeat_s=0``: none).

    Not thread-safe: use it from one thread only (the service's asyncio loop). Arrays are
    sent zero-copy, so they must not be modified after ``publish`` returns.
    """

    def __init__(
        self,
        address: str = DEFAULT_PUB_ADDRESS,
        *,
        sndhwm: int = 100,
        context: zmq.Context[Any] | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.address = address
        self.sndhwm = sndhwm
        self.heartbeat_s = heartbeat_s
        self._context = context
        self._own_context: zmq.Context[Any] | None = None
        self._socket: zmq.Socket[Any] | None = None
        self._ipc_file: IpcFile | None = None
        self._closed = False
        self._seq: dict[str, int] = {}
        self.sent: dict[str, int] = {}

    def start(self) -> ZmqPublisher:
        """Create and bind the PUB socket; returns ``self``."""
        if self._closed:
            raise RuntimeError("publisher is closed; create a new ZmqPublisher")
        if self._socket is not None:
            return self
        ctx = self._context
        if ctx is None and self.address.startswith("inproc://"):
            ctx = zmq.Context.instance()
        elif ctx is None:
            ctx = self._own_context = zmq.Context()
        sock = ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.sndhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
        set_heartbeat(sock, self.heartbeat_s)
        try:
            self._ipc_file = bind_or_explain(
                sock, self.address, "publisher", "--pub or publish.pub_address")
        except BaseException:
            self._term_own_context()
            raise
        self._socket = sock
        return self

    @property
    def bound_address(self) -> str:
        """The actual endpoint (resolves ``tcp://127.0.0.1:*`` to its port)."""
        return bound_endpoint(self._socket, "publisher")

    @property
    def started(self) -> bool:
        """Whether the socket is bound (:meth:`start`) and not closed."""
        return self._socket is not None

    def publish(
        self,
        topic: str,
        header: Mapping[str, Any],
        arrays: Mapping[str, np.ndarray] | None = None,
    ) -> int:
        """Encode and send one message without blocking; return its ``seq``.

        ``seq`` is taken even when PUB drops the message for a slow subscriber, so the drop
        shows there as a gap. ``t.published`` is stamped now when ``header["t"]`` is a dict
        without it. Raises :class:`ProtocolError` (nothing sent, no ``seq`` taken) for a
        header or array that cannot be encoded.
        """
        if self._socket is None:
            raise RuntimeError("publisher is not started (or closed); call start() first")
        seq = self._seq.get(topic, 0)
        parts = protocol.encode(topic, _stamp_published(header, seq), arrays)
        self._seq[topic] = seq + 1
        # PUB never raises Again: at the high-water mark it drops without a word
        self._socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        self.sent[topic] = self.sent.get(topic, 0) + 1
        return seq

    def limit_queue(self, sndhwm: int) -> bool:
        """Lower the high-water mark to ``sndhwm`` messages per subscriber; True where it
        was lowered.

        libzmq gives each connection its listener's options as they were at bind time, so
        the socket is unbound and bound again at the same endpoint: a subscriber connected
        before is disconnected and reconnects by itself (≈ 0.2 s on loopback; what is sent
        meanwhile it misses, as ``seq`` gaps). ``inproc://`` and ``ipc://*`` endpoints are
        left as they are (an in-process subscriber would not come back; ``*`` names a new
        file each bind). Raises ConfigError where the endpoint was taken meanwhile."""
        if self._socket is None:
            raise RuntimeError("publisher is not started (or closed); call start() first")
        if sndhwm >= self.sndhwm or self.address.startswith("inproc://") \
                or self.address == "ipc://*":
            return False
        # as bound (libzmq unbinds an ipc path only as it was written, relative or not)
        raw = self._socket.getsockopt(zmq.LAST_ENDPOINT)
        endpoint = raw.decode() if isinstance(raw, bytes) else str(raw)
        deadline = time.monotonic() + REBIND_TIMEOUT_S
        try:
            self._socket.unbind(endpoint)
            self._socket.setsockopt(zmq.SNDHWM, sndhwm)
            while True:
                try:
                    self._socket.bind(endpoint)
                    break
                except zmq.ZMQError as exc:
                    if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)
        except zmq.ZMQError as exc:
            raise ConfigError(
                f"cannot bind the publisher to {endpoint!r} again (to lower its high-water "
                f"mark to {sndhwm} messages for publish.max_queued_mb): {exc}; choose "
                "another address with --pub or publish.pub_address (another process may "
                "have taken it meanwhile), or set publish.max_queued_mb to 0") from exc
        self.sndhwm = sndhwm
        if self._ipc_file is not None:  # the bind made a new socket file
            self._ipc_file = bound_ipc_file(ipc_path(self.address))
        return True

    def next_seq(self, topic: str) -> int:
        """The ``seq`` the next message on ``topic`` will get."""
        return self._seq.get(topic, 0)

    def counters(self) -> dict[str, Any]:
        """``{"sent": {topic: n}, "next_seq": {topic: n}, "sndhwm": n}``: ``sent`` counts
        messages handed to the socket, not messages every subscriber got (PUB drops
        silently); ``next_seq`` lists every topic (0: none sent yet), so a late joiner finds
        each it subscribes to; ``sndhwm`` is the messages queued per subscriber at most."""
        return {"sent": dict(self.sent), "next_seq": _every_topic(self._seq),
                "sndhwm": self.sndhwm}

    def close(self, *, linger_s: float = 0.0, wait: bool = True) -> None:
        """Close the socket. Idempotent.

        ``linger_s`` 0 (the default, for an error path) discards unsent messages at once; a
        graceful close passes :data:`CLOSE_LINGER_S`: then, with the publisher's own
        context, it blocks until the queued messages are sent or that time is up, unless
        ``wait`` is False (call :meth:`wait_sent` later, e.g. off the event loop). The
        socket file of an ``ipc://PATH`` address is removed (unless bound anew since)."""
        self._closed = True
        if self._socket is not None:
            self._socket.close(linger=max(0, round(linger_s * 1000)))
            self._socket = None
        if self._ipc_file is not None:
            self._ipc_file.remove()
            self._ipc_file = None
        if wait:
            self.wait_sent()

    def wait_sent(self) -> None:
        """After :meth:`close`: wait until the messages it left queued are sent or its
        ``linger_s`` is up (terminates the publisher's own context; else returns at once)."""
        if self._socket is None:
            self._term_own_context()

    def _term_own_context(self) -> None:
        """Terminate the publisher's own context (waits for the socket's linger)."""
        ctx, self._own_context = self._own_context, None
        if ctx is not None:
            ctx.term()

    def __enter__(self) -> ZmqPublisher:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(linger_s=CLOSE_LINGER_S if exc_type is None else 0.0)


class MemoryPublisher:
    """In-memory :class:`Publisher` for tests: records every message, decoded.

    Messages go through :func:`protocol.encode` and :func:`protocol.decode`, so tests
    exercise the real wire format. Arrays in recorded messages are copies.
    """

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.closed = False
        self._seq: dict[str, int] = {}
        self.sent: dict[str, int] = {}

    def publish(
        self,
        topic: str,
        header: Mapping[str, Any],
        arrays: Mapping[str, np.ndarray] | None = None,
    ) -> int:
        """Record one message; return its ``seq``."""
        if self.closed:
            raise RuntimeError("publisher is closed")
        seq = self._seq.get(topic, 0)
        parts = protocol.encode(topic, _stamp_published(header, seq), arrays)
        self._seq[topic] = seq + 1
        # Copy the buffers as a socket would, so later changes to the arrays don't show.
        msg = protocol.decode([bytes(p) for p in parts])
        self.messages.append(msg)
        self.sent[topic] = self.sent.get(topic, 0) + 1
        return seq

    def by_topic(self, topic: str) -> list[Message]:
        """The recorded messages of one topic, in order."""
        return [m for m in self.messages if m.topic == topic]

    def counters(self) -> dict[str, dict[str, int]]:
        """Same shape as :meth:`ZmqPublisher.counters`."""
        return {"sent": dict(self.sent), "next_seq": _every_topic(self._seq)}

    def close(self, *, linger_s: float = 0.0, wait: bool = True) -> None:
        """Mark closed; idempotent (the arguments as :meth:`ZmqPublisher.close`, unused)."""
        self.closed = True


def _every_topic(next_seq: Mapping[str, int]) -> dict[str, int]:
    """``next_seq`` with every v1 topic (0 for one not sent yet), then any other."""
    return {**{topic: 0 for topic in protocol.TOPICS}, **next_seq}
