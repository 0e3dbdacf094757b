"""Subscribing to a livemask service: sync and asyncio SUB clients with gap detection."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from types import TracebackType
from typing import Any, cast

import zmq
import zmq.asyncio

from livemask import protocol
from livemask.client.control import connect_or_explain
from livemask.protocol import Message

__all__ = ["DEFAULT_SUB_ADDRESS", "DEFAULT_TOPICS", "AsyncSubscriber", "Subscriber"]

DEFAULT_SUB_ADDRESS = "tcp://127.0.0.1:5555"
DEFAULT_TOPICS: tuple[str, ...] = ("measurements", "status", "event")
#: Messages a subscriber's receive queue holds before it drops (libzmq's default is 1000:
#: a reader that stalled on ``frame`` and ``labels`` held ≈ 0.75 GB at 512², more than
#: 10 GB at 2048²); a ``latest_only`` reader keeps only the newest anyway.
DEFAULT_RCVHWM = 200
LATEST_ONLY_RCVHWM = 16

logger = logging.getLogger("livemask")

_ITER_POLL_S = 0.25  # how often iteration wakes up to notice close()


def _timeout_ms(timeout_s: float | None) -> int | None:
    """``timeout_s`` in ms for a poll; None waits for ever. ValueError for NaN or infinity."""
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not (
            math.isfinite(timeout_s)):
        raise ValueError(
            f"timeout_s must be a finite number of seconds, or None to wait for ever; "
            f"got {timeout_s!r}")
    return max(0, round(timeout_s * 1000))


def _cancelling() -> bool:
    """Whether the running task has been asked to cancel (``task.cancel()``)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _topic_tuple(topics: Iterable[str] | None) -> tuple[str, ...]:
    """``topics`` as a tuple; a single str is one topic (not its letters)."""
    if topics is None:
        return ()
    if isinstance(topics, str):
        return (topics,)
    out = tuple(topics)
    for topic in out:
        if not isinstance(topic, str):
            raise TypeError(
                f"topics must be topic names (str), e.g. ('measurements', 'status'); "
                f"got {topic!r} in {topics!r}")
    return out


