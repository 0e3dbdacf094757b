"""Limits on what one network peer can make the service hold: subscriptions, idle and
stuck connections, multipart requests, rule lists, file descriptors, log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import zmq
import zmq.asyncio

from livemask.client import Subscriber
from livemask.dashboard import server as dashboard_server
from livemask.dashboard.server import DashboardServer
from livemask.errors import CommandError
from livemask.feedback.spec import MAX_RULES
from livemask.service import limits
from livemask.service.commands import CommandHandler
from livemask.transport import ControlServer, ZmqPublisher
from livemask.transport.control_server import MAX_QUEUED_REQUESTS

ANY_PORT = "tcp://127.0.0.1:*"
DEADLINE_S = 10.0  # upper bound only: each wait normally ends in well under a second


# ------------------------------------------------------------------ a raw ZMTP 3.0 peer


def _frame(body: bytes, *, command: bool = False) -> bytes:
    flags = 4 if command else 0
    if len(body) > 255:
        return bytes([flags | 2]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def zmtp_peer(address: str, socket_type: bytes) -> socket.socket:
    """A handshaken ZMTP peer on a plain TCP socket (NULL mechanism) that never answers the
    service's heartbeat PINGs: what a client holding connections open looks like."""
    sock = socket.create_connection(("127.0.0.1", _port(address)), timeout=DEADLINE_S)
    sock.sendall(b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\x00")
                 + b"\x00" * 32)
    got = b""
    while len(got) < 64:
        chunk = sock.recv(64 - len(got))
        assert chunk, "the service closed the connection during the greeting"
        got += chunk
    props = b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    sock.sendall(_frame(b"\x05READY" + props, command=True))
    return sock


