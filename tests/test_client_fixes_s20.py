"""Client library fixes (bug hunt s20): stop not resent and aimed at one acquisition, an
AsyncSubscriber closed while a task waits on it, topics given as one string, unsubscribing
from an all-topics subscriber, bad addresses and timeouts."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq
import zmq.asyncio

from livemask import protocol
from livemask.client import AsyncSubscriber, ControlClient, Subscriber
from livemask.errors import ControlError, ControlTimeout
from livemask.service.app import Service
from tests.conftest import free_tcp_address, make_config

SYNC_DEADLINE_S = 10.0


@pytest.fixture
def router() -> Iterator[zmq.asyncio.Socket]:
    """A bare ROUTER on a loopback port the OS picks: a service that answers late."""
    sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    yield sock
    sock.close(linger=0)


@pytest.fixture
def raw_pub() -> Iterator[zmq.Socket[Any]]:
    """A bare PUB socket, for sending messages of chosen topics."""
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    yield sock
    sock.close(linger=0)


def endpoint(sock: zmq.Socket[Any]) -> str:
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


# ------------------------------------------------------------------ stop


async def test_stop_is_not_resent_after_a_timeout(router: zmq.asyncio.Socket) -> None:
    """Before, a stop whose reply came late (the service waiting for a long exposure) was
    resent; handled after the first, it stopped the acquisition another client had
    started meanwhile (and said ``stopped: false`` where the first had stopped the run)."""
    client = ControlClient(endpoint(router), timeout_s=0.2, retries=3)
    with client, pytest.raises(ControlTimeout, match=r"1 attempt\(s\).*'stop' is not resent"):
        await asyncio.to_thread(client.stop, 0.2)
    received = []
    while await router.poll(300):
        received.append(await router.recv_multipart())
    assert len(received) == 1
    assert json.loads(received[0][-1])["cmd"] == "stop"


async def test_stop_sends_the_acquisition_it_is_for(router: zmq.asyncio.Socket) -> None:
    with ControlClient(endpoint(router), timeout_s=5.0) as client:
        pending = asyncio.create_task(asyncio.to_thread(client.stop, acquisition=3))
        *envelope, payload = await asyncio.wait_for(router.recv_multipart(), 10)
        request = json.loads(payload)
        assert (request["cmd"], request["args"]) == ("stop", {"acquisition": 3})
        reply = {"stopped": False, "still_running": True, "acquisition": 4}
        await router.send_multipart([*envelope, protocol.ok_reply(request["id"], reply)])
        assert await asyncio.wait_for(pending, 10) == reply
        plain = asyncio.create_task(asyncio.to_thread(client.stop))
        *envelope, payload = await asyncio.wait_for(router.recv_multipart(), 10)
        assert json.loads(payload)["args"] == {}  # old services: no argument
        await router.send_multipart([*envelope, protocol.ok_reply(json.loads(payload)["id"], 1)])
        assert await asyncio.wait_for(plain, 10) == 1


async def _started(svc: Service, ctl: ControlClient, sequence: dict[str, Any]) -> int:
    """Start ``sequence``; the number of the acquisition it began, as the reply and
    ``status`` give it."""
    reply = await asyncio.to_thread(ctl.start, sequence)
    assert svc.acquiring
    assert reply["acquisition"] == svc.pipeline.acquisition
    assert (await asyncio.to_thread(ctl.status))["acquisition"] == reply["acquisition"]
    return int(reply["acquisition"])


async def test_stop_with_an_acquisition_stops_only_that_one() -> None:
    """The race of a stop sent again late (t18), made deterministic: client A's stop of
    acquisition 1 arrives after client B started acquisition 2."""
    long_run = {"time_plan": {"interval": 0.05, "loops": 400}}
    async with Service(make_config()) as svc:
        with ControlClient(svc.control.bound_address, timeout_s=5.0) as ctl:
            first = await _started(svc, ctl, long_run)
            reply = await asyncio.to_thread(ctl.stop, acquisition=first + 1)
            assert reply == {"stopped": False, "still_running": True, "acquisition": first}
            assert svc.acquiring  # nothing was stopped
            reply = await asyncio.to_thread(ctl.stop, acquisition=first)
            assert reply == {"stopped": True, "still_running": False, "acquisition": first}
            second = await _started(svc, ctl, long_run)  # client B's
            assert second == first + 1
            reply = await asyncio.to_thread(ctl.stop, acquisition=first)  # A's, late
            assert reply == {"stopped": False, "still_running": True, "acquisition": second}
            assert svc.acquiring
            # old clients: no argument stops whatever runs
            assert await asyncio.to_thread(ctl.stop) == {"stopped": True, "still_running": False}
            for bad in ("1", True, 0, 1.0):
                with pytest.raises(ControlError, match=r"stop: .*acquisition") as info:
                    await asyncio.to_thread(ctl.request, "stop", acquisition=bad)
                assert info.value.code == "invalid_args"


# ------------------------------------------------------------------ AsyncSubscriber


async def test_closing_an_async_subscriber_ends_iteration_in_the_waiting_task() -> None:
    """Before, pyzmq cancelled the future the reader awaited: CancelledError in it."""
    sub = AsyncSubscriber(free_tcp_address(), topics=("measurements",))

    async def reader() -> str:
        async for _ in sub:
            pass
        return "ended"

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.1)  # the reader waits in recv
    sub.close()
    assert await asyncio.wait_for(task, 5) == "ended"


async def test_closing_an_async_subscriber_ends_a_recv_without_timeout() -> None:
    sub = AsyncSubscriber(free_tcp_address())
    task = asyncio.create_task(sub.recv(None))
    await asyncio.sleep(0.1)
    sub.close()
    assert await asyncio.wait_for(task, 5) is None


async def test_cancelling_a_task_waiting_on_an_async_subscriber_still_cancels_it() -> None:
    async with AsyncSubscriber(free_tcp_address()) as sub:
        task = asyncio.create_task(sub.recv(None))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        # cancelled and closed together: still a cancellation
        task = asyncio.create_task(sub.recv(None))
        await asyncio.sleep(0.1)
        task.cancel()
        sub.close()
        with pytest.raises(asyncio.CancelledError):
            await task


# ------------------------------------------------------------------ topics


def _sync(pub: zmq.Socket[Any], sub: Subscriber) -> None:
    """Wait out the slow-joiner window: publish ``status`` until one arrives."""
    deadline = time.monotonic() + SYNC_DEADLINE_S
    while time.monotonic() < deadline:
        pub.send_multipart(protocol.encode("status", {"ping": True}))
        if sub.recv(timeout_s=0.02) is not None:
            return
    raise AssertionError("subscriber never connected")


def test_a_topic_given_as_a_string_is_one_topic(raw_pub: zmq.Socket[Any]) -> None:
    """Before, ``topics="status"`` subscribed to 's', 't', 'a', 'u': ``truth`` too."""
    with Subscriber(endpoint(raw_pub), topics="status") as sub:
        assert sub.topics == ("status",)
        _sync(raw_pub, sub)
        raw_pub.send_multipart(protocol.encode("truth", {"n": 1}))
        raw_pub.send_multipart(protocol.encode("status", {"last": True}))
        got = []
        while (msg := sub.recv(timeout_s=5.0)) is not None:  # in order, one connection
            got.append(msg.topic)
            if msg.header.get("last"):
                break
        assert "truth" not in got and got[-1] == "status"
    with pytest.raises(TypeError, match=r"topics must be topic names \(str\)"):
        Subscriber(endpoint(raw_pub), topics=[b"status"])  # type: ignore[list-item]


def test_unsubscribing_from_an_all_topics_subscriber_is_refused() -> None:
    """Before, ``unsubscribe("status")`` on a subscriber of all topics did nothing."""
    with Subscriber(free_tcp_address(), topics=None) as sub:
        assert sub.all_topics and sub.topics == ()
        with pytest.raises(ValueError, match=r"cannot exclude one topic from all; subscribe"):
            sub.unsubscribe("status")
        sub.subscribe("event")  # receives it already
        assert sub.all_topics and sub.topics == ()


def test_a_subscriber_left_without_topics_can_subscribe_again() -> None:
    with Subscriber(free_tcp_address(), topics=("frame", "labels")) as sub:
        sub.unsubscribe("frame")
        sub.unsubscribe("labels")
        assert sub.topics == () and not sub.all_topics
        sub.subscribe("frame")
        assert sub.topics == ("frame",)


# ------------------------------------------------------------------ addresses, timeouts


def _unclosed_socket_warnings(make: Callable[[], Any]) -> list[str]:
    """The ValueError ``make`` raises, and the ResourceWarnings of sockets it left open."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            make()
        except ValueError as exc:
            message = str(exc)
        else:
            raise AssertionError("no ValueError")
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    return [message, *leaks]


