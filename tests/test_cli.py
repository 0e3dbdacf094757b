"""The command line: serve with clean SIGTERM shutdown, segment, models, config errors."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from livemask.acquisition.simulated.nuclei import NucleiSample
from livemask.analysis.metrics import match_instances
from livemask.cli import app
from livemask.client import Subscriber
from tests.conftest import ROOT, free_tcp_address

runner = CliRunner()


def _port_free(address: str) -> bool:
    host, port = address.removeprefix("tcp://").split(":")
    with socket.socket() as s:
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
    return True


@pytest.mark.timeout(90)
def test_serve_publishes_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    pub, ctl = free_tcp_address(), free_tcp_address()
    cmd = [
        sys.executable, "-m", "livemask", "serve",
        "--config", str(ROOT / "configs" / "simulated-nuclei.yaml"),
        "--pub", pub, "--control", ctl, "--frames", "1000", "--interval", "0.1",
    ]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        with Subscriber(pub, ("measurements",)) as sub:
            msg = None
            deadline = time.monotonic() + 60
            while msg is None and time.monotonic() < deadline and proc.poll() is None:
                msg = sub.recv(timeout_s=0.5)
            assert msg is not None, (tmp_path / "serve.log").read_text()
            assert msg.header["summary"]["count"] > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "livemask stopped" in text
    assert _port_free(pub) and _port_free(ctl)


def test_serve_reports_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("acquisition:\n  mode: turbo\n")
    result = runner.invoke(app, ["serve", "--config", str(bad)])
    assert result.exit_code == 2
    assert "acquisition.mode" in result.output


@pytest.mark.parametrize(("flag", "value"), [("--frames", "0"), ("--interval", "-1")])
def test_serve_rejects_out_of_range_overrides(flag: str, value: str) -> None:
    result = runner.invoke(app, ["serve", flag, value])
    assert result.exit_code == 2
    assert f"Invalid value for '{flag}'" in result.output


def test_serve_reports_missing_config(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_segment_writes_labels_and_table(tmp_path: Path) -> None:
    sample = NucleiSample(seed=11)
    frames = [sample.render((0.0, 0.0), (256, 256)) for _ in range(2)]
    stack = np.stack([f.image for f in frames])
    src, out, table = tmp_path / "in.tif", tmp_path / "labels.tif", tmp_path / "m.csv"
    tifffile.imwrite(src, stack)
    result = runner.invoke(app, ["segment", str(src), "-o", str(out), "--table", str(table)])
    assert result.exit_code == 0, result.output
    labels = tifffile.imread(out)
    assert labels.shape == stack.shape and labels.dtype == np.int32
    score = match_instances(frames[0].labels, labels[0])
    assert score.f1 > 0.6, score
    rows = table.read_text().splitlines()
    assert rows[0].startswith("plane,label,area_px")
    assert len(rows) - 1 == sum(len(np.unique(p)) - 1 for p in labels)


def test_segment_rejects_missing_input(tmp_path: Path) -> None:
    result = runner.invoke(app, ["segment", str(tmp_path / "x.tif"), "-o", str(tmp_path / "y.tif")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_models_lists_nuclei() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "nuclei" in result.output
