"""Tests of the ZeroMQ transport and clients over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio
from pydantic import BaseModel, ConfigDict

from livemask import protocol
from livemask.client import AsyncSubscriber, ControlClient, Subscriber
from livemask.errors import CommandError, ConfigError, ControlError, ControlTimeout
from livemask.transport import ControlServer, MemoryPublisher, Publisher, ZmqPublisher
from livemask.transport.control_server import MAX_UNREAD_REPLIES

ANY_PORT = "tcp://127.0.0.1:*"
SYNC_DEADLINE_S = 10.0  # upper bound only; normally done in milliseconds


# ------------------------------------------------------------------ fixtures/helpers


@pytest.fixture
def publisher() -> Iterator[ZmqPublisher]:
    pub = ZmqPublisher(ANY_PORT).start()
    yield pub
    pub.close()


@pytest.fixture
def raw_pub() -> Iterator[zmq.Socket[Any]]:
    """A bare PUB socket, for sending crafted messages."""
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(ANY_PORT)
    yield sock
    sock.close(linger=0)


def endpoint(sock: zmq.Socket[Any]) -> str:
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def sync_subscriber(pub: ZmqPublisher, sub: Subscriber) -> None:
    """Wait out the slow-joiner window: publish 'status' pings until one arrives."""
    deadline = time.monotonic() + SYNC_DEADLINE_S
    while time.monotonic() < deadline:
        pub.publish("status", {"ping": True})
        msg = sub.recv(timeout_s=0.02)
        if msg is not None:
            # drain any further pings so the test starts from an empty queue
            while sub.recv(timeout_s=0.02) is not None:
                pass
            return
    raise AssertionError("subscriber never connected")


async def async_sync(pub: ZmqPublisher, sub: AsyncSubscriber) -> None:
    """sync_subscriber for an AsyncSubscriber."""
    deadline = time.monotonic() + SYNC_DEADLINE_S
    while time.monotonic() < deadline:
        pub.publish("status", {"ping": True})
        if await sub.recv(timeout_s=0.02) is not None:
            while await sub.recv(timeout_s=0.02) is not None:
                pass
            return
    raise AssertionError("async subscriber never connected")


def sync_raw(pub_sock: zmq.Socket[Any], sub: Subscriber) -> None:
    """sync_subscriber for a bare PUB socket; resets the subscriber's counters."""
    deadline = time.monotonic() + SYNC_DEADLINE_S
    while time.monotonic() < deadline:
        pub_sock.send_multipart(protocol.encode("event", {"kind": "ping"}))
        if sub.recv(timeout_s=0.02) is not None:
            while sub.recv(timeout_s=0.02) is not None:
                pass
            sub.received.clear()
            sub.last_seq.clear()
            return
    raise AssertionError("subscriber never connected")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ publisher


def test_publisher_satisfies_protocol(publisher: ZmqPublisher) -> None:
    assert isinstance(publisher, Publisher)
    assert isinstance(MemoryPublisher(), Publisher)


def test_bound_address_resolves_random_port(publisher: ZmqPublisher) -> None:
    addr = publisher.bound_address
    assert addr.startswith("tcp://127.0.0.1:")
    assert not addr.endswith("*")


def test_bind_conflict_is_a_config_error(publisher: ZmqPublisher) -> None:
    other = ZmqPublisher(publisher.bound_address)
    with pytest.raises(ConfigError, match=r"cannot bind the publisher.*another `livemask serve`"):
        other.start()
    other.close()


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_ipv6_loopback_addresses_work() -> None:
    if not _ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    # before: "No such device": no socket had ZMQ_IPV6 set
    with ZmqPublisher("tcp://[::1]:*") as pub, Subscriber(pub.bound_address) as sub:
        assert pub.bound_address.startswith("tcp://[::1]:")
        got = None
        for _ in range(100):  # until the subscription has reached the publisher
            pub.publish("status", {"hello": True})
            got = sub.recv(timeout_s=0.05)
            if got is not None:
                break
        assert got is not None and got.header["hello"] is True


def test_a_malformed_address_is_not_blamed_on_another_service() -> None:
    bad = ZmqPublisher("garbage")
    with pytest.raises(ConfigError, match="cannot bind the publisher") as info:
        bad.start()
    assert "another `livemask serve`" not in str(info.value)
    assert "valid address, tcp://HOST:PORT" in str(info.value)
    bad.close()


def test_publish_before_start_raises() -> None:
    pub = ZmqPublisher(ANY_PORT)
    with pytest.raises(RuntimeError, match="start"):
        pub.publish("status", {})
    pub.close()
    pub.close()  # idempotent


def test_publisher_context_manager() -> None:
    with ZmqPublisher(ANY_PORT) as pub:
        assert pub.publish("status", {}) == 0
    with pytest.raises(RuntimeError):
        pub.publish("status", {})


