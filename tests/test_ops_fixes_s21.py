"""Operations fixes (s21): the model label while starting, own-port clashes, run start/finish
logging, metrics clients that trickle bytes, log rotation by moving the file."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import select
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import typer
import useq

from livemask.config import parse_config
from livemask.errors import ConfigError, ModelError
from livemask.service.app import Service
from livemask.service.metrics import MetricsServer
from tests.conftest import ROOT, make_config
from tests.test_metrics import STATUS, _scrape, samples
from tests.test_service import collect_run

GRAINS_CARD = ROOT / "src" / "livemask" / "models" / "grains.yaml"


# ------------------------------------------------------------------ (1) model while starting
def _info_while_the_card_loads(
    monkeypatch: pytest.MonkeyPatch, svc: Service
) -> list[dict[str, str]]:
    """Scrape ``livemask_info``'s labels over HTTP as the service loads its model card."""
    import livemask.service.app as app

    seen: list[dict[str, str]] = []
    real = app.load_model_card

    def scrape_then_load(name_or_path: Any) -> Any:
        assert svc.metrics is not None and svc.metrics.url is not None
        with urllib.request.urlopen(svc.metrics.url, timeout=10) as resp:
            got = samples(resp.read().decode())
        (labels,) = [dict(k[1]) for k in got if k[0] == "livemask_info"]
        seen.append(labels)
        return real(name_or_path)

    monkeypatch.setattr(app, "load_model_card", scrape_then_load)
    return seen


