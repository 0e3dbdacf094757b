"""Session 20 fixes: a recording's config.yaml of a model.path run loads again, interval
bounds (replay, bench), errors naming what the command takes, one endpoint for both sockets,
SIGTERM/SIGHUP while the command line imports; review C: one endpoint written two ways, the
packaged simulated rig in configs and dumps, signal setup in the entry point only, nohup."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import useq
import yaml
from typer.testing import CliRunner

from livemask import cli
from livemask.acquisition.core import open_core
from livemask.acquisition.replay import ReplaySource, open_stack
from livemask.acquisition.simulated import SIMULATED_CFG
from livemask.bench import BenchSettings, service_config
from livemask.config import load_config
from livemask.errors import ConfigError, ModelError
from livemask.inference.models import MODELS_DIR, load_model_card
from tests.conftest import ROOT, free_tcp_address, make_config

runner = CliRunner()


def _flat(text: str) -> str:
    """Output with rich's box drawing and line breaks folded into single spaces."""
    return " ".join(text.replace("│", " ").split())


def _own_card(tmp_path: Path) -> Path:
    """A copy of the shipped nuclei card and model: a model card of one's own."""
    for name in ("nuclei.yaml", "nuclei.onnx"):
        shutil.copy(MODELS_DIR / name, tmp_path / name)
    return tmp_path / "nuclei.yaml"


# ------------------------------------------------------------------ (1) config round trip
def _round_trip(path: Path, out: Path) -> tuple[Any, Any]:
    """The config at ``path`` and the one loaded from its dump (as a recording writes it)."""
    cfg = load_config(path)
    out.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return cfg, load_config(out)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_each_shipped_config_loads_again_from_its_dump(tmp_path: Path, name: str) -> None:
    cfg, again = _round_trip(ROOT / "configs" / name, tmp_path / "dump.yaml")
    assert again.model_dump() == cfg.model_dump()


def test_a_model_path_config_loads_again_from_its_dump(tmp_path: Path) -> None:
    """Before, the dump held the default ``model.name`` beside ``model.path``, and loading
    it said both were set."""
    card = _own_card(tmp_path)
    own = tmp_path / "own.yaml"
    own.write_text(f"hardware: {{config_file: {SIMULATED_CFG}}}\n"
                   "model: {path: nuclei.yaml}\n")
    cfg, again = _round_trip(own, tmp_path / "dump.yaml")
    assert "name" not in cfg.model_dump()["model"]
    assert again.model.path == card and again.model_dump() == cfg.model_dump()
    assert load_config(ROOT / "configs" / "simulated-nuclei.yaml").model_dump()["model"][
        "name"] == "nuclei"  # a name config keeps its name


@pytest.mark.timeout(90)
def test_a_recording_of_a_model_path_run_is_reusable_as_its_config(tmp_path: Path) -> None:
    """docs/configuration.md: a run's config.yaml can be reused with --config. Before, that
    of a run with model.path failed to load (model.name and model.path both set)."""
    card = _own_card(tmp_path)
    cfg = make_config(model={"path": str(card)},
                      record={"enabled": True, "path": str(tmp_path / "recs")},
                      acquisition={"autostart": True,
                                   "sequence": {"time_plan": {"interval": 0.0, "loops": 2}}})
    problem = asyncio.run(cli._serve(cfg, view=False, exit_when_done=True))
    assert problem is None
    (run,) = (tmp_path / "recs").iterdir()
    again = load_config(run / "config.yaml")
    assert again.model.path == card and again.model_dump() == cfg.model_dump()