def test_seq_per_topic_and_arrays_over_tcp(publisher: ZmqPublisher) -> None:
    with Subscriber(publisher.bound_address, topics=None) as sub:
        sync_subscriber(publisher, sub)
        image = np.arange(64 * 32, dtype=np.uint16).reshape(64, 32)
        labels = (image % 5).astype(np.int32)
        sent = []
        for i in range(5):
            sent.append(("frame", publisher.publish("frame", {"frame_id": i}, {"image": image})))
            sent.append(
                ("labels", publisher.publish("labels", {"frame_id": i}, {"labels": labels}))
            )
            sent.append(("measurements", publisher.publish("measurements", {"frame_id": i})))
        assert [s for t, s in sent if t == "frame"] == [0, 1, 2, 3, 4]
        assert [s for t, s in sent if t == "measurements"] == [0, 1, 2, 3, 4]

        got: list[protocol.Message] = []
        while len(got) < len(sent):
            msg = sub.recv(timeout_s=5.0)
            assert msg is not None, "message lost on an idle loopback connection"
            got.append(msg)
        assert [(m.topic, m.header["seq"]) for m in got] == sent
        frame = got[0]
        assert frame.header["frame_id"] == 0
        np.testing.assert_array_equal(frame.arrays["image"], image)
        np.testing.assert_array_equal(got[1].arrays["labels"], labels)
        assert sub.gaps == {}
        assert sub.received["frame"] == 5
        assert publisher.counters()["sent"]["frame"] == 5
        assert publisher.counters()["next_seq"]["measurements"] == 5


def test_status_next_seq_lists_every_topic(publisher: ZmqPublisher) -> None:
    """Before, ``status.publisher.next_seq`` left out topics not sent yet: a late joiner
    reading it got a KeyError on its first frame."""
    from livemask.protocol import TOPICS

    publisher.publish("event", {"kind": "x"})
    assert publisher.counters()["next_seq"] == {**dict.fromkeys(TOPICS, 0), "event": 1}


def test_publish_stamps_published_time(publisher: ZmqPublisher) -> None:
    mem = MemoryPublisher()
    mem.publish("frame", {"t": {"acquired": 1.0}}, {"image": np.zeros((2, 2), np.uint16)})
    mem.publish("frame", {"t": {"acquired": 1.0, "published": 2.0}})
    mem.publish("status", {})
    first, second = mem.by_topic("frame")
    assert first.header["t"]["published"] >= first.header["t"]["acquired"]
    assert second.header["t"]["published"] == 2.0
    assert "t" not in mem.by_topic("status")[0].header


def test_topic_filter(publisher: ZmqPublisher) -> None:
    with Subscriber(publisher.bound_address, topics=("status", "measurements")) as sub:
        sync_subscriber(publisher, sub)
        publisher.publish("frame", {}, {"image": np.zeros((4, 4), np.uint16)})
        publisher.publish("measurements", {"summary": {"count": 0}})
        msg = sub.recv(timeout_s=5.0)
        assert msg is not None and msg.topic == "measurements"
        assert "frame" not in sub.received


@pytest.mark.timeout(60)
def test_slow_subscriber_never_blocks_publisher() -> None:
    """5000 x 256 KiB to a SUB that stops reading: publish() keeps returning."""
    pub = ZmqPublisher(ANY_PORT, sndhwm=2).start()
    with pub, Subscriber(pub.bound_address, topics=None, rcvhwm=2) as sub:
        sync_subscriber(pub, sub)
        payload = np.zeros(128 * 1024, dtype=np.uint16)  # 256 KiB
        for i in range(5000):
            assert pub.publish("frame", {"frame_id": i}, {"image": payload}) == i
        counts = pub.counters()
        assert counts["sent"]["frame"] == 5000  # handed to the socket, not delivered
        assert counts["next_seq"]["frame"] == 5000


@pytest.mark.timeout(60)
def test_the_publisher_claims_no_drop_count_and_the_subscriber_sees_the_gaps() -> None:
    """PUB drops at the high-water mark without a word: before, counters() had a
    ``dropped`` that stayed empty while most messages were lost."""
    with ZmqPublisher(ANY_PORT, sndhwm=5) as pub, \
            Subscriber(pub.bound_address, topics=None, rcvhwm=5) as sub:
        sync_subscriber(pub, sub)
        image = np.zeros((512, 512), np.uint16)
        for i in range(2000):
            pub.publish("frame", {"frame_id": i}, {"image": image})
        frames = []
        while (msg := sub.recv(timeout_s=0.5)) is not None:
            frames.append(msg.header["seq"])
        assert set(pub.counters()) == {"sent", "next_seq", "sndhwm"}
        assert len(frames) < 2000  # dropped on the way ...
        assert sub.gaps["frame"] == frames[-1] + 1 - len(frames)  # ... and seen as seq gaps