def closed_by_peer(sock: socket.socket, timeout_s: float = DEADLINE_S) -> bool:
    """Whether the other side closes ``sock`` within ``timeout_s`` (what it sends is read
    and dropped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True
    return False


# ------------------------------------------------------------------ publisher


def _status_reaches(pub: ZmqPublisher, sub: Subscriber) -> bool:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        pub.publish("status", {"ping": True})
        if sub.recv(timeout_s=0.05) is not None:
            return True
    return False


def test_a_subscription_past_the_limit_disconnects_only_that_subscriber() -> None:
    """Each subscribed byte cost the service ≈ 45 bytes (1 MiB subscribed: +48 MiB)."""
    with ZmqPublisher(ANY_PORT) as pub:
        peer = zmtp_peer(pub.bound_address, b"SUB")
        try:
            peer.sendall(_frame(b"\x01" + b"z" * 4096))
            assert closed_by_peer(peer)
        finally:
            peer.close()
        with Subscriber(pub.bound_address, ("status",)) as sub:  # real subscribers: served
            assert _status_reaches(pub, sub)


def test_the_publisher_drops_a_subscriber_that_does_not_answer_heartbeats() -> None:
    """Handshaken idle connections used to be held for ever (file descriptors ran out)."""
    with ZmqPublisher(ANY_PORT, heartbeat_s=0.1) as pub:
        peer = zmtp_peer(pub.bound_address, b"SUB")
        try:
            peer.sendall(_frame(b"\x01status"))
            assert closed_by_peer(peer)
        finally:
            peer.close()
        with Subscriber(pub.bound_address, ("status",)) as sub:  # libzmq answers PINGs
            assert _status_reaches(pub, sub)
            time.sleep(0.5)  # several heartbeat timeouts: still connected
            assert _status_reaches(pub, sub)


# ------------------------------------------------------------------ control server


async def _echo(cmd: str, args: dict[str, Any]) -> Any:
    return {"cmd": cmd, **args}


@pytest.fixture
async def control() -> AsyncIterator[ControlServer]:
    srv = ControlServer(ANY_PORT, _echo, heartbeat_s=0.1).start()
    task = asyncio.create_task(srv.serve())
    yield srv
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    srv.close()


def _request(i: int) -> bytes:
    return json.dumps({"id": i, "cmd": "status"}).encode()


async def _reply(sock: zmq.asyncio.Socket) -> list[bytes]:
    frames: list[bytes] = await asyncio.wait_for(sock.recv_multipart(), DEADLINE_S)
    return frames


async def test_a_request_of_several_frames_is_refused_and_not_echoed(
    control: ControlServer, raw_socket: Any
) -> None:
    """Before, every frame but the last came back as the reply's envelope: 2 × 15 MiB in,
    30 MiB queued back out."""
    dealer = raw_socket(zmq.DEALER, control.bound_address)
    await dealer.send_multipart([b"a" * 1000, b"b" * 1000, _request(1)])
    (reply,) = await _reply(dealer)
    assert json.loads(reply)["error"]["code"] == "bad_request"
    assert "single frame" in json.loads(reply)["error"]["message"]
    await dealer.send_multipart([b"a" * 1000, _request(2)])  # a wrong 2-frame one as well
    (reply,) = await _reply(dealer)
    assert json.loads(reply)["error"]["code"] == "bad_request"
    req = raw_socket(zmq.REQ, control.bound_address)
    await req.send_multipart([b"x" * 1000, _request(3)])
    (reply,) = await _reply(req)  # REQ gets its reply (it needs the empty delimiter)
    assert json.loads(reply)["error"]["code"] == "bad_request"
    for sock, i in ((dealer, 4), (req, 5)):  # one-frame requests are answered as before
        await sock.send(_request(i))
        (reply,) = await _reply(sock)
        assert json.loads(reply) == {"id": i, "ok": True, "result": {"cmd": "status"}}


async def test_a_req_client_behind_a_proxy_is_answered(
    control: ControlServer, raw_socket: Any
) -> None:
    """Review: a REQ reaching the service through a ROUTER/DEALER proxy (zmq.proxy) sends
    [proxy, client, b"", request]; that was refused to [proxy] only, which the proxy could
    not route: the client heard nothing."""
    front = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    front.setsockopt(zmq.LINGER, 0)
    port = front.bind_to_random_port("tcp://127.0.0.1")
    back = raw_socket(zmq.DEALER, control.bound_address)
    client = raw_socket(zmq.REQ, f"tcp://127.0.0.1:{port}")
    try:
        for i, frames in ((1, [_request(1)]), (2, [b"x" * 10, _request(2)])):
            await client.send_multipart(frames)
            await back.send_multipart(await _reply(front))  # the proxy's two hops
            await front.send_multipart(await _reply(back))
            (reply,) = await _reply(client)
            got = json.loads(reply)
            if i == 1:
                assert got == {"id": 1, "ok": True, "result": {"cmd": "status"}}
            else:  # a refusal reaches the proxied client too
                assert got["error"]["code"] == "bad_request"
    finally:
        front.close(linger=0)


async def test_the_control_server_queues_few_requests_of_one_client(
    control: ControlServer,
) -> None:
    """libzmq's default (1000 queued messages) let one client pipeline 64 × 15 MiB."""
    assert control._socket is not None
    assert control._socket.getsockopt(zmq.RCVHWM) == MAX_QUEUED_REQUESTS <= 16


async def test_the_control_server_drops_a_peer_that_does_not_answer_heartbeats(
    control: ControlServer, raw_socket: Any
) -> None:
    peer = zmtp_peer(control.bound_address, b"DEALER")
    try:
        assert await asyncio.to_thread(closed_by_peer, peer)
    finally:
        peer.close()
    dealer = raw_socket(zmq.DEALER, control.bound_address)  # a libzmq client stays
    await asyncio.sleep(0.5)
    await dealer.send(_request(1))
    assert json.loads((await _reply(dealer))[0])["ok"] is True


async def test_the_rules_command_takes_a_bounded_number_of_rules() -> None:
    """20,000 rules took 2.3 s to set and then held up the analysis of every frame."""
    handler = CommandHandler(cast(Any, None))  # (refused before the service is used)
    rules = [{"name": f"r{i}", "when": "count > 1", "do": "stop"} for i in range(MAX_RULES + 1)]
    with pytest.raises(CommandError, match=rf"rules: .*at most {MAX_RULES} items") as info:
        await handler("rules", {"rules": rules})
    assert info.value.code == "invalid_args"