# ------------------------------------------------------------------ (2) interval bounds
class _WaitLog(threading.Event):
    """The replay's stop event, noting each timeout it is waited with."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        return super().wait(timeout)


def test_a_replay_waits_longer_than_a_thread_wait_takes(tmp_path: Path) -> None:
    """Before, an interval beyond threading.TIMEOUT_MAX (``replay --interval 1e10``) ended
    the replay with OverflowError before the second frame."""
    images = np.random.default_rng(1).integers(0, 4000, (2, 32, 32)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", images, imagej=True, metadata={"axes": "TYX"})
    source = ReplaySource(open_stack(tmp_path / "stack.tif"), interval_s=1e10)
    waits = _WaitLog()
    source._stop = waits
    got: list[Any] = []
    done: list[str | None] = []
    source.connect(got.append)
    source.start([useq.MDAEvent()] * 2, mode="free-run", on_done=done.append)
    deadline = time.monotonic() + 10
    while not (waits.timeouts or done) and time.monotonic() < deadline:
        time.sleep(0.01)
    source.close()  # the replay waits for the second frame: stop it there
    assert done == [None] and len(got) == 1
    assert waits.timeouts and all(t is not None and t <= threading.TIMEOUT_MAX
                                  for t in waits.timeouts)


def test_replay_interval_has_the_bound_of_serve(tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["replay", str(tmp_path / "none.tif"), "--interval", "1e14"])
    assert result.exit_code == 2
    out = _flat(result.output)
    assert "Invalid value for '--interval'" in out and "999,999,999 days" in out


@pytest.mark.parametrize(("given", "flag"), [
    ({"interval_s": 1e300}, "--interval"),
    ({"camera_fps": 1e-300}, "--camera-fps"),
])
def test_bench_refuses_an_interval_no_time_plan_holds_up_front(
    given: dict[str, float], flag: str
) -> None:
    """Before, ``bench --interval 1e300`` ran the model alone and the naive loop, then ended
    with useq's raw validation errors."""
    with pytest.raises(ConfigError, match=rf"^{flag} must be .*999,999,999 days"):
        BenchSettings(size=64, frames=2, **given)


# ------------------------------------------------------------------ (3) errors name flags
@pytest.mark.parametrize(("given", "said"), [
    ({"backend": "cuda"}, r"--backend: Input should be 'auto'"),
    ({"gc_threshold": 2**40}, r"--gc-threshold: Input should be less than or equal"),
])
def test_bench_errors_name_its_flags(given: dict[str, Any], said: str) -> None:
    """Before: ``model.backend: ...``, ``pipeline.gc_threshold: ...`` (keys of a config
    that bench does not take)."""
    with pytest.raises(ConfigError, match=said) as info:
        service_config(BenchSettings(size=64, frames=2, **given))
    assert "model." not in str(info.value) and "pipeline." not in str(info.value)


def test_bench_size_beyond_the_sensor_bound_names_size() -> None:
    """Before: ``simulation.sensor_shape_px.0: ...`` (twice), once the card was loaded."""
    with pytest.raises(ConfigError, match=r"--size 16 to 16384 .*got 16385"):
        BenchSettings(size=16385, frames=2)


def test_bench_command_names_backend() -> None:
    result = runner.invoke(cli.app, ["bench", "--backend", "cuda", "--size", "64",
                                     "--frames", "2"])
    assert result.exit_code == 2
    assert "--backend: Input should be" in result.output and "model." not in result.output


@pytest.mark.parametrize(("model", "said"), [
    ("Nuclei", r"unknown model 'Nuclei'.*own model card \.yaml: model\.path in a config, "
               r"--model on the command line"),
    ("mycard/nope.yaml", r"does not exist; check the path \(model\.path in a config, "
                         r"--model on the command line\)"),
])
def test_model_errors_name_the_flag_and_the_key(model: str, said: str) -> None:
    """Before: "(or set model.path ...)" and "check model.path", also for ``--model``."""
    with pytest.raises(ModelError, match=said):
        load_model_card(model)


def test_segment_model_error_names_model_flag(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "image.tif", np.zeros((32, 32), np.uint16))
    result = runner.invoke(cli.app, ["segment", str(tmp_path / "image.tif"), "-o",
                                     str(tmp_path / "labels.tif"), "--model", "Nuclei"])
    assert result.exit_code == 2
    assert "--model on the command line" in _flat(result.output)


# ------------------------------------------------------------------ (4) one endpoint
def test_one_endpoint_for_both_sockets_is_a_config_error(tmp_path: Path) -> None:
    """Before, it loaded and the second bind failed: "Address already in use ... Is another
    livemask serve running?"."""
    address = free_tcp_address()
    same = tmp_path / "same.yaml"
    same.write_text(f"publish: {{pub_address: '{address}', control_address: '{address}'}}\n")
    with pytest.raises(ConfigError, match=r"publish\.pub_address and publish\.control_address "
                                          r"are both .*its own endpoint"):
        load_config(same)
    ipc = tmp_path / "ipc.yaml"
    ipc.write_text("publish: {pub_address: 'ipc:///tmp/lm', control_address: 'ipc:///tmp/lm'}\n")
    with pytest.raises(ConfigError, match=r"are both 'ipc:///tmp/lm'"):
        load_config(ipc)
    free = tmp_path / "free.yaml"  # a port picked at bind: each socket gets its own
    free.write_text("publish: {pub_address: 'tcp://127.0.0.1:*', "
                    "control_address: 'tcp://127.0.0.1:*'}\n")
    assert load_config(free).publish.pub_address == "tcp://127.0.0.1:*"


