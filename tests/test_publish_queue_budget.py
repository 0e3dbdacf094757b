"""publish.max_queued_mb: what a subscriber that stops reading can pin in the service.

A PUB socket keeps up to its high-water mark of messages per subscriber, zero-copy (the
frames' own arrays): 200 messages of 2048² frames are over 2 GB. libzmq gives a connection
the listener's high-water mark as it was at bind time, so the publisher binds again once the
frame size is known; these tests run real sockets on loopback.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from livemask.service.app import Service
from livemask.transport.publisher import (
    LARGEST_BYTES_PER_PIXEL,
    MIN_QUEUE_HWM,
    ZmqPublisher,
    queue_hwm,
)
from tests.conftest import make_config
from tests.test_ops_fixes_s24 import short_dir
from tests.test_service import collect_run

__all__ = ["short_dir"]  # (a fixture of test_ops_fixes_s24, used here)


def test_the_high_water_mark_fits_the_budget_to_the_frame_size() -> None:
    frame_2048 = 2048 * 2048 * LARGEST_BYTES_PER_PIXEL  # an int32 labels message, 16.8 MB
    assert queue_hwm(200, 512, (2048, 2048)) == int(512e6 // frame_2048) == 30
    assert queue_hwm(200, 512, (512, 512)) == 200  # 488 fit: publish.sndhwm caps it
    assert queue_hwm(10, 512, (512, 512)) == 10
    assert queue_hwm(200, 1, (2048, 2048)) == MIN_QUEUE_HWM  # a tiny budget: the floor
    assert queue_hwm(200, 0, (4096, 4096)) == 200  # 0: sndhwm alone


def _stalled_subscriber(ctx: zmq.Context, address: str) -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 1)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(address)
    return sub


def _until_connected(pub: ZmqPublisher, sub: zmq.Socket, timeout_s: float = 10.0) -> None:
    """Send small messages until ``sub`` gets one (it has (re)connected and subscribed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pub.publish("status", {"ping": True})
        if sub.poll(20):
            while sub.poll(50):  # empty its queue before it stalls
                sub.recv_multipart()
            return
    raise AssertionError("the subscriber did not connect")


def _received(sub: zmq.Socket) -> int:
    """Read everything that reaches ``sub`` until nothing comes for a second."""
    n = 0
    while sub.poll(1000):
        sub.recv_multipart()
        n += 1
    return n


@pytest.mark.parametrize("lowered", [True, False])
def test_a_stalled_subscriber_holds_at_most_the_lowered_mark(lowered: bool) -> None:
    ctx = zmq.Context()
    big = np.zeros((1024, 2048), dtype=np.int32)  # 8 MB: the kernel's loopback buffers
    try:                                          # hold at most a few of them
        with ZmqPublisher("tcp://127.0.0.1:*", sndhwm=200, heartbeat_s=0) as pub:
            sub = _stalled_subscriber(ctx, pub.bound_address)  # connected before the rebind
            _until_connected(pub, sub)
            if lowered:
                assert pub.limit_queue(5)
                assert pub.counters()["sndhwm"] == 5
                _until_connected(pub, sub)  # it reconnects by itself
            for _ in range(60):  # the subscriber reads nothing meanwhile
                pub.publish("labels", {"frame_id": 0}, {"labels": big})
            time.sleep(0.5)
            got = _received(sub)
            if lowered:  # 5 queued, 1 in the subscriber, a few in the kernel's buffers
                assert 1 <= got <= 12, got
            else:
                assert got == 60
            sub.close()
    finally:
        ctx.term()


def test_raising_the_mark_or_an_inproc_endpoint_keeps_the_bind() -> None:
    with ZmqPublisher("tcp://127.0.0.1:*", sndhwm=20, heartbeat_s=0) as pub:
        address = pub.bound_address
        assert not pub.limit_queue(20) and not pub.limit_queue(50)
        assert pub.sndhwm == 20 and pub.bound_address == address
        assert pub.limit_queue(8) and pub.bound_address == address  # the same port again
    with ZmqPublisher("inproc://queue-budget", sndhwm=20, heartbeat_s=0) as pub:
        assert not pub.limit_queue(8)
        assert pub.counters()["sndhwm"] == 20


async def test_the_service_limits_its_queue_to_the_cameras_frames(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """512² frames, 4 MB: 3 labels messages fit, so the floor of 4; frames still flow to a
    subscriber that reads."""
    cfg = make_config(publish={"max_queued_mb": 4.0})
    rows, cols = cfg.simulation.sensor_shape_px
    caplog.set_level(logging.INFO, logger="livemask")
    async with Service(cfg) as svc:
        expected = queue_hwm(cfg.publish.sndhwm, 4.0, (rows, cols))
        assert expected == MIN_QUEUE_HWM < cfg.publish.sndhwm
        assert svc.status()["publisher"]["sndhwm"] == expected
        assert f"at most {expected} messages queued per subscriber" in caplog.text
        got = await collect_run(svc, ("frame", "labels", "measurements", "event"))
        assert len(got["labels"]) == len(got["frame"]) == 12


async def test_no_budget_keeps_publish_sndhwm() -> None:
    cfg = make_config(publish={"max_queued_mb": 0, "sndhwm": 150})
    async with Service(cfg) as svc:
        assert svc.status()["publisher"]["sndhwm"] == 150


@pytest.mark.parametrize("address", ["ipc://pub.sock", "ipc://./pub.sock"])
def test_a_relative_ipc_address_is_bound_again(
    address: str, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rebind unbound the absolute path status reports: libzmq matches an ipc unbind
    only as bound, so a service on a relative ipc path with a large camera failed to
    start (review)."""
    monkeypatch.chdir(short_dir)
    with ZmqPublisher(address, sndhwm=200, heartbeat_s=0) as pub:
        assert pub.limit_queue(5)
        assert pub.bound_address == f"ipc://{short_dir / 'pub.sock'}"
        ctx = zmq.Context()
        try:
            sub = _stalled_subscriber(ctx, pub.bound_address)
            _until_connected(pub, sub)
            sub.close()
        finally:
            ctx.term()
