"""The control server: a ZeroMQ ROUTER answering JSON requests (see docs/protocol.md)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import zmq
import zmq.asyncio
from pydantic import ValidationError

from livemask import protocol
from livemask.errors import CommandError, ProtocolError
from livemask.transport._sockets import IpcFile, bind_or_explain, bound_endpoint
from livemask.transport.publisher import HEARTBEAT_S, set_heartbeat

__all__ = ["DEFAULT_CONTROL_ADDRESS", "ControlServer", "Handler"]

DEFAULT_CONTROL_ADDRESS = "tcp://127.0.0.1:5556"
#: Largest request accepted: libzmq disconnects a peer that sends more (the largest real
#: request, ``enqueue`` of 10,000 events, is about 1 MB of JSON). libzmq checks it per
#: frame, and takes in a whole multipart message before the service sees it: a request is
#: one frame, and a message of more frames is refused (``bad_request``) once it is in.
MAX_REQUEST_BYTES = 16 * 1024 * 1024
#: Requests of one client queued in the service, not yet handled; libzmq reads no more of
#: that client's connection meanwhile (its requests wait, none is lost). libzmq's default,
#: 1000, let one client that pipelined 15 MiB requests hold ≈ 15 GB in the service.
MAX_QUEUED_REQUESTS = 8
#: Routing frames (proxies' peer identities) a request may carry before its empty
#: delimiter, and the size of each: they are sent back with the reply.
MAX_ROUTING_FRAMES = 8
MAX_ROUTING_BYTES = 255
#: Replies queued in the service for one client that does not read them; more are dropped
#: (that client times out on them). The client's own receive queue and the kernel's socket
#: buffers hold more first, so a client sees drops only far beyond this. libzmq's default,
#: 1000, let a client that pipelined ``snapshot`` requests with arrays and never read hold
#: ≈ 2 GB of replies in the service at 512².
MAX_UNREAD_REPLIES = 16

logger = logging.getLogger("livemask")

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]
"""``async handler(cmd, args) -> result``; raises CommandError for error replies."""


class ControlServer:
    """Asyncio ROUTER server: one JSON request in, one JSON reply out.

    REQ peers (``[identity, b"", payload]``) and DEALER peers (``[identity, payload]``)
    are both answered with the envelope they came with; a message of any other shape (more
    frames) gets a ``bad_request`` reply and nothing of it is sent back. A peer that does
    not answer the ZeroMQ heartbeat (``heartbeat_s``) is disconnected. Requests are handled
    one at a time, in arrival order. The handler raises :class:`CommandError` for an error reply
    (including ``unknown_command``); a pydantic ``ValidationError`` becomes
    ``invalid_args``; any other exception, or a result that cannot be encoded, becomes
    ``internal`` and is logged. Every request gets exactly one reply; no request can stop
    the server. Stop it with ``task.cancel()`` then :meth:`close`.
    """

    def __init__(
        self,
        address: str,
        handler: Handler,
        *,
        context: zmq.asyncio.Context | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.address = address
        self.heartbeat_s = heartbeat_s
        self._handler = handler
        self._context = context
        self._socket: zmq.asyncio.Socket | None = None
        self._ipc_file: IpcFile | None = None
        self._closed = False
        self.requests = 0
        self.errors = 0

    def start(self) -> ControlServer:
        """Create and bind the ROUTER socket; returns ``self``."""
        if self._closed:
            raise RuntimeError("control server is closed; create a new ControlServer")
        if self._socket is not None:
            return self
        ctx = self._context if self._context is not None else zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.SNDHWM, MAX_UNREAD_REPLIES)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        sock.setsockopt(zmq.RCVHWM, MAX_QUEUED_REQUESTS)
        set_heartbeat(sock, self.heartbeat_s)
        self._ipc_file = bind_or_explain(
            sock, self.address, "control server", "--control or publish.control_address"
        )
        self._socket = sock
        return self

    @property
    def bound_address(self) -> str:
        """The actual endpoint (resolves ``tcp://127.0.0.1:*`` to its port)."""
        return bound_endpoint(self._socket, "control server")

    async def serve(self) -> None:
        """Answer requests forever (starts the socket if needed). Cancel to stop."""
        if self._socket is None:
            self.start()
        sock = self._socket
        assert sock is not None
        while True:
            # copy=False: the frames of a big message are not copied once more
            frames: list[zmq.Frame] = await sock.recv_multipart(copy=False)
            if len(frames) < 2:  # ROUTER always prepends the identity; be defensive
                continue
            envelope, payload = _split(frames)
            del frames
            await self._answer(sock, envelope, payload)

    async def _answer(
        self, sock: zmq.asyncio.Socket, envelope: list[bytes], payload: bytes | None
    ) -> None:
        """Handle one request (None: a message of another shape) and send its reply."""
        try:
            reply = await self.handle(payload) if payload is not None else self._refuse()
            await sock.send_multipart([*envelope, reply])
        except zmq.ZMQError:  # the peer left (ROUTER drops to unknown peers): next one
            logger.debug("control reply not sent", exc_info=True)
        except Exception:  # handle() never raises; keep serving whatever happens
            logger.exception("control request %r not answered", (payload or b"")[:200])

    def _refuse(self) -> bytes:
        """The reply to a message of more frames than a request has."""
        self.requests += 1
        self.errors += 1
        return protocol.error_reply(
            None, protocol.BAD_REQUEST,
            "a request is one frame of JSON (REQ and DEALER clients send just that); this "
            "message had more: send each request as a single frame")

    async def handle(self, payload: bytes) -> bytes:
        """Turn one raw request into one raw reply; never raises (except cancellation)."""
        self.requests += 1
        req_id: str | int | None = None
        try:
            obj = protocol.load_request(payload)  # parsed once: 16 MiB take ~0.5 s
            req_id = protocol.request_id(obj)
            request = protocol.validate_request(obj)
            result = await self._handler(request.cmd, request.args)
        except CommandError as exc:
            self.errors += 1
            return protocol.error_reply(req_id, exc.code, exc.message)
        except ValidationError as exc:
            self.errors += 1
            return protocol.error_reply(
                req_id, protocol.INVALID_ARGS, protocol.format_validation_error(exc)
            )
        except Exception as exc:
            self.errors += 1
            logger.exception("control request %r failed", bytes(payload)[:200])
            return protocol.error_reply(req_id, protocol.INTERNAL, f"{type(exc).__name__}: {exc}")
        try:
            return protocol.ok_reply(req_id, result)
        except ProtocolError as exc:  # the command was done, but its result has no JSON form
            self.errors += 1
            logger.error("control request %r: reply not encodable: %s", bytes(payload)[:200], exc)
            return protocol.error_reply(
                req_id, protocol.INTERNAL, f"the command ran, but its result cannot be sent: {exc}"
            )

    def close(self) -> None:
        """Close the socket, and remove the socket file of an ``ipc://PATH`` address (unless
        bound anew since); idempotent."""
        self._closed = True
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._ipc_file is not None:
            self._ipc_file.remove()
            self._ipc_file = None


def _split(frames: list[zmq.Frame]) -> tuple[list[bytes], bytes | None]:
    """``(reply envelope, request)`` of a ROUTER message: ``[identity, request]`` (DEALER;
    an empty frame is an empty request, answered ``bad_json`` as a REQ's is),
    ``[identity, b"", request]`` (REQ) or ``[identity, *routing, b"", request]`` (a REQ
    behind ROUTER/DEALER proxies: at most :data:`MAX_ROUTING_FRAMES` routing identities of
    at most :data:`MAX_ROUTING_BYTES` each). For any other shape the request is None and
    the envelope holds only what routes the refusal back (small routing frames and the
    empty delimiter): other frames are never sent back."""
    identity, rest = frames[0].bytes, frames[1:]
    if len(rest) == 1:  # a DEALER's one frame (a REQ sends a delimiter before its own)
        return [identity], rest[0].bytes
    empty = next((k for k, f in enumerate(rest) if len(f) == 0), None)
    if empty is None:  # a DEALER's own frames
        return [identity], None
    routing = rest[:empty]
    routable = (len(routing) <= MAX_ROUTING_FRAMES
                and all(len(f) <= MAX_ROUTING_BYTES for f in routing))
    envelope = [identity, *(f.bytes for f in routing), b""] if routable else [identity, b""]
    if routable and len(rest) == empty + 2:
        return envelope, rest[-1].bytes
    return envelope, None