# ------------------------------------------------------------------ open files limit


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 256)
    if hard != resource.RLIM_INFINITY and hard <= low:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    code = ("import resource; from livemask.service.limits import raise_open_files_limit; "
            "n = raise_open_files_limit(); "
            "print(n, *resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard)))
    now, new_soft, new_hard = (int(v) for v in out.stdout.split())
    assert new_hard == hard and new_soft == now > low
    assert new_soft == (hard if hard != resource.RLIM_INFINITY else limits.UNLIMITED_NOFILE)


def test_an_open_files_limit_that_cannot_be_raised_stays(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*_: Any) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "getrlimit", lambda _: (100, 200))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    with caplog.at_level(logging.INFO, logger="livemask"):
        assert limits.raise_open_files_limit() == 100
    assert "open files limit stays at 100" in caplog.text


# ------------------------------------------------------------------ dashboard


@pytest.fixture
async def dashboard() -> AsyncIterator[DashboardServer]:
    async with DashboardServer("tcp://127.0.0.1:48911", port=0) as server:
        yield server


async def _get(port: int, path: str = "/api/state") -> bytes:
    """One raw HTTP/1.0 GET; the whole response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), DEADLINE_S)
    finally:
        writer.close()


async def _wait(check: Any) -> bool:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _open(server: DashboardServer) -> int:
    """The HTTP connections ``server`` serves now."""
    runner = server._runner
    assert runner is not None and runner.server is not None
    return len(runner.server.connections)


async def test_the_dashboard_refuses_connections_past_its_limit(
    monkeypatch: pytest.MonkeyPatch, dashboard: DashboardServer
) -> None:
    monkeypatch.setattr(dashboard_server, "MAX_CONNECTIONS", 3)
    idle = [await asyncio.open_connection("127.0.0.1", dashboard.port) for _ in range(3)]
    try:
        assert await _wait(lambda: _open(dashboard) == 3)
        assert (await _get(dashboard.port)).startswith(b"HTTP/1.1 503 ")
        assert dashboard.connections_refused == 1
    finally:
        for _, writer in idle:
            writer.close()
    assert await _wait(lambda: _open(dashboard) == 0)
    assert (await _get(dashboard.port)).startswith(b"HTTP/1.0 200 ")


async def test_the_dashboard_closes_a_connection_that_sends_no_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiohttp's default held an idle connection, or one sending its headers slowly, for an
    hour (3630 s)."""
    monkeypatch.setattr(dashboard_server, "KEEPALIVE_S", 0.2)
    async with DashboardServer("tcp://127.0.0.1:48912", port=0) as server:
        idle = socket.create_connection(("127.0.0.1", server.port))
        slow = socket.create_connection(("127.0.0.1", server.port))
        try:
            slow.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the end
            assert await asyncio.to_thread(closed_by_peer, idle)
            assert await asyncio.to_thread(closed_by_peer, slow)
        finally:
            idle.close()
            slow.close()


def _stuck_websocket(port: int) -> socket.socket:
    """A WebSocket client that completes the upgrade and then reads nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    return sock


async def _flood_until_gone(server: DashboardServer, sock: socket.socket) -> bool:
    """Send the browsers big messages until ``server`` has none left; then whether it
    released the connection (before ``sock`` reads anything: reading would let a close
    that waits for the unsent data finish) and ``sock`` sees it closed."""
    assert await _wait(lambda: len(server.browsers) == 1)
    text = "x" * 60_000
    deadline = time.monotonic() + DEADLINE_S
    while server.browsers and time.monotonic() < deadline:
        server._broadcast({"type": "pad", "text": text})
        await asyncio.sleep(0.01)
    assert not server.browsers
    return await _wait(lambda: _open(server) == 0) and await asyncio.to_thread(
        closed_by_peer, sock)


async def test_a_websocket_client_that_never_reads_is_dropped_by_the_heartbeat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The heartbeat closed such a browser's WebSocket, but the connection waited for ever
    to send what was queued for it (100 of them held 60 s after heartbeat=20)."""
    monkeypatch.setattr(dashboard_server, "WS_HEARTBEAT_S", 0.4)
    async with DashboardServer("tcp://127.0.0.1:48913", port=0) as server:
        sock = _stuck_websocket(server.port)
        try:
            assert await _flood_until_gone(server, sock)
        finally:
            sock.close()