@pytest.mark.timeout(90)
async def test_the_model_label_is_the_cards_name_while_the_service_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, ``livemask_info`` and ``status.model`` said ``nuclei`` (model.name's default)
    until the card at model.path was loaded, then its name: a label that changed."""
    svc = Service(make_config(model={"path": str(GRAINS_CARD)}, metrics={"enabled": True,
                                                                         "port": 0}))
    seen = _info_while_the_card_loads(monkeypatch, svc)
    async with svc:
        assert svc.status()["model"] == "grains"
    assert len(seen) == 1
    assert seen[0]["model"] == "grains"
    assert "backend" not in seen[0]  # not loaded yet


@pytest.mark.timeout(60)
async def test_no_model_label_while_an_unreadable_card_is_tried(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """A card that cannot be read: no ``model`` (it is not known), never ``nuclei``."""
    svc = Service(make_config(model={"path": str(tmp_path / "gone.yaml")},
                              metrics={"enabled": True, "port": 0}))
    seen = _info_while_the_card_loads(monkeypatch, svc)
    with pytest.raises(ModelError, match=r"gone\.yaml does not exist"):
        async with svc:
            pass
    assert len(seen) == 1 and "model" not in seen[0]


# ------------------------------------------------------------------ (2) own-port clashes
@pytest.mark.parametrize(("sections", "keys"), [
    ({"metrics": {"enabled": True, "port": 48391},
      "publish": {"pub_address": "tcp://127.0.0.1:48391"}},
     ("metrics.port", "publish.pub_address")),
    ({"metrics": {"enabled": True, "port": 48392, "address": "0.0.0.0"},
      "publish": {"control_address": "tcp://127.0.0.1:48392"}},
     ("metrics.port", "publish.control_address")),
    ({"dashboard": {"enabled": True, "port": 48393},
      "publish": {"control_address": "tcp://*:48393"}},
     ("dashboard.port", "publish.control_address")),
    ({"dashboard": {"enabled": True, "port": 48394, "address": "localhost"},
      "metrics": {"enabled": True, "port": 48394}},
     ("metrics.port", "dashboard.port")),
])
def test_an_own_port_clash_is_refused_naming_both_keys(
    sections: dict[str, Any], keys: tuple[str, str]
) -> None:
    """Before, the second bind failed at start with a bare "Address already in use"."""
    from livemask.config import check_own_ports

    message = rf"{re.escape(keys[0])} and {re.escape(keys[1])} are one TCP port"
    with pytest.raises(ConfigError, match=message):
        check_own_ports(make_config(**sections))


async def test_the_service_refuses_an_own_port_clash_before_binding() -> None:
    """A config built in Python (not through ``serve``) is checked when the service starts."""
    cfg = make_config(metrics={"enabled": True, "port": 48389},
                      publish={"pub_address": "tcp://127.0.0.1:48389"})
    with pytest.raises(ConfigError, match=r"metrics\.port and publish\.pub_address"):
        async with Service(cfg):
            pass


def test_a_clash_in_the_file_that_a_flag_removes_is_no_error(tmp_path: Path) -> None:
    """Before, the file's clash was refused when it loaded, before ``serve --pub`` moved the
    PUB socket off the metrics port."""
    from livemask import cli
    from livemask.config import load_config

    config = tmp_path / "c.yaml"
    config.write_text("metrics: {enabled: true, port: 48388}\n"
                      "publish: {pub_address: 'tcp://127.0.0.1:48388'}\n")
    cfg = load_config(config)
    cli._apply_service_flags(cfg, pub="tcp://127.0.0.1:48387", control=None, mode=None,
                             record=None)
    cli._check_own_ports(cfg, pub="tcp://127.0.0.1:48387", control=None)


@pytest.mark.parametrize("sections", [
    {"metrics": {"enabled": False, "port": 48395},
     "publish": {"pub_address": "tcp://127.0.0.1:48395"}},  # metrics off
    {"metrics": {"enabled": True, "port": 48396, "address": "127.0.0.2"},
     "publish": {"pub_address": "tcp://127.0.0.1:48396"}},  # other hosts
    {"metrics": {"enabled": True, "port": 0}, "dashboard": {"enabled": True, "port": 0}},
])
def test_ports_that_do_not_clash_pass(sections: dict[str, Any]) -> None:
    from livemask.config import check_own_ports

    check_own_ports(make_config(**sections))


def test_a_clash_set_by_flags_names_the_flags() -> None:
    """What ``serve --dashboard``/``--control`` can name, once they are applied."""
    from livemask.config import check_own_ports

    cfg = parse_config({"metrics": {"enabled": True, "port": 48397}})
    cfg.dashboard.enabled, cfg.dashboard.port = True, 48397
    with pytest.raises(ConfigError, match=r"^metrics\.port and --dashboard are one TCP port "
                       r"\(127\.0\.0\.1:48397, 127\.0\.0\.1:48397\)"):
        check_own_ports(cfg, {"dashboard.port": "--dashboard"})


@pytest.mark.parametrize("flags, named", [
    (["--dashboard", "127.0.0.1:48396"], "metrics.port and --dashboard"),
    (["--control", "tcp://127.0.0.1:48396"], "metrics.port and --control"),
])
def test_serve_refuses_a_clash_that_its_flags_make(
    tmp_path: Path, flags: list[str], named: str
) -> None:
    """Before, ``serve --dashboard``/``--control`` on the metrics port passed the config
    check and failed at bind with a bare "Address already in use"."""
    from typer.testing import CliRunner

    from livemask import cli

    config = tmp_path / "c.yaml"
    config.write_text("metrics: {enabled: true, port: 48396}\n")
    result = CliRunner().invoke(cli.app, ["serve", "--config", str(config), *flags])
    assert result.exit_code == 2, result.output
    assert f"{named} are one TCP port" in " ".join(result.output.split())


# ------------------------------------------------------------------ (3) runs in the log
def _messages(records: list[logging.LogRecord], level: int) -> list[str]:
    return [r.getMessage() for r in records if r.levelno == level
            and r.getMessage().startswith("acquisition ")]


@pytest.mark.timeout(90)
async def test_an_acquisition_that_ends_with_an_error_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, livemask_log: list[logging.LogRecord]
) -> None:
    """Before, its error was published (``acquisition_finished.error``) but never logged."""
    from livemask.acquisition.simulated.devices import SimCamera

    snaps, real_snap = itertools.count(), SimCamera.snap

    def flaky_snap(self: SimCamera, buffer: Any) -> Any:
        if next(snaps) % 4 == 3:
            raise RuntimeError("camera link lost")
        return real_snap(self, buffer)

    monkeypatch.setattr(SimCamera, "snap", flaky_snap)
    async with Service(make_config()) as svc:
        await collect_run(svc, ("event",))
    assert _messages(livemask_log, logging.INFO) == [
        "acquisition 1 started: 12 event(s) planned, synchronized mode"]
    (warning,) = _messages(livemask_log, logging.WARNING)
    assert warning.startswith("acquisition 1 ended with an error (9 frame(s) in ")
    assert warning.endswith(" s (9 analysed, 0 skipped analysis, 0 failed), 3 missing): "
                            "3 of 12 imaging event(s) delivered no frame "
                            "(failed snaps, each announced as a frame_missing event): check "
                            "the camera (the log has pymmcore-plus' warnings)")


@pytest.mark.timeout(90)
async def test_acquisitions_that_finish_or_are_stopped_are_logged(
    livemask_log: list[logging.LogRecord],
) -> None:
    """Before, nothing was logged when an acquisition started, finished or was stopped."""
    async with Service(make_config()) as svc:
        await collect_run(svc, ("event",))
        svc.start_acquisition(useq.MDASequence(time_plan={"interval": 0.05, "loops": 10_000}))
        for _ in range(400):
            if svc.pipeline.counters.counts["acquired"] >= 14:
                break
            await asyncio.sleep(0.05)
        await svc.stop_acquisition()
    info = _messages(livemask_log, logging.INFO)
    assert info[:2] == ["acquisition 1 started: 12 event(s) planned, synchronized mode",
                        info[1]]
    assert info[1].startswith("acquisition 1 finished: 12 frame(s) in ")
    # what became of them (grains.md: the closing line counts the skipped frames)
    assert info[1].endswith(" s (12 analysed, 0 skipped analysis, 0 failed), 0 missing")
    assert info[2] == "acquisition 2 started: 10000 event(s) planned, synchronized mode"
    assert info[3].startswith("acquisition 2 stopped: ")
    assert info[3].endswith(" failed), 0 missing, 0 enqueued event(s) not run")
    assert len(info) == 4 and not _messages(livemask_log, logging.WARNING)


def test_the_exit_reason_is_logged_to_the_log_file(
    fresh_logging: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before, ``error: the run ended ...`` went to stderr only, not to LIVEMASK_LOG_FILE."""
    from livemask.cli import _fail_run
    from livemask.log import setup_logging

    monkeypatch.setenv("LIVEMASK_LOG_FILE", str(tmp_path / "run.log"))
    logger = setup_logging()
    try:
        with pytest.raises(typer.Exit) as exited:
            _fail_run("3 of 9 frame(s) failed")
    finally:
        for handler in logger.handlers:
            handler.close()
    assert exited.value.exit_code == 1
    assert "ERROR livemask: exit code 1: 3 of 9 frame(s) failed" in (
        tmp_path / "run.log").read_text()
    assert capsys.readouterr().err == "error: 3 of 9 frame(s) failed\n"


def test_the_exit_reason_is_printed_once_where_the_log_is_the_console(
    fresh_logging: None, capsys: pytest.CaptureFixture[str],
) -> None:
    from livemask.cli import _fail_run
    from livemask.log import setup_logging

    setup_logging()
    with pytest.raises(typer.Exit):
        _fail_run("3 of 9 frame(s) failed")
    assert capsys.readouterr().err == "error: 3 of 9 frame(s) failed\n"


# ------------------------------------------------------------------ (4) metrics clients


def _closed_while_trickling(port: int, request: bytes, every_s: float) -> bool:
    """Send ``request`` one byte every ``every_s`` seconds; True when the server closes the
    connection before the last byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for i in range(len(request)):
            try:
                sock.sendall(request[i : i + 1])
                readable, _, _ = select.select([sock], [], [], every_s)
                if readable and sock.recv(1) == b"":
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
    return False


def test_a_client_trickling_its_request_is_dropped_at_the_deadline() -> None:
    """Before, the timeout was per read: a byte every few seconds held a thread for ever (32
    such clients blocked every scrape)."""
    request = b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 40 + b"\r\n\r\n"
    with MetricsServer(lambda: STATUS, port=0, client_timeout_s=0.5) as server:
        assert _closed_while_trickling(server.port, request, every_s=0.1)  # ≈ 6 s to send
        assert "livemask_frames_acquired_total" in _scrape(str(server.url))


def _refused(port: int, times: int, request: bytes = b"") -> None:
    """Open ``times`` connections (sending ``request``) that the server, its one
    connection held already, closes unanswered."""
    for _ in range(times):
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as extra,
            contextlib.suppress(ConnectionResetError, BrokenPipeError),
        ):
            if request:
                extra.sendall(request)
            assert extra.recv(1) == b""  # refused: closed unanswered


def test_refused_connections_are_a_rate_limited_warning(
    livemask_log: list[logging.LogRecord],
) -> None:
    """Before, a DEBUG line per refused connection: scrapes failing for this were invisible
    at the default level."""
    with MetricsServer(lambda: STATUS, port=0, max_connections=1) as server:
        held = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            _refused(server.port, 3, b"GET /metrics HTTP/1.0\r\n\r\n")
        finally:
            held.close()
    warnings = [r for r in livemask_log if r.levelno == logging.WARNING
                and "refused" in r.getMessage()]
    assert len(warnings) == 2  # the first at once, the rest counted and said at close
    assert "refused 1 connection(s)" in warnings[0].getMessage()
    assert "1 are served at once at most" in warnings[0].getMessage()
    assert "refused 2 connection(s) in the last" in warnings[1].getMessage()


def test_refusals_after_a_warning_are_said_when_the_interval_has_passed(
    livemask_log: list[logging.LogRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, refusals after the first warning were said only if another came a minute
    later: a burst was reported as one."""
    import livemask.service.metrics as metrics

    monkeypatch.setattr(metrics, "REFUSED_WARNING_EVERY_S", 1.0)
    with MetricsServer(lambda: STATUS, port=0, max_connections=1) as server:
        held = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            _refused(server.port, 4)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and sum(
                    "refused" in r.getMessage() for r in livemask_log) < 2:
                time.sleep(0.05)
        finally:
            held.close()
        said = [r.getMessage() for r in livemask_log if "refused" in r.getMessage()]
    assert len(said) >= 2 and "refused 1 connection(s)" in said[0]
    assert "refused 3 connection(s) in the last" in said[1]


# ------------------------------------------------------------------ (5) log rotation
def test_the_log_file_is_reopened_after_it_was_moved(
    fresh_logging: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Before, a plain FileHandler kept writing to the moved file (``rot.log.1``), and the
    usual ``postrotate kill -HUP`` stops the service."""
    from livemask.log import setup_logging

    path = tmp_path / "rot.log"
    monkeypatch.setenv("LIVEMASK_LOG_FILE", str(path))
    logger = setup_logging()
    try:
        logger.info("before the rotation")
        path.rename(tmp_path / "rot.log.1")
        logger.info("after the rotation")
    finally:
        for handler in logger.handlers:
            handler.close()
    assert "after the rotation" in path.read_text()
    assert "after the rotation" not in (tmp_path / "rot.log.1").read_text()
    assert "before the rotation" in (tmp_path / "rot.log.1").read_text()


@pytest.mark.parametrize("other", [
    {"publish": {"pub_address": "tcp://127.0.0.1:48386"}},
    {"metrics": {"enabled": True, "port": 48386, "address": "0.0.0.0"}},
])
def test_a_dashboard_on_ipv6_any_does_not_clash_with_ipv4_listeners(
    other: dict[str, Any]
) -> None:
    """The dashboard binds ``::`` IPv6-only (``socket.create_server``), so an IPv4 listener
    on its port is no clash (it was refused); on ``::1`` or with metrics on ``::`` it is."""
    from livemask.config import check_own_ports

    check_own_ports(make_config(dashboard={"enabled": True, "port": 48386, "address": "::"},
                                **other))
    with pytest.raises(ConfigError, match="one TCP port"):
        check_own_ports(make_config(
            dashboard={"enabled": True, "port": 48385, "address": "::"},
            metrics={"enabled": True, "port": 48385, "address": "::"}))