@pytest.mark.timeout(60)
def test_a_subscriber_that_stops_reading_holds_a_bounded_queue() -> None:
    """libzmq's default (1000 messages) let a stalled viewer of ``frame`` hold ~0.75 GB at
    512²; the default holds 200 (and 16 for a latest-only reader, which keeps the newest)."""
    ctx: zmq.Context[Any] = zmq.Context()
    # fixed TCP buffers (128 KiB, the kernel doubles them: a few messages); autotuned ones
    # grew on a busy machine to hold ~85 more, near the old bound of 200 + 5 + 100
    ctx.setsockopt(zmq.SNDBUF, 128 * 1024)
    ctx.setsockopt(zmq.RCVBUF, 128 * 1024)
    try:
        with ZmqPublisher(ANY_PORT, sndhwm=5, context=ctx) as pub, \
                Subscriber(pub.bound_address, topics=None, context=ctx) as sub:
            assert sub.rcvhwm == 200
            sync_subscriber(pub, sub)
            payload = np.zeros(64 * 1024, np.uint16)  # 128 KiB: socket buffers hold few
            for i in range(600):  # paced, so that the subscriber's queue is what fills up
                pub.publish("frame", {"frame_id": i}, {"image": payload})
                time.sleep(0.002)
            got = 0
            while sub.recv(timeout_s=0.5) is not None:
                got += 1
    finally:
        ctx.term()
    assert 100 <= got <= 200 + 5 + 30 < 600  # (+ the publisher's queue, a few in TCP buffers)
    with Subscriber("tcp://127.0.0.1:1", latest_only=True) as latest:
        assert latest.rcvhwm == 16


@pytest.mark.timeout(60)
def test_a_graceful_close_delivers_the_messages_still_queued() -> None:
    """Before, close() used LINGER 0: what the socket had not sent yet was thrown away."""
    n, got = 40, []
    go = threading.Event()
    pub = ZmqPublisher(ANY_PORT, sndhwm=1000).start()
    with Subscriber(pub.bound_address, topics=None, rcvhwm=2) as sub:

        def read() -> None:
            go.wait(30)
            while (msg := sub.recv(timeout_s=3.0)) is not None:
                got.append(msg.header["frame_id"])

        reader = threading.Thread(target=read)
        with pub:
            sync_subscriber(pub, sub)
            reader.start()
            payload = np.zeros(512 * 1024, np.uint16)  # 1 MiB: more than the TCP buffers hold
            for i in range(n):
                pub.publish("frame", {"frame_id": i}, {"image": payload})
            go.set()  # the reader starts; the graceful close waits for it (up to 2 s)
        reader.join(30)
    assert got == list(range(n))
def test_memory_publisher_records_decoded_messages() -> None:
    mem = MemoryPublisher()
    image = np.ones((3, 3), np.uint16)
    assert mem.publish("frame", {"frame_id": 1}, {"image": image}) == 0
    assert mem.publish("frame", {"frame_id": 2}, {"image": image}) == 1
    assert mem.publish("event", {"kind": "acquisition_started"}) == 0
    image[:] = 7  # recorded arrays are copies
    assert [m.header["seq"] for m in mem.by_topic("frame")] == [0, 1]
    assert mem.by_topic("frame")[0].arrays["image"].max() == 1
    assert mem.messages[2].header["v"] == protocol.PROTOCOL_VERSION
    assert mem.counters()["sent"] == {"frame": 2, "event": 1}
    mem.close()
    mem.close()
    with pytest.raises(RuntimeError):
        mem.publish("status", {})


# ------------------------------------------------------------------ subscriber


def test_gap_detection_from_seq(raw_pub: zmq.Socket[Any]) -> None:
    with Subscriber(endpoint(raw_pub), topics=("measurements", "event")) as sub:
        sync_raw(raw_pub, sub)
        for seq in (0, 1, 5, 6, 10):  # missed 2..4 and 7..9
            raw_pub.send_multipart(protocol.encode("measurements", {"seq": seq}))
        raw_pub.send_multipart(protocol.encode("measurements", {"seq": 0}))  # restart
        raw_pub.send_multipart(protocol.encode("measurements", {"seq": 1}))
        seen: list[int] = []
        while len(seen) < 7:
            msg = sub.recv(timeout_s=5.0)
            assert msg is not None
            seen.append(msg.header["seq"])
        assert seen == [0, 1, 5, 6, 10, 0, 1]
        assert sub.gaps == {"measurements": 6}
        assert sub.received == {"measurements": 7}


def test_recv_timeout_returns_none(publisher: ZmqPublisher) -> None:
    with Subscriber(publisher.bound_address) as sub:
        assert sub.recv(timeout_s=0.01) is None
        assert sub.recv(timeout_s=0) is None