@pytest.mark.parametrize("address", ["127.0.0.1:48510", "http://127.0.0.1:48510",
                                     "tcp://127.0.0.1", "tcp://127.0.0.1:115086",
                                     "tcp://127.0.0.1:0", "tcp://127.0.0.1:*"])
@pytest.mark.parametrize("client", [ControlClient, Subscriber, AsyncSubscriber])
def test_a_malformed_address_is_a_value_error_naming_the_form(
    address: str, client: Callable[[str], Any]
) -> None:
    """Before, a bare ZMQError 'Invalid argument' (ControlClient: at its first request),
    and the socket was left open."""
    message, *leaks = _unclosed_socket_warnings(lambda: client(address))
    assert f"address {address!r}" in message
    assert "tcp://HOST:PORT" in message and "ipc://PATH" in message
    assert "livemask serve" in message
    assert leaks == []


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_timeouts_must_be_finite(bad: float) -> None:
    """Before, accepted: each request then failed with OverflowError or ValueError."""
    address = free_tcp_address()
    with pytest.raises(ValueError, match=r"timeout_s must be > 0 and finite"):
        ControlClient(address, timeout_s=bad)
    with ControlClient(address, timeout_s=0.05, retries=1) as client:
        with pytest.raises(ValueError, match=r"timeout_s must be > 0 and finite"):
            client.request("status", timeout_s=bad)
        with pytest.raises(ValueError, match=r"timeout_s must be > 0 and finite"):
            client.stop(timeout_s=bad)
    with Subscriber(address) as sub:
        with pytest.raises(ValueError, match=r"timeout_s must be a finite .* or None"):
            sub.recv(bad)
        assert sub.recv(0) is None


async def test_async_recv_timeout_must_be_finite() -> None:
    async with AsyncSubscriber(free_tcp_address()) as sub:
        with pytest.raises(ValueError, match=r"timeout_s must be a finite .* or None"):
            await sub.recv(float("inf"))
