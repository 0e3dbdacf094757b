"""Small fixes of session 25's hunts (client author, biologist), each failing before."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from livemask.transport.publisher import ZmqPublisher


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a unix socket path has at most 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="lm-", dir="/tmp") as name:
        yield Path(name)


def test_a_relative_ipc_address_is_reported_absolute(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """status.pub_address said ``ipc://ipcdir/pub.sock``: a client in another folder that
    connected to it, as protocol.md says to, received nothing."""
    (short_dir / "ipcdir").mkdir()
    monkeypatch.chdir(short_dir)
    with ZmqPublisher("ipc://ipcdir/pub.sock", heartbeat_s=0) as pub:
        address = pub.bound_address
        assert address == f"ipc://{short_dir / 'ipcdir' / 'pub.sock'}"
        monkeypatch.chdir("/")
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(address)
            for _ in range(200):
                pub.publish("status", {"n": 1})
                if sub.poll(20):
                    break
            assert sub.poll(0), "nothing reached a subscriber of the reported address"
        finally:
            sub.close(linger=0)
            ctx.term()