def test_latest_only_returns_newest_inproc() -> None:
    """inproc delivery is synchronous, so the queue content is known exactly."""
    with (
        ZmqPublisher("inproc://latest-only-test") as pub,
        Subscriber("inproc://latest-only-test", topics=None, latest_only=True) as sub,
    ):
        sync_subscriber(pub, sub)
        before = sub.received["status"]
        skipped_before = sub.skipped_latest
        for i in range(20):
            pub.publish("measurements", {"frame_id": i})
        msg = sub.recv(timeout_s=5.0)
        assert msg is not None
        assert msg.header["frame_id"] == 19
        assert sub.skipped_latest - skipped_before == 19
        assert sub.received["measurements"] == 20
        assert sub.received["status"] == before
        assert sub.recv(timeout_s=0.01) is None


def test_latest_only_over_tcp_ends_on_newest(publisher: ZmqPublisher) -> None:
    with Subscriber(
        publisher.bound_address, topics=("measurements", "status"), latest_only=True
    ) as sub:
        sync_subscriber(publisher, sub)
        for i in range(50):
            publisher.publish("measurements", {"frame_id": i})
        returned: list[int] = []
        while not returned or returned[-1] != 49:
            msg = sub.recv(timeout_s=5.0)
            assert msg is not None
            returned.append(msg.header["frame_id"])
        assert returned == sorted(returned)
        assert sub.received["measurements"] == 50
        assert len(returned) + sub.skipped_latest >= 50
        assert sub.gaps == {}


def test_iteration_stops_when_closed(publisher: ZmqPublisher) -> None:
    sub = Subscriber(publisher.bound_address, topics=None)
    sync_subscriber(publisher, sub)
    for i in range(3):
        publisher.publish("event", {"kind": "setting_changed", "n": i})
    got = []
    for msg in sub:
        got.append(msg.header["n"])
        if len(got) == 3:
            sub.close()
    assert got == [0, 1, 2]
    assert sub.closed
    sub.close()


async def test_async_subscriber(publisher: ZmqPublisher) -> None:
    async with AsyncSubscriber(publisher.bound_address, topics=("frame", "status")) as sub:
        await async_sync(publisher, sub)
        image = np.arange(16, dtype=np.uint16).reshape(4, 4)
        for i in range(3):
            publisher.publish("frame", {"frame_id": i}, {"image": image})
        frames = []
        async for msg in sub:
            frames.append(msg)
            if len(frames) == 3:
                break
        assert [m.header["seq"] for m in frames] == [0, 1, 2]
        np.testing.assert_array_equal(frames[2].arrays["image"], image)
        assert sub.gaps == {}
        assert await sub.recv(timeout_s=0.01) is None


async def test_async_subscriber_latest_only() -> None:
    # inproc needs one context: an asyncio shadow of the publisher's sync context
    actx = zmq.asyncio.Context.shadow(zmq.Context.instance().underlying)
    with ZmqPublisher("inproc://async-latest-test") as pub:
        async with AsyncSubscriber(
            "inproc://async-latest-test", topics=None, latest_only=True, context=actx
        ) as sub:
            await async_sync(pub, sub)
            for i in range(10):
                pub.publish("measurements", {"frame_id": i})
            msg = await sub.recv(timeout_s=5.0)
            assert msg is not None and msg.header["frame_id"] == 9
            assert sub.received["measurements"] == 10


# ------------------------------------------------------------------ control channel


class SetArgs(BaseModel):
    exposure_ms: float


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StrictArgs(BaseModel):
    """Arguments checked as the service's commands check theirs: unknown ones refused."""

    model_config = ConfigDict(extra="forbid")
    options: Options


HANDLED: list[str] = []
"""Commands the stand-in handler ran."""


async def handler(cmd: str, args: dict[str, Any]) -> Any:
    """A small command set standing in for the service."""
    HANDLED.append(cmd)
    if cmd == "status":
        return {"state": "idle", "frames": np.int64(3)}
    if cmd == "echo":
        return args
    if cmd == "start":
        raise CommandError(protocol.INVALID_STATE, "already running; send stop first")
    if cmd == "set":
        return SetArgs.model_validate(args).model_dump()
    if cmd == "strict":
        return StrictArgs.model_validate(args).model_dump()
    if cmd == "boom":
        raise RuntimeError("handler exploded")
    if cmd == "slow":
        await asyncio.sleep(0)
        return "done"
    if cmd == "big":  # a reply of megabytes, as a snapshot with arrays
        return {"data": "x" * int(args["n"])}
    if cmd == "stop":  # waits for the frame being taken, as the service does
        await asyncio.sleep(0.5)
        return {"stopped": True, "still_running": False}
    raise CommandError(protocol.UNKNOWN_COMMAND, f"unknown command {cmd!r}")


@pytest.fixture
async def server() -> AsyncIterator[ControlServer]:
    srv = ControlServer(ANY_PORT, handler).start()
    task = asyncio.create_task(srv.serve())
    yield srv
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    srv.close()
    srv.close()  # idempotent


