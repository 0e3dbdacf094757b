"""Operations fixes (s22): a second service on live ipc addresses, ipc socket files left
behind on close; the standalone dashboard's bind errors and a failed start's port; the
recording's health in the Prometheus metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from livemask.cli import app as cli_app
from livemask.client import ControlClient, Subscriber
from livemask.dashboard.server import DashboardServer
from livemask.errors import ConfigError
from livemask.service.metrics import MetricsServer
from livemask.transport import ControlServer, ZmqPublisher
from tests.conftest import ROOT, free_tcp_address
from tests.test_metrics import STATUS, _scrape, exposition, samples


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


# ------------------------------------------------------------------ (3) recording metrics
def test_recording_health_families_from_a_status_snapshot() -> None:
    """Before, ``status.recording`` gave no metric at all."""
    recording = {"path": "/data/run", "frames_written": 30, "frames_analysed": 30,
                 "frames_skipped": 0, "frames_failed": 0, "frames_rejected": 12,
                 "frames_queued": 3, "queued_mb": 1.5, "measurement_rows": 400,
                 "frames_rows_lost": 2, "errors": ["x"], "errors_total": 14,
                 "failing": True, "stopped": None}
    got = samples(exposition(lambda: {**STATUS, "recording": recording,
                                      "last_error": "recording to /data/run: full"}))
    for name, value in (("recording_enabled", 1), ("recording_failing", 1),
                        ("recording_stopped", 0), ("recording_frames_queued", 3),
                        ("recording_queued_bytes", 1.5 * 2**20),
                        ("recording_frames_written_total", 30),
                        ("recording_frames_rejected_total", 12),
                        ("recording_frames_rows_lost_total", 2),
                        ("recording_measurement_rows_total", 400),
                        ("recording_errors_total", 14)):
        assert got[(f"livemask_{name}", ())] == value, name
    families = {f.name: f.type for f in text_string_to_metric_families(
        exposition(lambda: {**STATUS, "recording": recording}))}
    assert families["livemask_recording_frames_rejected"] == "counter"
    assert families["livemask_recording_failing"] == "gauge"
    off = samples(exposition(lambda: {**STATUS, "recording": None, "last_error": None}))
    assert off[("livemask_recording_enabled", ())] == 0
    assert not [k for k in off if k[0].startswith("livemask_recording_")
                and k[0] != "livemask_recording_enabled"]
    with MetricsServer(lambda: {**STATUS, "recording": recording}, port=0) as server:
        assert server.url is not None  # named by describe(): a restricted scrape gets it
        assert samples(_scrape(server.url + "?name[]=livemask_recording_failing")) == {
            ("livemask_recording_failing", ()): 1.0}


# The service records until the disk is full (the kernel's file-size limit of 1 byte from
# then on: every write fails), its metrics served over HTTP; the test scrapes them.
_DISK_FILLS_SCRIPT = r"""
import asyncio, json, resource, signal, sys
from livemask.service.app import Service
from tests.conftest import make_config

async def main() -> None:
    cfg = make_config(record={"enabled": True, "path": sys.argv[1]},
                      metrics={"enabled": True, "port": 0},
                      acquisition={"sequence": {"time_plan": {"interval": 0.05,
                                                              "loops": 100000}}})
    async with Service(cfg) as svc:
        svc.start_acquisition(None)
        while svc.recorder.report()["frames_written"] < 3:
            await asyncio.sleep(0.05)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
        print(json.dumps({"metrics": svc.metrics.url,
                          "control": svc.control.bound_address}), flush=True)
        await asyncio.sleep(120)

asyncio.run(main())
"""


def _metrics_until(url: str, done: Callable[[dict[Any, float]], bool]) -> dict[Any, float]:
    """Scrape ``url`` until ``done`` holds for the samples (at most 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        got = samples(_scrape(url))
        if done(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


@pytest.mark.timeout(120)
def test_a_full_disk_shows_in_the_metrics(tmp_path: Path) -> None:
    """Before, ``/metrics`` of a service whose disk was full looked healthy: frames rejected,
    ``status.recording.failing`` true and ``status.last_error`` set, none of it exported."""
    log = tmp_path / "child.log"  # (its writes fail too once the disk is full)
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", _DISK_FILLS_SCRIPT, str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, log.read_text()
        where = json.loads(line)
        got = _metrics_until(where["metrics"], lambda g: g.get(
            ("livemask_recording_frames_rejected_total", ()), 0) >= 3)
        with ControlClient(where["control"], timeout_s=10) as client:
            status = client.status()
        recording = status["recording"]
        assert recording["failing"] is True and status["last_error"] is not None
        assert got[("livemask_recording_enabled", ())] == 1
        assert got[("livemask_recording_failing", ())] == 1
        assert got[("livemask_recording_stopped", ())] == 0
        assert got[("livemask_recording_frames_rejected_total", ())] >= 3
        assert 3 <= got[("livemask_recording_frames_written_total", ())] \
            <= recording["frames_written"]
        assert 1 <= got[("livemask_recording_errors_total", ())] <= recording["errors_total"]
    finally:
        proc.kill()
        proc.communicate(timeout=30)