def test_serve_pub_flag_on_the_control_endpoint_names_both(tmp_path: Path) -> None:
    a, b = free_tcp_address(), free_tcp_address()
    cfg = tmp_path / "c.yaml"  # (no such rig: the old code failed opening it)
    cfg.write_text(f"hardware: {{config_file: {tmp_path / 'none.cfg'}}}\n"
                   f"publish: {{pub_address: '{a}', control_address: '{b}'}}\n")
    result = runner.invoke(cli.app, ["serve", "-c", str(cfg), "--pub", b])
    assert result.exit_code == 2
    assert "--pub and publish.control_address are both" in _flat(result.output)
    swapped = load_config(cfg)  # flags given together are applied together
    cli._apply_service_flags(swapped, pub=b, control=a, mode=None, record=None)
    assert (swapped.publish.pub_address, swapped.publish.control_address) == (b, a)


# ------------------------------------------------------------------ (5) signals at start
def _console_script_entry() -> tuple[str, str]:
    """The module and function of the ``livemask`` console script in pyproject.toml."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        entry: str = tomllib.load(f)["project"]["scripts"]["livemask"]
    module, _, function = entry.partition(":")
    return module, function


#: How each launcher runs the command line: ``python -m livemask``, the console script.
_LAUNCH = {
    "python -m": "runpy.run_module('livemask', run_name='__main__', alter_sys=True)",
    "console script": "from {0} import {1}; sys.exit({1}())".format(*_console_script_entry()),
}


def _signalled_in_import(
    signum: int, module: str, launch: str = "python -m"
) -> subprocess.CompletedProcess[str]:
    """``livemask serve`` (``launch``: ``python -m`` or the console script's entry) that
    sends itself ``signum`` when ``module`` is first imported: a ``kill`` (or a closed
    terminal) at that point of its start-up."""
    argv = ["livemask", "serve", "--config", str(ROOT / "configs" / "simulated-nuclei.yaml"),
            "--pub", free_tcp_address(), "--control", free_tcp_address()]
    script = "\n".join([
        "import os, runpy, sys",
        "class Signal:",
        "    def find_spec(self, name, path=None, target=None):",
        f"        if name == {module!r}:",
        f"            os.kill(os.getpid(), {int(signum)})",
        "sys.meta_path.insert(0, Signal())",
        f"sys.argv = {argv!r}",
        _LAUNCH[launch],
    ])
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("module", [
    "livemask.config",  # imported by livemask.cli, before any command runs
    "livemask.service.limits",  # imported by serve, before it handles signals itself
])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("launch", list(_LAUNCH))
def test_sigterm_or_sighup_while_importing_exits_130_with_one_line(
    signum: int, module: str, launch: str
) -> None:
    """Before, they ended the process by the signal (143, 129) without a word, where
    Ctrl-C printed "livemask: interrupted" and exited 130."""
    run = _signalled_in_import(signum, module, launch)
    assert run.returncode == 130, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr
    assert "livemask: interrupted" in run.stderr.splitlines()


def test_an_ignored_sighup_stays_ignored_by_the_entry_point() -> None:
    """``nohup livemask``: the entry point leaves SIGHUP ignored (only default actions
    change; serve's own handling: test_nohup_serve_keeps_running_after_sighup)."""
    from livemask import _entry

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        _entry.stop_signals_interrupt()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


@contextlib.contextmanager
def _serving(
    log: Path, frames: int, preexec_fn: Callable[[], None] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], Any]]:
    """``python -m livemask serve`` of the simulated nuclei config for ``frames`` frames
    (output to ``log``) and a measurements subscriber of it; killed if still running at
    the end."""
    from livemask.client import Subscriber

    pub = free_tcp_address()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "livemask", "serve", "--config",
             str(ROOT / "configs" / "simulated-nuclei.yaml"), "--pub", pub,
             "--control", free_tcp_address(), "--frames", str(frames)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=preexec_fn)
    try:
        with Subscriber(pub, ("measurements",)) as sub:
            yield proc, sub
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(90)
def test_sigterm_once_serving_still_stops_in_order(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with _serving(log, 1000) as (proc, sub):
        assert _measurements(sub, proc, 1), log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    assert "livemask stopped" in log.read_text()


def test_the_dashboard_names_a_model_given_by_path_from_its_service_started() -> None:
    """A path config's dump has no model.name since it is reusable: the dashboard's event
    line named no model (before that, the default 'nuclei' for any card)."""
    from livemask.config import parse_config
    from livemask.dashboard.state import event_summary

    card = ROOT / "src" / "livemask" / "models" / "grains.yaml"
    cfg = parse_config({"model": {"path": str(card)}})
    header = {"kind": "service_started", "config": cfg.model_dump(mode="json")}
    assert event_summary(header)["text"] == "model grains"
    named = parse_config({"model": {"name": "nuclei"}}).model_dump(mode="json")
    assert event_summary({"kind": "service_started", "config": named})["text"] == "model nuclei"


# ------------------------------------------------------------------ (6) review C
# one endpoint written two ways
@pytest.mark.parametrize(("pub", "control"), [
    ("ipc://svc.sock", "ipc://./svc.sock"),
    ("ipc://svc.sock", "ipc://{cwd}/svc.sock"),
    ("tcp://localhost:{port}", "tcp://127.0.0.1:{port}"),
    ("tcp://*:{port}", "tcp://127.0.0.1:{port}"),
    ("tcp://0.0.0.0:{port}", "tcp://127.0.0.1:{port}"),
    ("tcp://127.0.0.1:0{port}", "tcp://127.0.0.1:{port}"),
    ("tcp://[::]:{port}", "tcp://127.0.0.1:{port}"),
])
def test_one_endpoint_written_two_ways_is_refused_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pub: str, control: str
) -> None:
    """Before, only the same text was refused: a second ipc bind took the path over (the
    service published into nothing) and tcp failed at bind, asking whether another
    livemask serve was running."""
    monkeypatch.chdir(tmp_path)
    port = free_tcp_address().rpartition(":")[2]
    pub, control = (a.format(cwd=tmp_path, port=port) for a in (pub, control))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"publish: {{pub_address: '{pub}', control_address: '{control}'}}\n")
    with pytest.raises(ConfigError, match=r"publish\.pub_address and publish\.control_address "
                                          r"are one endpoint \(.*its own endpoint"):
        load_config(cfg)
    result = runner.invoke(cli.app, ["serve", "--pub", pub, "--control", control])
    assert result.exit_code == 2
    assert "--pub and --control are" in _flat(result.output)