@pytest.fixture
def client_factory() -> Iterator[Any]:
    clients: list[ControlClient] = []

    def make(address: str, **kwargs: Any) -> ControlClient:
        clients.append(ControlClient(address, **kwargs))
        return clients[-1]

    yield make
    for c in clients:
        c.close()


async def call(client: ControlClient, cmd: str, **args: Any) -> Any:
    """Run the blocking client in a thread so the server's loop keeps running."""
    return await asyncio.to_thread(client.request, cmd, **args)


async def test_control_ok_reply(server: ControlServer, client_factory: Any) -> None:
    client = client_factory(server.bound_address, timeout_s=5.0)
    assert await call(client, "status") == {"state": "idle", "frames": 3}
    assert await call(client, "echo", a=1, b=[1, 2]) == {"a": 1, "b": [1, 2]}
    assert await asyncio.to_thread(client.set, exposure_ms=20) == {"exposure_ms": 20.0}


async def test_client_refuses_non_finite_numbers_instead_of_sending_null(
    server: ControlServer, client_factory: Any
) -> None:
    """JSON has no NaN: encoded as null, ``x_pos: nan`` read as "not given" imaged wherever
    the stage was (bug hunt). The client refuses it before sending, naming the argument."""
    client = client_factory(server.bound_address, timeout_s=5.0)
    with pytest.raises(ValueError, match=r"enqueue: args\.events\[0\]\.x_pos is not a finite"):
        await call(client, "enqueue", events=[{"x_pos": float("nan"), "y_pos": 1.0}])
    with pytest.raises(ValueError, match=r"args\.exposure_ms is not a finite"):
        await asyncio.to_thread(client.set, exposure_ms=np.float32("inf"))
    with pytest.raises(ValueError, match=r"args\.a\.b"):
        await call(client, "echo", a={"b": np.array([1.0, np.nan])})
    assert await call(client, "echo", a=1.5, b=[np.float64(2)]) == {"a": 1.5, "b": [2.0]}


async def test_control_command_error(server: ControlServer, client_factory: Any) -> None:
    client = client_factory(server.bound_address, timeout_s=5.0)
    with pytest.raises(ControlError) as info:
        await call(client, "start")
    assert info.value.code == "invalid_state"
    assert "send stop first" in info.value.message
    with pytest.raises(ControlError) as info:
        await call(client, "fly")
    assert info.value.code == "unknown_command"


async def test_control_validation_error_is_invalid_args(
    server: ControlServer, client_factory: Any
) -> None:
    client = client_factory(server.bound_address, timeout_s=5.0)
    with pytest.raises(ControlError) as info:
        await call(client, "set", exposure_ms="fast")
    assert info.value.code == "invalid_args"
    assert "exposure_ms" in info.value.message


