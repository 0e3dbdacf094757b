"""Operations fixes (s22): a second service on live ipc addresses, ipc socket files left
behind on close; the standalone dashboard's bind errors and a failed start's port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from livemask.cli import app as cli_app
from livemask.client import ControlClient, Subscriber
from livemask.dashboard.server import DashboardServer
from livemask.errors import ConfigError
from livemask.transport import ControlServer, ZmqPublisher
from tests.conftest import ROOT, free_tcp_address


# ------------------------------------------------------------------ (1) ipc takeover
@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a unix socket path has at most 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="lm-", dir="/tmp") as name:
        yield Path(name)


def _serve(pub: str, ctl: str, log: Path) -> subprocess.Popen[bytes]:
    """``livemask serve`` of the simulated rig in a child process, output to ``log``."""
    cmd = [sys.executable, "-m", "livemask", "serve",
           "--config", str(ROOT / "configs" / "simulated-nuclei.yaml"),
           "--pub", pub, "--control", ctl, "--frames", "100000", "--interval", "0.2"]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def _wait_publishing(proc: subprocess.Popen[bytes], pub: str, log: Path) -> None:
    """Until the service at ``pub`` publishes a status (it has bound both sockets)."""
    with Subscriber(pub, ("status",)) as sub:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if sub.recv(timeout_s=0.5) is not None:
                return
    pytest.fail(f"the first service never published:\n{log.read_text()}")


@pytest.mark.timeout(150)
def test_a_second_serve_on_live_ipc_addresses_is_refused(short_dir: Path) -> None:
    """Before, the second ``livemask serve`` started without a word: libzmq unlinked the
    first's socket files and bound its own, and the first ran on, unreachable."""
    pub, ctl = f"ipc://{short_dir}/pub.sock", f"ipc://{short_dir}/ctl.sock"
    first = _serve(pub, ctl, short_dir / "first.log")
    try:
        _wait_publishing(first, pub, short_dir / "first.log")
        inodes = {p: os.stat(p).st_ino for p in short_dir.glob("*.sock")}
        second = subprocess.run(
            [sys.executable, "-m", "livemask", "serve",
             "--config", str(ROOT / "configs" / "simulated-nuclei.yaml"),
             "--pub", pub, "--control", ctl],
            capture_output=True, text=True, timeout=90)
        said = " ".join(second.stderr.split())
        assert second.returncode != 0, said
        assert "Address already in use" in said and "another `livemask serve`" in said, said
        assert {p: os.stat(p).st_ino for p in short_dir.glob("*.sock")} == inodes
        with ControlClient(ctl, timeout_s=10) as client:  # the first is still reachable
            assert client.status()["state"] in ("idle", "running", "starting")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
        assert not list(short_dir.glob("*.sock"))  # a clean close removes its files
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def _stale_socket_file(path: Path) -> None:
    """A unix socket file nobody listens on (a service that was killed leaves one)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        s.listen()
    assert path.is_socket()


def test_a_stale_ipc_file_is_replaced_and_removed_on_close(short_dir: Path) -> None:
    path = short_dir / "pub.sock"
    _stale_socket_file(path)
    pub = ZmqPublisher(f"ipc://{path}").start()
    try:
        with Subscriber(f"ipc://{path}", ("status",)) as sub:
            got = None
            for _ in range(100):  # until the subscription has reached the publisher
                pub.publish("status", {"hello": True})
                if (got := sub.recv(timeout_s=0.05)) is not None:
                    break
            assert got is not None
    finally:
        pub.close()
    assert not path.exists()


def test_a_live_ipc_path_is_refused_and_kept(short_dir: Path) -> None:
    path = short_dir / "ctl.sock"
    with ZmqPublisher(f"ipc://{path}") as first:
        inode = path.stat().st_ino
        with pytest.raises(ConfigError, match=r"Address already in use .*another `livemask "
                                              r"serve` running\? .*--control"):
            ControlServer(f"ipc://{path}", _never).start()
        assert path.stat().st_ino == inode
        assert first.started
    assert not path.exists()


async def _never(cmd: str, args: dict[str, object]) -> None:
    """A control handler for servers that never get a request."""
    raise AssertionError(cmd)


@pytest.mark.parametrize("kind", ["publisher", "control server"])
def test_close_keeps_a_socket_file_bound_anew_since(short_dir: Path, kind: str) -> None:
    """Only the file this socket bound is removed, never one another process bound since
    at that path (libzmq replaces the file on bind)."""
    path = short_dir / "x.sock"
    server: ZmqPublisher | ControlServer = (
        ZmqPublisher(f"ipc://{path}") if kind == "publisher"
        else ControlServer(f"ipc://{path}", _never)).start()
    path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()
        server.close()
        assert path.is_socket()


def test_a_control_server_removes_its_ipc_file_on_close(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A relative ipc path is removed from where it was bound, whatever the working
    directory is at close."""
    monkeypatch.chdir(short_dir)
    server = ControlServer("ipc://ctl.sock", _never).start()
    assert (short_dir / "ctl.sock").is_socket()
    monkeypatch.chdir(ROOT)
    server.close()
    assert not (short_dir / "ctl.sock").exists()


# ------------------------------------------------------------------ (2) standalone dashboard
@pytest.mark.parametrize("address", ["127.0.0.1", "192.0.2.1"])  # port taken; not ours
def test_standalone_dashboard_bind_errors_name_listen(address: str) -> None:
    """Before, ``livemask dashboard`` said "Choose another dashboard.port / --dashboard
    HOST:PORT" (``serve``'s key and flag); its option is ``--listen``."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1] if address == "127.0.0.1" else 0
        result = CliRunner().invoke(cli_app, ["dashboard", "--connect", free_tcp_address(),
                                              "--listen", f"{address}:{port}"])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code != 0, text
    assert f"cannot serve the dashboard on {address}:{port}" in text
    assert "Choose another --listen HOST:PORT" in text, text
    assert "--dashboard" not in text and "dashboard.port" not in text


async def test_a_dashboard_that_fails_after_binding_frees_its_port() -> None:
    """Before, a subscriber that refused the pub address left the HTTP port bound (and the
    aiohttp runner set up) until the process ended: a second start on it failed."""
    server = DashboardServer("tcp://127.0.0.1:0", port=0)  # no port 0 to connect to
    with pytest.raises(ValueError, match=r"not an address to connect to"):
        await server.start()
    assert server.port != 0 and server.url is None
    with socket.create_server(("127.0.0.1", server.port)):  # the port is free again
        pass
    publisher = ZmqPublisher("tcp://127.0.0.1:*").start()
    try:
        async with DashboardServer(publisher.bound_address, port=server.port) as again:
            assert again.url == f"http://127.0.0.1:{server.port}/"
    finally:
        publisher.close()
    await server.close()  # still idempotent after a failed start