def _binds_both(pub: str, control: str) -> bool:
    """Whether a PUB and a ROUTER socket bind these endpoints side by side (real libzmq)."""
    import zmq

    from livemask.transport._sockets import bind_or_explain

    ctx = zmq.Context.instance()
    first, second = ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)
    try:
        bind_or_explain(first, pub, "PUB", "--pub")
        bind_or_explain(second, control, "control", "--control")
        return True
    except ConfigError as exc:
        assert "Address already in use" in str(exc)
        return False
    finally:
        first.close(linger=0)
        second.close(linger=0)


@pytest.mark.parametrize(("pub", "control"), [
    ("tcp://localhost:{port}", "tcp://127.0.0.1:{port}"),
    ("tcp://*:{port}", "tcp://127.0.0.1:{port}"),
    ("tcp://127.0.0.1:{port}", "tcp://0.0.0.0:{port}"),
    ("tcp://127.0.0.1:00{port}", "tcp://127.0.0.1:{port}"),
    ("tcp://127.0.0.1:{port}", "tcp://127.0.0.1:{other}"),
    ("tcp://127.0.0.1:{port}", "tcp://127.0.0.2:{port}"),
])
def test_same_endpoint_is_what_libzmq_cannot_bind_twice(pub: str, control: str) -> None:
    from livemask.config import same_endpoint

    port, other = (free_tcp_address().rpartition(":")[2] for _ in range(2))
    pub, control = (a.format(port=port, other=other) for a in (pub, control))
    assert same_endpoint(pub, control) is not _binds_both(pub, control)


@pytest.mark.parametrize(("pub", "control"), [
    ("tcp://127.0.0.1:5555", "tcp://[::1]:5555"),  # two address families: both bind
    ("tcp://*:5555", "tcp://[::1]:5555"),
    ("tcp://127.0.0.1:*", "tcp://localhost:*"),  # each its own port
    ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"),
    ("ipc://*", "ipc://*"),
    ("ipc://a.sock", "ipc://b.sock"),
])
def test_distinct_endpoints_still_load(pub: str, control: str) -> None:
    from livemask.config import parse_config

    publish = parse_config({"publish": {"pub_address": pub, "control_address": control}})
    assert publish.publish.control_address == control