async def test_control_handler_exception_is_internal_and_server_survives(
    server: ControlServer, client_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = client_factory(server.bound_address, timeout_s=5.0)
    with caplog.at_level(logging.ERROR, logger="livemask"), pytest.raises(ControlError) as info:
        await call(client, "boom")
    assert info.value.code == "internal"
    assert "handler exploded" in info.value.message
    assert any(r.exc_info for r in caplog.records if r.name == "livemask")
    assert await call(client, "status") == {"state": "idle", "frames": 3}


async def test_control_unserialisable_result_is_internal(client_factory: Any) -> None:
    async def bad(cmd: str, args: dict[str, Any]) -> Any:
        return object()

    srv = ControlServer(ANY_PORT, bad).start()
    task = asyncio.create_task(srv.serve())
    try:
        client = client_factory(srv.bound_address, timeout_s=5.0)
        with pytest.raises(ControlError) as info:
            await call(client, "status")
        assert info.value.code == "internal"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        srv.close()


async def test_malformed_json_from_raw_req(server: ControlServer, raw_socket: Any) -> None:
    req = raw_socket(zmq.REQ, server.bound_address)
    await req.send(b"{this is not json")
    reply = json.loads(await asyncio.wait_for(req.recv(), 10))
    assert reply["ok"] is False
    assert reply["id"] is None
    assert reply["error"]["code"] == "bad_json"
    # the same socket and server go on working
    await req.send(b'{"id": "x", "cmd": "status", "extra": 1}')
    reply = json.loads(await asyncio.wait_for(req.recv(), 10))
    assert reply["id"] == "x"
    assert reply["error"]["code"] == "bad_request"
    assert "extra" in reply["error"]["message"]
    await req.send(b'{"id": 9, "cmd": "status"}')
    reply = json.loads(await asyncio.wait_for(req.recv(), 10))
    assert reply == {"id": 9, "ok": True, "result": {"state": "idle", "frames": 3}}


async def test_requests_python_cannot_parse_get_bad_json(
    server: ControlServer, raw_socket: Any
) -> None:
    # each of these used to escape handle() and end serve(): no reply, ever, to anyone
    req = raw_socket(zmq.REQ, server.bound_address)
    for raw in (b'{"id": 1, "cmd": "status", "args": {"x": ' + b"[" * 5000 + b"]" * 5000
                + b"}}", b'{"id": ' + b"1" * 5000 + b', "cmd": "status"}'):
        await req.send(raw)
        reply = json.loads(await asyncio.wait_for(req.recv(), 10))
        assert reply["error"]["code"] == "bad_json"
    await req.send(b'{"id": 9, "cmd": "status"}')
    reply = json.loads(await asyncio.wait_for(req.recv(), 10))
    assert reply["ok"] is True


async def test_an_id_beyond_64_bits_gets_its_one_reply(
    server: ControlServer, raw_socket: Any
) -> None:
    """Before, encoding the reply raised for such an id, and no reply was sent at all."""
    req = raw_socket(zmq.REQ, server.bound_address)
    for raw in (b'{"id": 18446744073709551616, "cmd": "status"}',
                b'{"id": -9223372036854775809, "cmd": "fly", "bogus": 1}'):
        await req.send(raw)
        reply = json.loads(await asyncio.wait_for(req.recv(), 10))
        assert reply["id"] is None and reply["error"]["code"] == "bad_request"
        assert reply["error"]["message"].startswith("id: ")
        assert "does not fit 64 bits" in reply["error"]["message"]
    await req.send(b'{"id": 9223372036854775807, "cmd": "echo", "args": {"n": 2}}')
    reply = json.loads(await asyncio.wait_for(req.recv(), 10))
    assert reply == {"id": 2**63 - 1, "ok": True, "result": {"n": 2}}


async def ask(req: Any, raw: bytes) -> tuple[bytes, dict[str, Any]]:
    """Send one raw request on a REQ socket; its raw and parsed reply."""
    await req.send(raw)
    reply = await asyncio.wait_for(req.recv(), 30)
    return reply, json.loads(reply)


async def test_a_request_with_100000_unknown_keys_gets_a_short_reply(
    server: ControlServer, raw_socket: Any
) -> None:
    """800,000 unknown keys held the event loop for 9 s while each was reported, in a
    32.7 MB reply. Now too many arguments are refused before any command sees them, and a
    validation error lists ten problems."""
    req = raw_socket(zmq.REQ, server.bound_address)
    keys = b",".join(b'"k%d": 1' % i for i in range(100_000))
    raw, reply = await ask(req, b'{"id": 5, "cmd": "strict", "args": {' + keys + b"}}")
    assert len(raw) < 300
    assert reply["id"] == 5 and reply["error"]["code"] == "bad_request"
    assert reply["error"]["message"].startswith("args: 100000 arguments; a command takes at")
    nested = b'{"id": 6, "cmd": "strict", "args": {"options": {' + keys + b"}}}"
    raw, reply = await ask(req, nested)
    assert len(raw) < 1000
    assert reply["id"] == 6 and reply["error"]["code"] == "invalid_args"
    message = reply["error"]["message"]
    assert message.startswith("options.k0: Extra inputs are not permitted; options.k1: ")
    assert message.endswith("; and 99990 more")


async def test_a_repeated_key_is_refused_and_nothing_runs(
    server: ControlServer, raw_socket: Any
) -> None:
    """``{"cmd": "status", "cmd": "stop"}`` stopped the acquisition (the last one won)."""
    req = raw_socket(zmq.REQ, server.bound_address)
    HANDLED.clear()
    _, reply = await ask(req, b'{"id": 1, "cmd": "status", "cmd": "stop"}')
    assert reply["error"]["code"] == "bad_json"
    assert "repeats the key 'cmd'" in reply["error"]["message"]
    _, reply = await ask(req, b'{"id": 2, "cmd": "echo", "args": {"a": {"b": 1, "b": 2}}}')
    assert reply["error"]["code"] == "bad_json" and "'b'" in reply["error"]["message"]
    assert HANDLED == []


async def test_an_id_no_reply_can_carry_is_refused_before_the_command_runs(
    server: ControlServer, raw_socket: Any
) -> None:
    """A lone surrogate is valid JSON: before, ``stop`` ran, then its reply could not be
    encoded and an ``internal`` error with id null came back."""
    req = raw_socket(zmq.REQ, server.bound_address)
    HANDLED.clear()
    _, reply = await ask(req, b'{"id": "\\ud800", "cmd": "stop"}')
    assert reply["id"] is None and reply["error"]["code"] == "bad_request"
    assert reply["error"]["message"].startswith("id: ")
    assert "lone UTF-16 surrogate" in reply["error"]["message"]
    assert HANDLED == []
    _, reply = await ask(req, b'{"id": "\\ud83d\\ude00", "cmd": "echo", "args": {"n": 1}}')
    assert reply == {"id": "\U0001f600", "ok": True, "result": {"n": 1}}


async def test_a_key_no_reply_can_carry_still_gets_its_one_reply(
    server: ControlServer, raw_socket: Any
) -> None:
    """Review: an unknown key with a lone surrogate (valid JSON) made the error reply
    unencodable: no reply at all, and a traceback in the service's log."""
    req = raw_socket(zmq.REQ, server.bound_address)
    HANDLED.clear()
    _, reply = await ask(req, b'{"id": 1, "cmd": "status", "\\ud800x": 1}')
    assert reply["id"] == 1 and reply["error"]["code"] == "bad_request"
    assert reply["error"]["message"].startswith("\\ud800x: not a request field")
    assert HANDLED == []
    _, reply = await ask(req, b'{"id": 2, "cmd": "strict", "args": {"\\ud800": 1}}')
    assert reply["id"] == 2 and reply["error"]["code"] == "invalid_args"


async def test_dealer_peer(server: ControlServer, raw_socket: Any) -> None:
    dealer = raw_socket(zmq.DEALER, server.bound_address)
    for i in range(3):  # pipelined: DEALER need not wait for each reply
        await dealer.send(json.dumps({"id": i, "cmd": "echo", "args": {"i": i}}).encode())
    replies = [json.loads(await asyncio.wait_for(dealer.recv(), 10)) for _ in range(3)]
    assert [r["result"] for r in replies] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert [r["id"] for r in replies] == [0, 1, 2]


async def test_a_client_that_never_reads_holds_a_bounded_number_of_replies(
    server: ControlServer, client_factory: Any
) -> None:
    """libzmq's default queue (1000 replies per peer) let a client that pipelined big
    requests and never read hold gigabytes in the service; replies past the bound drop."""
    ctx = zmq.asyncio.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVHWM, 1)
    dealer.setsockopt(zmq.RCVBUF, 64 * 1024)
    dealer.connect(server.bound_address)
    try:
        sent = 60
        for i in range(sent):
            await dealer.send(json.dumps({"id": i, "cmd": "big", "args": {"n": 1 << 20}}).encode())
        deadline = time.monotonic() + 30
        while server.requests < sent:  # every request handled, its reply queued or dropped
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        other = client_factory(server.bound_address, timeout_s=10.0)
        assert await asyncio.to_thread(lambda: other.request("echo", i=1)) == {"i": 1}
        got = 0
        while await dealer.poll(500):
            await dealer.recv()
            got += 1
        assert 1 <= got <= MAX_UNREAD_REPLIES + 10 < sent  # (+ socket buffers, in flight)
    finally:
        dealer.close(linger=0)