class _SubscriberBase:
    """Socket set-up and per-topic seq bookkeeping shared by both subscribers."""

    _socket: zmq.Socket[Any] | None

    def __init__(
        self,
        address: str,
        topics: Iterable[str] | None,
        latest_only: bool,
        rcvhwm: int | None,
        context: zmq.Context[Any],
    ) -> None:
        if rcvhwm is None:
            rcvhwm = LATEST_ONLY_RCVHWM if latest_only else DEFAULT_RCVHWM
        self.address = address
        self.topics: tuple[str, ...] = _topic_tuple(topics)
        self._all_topics = not self.topics
        self.latest_only = latest_only
        self.rcvhwm = rcvhwm
        self.received: dict[str, int] = {}
        self.gaps: dict[str, int] = {}
        self.skipped_latest = 0
        self.last_seq: dict[str, int] = {}
        prefixes = [topic.encode("ascii") for topic in self.topics or ("",)]  # (before
        sock = context.socket(zmq.SUB)  # the socket: a non-ASCII topic leaks none)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        for prefix in prefixes:
            sock.setsockopt(zmq.SUBSCRIBE, prefix)
        connect_or_explain(sock, address)  # (closes it on failure)
        self._socket = sock

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._socket is None

    @property
    def all_topics(self) -> bool:
        """True for a subscriber of every topic (``topics`` None or empty): its
        :attr:`topics` stays ``()``."""
        return self._all_topics

    def _track(self, msg: Message) -> Message:
        """Count ``msg`` and add any jump in its topic's ``seq`` to :attr:`gaps`."""
        topic = msg.topic
        self.received[topic] = self.received.get(topic, 0) + 1
        seq = msg.header.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            last = self.last_seq.get(topic)
            if last is not None and seq > last + 1:
                missed = seq - last - 1
                self.gaps[topic] = self.gaps.get(topic, 0) + missed
                logger.debug("missed %d %r message(s) (seq %d -> %d)", missed, topic, last, seq)
            elif last is not None and seq <= last:
                logger.info("%r seq went back from %d to %d: publisher restarted", topic, last, seq)
            self.last_seq[topic] = seq
        return msg

    def _drain(self, first: Message) -> Message:
        """latest_only: read everything already queued, return the newest."""
        assert self._socket is not None
        newest = first
        for _ in range(max(self.rcvhwm, 1) * 4):  # bounded even if the publisher outruns us
            try:
                frames = self._socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            newest = self._track(protocol.decode(frames))
            self.skipped_latest += 1
        return newest

    def subscribe(self, topic: str) -> None:
        """Also receive ``topic`` (it takes a moment to reach the publisher: slow joiner).

        Missed messages of ``topic`` are counted from the first one received after this.
        A subscriber of all topics receives it already: nothing changes.
        """
        if self._socket is None:
            raise RuntimeError("subscriber is closed")
        if not self._all_topics and topic not in self.topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
            self.topics += (topic,)
            self.last_seq.pop(topic, None)

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``; messages already on their way still arrive.

        ``seq`` tracking of ``topic`` restarts: what was published meanwhile is no gap.
        ValueError on a subscriber of all topics (``topics`` None or empty).
        """
        if self._socket is None:
            raise RuntimeError("subscriber is closed")
        if self._all_topics:
            raise ValueError(
                f"cannot unsubscribe {topic!r} from a subscriber of all topics (topics=None "
                "or empty): ZeroMQ prefix subscriptions cannot exclude one topic from all; "
                "subscribe to the topics you want instead, e.g. topics=('measurements', "
                "'event')")
        if topic in self.topics:
            self._socket.setsockopt(zmq.UNSUBSCRIBE, topic.encode("ascii"))
            self.topics = tuple(t for t in self.topics if t != topic)
            self.last_seq.pop(topic, None)

    def counters(self) -> dict[str, Any]:
        """``received`` and ``gaps`` per topic, and ``skipped_latest``."""
        return {
            "received": dict(self.received),
            "gaps": dict(self.gaps),
            "skipped_latest": self.skipped_latest,
        }

    def close(self) -> None:
        """Close the socket; idempotent."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None