# the simulated rig's .cfg in the package
def test_a_config_naming_the_old_simulated_cfg_says_where_it_is(tmp_path: Path) -> None:
    """Configs and recordings made before the rig moved into the package name
    ../hardware/simulated.cfg: before, "does not exist; check hardware.config_file" only."""
    (tmp_path / "configs").mkdir()
    old = tmp_path / "configs" / "old.yaml"
    old.write_text("hardware:\n  config_file: ../hardware/simulated.cfg\n")
    result = runner.invoke(cli.app, ["serve", "-c", str(old), "--pub", free_tcp_address(),
                                     "--control", free_tcp_address()])
    assert result.exit_code == 2
    said = _flat(result.output)
    assert "does not exist; check hardware.config_file" in said
    assert "part of the livemask package now: delete hardware.config_file" in said
    assert _flat(repr(str(SIMULATED_CFG))) in said
    with pytest.raises(ConfigError, match=r"does not exist; check hardware\.config_file$"):
        open_core(tmp_path / "rig.cfg")  # another missing .cfg: no such hint


def test_a_dump_leaves_out_the_packaged_rig_and_keeps_an_own_one(tmp_path: Path) -> None:
    """Before, a dump (a recording's config.yaml) pinned this install's site-packages path
    of the packaged rig: after a venv rebuild, or on another machine, it did not exist."""
    from livemask.config import parse_config

    dumped = parse_config({}).model_dump(mode="json")
    assert "config_file" not in dumped["hardware"]
    assert parse_config(dumped).hardware.config_file == SIMULATED_CFG
    own = tmp_path / "rig.cfg"
    shutil.copy(SIMULATED_CFG, own)
    kept = parse_config({"hardware": {"config_file": str(own)}}).model_dump(mode="json")
    assert kept["hardware"]["config_file"] == str(own)


# signal handling belongs to the entry point
def test_importing_the_cli_leaves_the_signal_handlers_alone() -> None:
    """Before, importing livemask.cli (tests, notebooks, CliRunner users) made SIGTERM and
    SIGHUP raise KeyboardInterrupt in that process."""
    script = ("import signal, livemask.cli\n"
              "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,"
              " signal.getsignal(signal.SIGHUP) is signal.SIG_DFL)")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert run.stdout.split() == ["True", "True"], run.stderr


_SPAWNING_SCRIPT = """\
import multiprocessing, sys, time
from livemask.cli import main  # as the console script's module did

def child(ready):
    ready.set()
    time.sleep(60)

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=child, args=(ready,), daemon=True)
    p.start()
    assert ready.wait(60)
    p.terminate()
    p.join(30)
    print("exitcode", p.exitcode)
"""


@pytest.mark.timeout(90)
def test_a_spawned_child_of_a_cli_importer_ends_by_sigterm(tmp_path: Path) -> None:
    """Before, the child re-imported livemask.cli and terminate() made it print a
    KeyboardInterrupt traceback and exit 1 (bench's SubscriberProcess), not -15."""
    script = tmp_path / "spawner.py"
    script.write_text(_SPAWNING_SCRIPT)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=80, cwd=ROOT)
    assert run.stdout.split() == ["exitcode", str(-signal.SIGTERM)], run.stderr
    assert "KeyboardInterrupt" not in run.stderr


# nohup: an ignored SIGHUP stays ignored
def _ignore_sighup() -> None:
    """preexec_fn: start the child as ``nohup`` does."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


@pytest.mark.timeout(120)
def test_nohup_serve_keeps_running_after_sighup(tmp_path: Path) -> None:
    """Before, serve installed its SIGHUP handler regardless: ``nohup livemask serve``
    stopped when its terminal closed."""
    log = tmp_path / "serve.log"
    with _serving(log, 100000, preexec_fn=_ignore_sighup) as (proc, sub):
        assert _measurements(sub, proc, 1), log.read_text()
        proc.send_signal(signal.SIGHUP)
        assert _measurements(sub, proc, 10), log.read_text()  # still serving
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    text = log.read_text()
    assert text.count("shutting down") == 1 and "livemask stopped" in text


def _measurements(sub: Any, proc: subprocess.Popen[bytes], count: int) -> bool:
    """Whether ``count`` measurements messages come while ``proc`` runs (60 s at most)."""
    deadline = time.monotonic() + 60
    while count and time.monotonic() < deadline and proc.poll() is None:
        count -= sub.recv(timeout_s=0.5) is not None
    return count == 0


def test_serve_and_dashboard_leave_an_ignored_stop_signal_ignored() -> None:
    before = {sig: signal.getsignal(sig) for sig in cli.STOP_SIGNALS}
    try:
        for sig in cli.STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        assert cli._stop_signals() == (signal.SIGINT,)  # (a shell's background job)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert cli._stop_signals() == (signal.SIGINT, signal.SIGHUP)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