async def test_server_cancel_then_close() -> None:
    srv = ControlServer(ANY_PORT, handler)
    task = asyncio.create_task(srv.serve())  # serve() starts the socket itself
    await asyncio.sleep(0)
    assert srv.bound_address.startswith("tcp://127.0.0.1:")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    srv.close()


async def test_server_bind_conflict(server: ControlServer) -> None:
    other = ControlServer(server.bound_address, handler)
    with pytest.raises(ConfigError, match="--control"):
        other.start()
    other.close()


def test_client_times_out_without_server() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    with ControlClient(address, timeout_s=0.05, retries=2) as client:
        with pytest.raises(ControlTimeout) as info:
            client.status()
        assert isinstance(info.value, TimeoutError)
        assert address in str(info.value)
        assert "livemask serve" in str(info.value)
        assert "2 attempt" in str(info.value)
        assert client._socket is None  # the stuck REQ socket was thrown away


def test_stop_gives_up_on_a_service_that_is_not_there_in_the_client_timeout() -> None:
    """Before, stop() tried three times for 30 s each: a cleanup hung for 90 s."""
    address = f"tcp://127.0.0.1:{free_port()}"
    with ControlClient(address, timeout_s=0.05, retries=2) as client:
        start = time.monotonic()
        with pytest.raises(ControlTimeout, match=r"no connection to .* for 'stop' after 2 "):
            client.stop(timeout_s=3.0)
        assert time.monotonic() - start < 2.0
        with pytest.raises(ControlTimeout, match=r"'enqueue' after 1 attempt\(s\) of 0\.05 s: no"):
            client.enqueue([{"index": {"t": 0}}])  # (never sent: it cannot have run)


async def test_stop_waits_longer_than_other_requests(
    server: ControlServer, client_factory: Any
) -> None:
    """The service answers ``stop`` once the frame being taken is done (5 s for a hung
    camera, longer for long exposures); before, the client gave up after its 2 s."""
    client = client_factory(server.bound_address, timeout_s=0.1, retries=1)
    with pytest.raises(ControlTimeout, match=r"1 attempt\(s\) of 0\.1 s"):
        await call(client, "stop")
    client = client_factory(server.bound_address, timeout_s=0.1, retries=1)
    assert await asyncio.to_thread(client.stop) == {"stopped": True, "still_running": False}
    with pytest.raises(ControlTimeout, match=r"1 attempt\(s\) of 0\.1 s"):
        await asyncio.to_thread(client.stop, timeout_s=0.05)  # the client's own is longer
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        client.request("status", timeout_s=0)