async def test_a_websocket_client_that_sends_but_never_reads_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Data from the client keeps the heartbeat happy: the send timeout still drops it."""
    monkeypatch.setattr(dashboard_server, "WS_SEND_TIMEOUT_S", 0.3)
    async with DashboardServer("tcp://127.0.0.1:48914", port=0) as server:
        sock = _stuck_websocket(server.port)
        stop = asyncio.Event()

        async def keep_sending() -> None:  # masked empty text frames ("view" is ignored)
            while not stop.is_set():
                with_mask = b"\x81\x80" + os.urandom(4)
                try:
                    await asyncio.to_thread(sock.sendall, with_mask)
                except OSError:
                    return
                await asyncio.sleep(0.05)

        sender = asyncio.create_task(keep_sending())
        try:
            assert await _flood_until_gone(server, sock)
        finally:
            stop.set()
            await sender
            sock.close()


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_malformed_requests_log_one_line_not_a_traceback_each(
    monkeypatch: pytest.MonkeyPatch, dashboard: DashboardServer
) -> None:
    """aiohttp's own logger wrote a traceback per malformed request (≈ 40 × its bytes),
    outside livemask's log handler."""
    ours, theirs = _Keep(), _Keep()
    monkeypatch.setattr(logging.getLogger("livemask"), "handlers", [ours])
    monkeypatch.setattr(logging.getLogger("livemask"), "propagate", False)
    aio = logging.getLogger("aiohttp.server")
    aio.addHandler(theirs)
    try:
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", dashboard.port)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")  # no Host header
            assert (await asyncio.wait_for(reader.read(), DEADLINE_S)).startswith(
                b"HTTP/1.0 400 ")
            writer.close()
    finally:
        aio.removeHandler(theirs)
    assert theirs.records == []
    (record,) = [r for r in ours.records if r.name.startswith("livemask.http")]
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "BadHttpMessage: 400, message: Missing 'Host' header" in record.getMessage()
    assert "\n" not in record.getMessage()


def test_the_http_log_filter_shows_a_repeat_again_with_its_count() -> None:
    from livemask.log import HttpLogFilter

    filt = HttpLogFilter((ValueError,), every_s=3600.0)

    def record(err: Exception) -> logging.LogRecord:
        return logging.LogRecord("livemask.http", logging.ERROR, "x.py", 1,
                                 "Error handling request from %s", ("1.2.3.4",),
                                 (type(err), err, None))

    assert filt.filter(first := record(ValueError("bad\nthing")))
    assert first.getMessage() == "Error handling request from 1.2.3.4: ValueError: bad thing"
    assert first.levelno == logging.WARNING and first.exc_info is None  # a client's error
    assert not filt.filter(record(ValueError("x"))) and not filt.filter(record(ValueError("y")))
    filt.every_s = 0.0
    assert filt.filter(again := record(ValueError("z")))
    assert "(and 2 more in the last" in again.getMessage()
    # review: a handler's own failure (a 500, a bug) keeps its traceback, every time
    for _ in range(3):
        assert filt.filter(bug := record(KeyError("bug in handler")))
        assert bug.levelno == logging.ERROR and bug.exc_info is not None


def test_the_config_takes_a_bounded_number_of_rules() -> None:
    """The same limit as the rules command, for feedback.rules in a config file."""
    from livemask.config import parse_config
    from livemask.errors import ConfigError

    rule = {"when": {"values": [{"path": "summary.count", "gt": 1}]}, "action": {"stop": True}}
    rules = [{"name": f"r{i}", **rule} for i in range(MAX_RULES + 1)]
    with pytest.raises(ConfigError, match=rf"feedback\.rules.*at most {MAX_RULES} items"):
        parse_config({"feedback": {"rules": rules}})
    assert len(parse_config({"feedback": {"rules": rules[:MAX_RULES]}}).feedback.rules) == 100