class Subscriber(_SubscriberBase):
    """Blocking SUB client of the livemask stream.

    Subscribes to ``topics`` (a str is one topic; all topics when empty or None: then
    :attr:`all_topics` is true, :meth:`subscribe` changes nothing and :meth:`unsubscribe`
    raises ValueError) and decodes each message
    with its arrays as zero-copy views. ``gaps[topic]`` counts messages missed (jumps in
    ``seq``), ``received[topic]`` those received. With ``latest_only=True`` each
    :meth:`recv` drains the queue and returns only the newest message (for viewers that
    must not lag); the others are counted in ``skipped_latest``. ``rcvhwm``: messages held
    while the caller does not read (:data:`DEFAULT_RCVHWM`, :data:`LATEST_ONLY_RCVHWM`
    with ``latest_only``; a ``frame`` plus ``labels`` pair is 24 MB at 2048²); more are
    dropped and show as ``gaps``. ``address``: ``tcp://HOST:PORT`` or ``ipc://PATH`` (a
    ValueError otherwise). Not thread-safe.
    """

    def __init__(
        self,
        address: str = DEFAULT_SUB_ADDRESS,
        topics: Iterable[str] | None = DEFAULT_TOPICS,
        *,
        latest_only: bool = False,
        rcvhwm: int | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        ctx = context if context is not None else zmq.Context.instance()
        super().__init__(address, topics, latest_only, rcvhwm, ctx)
        self._poller = zmq.Poller()
        assert self._socket is not None
        self._poller.register(self._socket, zmq.POLLIN)

    def recv(self, timeout_s: float | None = 1.0) -> Message | None:
        """The next message, or None after ``timeout_s`` seconds (None: wait forever;
        NaN or infinity: ValueError).

        Raises :class:`ProtocolError` for a malformed message.
        """
        if self._socket is None:
            raise RuntimeError("subscriber is closed")
        events = dict(self._poller.poll(_timeout_ms(timeout_s)))
        if self._socket not in events:
            return None
        frames = self._socket.recv_multipart(copy=False)
        msg = self._track(protocol.decode(frames))
        return self._drain(msg) if self.latest_only else msg

    def __iter__(self) -> Iterator[Message]:
        """Yield messages until the subscriber is closed."""
        return self.messages(silent_hint_s=math.inf)

    def messages(self, *, silent_hint_s: float = 5.0) -> Iterator[Message]:
        """Iterate as ``for msg in sub``, saying once on stderr when nothing has come for
        ``silent_hint_s`` seconds (no service there, or not at this address): a script
        that waits in silence looks hung."""
        deadline: float | None = time.monotonic() + silent_hint_s
        while self._socket is not None:
            try:
                msg = self.recv(timeout_s=_ITER_POLL_S)
            except (zmq.ZMQError, RuntimeError):
                if self._socket is None:  # closed while waiting
                    return
                raise
            if msg is not None:
                deadline = None
                yield msg
            elif deadline is not None and time.monotonic() > deadline:
                deadline = None
                print(f"no messages from {self.address} after {silent_hint_s:g} s: is a "
                      "service running there (livemask serve), is this its "
                      "publish.pub_address, and is an acquisition running (an idle "
                      "service sends only status)?", file=sys.stderr)

    def close(self) -> None:
        """Close the socket; idempotent."""
        if self._socket is not None:
            self._poller.unregister(self._socket)
        super().close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncSubscriber(_SubscriberBase):
    """asyncio SUB client with the same semantics as :class:`Subscriber`.

    Closing it (from another task) while a task waits in :meth:`recv` or iterates ends
    that wait: ``recv`` returns None and iteration stops; cancelling the waiting task
    still raises ``CancelledError`` in it.
    """

    _socket: zmq.asyncio.Socket | None

    def __init__(
        self,
        address: str = DEFAULT_SUB_ADDRESS,
        topics: Iterable[str] | None = DEFAULT_TOPICS,
        *,
        latest_only: bool = False,
        rcvhwm: int | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        ctx = context if context is not None else zmq.asyncio.Context.instance()
        super().__init__(address, topics, latest_only, rcvhwm, ctx)

    async def recv(self, timeout_s: float | None = 1.0) -> Message | None:
        """The next message, or None after ``timeout_s`` seconds (None: wait forever) or
        when the subscriber is closed meanwhile."""
        sock = self._socket
        if sock is None:
            raise RuntimeError("subscriber is closed")
        timeout_ms = _timeout_ms(timeout_s)
        try:
            if not await sock.poll(timeout_ms):  # POLLIN; returns the event mask
                return None
            frames = await sock.recv_multipart(copy=False)
            msg = self._track(protocol.decode(frames))
            return await self._adrain(msg) if self.latest_only else msg
        except (asyncio.CancelledError, zmq.ZMQError):
            # closing the socket cancels the futures awaited on it (pyzmq): that is the
            # end of the stream, not a cancellation of the task waiting here
            if self._socket is None and not _cancelling():
                return None
            raise

    async def _adrain(self, first: Message) -> Message:
        sock = self._socket
        assert sock is not None
        newest = first
        for _ in range(max(self.rcvhwm, 1) * 4):
            if not cast(int, sock.get(zmq.EVENTS)) & zmq.POLLIN:
                break
            frames = await sock.recv_multipart(copy=False)
            newest = self._track(protocol.decode(frames))
            self.skipped_latest += 1
        return newest

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Message]:
        while self._socket is not None:
            try:
                msg = await self.recv(timeout_s=_ITER_POLL_S)
            except (zmq.ZMQError, RuntimeError):
                if self._socket is None:  # closed while waiting
                    return
                raise
            if msg is not None:
                yield msg

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