async def test_client_recovers_when_server_appears_late(client_factory: Any) -> None:
    """Lazy Pirate: the first attempt is lost, a retry on a fresh socket succeeds."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    client = client_factory(address, timeout_s=0.3, retries=20)
    pending = asyncio.create_task(call(client, "status"))
    await asyncio.sleep(0.05)
    srv = ControlServer(address, handler).start()
    task = asyncio.create_task(srv.serve())
    try:
        assert await asyncio.wait_for(pending, 30) == {"state": "idle", "frames": 3}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        srv.close()


async def test_client_discards_reply_with_other_id(client_factory: Any) -> None:
    """A reply for another request id is dropped; the retry gets the right one."""
    router = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(ANY_PORT)
    try:
        client = client_factory(endpoint(router), timeout_s=0.5, retries=3)
        pending = asyncio.create_task(call(client, "status"))
        ident, empty, payload = await asyncio.wait_for(router.recv_multipart(), 10)
        req_id = json.loads(payload)["id"]
        await router.send_multipart([ident, empty, protocol.ok_reply(req_id + 100, "wrong")])
        ident, empty, payload = await asyncio.wait_for(router.recv_multipart(), 10)
        assert json.loads(payload)["id"] == req_id  # resent with the same id
        await router.send_multipart([ident, empty, protocol.ok_reply(req_id, "right")])
        assert await asyncio.wait_for(pending, 10) == "right"
    finally:
        router.close(linger=0)


async def test_a_request_that_changes_things_is_not_resent(client_factory: Any) -> None:
    """Before, an enqueue whose reply came late (behind a slow stop) was resent and, the
    first copy still delivered, acquired twice; the caller saw one success."""
    router = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(ANY_PORT)
    try:
        client = client_factory(endpoint(router), timeout_s=0.2, retries=3)
        with pytest.raises(ControlTimeout, match=r"1 attempt\(s\).*'enqueue' is not resent"):
            await call(client, "enqueue", events=[{"x_pos": 1.0}])
        received = []
        while await router.poll(300):
            received.append(await router.recv_multipart())
        assert len(received) == 1
        with pytest.raises(ControlTimeout, match=r"3 attempt\(s\)"):  # safe to repeat
            await call(client, "status")
        with pytest.raises(ControlTimeout, match=r"3 attempt\(s\)"):
            await call(client, "rules")  # listing them
        with pytest.raises(ControlTimeout, match=r"1 attempt\(s\)"):
            await call(client, "rules", enable=["a"])
    finally:
        router.close(linger=0)


def test_client_request_ids_increment_and_wrappers_send_args() -> None:
    sent: list[dict[str, Any]] = []

    class Recorder(ControlClient):
        def request(self, cmd: str, /, *, timeout_s: float | None = None, **args: Any) -> Any:
            sent.append({"cmd": cmd, "args": args})
            return None

    class FakeModel:
        def model_dump(self, mode: str = "python") -> dict[str, Any]:
            return {"mode": mode}

    with Recorder("tcp://127.0.0.1:1") as c:
        c.status()
        c.start()
        c.start({"time_plan": {"interval": 1, "loops": 3}})
        c.start(FakeModel())
        c.stop()
        c.enqueue([{"index": {"t": 0}}, FakeModel()])
        c.snapshot()
        c.set(exposure_ms=10, mode="free-run")
    assert sent == [
        {"cmd": "status", "args": {}},
        {"cmd": "start", "args": {}},
        {"cmd": "start", "args": {"sequence": {"time_plan": {"interval": 1, "loops": 3}}}},
        {"cmd": "start", "args": {"sequence": {"mode": "json"}}},
        {"cmd": "stop", "args": {}},
        {"cmd": "enqueue", "args": {"events": [{"index": {"t": 0}}, {"mode": "json"}]}},
        {"cmd": "snapshot", "args": {}},
        {"cmd": "set", "args": {"exposure_ms": 10, "mode": "free-run"}},
    ]


async def test_request_ids_increment_on_the_wire(
    server: ControlServer, raw_socket: Any, client_factory: Any
) -> None:
    seen: list[Any] = []
    original = server.handle

    async def spy(payload: bytes) -> bytes:
        seen.append(json.loads(payload)["id"])
        return await original(payload)

    server.handle = spy  # type: ignore[method-assign]
    client = client_factory(server.bound_address, timeout_s=5.0)
    for _ in range(3):
        await call(client, "status")
    assert seen == [1, 2, 3]
