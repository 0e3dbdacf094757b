"""The command line: serve with clean SIGTERM shutdown, segment, models, config errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from livemask.acquisition.simulated import SIMULATED_CFG
from livemask.acquisition.simulated.nuclei import NucleiSample
from livemask.analysis.metrics import match_instances
from livemask.cli import _address, app
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


def test_segment_keeps_the_stack_axes_and_writes_only_tiff(tmp_path: Path) -> None:
    """Before, a (t, z, y, x) stack came back as (t*z, y, x) labels, and ``-o x.png`` wrote
    TIFF bytes into a .png file."""
    sample = NucleiSample(seed=11)
    stack = np.stack([sample.render((0.0, 0.0), (64, 64)).image for _ in range(6)])
    src = tmp_path / "tz.tif"
    tifffile.imwrite(src, stack.reshape(2, 3, 64, 64), photometric="minisblack",
                     metadata={"axes": "TZYX"})
    out = tmp_path / "labels.tiff"
    result = runner.invoke(app, ["segment", str(src), "-o", str(out)])
    assert result.exit_code == 0, result.output
    labels = tifffile.imread(out)
    assert labels.shape == (2, 3, 64, 64) and labels[1, 2].max() > 0
    png = tmp_path / "labels.png"
    result = runner.invoke(app, ["segment", str(src), "-o", str(png)])
    assert result.exit_code == 2
    assert "labels are written as an int32 TIFF; give an output file name ending in .tif" in (
        _flat(result.output))
    assert not png.exists()


def test_segment_rejects_missing_input(tmp_path: Path) -> None:
    result = runner.invoke(app, ["segment", str(tmp_path / "x.tif"), "-o", str(tmp_path / "y.tif")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_segment_names_a_corrupt_tiff(tmp_path: Path) -> None:
    src = tmp_path / "corrupt.tif"
    src.write_bytes(b"not a tiff at all")
    result = runner.invoke(app, ["segment", str(src), "-o", str(tmp_path / "y.tif")])
    assert result.exit_code == 2
    assert f"{src} cannot be read as an image: not a TIFF file" in _flat(result.output)


def test_evaluate_tracking_refuses_a_model_of_another_task() -> None:
    result = runner.invoke(app, ["evaluate-tracking", "--model", "grains", "--frames", "2"])
    assert result.exit_code == 2
    assert "model 'grains' segments grains, not nuclei" in _flat(result.output)


def _flat(output: str) -> str:
    """CLI output with rich's box drawing and line wrapping undone."""
    return " ".join(output.replace("│", " ").split())


@pytest.mark.parametrize(
    ("image", "found"),
    [
        (np.zeros((64, 64), dtype=bool), "has dtype bool; expected integer"),
        (np.zeros((64, 64), dtype=np.complex64), "has dtype complex64; expected integer"),
        (np.zeros((0, 0), dtype=np.uint16), "has shape (0, 0); expected 2-D images"),
        (np.zeros((1, 64), dtype=np.uint16), "has shape (1, 64); expected 2-D images"),
        (np.zeros((3, 0, 4), dtype=np.uint16), "has shape (3, 0, 4); expected 2-D images"),
    ],
    ids=["bool", "complex64", "0x0", "1x64", "stack-of-0x4"],
)
def test_segment_rejects_unsupported_images(tmp_path: Path, image: np.ndarray, found: str) -> None:
    src = tmp_path / "odd.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile warns about zero-size images
        tifffile.imwrite(src, image)
    result = runner.invoke(app, ["segment", str(src), "-o", str(tmp_path / "y.tif")])
    assert result.exit_code == 2, result.output
    assert f"error: {src} {found}" in _flat(result.output)
    assert not (tmp_path / "y.tif").exists()


def _nuclei_image(tmp_path: Path, name: str, *, nan_patch: bool) -> Path:
    image = NucleiSample(seed=11).render((0.0, 0.0), (256, 256)).image.astype(np.float32)
    if nan_patch:
        image[100:105, 100:105] = np.nan
    path = tmp_path / name
    tifffile.imwrite(path, image)
    return path


def test_segment_nan_patch_finds_the_same_objects(tmp_path: Path) -> None:
    counts = {}
    for nan_patch in (False, True):
        src = _nuclei_image(tmp_path, f"in-{nan_patch}.tif", nan_patch=nan_patch)
        out = tmp_path / f"labels-{nan_patch}.tif"
        result = runner.invoke(app, ["segment", str(src), "-o", str(out)])
        assert result.exit_code == 0, result.output
        counts[nan_patch] = len(np.unique(tifffile.imread(out))) - 1
    assert counts[False] > 20
    assert abs(counts[True] - counts[False]) <= 1, counts
    assert "25 NaN/infinite pixels, filled from their nearest finite" in result.output


def test_segment_reports_image_without_finite_pixels(tmp_path: Path) -> None:
    src = tmp_path / "nan.tif"
    tifffile.imwrite(src, np.full((64, 64), np.nan, dtype=np.float32))
    result = runner.invoke(app, ["segment", str(src), "-o", str(tmp_path / "y.tif")])
    assert result.exit_code == 2, result.output
    assert f"error: {src}: the image has no finite pixel" in _flat(result.output)


def test_segment_says_a_service_config_is_not_a_model_card(tmp_path: Path) -> None:
    src = _nuclei_image(tmp_path, "in.tif", nan_patch=False)
    cfg = ROOT / "configs" / "simulated-nuclei.yaml"
    result = runner.invoke(app, ["segment", str(src), "-o", str(tmp_path / "y.tif"),
                                 "--model", str(cfg)])
    assert result.exit_code == 2, result.output
    text = _flat(result.output)
    assert f"error: {cfg} is not a model card" in text
    assert "validation error" not in text and "pydantic" not in text


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--pixel-size-um", "nan"), ("--pixel-size-um", "inf"), ("--pixel-size-um", "0"),
     ("--pixel-size-um", "-1"), ("--threads", "-3"), ("--threads", "0")],
)
def test_segment_rejects_bad_numbers(tmp_path: Path, flag: str, value: str) -> None:
    src = _nuclei_image(tmp_path, "in.tif", nan_patch=False)
    result = runner.invoke(app, ["segment", str(src), "-o", str(tmp_path / "y.tif"), flag, value])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{flag}'" in result.output
    assert not (tmp_path / "y.tif").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--mode", "bogus"], "'bogus' is not one of 'free-run', 'pipelined', "
         "'synchronized'"),
        (["replay", "x.tif", "--mode", "bogus"], "'bogus' is not one of 'free-run'"),
        (["serve", "--interval", "inf"], "must be a finite number, got inf"),
        (["replay", "x.tif", "--interval", "inf"], "must be a finite number, got inf"),
        (["serve", "--pub", "garbage"], "'garbage' is not a valid address; expected "
         "tcp://HOST:PORT, e.g. tcp://127.0.0.1:5555"),
        (["serve", "--control", "tcp://127.0.0.1:notaport"], "is not a valid address"),
        (["replay", "x.tif", "--pub", "tcp://127.0.0.1:70000"], "is not a valid address"),
    ],
)
def test_service_flags_are_checked_and_named(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    flag = next(a for a in args if a.startswith("--"))
    text = _flat(result.output)
    assert f"Invalid value for '{flag}'" in text
    assert message in text
    assert "pydantic" not in text and "another `livemask serve`" not in text


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:*", "tcp://*:5555", "tcp://[::1]:0",
                                     "tcp://localhost:5555", "ipc:///tmp/livemask.ipc",
                                     "ipc:///tmp/a b", "epgm://eth0;239.192.1.1:5555"])
def test_valid_addresses_pass_the_flag_check(address: str) -> None:
    assert _address(address) == address


def test_models_lists_nuclei() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "nuclei" in result.output


async def test_a_second_interrupt_during_start_up_quits_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from livemask.cli import _Interrupts

    exits: list[int] = []
    interrupts = _Interrupts(exit_now=exits.append)
    with caplog.at_level("WARNING", logger="livemask"):
        interrupts()
    assert interrupts.stop.is_set() and exits == []
    assert "interrupt again to quit at once" in caplog.text
    interrupts()
    assert exits == [130]
    running = _Interrupts(exit_now=exits.append)
    running.starting = False  # once started, every interrupt is an orderly stop
    running.still_to_do = lambda: ": writing 40 queued frame(s) to /data/run-1"
    caplog.clear()
    with caplog.at_level("WARNING", logger="livemask"):
        running()
        assert caplog.text == ""
        running()  # says what the stop still waits for
    assert running.stop.is_set() and exits == [130]
    assert "already stopping: writing 40 queued frame(s) to /data/run-1; it goes on" \
        in caplog.text


@pytest.mark.parametrize("args", [
    ["bench", "--camera-fps", "inf"], ["bench", "--latency-warmup-s", "nan"],
    ["bench", "--interval", "inf"], ["train", "nuclei", "--iterations", "0"],
    ["train", "nuclei", "--minutes", "-1"], ["watch", "--pub", "bogus"],
    ["watch", "--duration", "0"], ["dashboard", "--connect", "bogus"],
])
def test_more_flags_are_checked_before_anything_runs(args: list[str]) -> None:
    # before: a traceback, a run with a silently wrong setting, or (watch --duration 0) a
    # watch that never ended
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    flag = next(a for a in args if a.startswith("--"))
    assert f"Invalid value for '{flag}'" in _flat(result.output)


@pytest.mark.parametrize("args", [
    ["evaluate", "--model", "nuclei", "-n", "0"], ["evaluate", "--model", "nuclei", "-n", "-1"],
    ["evaluate-tracking", "--frames", "3", "--seed", "-1"], ["evaluate-tracking", "--frames", "1"],
    ["evaluate-tracking", "--positions", "0"], ["evaluate-tracking", "--positions", "5"],
])
def test_evaluate_numbers_are_checked_and_named(args: list[str]) -> None:
    # before: "no images to evaluate", numpy's "expected non-negative integer" or the
    # simulator's "frames must be >= 2", none naming the option
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    flag = args[-2]
    assert f"Invalid value for '{flag}'" in _flat(result.output)


def test_output_paths_are_checked_before_the_run(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    for args in (["bench", "--json", str(tmp_path)],
                 ["evaluate", "--json", str(tmp_path / "a-file" / "e.json")],
                 ["train", "nuclei-rf", "--quick", "--out", str(tmp_path / "a-file")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "Invalid value for" in _flat(result.output)


def test_train_forest_without_the_train_extra_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # before: a ModuleNotFoundError traceback (skl2onnx is imported inside the function)
    monkeypatch.setitem(sys.modules, "skl2onnx", None)
    result = runner.invoke(app, ["train", "nuclei-rf", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert ("install the train extra: pip install 'livemask[train]' (in a checkout: pip "
            "install -e '.[train]')") in _flat(result.output)


@pytest.mark.parametrize("args", [
    ["--seed", "-1"],  # before: a numpy traceback
    ["--out", "a-file/sub"],  # before: a NotADirectoryError traceback
])
def test_train_flags_are_checked_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x")
    for task in ("nuclei", "nuclei-rf"):
        result = runner.invoke(app, ["train", task, "--quick", *args])
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '{args[0]}'" in _flat(result.output)


def test_train_quick_keeps_explicit_iterations_and_minutes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # before: --quick silently replaced them with 20 iterations and 40 minutes
    pytest.importorskip("torch")
    from livemask.training import cli as training_cli

    seen: dict[str, Any] = {}

    def fake_train(out: Path, settings: Any, **kwargs: Any) -> Path:
        seen.update(settings=settings, **kwargs)
        return out / "nuclei.yaml"

    monkeypatch.setattr(training_cli, "train_model", fake_train)
    args = ["train", "nuclei", "--quick", "--out", str(tmp_path)]
    for extra, iterations, minutes in (([], 20, 40.0), (["--iterations", "3"], 3, 40.0),
                                       (["--minutes", "0.5", "--iterations", "9"], 9, 0.5)):
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
        settings = seen["settings"]
        assert (settings.iterations, settings.max_minutes) == (iterations, minutes)
        assert settings.pool_size == 16 and seen["force"] is False


def test_train_forest_says_it_ignores_iterations_and_minutes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("skl2onnx")
    from livemask.training import random_forest

    monkeypatch.setattr(random_forest, "train_random_forest",
                        lambda out, **kwargs: Path(out) / "nuclei_rf.yaml")
    result = runner.invoke(app, ["train", "nuclei-rf", "--out", str(tmp_path),
                                 "--iterations", "5"])
    assert result.exit_code == 0, result.output
    assert "--iterations and --minutes do not apply" in _flat(result.output)


def test_train_refuses_the_shipped_models_folder_without_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # before: `--out src/livemask/models` trained over the shipped model
    pytest.importorskip("torch")
    import shutil

    from livemask.inference import models

    fake = tmp_path / "shipped"  # a stand-in: never the real folder, even on old code
    shutil.copytree(models.MODELS_DIR, fake, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(models, "MODELS_DIR", fake)
    before = (fake / "nuclei.onnx").read_bytes()
    result = runner.invoke(app, ["train", "nuclei", "--quick", "--out", str(fake)])
    assert result.exit_code == 2, result.output
    assert "shipped models folder" in _flat(result.output)
    assert "--force" in _flat(result.output)
    assert (fake / "nuclei.onnx").read_bytes() == before


def test_train_with_an_unknown_task_makes_no_output_folder(tmp_path: Path) -> None:
    # before: --out was made while the arguments were read, so `train nucleii --out X` left X
    result = runner.invoke(app, ["train", "nucleii", "--out", str(tmp_path / "runs" / "x")])
    assert result.exit_code == 2, result.output
    assert "unknown task 'nucleii'" in _flat(result.output)
    assert not (tmp_path / "runs").exists()


def test_train_restores_the_sigterm_handler(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    runner.invoke(app, ["train", "nucleii", "--out", str(tmp_path)])
    assert signal.getsignal(signal.SIGTERM) is before


def _spy_services(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The services `_serve` creates, in order."""
    from livemask.service import app as service_app

    made: list[Any] = []

    class Spy(service_app.Service):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(service_app, "Service", Spy)
    return made


def _slow_model(monkeypatch: pytest.MonkeyPatch, infer: Any) -> None:
    """Every service built from now on infers with ``infer(real_infer, image)``."""
    from livemask.service import app as service_app

    real_build = service_app.build_segmenter

    def build(*args: Any, **kwargs: Any) -> Any:
        seg = real_build(*args, **kwargs)
        real_infer = seg.infer
        seg.infer = lambda image: infer(real_infer, image)  # type: ignore[method-assign]
        return seg

    monkeypatch.setattr(service_app, "build_segmenter", build)


def _free_run_config(loops: int) -> Any:
    from tests.conftest import make_config

    return make_config(simulation={"truth": False}, pipeline={"queue_size": 10},
                       acquisition={"mode": "free-run", "autostart": True,
                                    "sequence": {"time_plan": {"interval": 0.0, "loops": loops}}})


@pytest.mark.timeout(120)
def test_exit_when_done_waits_for_a_model_slower_than_any_drain_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, --exit-when-done gave the frames in flight 5 s (then the close 3 s more) and
    exited 0 with frames never analysed (6 acquired, 2 analysed). Here every drain
    deadline passes at once: the run must still wait for its frames, which keep coming."""
    import asyncio

    from livemask.cli import _serve
    from livemask.service.pipeline import Pipeline

    async def deadline_passed(self: Pipeline, timeout_s: float = 5.0) -> bool:
        return self.in_flight == 0

    monkeypatch.setattr(Pipeline, "drain", deadline_passed)
    _slow_model(monkeypatch, lambda infer, image: (time.sleep(0.2), infer(image))[1])
    made = _spy_services(monkeypatch)
    problem = asyncio.run(_serve(_free_run_config(6), view=False, exit_when_done=True))
    counts = made[0].pipeline.counters.snapshot()
    assert problem is None
    assert counts["frames_acquired"] == counts["frames_published"] == 6
    assert counts["frames_analysed"] + counts["frames_skipped"] == 6


@pytest.mark.timeout(120)
def test_exit_when_done_reports_frames_that_were_never_analysed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, a run stopped with frames in flight (here a Ctrl-C while the model is busy
    with the first frame) exited 0 as if every frame had been analysed."""
    import asyncio
    import threading

    from livemask.cli import _serve
    from livemask.service.pipeline import Pipeline

    release, interrupted = threading.Event(), threading.Event()

    def stuck(infer: Any, image: Any) -> Any:
        if not interrupted.is_set():
            interrupted.set()
            signal.raise_signal(signal.SIGINT)  # the user gives up waiting
        release.wait(60)
        return infer(image)

    async def deadline_passed(self: Pipeline, timeout_s: float = 5.0) -> bool:
        return self.in_flight == 0

    real_close = Pipeline.close

    async def close(self: Pipeline) -> None:
        release.set()  # let the model thread end, so the executor can shut down
        await real_close(self)

    monkeypatch.setattr(Pipeline, "drain", deadline_passed)
    monkeypatch.setattr(Pipeline, "close", close)
    _slow_model(monkeypatch, stuck)
    made = _spy_services(monkeypatch)
    problem = asyncio.run(_serve(_free_run_config(3), view=False, exit_when_done=True))
    counts = made[0].pipeline.counters.snapshot()
    never = counts["frames_acquired"] - counts["frames_published"]
    assert never >= 1 and counts["frames_analysed"] == 0
    assert problem == (f"{never} of {counts['frames_acquired']} frame(s) were never analysed "
                       "nor published: the service stopped before their turn")


@pytest.mark.timeout(120)
def test_an_interrupt_during_start_up_does_not_start_the_acquisition(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the service finished starting and then autostarted the acquisition (light,
    stage moves, snaps) although the user had pressed Ctrl-C, only to stop it again."""
    problem, made = _serve_with_signal_in_start_up(monkeypatch, caplog, signal.SIGINT)
    assert problem is None
    assert made[0].pipeline.acquisition == 0 and made[0].acquisitions_finished == 0
    assert "a stop was requested during start-up" in caplog.text


def _serve_with_signal_in_start_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, sig: signal.Signals
) -> tuple[str | None, list[Any]]:
    """Run ``_serve`` (free-run, 50 frames) with ``sig`` raised early in the service's
    start-up, before the model loads, once its handler is in place; its result and the
    services made."""
    import asyncio

    from livemask.cli import _serve
    from livemask.service import app as service_app

    made = _spy_services(monkeypatch)

    async def signalled(self: Any) -> None:
        handler = signal.getsignal(sig)
        assert handler not in (signal.SIG_DFL, signal.SIG_IGN, None), f"{sig.name} would kill it"
        signal.raise_signal(sig)
        for _ in range(500):  # until the loop has run the signal handler
            if self._stop is not None and self._stop.is_set():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{sig.name} never reached the service")

    monkeypatch.setattr(service_app.Service, "_start_dashboard", signalled)
    with caplog.at_level("INFO", logger="livemask"):
        problem = asyncio.run(_serve(_free_run_config(50), view=False, exit_when_done=False))
    return problem, made


def test_serve_frames_turns_an_interval_and_duration_plan_into_loops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config with interval + duration and --frames gave "time_plan.loops: unknown field"
    (interval, duration and loops cannot go together; bug hunt)."""
    from livemask import cli

    seen: list[Any] = []

    async def fake_serve(cfg: Any, **kwargs: Any) -> None:
        seen.append(cfg.acquisition.mda_sequence())

    monkeypatch.setattr(cli, "_serve", fake_serve)
    config = tmp_path / "c.yaml"
    config.write_text(f"hardware: {{config_file: {SIMULATED_CFG}}}\n"
                      "acquisition:\n  sequence:\n    time_plan: {interval: 0.5, duration: 60}\n")
    result = runner.invoke(app, ["serve", "--config", str(config), "--frames", "7"])
    assert result.exit_code == 0, result.output
    plan = seen[0].time_plan
    assert plan.loops == 7 and plan.interval.total_seconds() == 0.5


def test_serve_frames_keeps_the_interval_of_a_duration_and_loops_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """{duration: 60, loops: 7} (10 s apart) with --frames 3 made 3 time points 30 s apart:
    a quick test run stretched to the whole duration (biologist hunt)."""
    seen = _seen_configs(monkeypatch)
    config = _config_with_sequence(tmp_path, "{time_plan: {duration: 60, loops: 7}}")
    for flags in (["--frames", "3"], ["--frames", "3", "--interval", "2"]):
        result = runner.invoke(app, ["serve", "--config", str(config), *flags])
        assert result.exit_code == 0, result.output
    plans = [cfg.acquisition.mda_sequence().time_plan for cfg in seen]
    assert plans[0].loops == 3 and plans[0].interval.total_seconds() == 10.0
    assert plans[1].loops == 3 and plans[1].interval.total_seconds() == 2.0


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-5", "70000"])
def test_bench_refuses_a_bad_exposure_before_rendering(value: str) -> None:
    result = runner.invoke(app, ["bench", "--exposure-ms", value, "--frames", "4"])
    assert result.exit_code == 2
    assert "Invalid value for '--exposure-ms'" in _flat(result.output)


def _seen_configs(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The configs ``serve`` would run, in order (the service itself is not started)."""
    from livemask import cli

    seen: list[Any] = []

    async def fake_serve(cfg: Any, **kwargs: Any) -> None:
        seen.append(cfg)

    monkeypatch.setattr(cli, "_serve", fake_serve)
    return seen


def _config_with_sequence(tmp_path: Path, sequence: str) -> Path:
    config = tmp_path / "c.yaml"
    config.write_text(f"hardware: {{config_file: {SIMULATED_CFG}}}\n"
                      f"acquisition:\n  sequence: {sequence}\n")
    return config


_GRID = "{grid_plan: {rows: 2, columns: 2}, channels: [{config: DAPI, exposure: 10}]}"
_PHASES = "{time_plan: {phases: [{interval: 0.1, loops: 2}, {interval: 0.2, loops: 2}]}}"


@pytest.mark.parametrize(("sequence", "args", "flag", "message"), [
    (None, ["--frames", "99999999999999999999"], "--frames", "9223372036854775807"),
    (None, ["--frames", "2", "--interval", "1e300"], "--interval", "must be at most"),
    (_PHASES, ["--frames", "3"], "--frames", "multi-phase time plan"),
    (_PHASES, ["--interval", "3"], "--interval", "multi-phase time plan"),
    (_GRID, ["--interval", "1"], "--interval", "give --frames N too"),
], ids=["frames-beyond-64-bits", "interval-1e300", "frames-multi-phase",
        "interval-multi-phase", "interval-without-time-plan"])
def test_serve_time_lapse_flags_are_checked_like_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sequence: str | None, args: list[str],
    flag: str, message: str,
) -> None:
    """Before: a frame count beyond 64 bits opened the hardware, then failed to encode its
    start event; a huge interval printed pydantic's dump with a URL; --frames on a
    multi-phase plan blamed a ``loops`` key the user never wrote; and --interval alone on a
    2x2 grid without a time plan added 170 time points (680 frames)."""
    seen = _seen_configs(monkeypatch)
    config = ["--config", str(_config_with_sequence(tmp_path, sequence))] if sequence else []
    result = runner.invoke(app, ["serve", *config, *args])
    text = _flat(result.output)
    assert result.exit_code == 2, text
    assert seen == []
    assert f"Invalid value for '{flag}'" in text and message in text
    assert "pydantic" not in text and "loops: unknown field" not in text


def test_serve_frames_adds_a_time_lapse_to_a_sequence_without_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _seen_configs(monkeypatch)
    config = str(_config_with_sequence(tmp_path, _GRID))
    result = runner.invoke(app, ["serve", "-c", config, "--frames", "3", "--interval", "2"])
    assert result.exit_code == 0, result.output
    plan = seen[0].acquisition.mda_sequence().time_plan
    assert plan.loops == 3 and plan.interval.total_seconds() == 2
    result = runner.invoke(app, ["serve", "--interval", "0.5"])  # the default has a plan
    assert result.exit_code == 0, result.output
    plan = seen[1].acquisition.mda_sequence().time_plan
    assert plan.loops == 170 and plan.interval.total_seconds() == 0.5


@pytest.mark.parametrize(("variable", "value"), [
    ("LIVEMASK_LOG_LEVEL", "verbose"), ("LIVEMASK_MM_LOG_LEVEL", "loud"),
])
@pytest.mark.parametrize("command", [["serve"], ["segment", "in.tif", "-o", "out.tif"],
                                     ["dashboard", "--listen", "127.0.0.1:0"]])
def test_a_bad_log_variable_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, command: list[str]
) -> None:
    """Before, a traceback and exit code 1 in every command."""
    monkeypatch.setenv(variable, value)
    result = runner.invoke(app, command)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"error: {variable}='{value}' is not a log level" in result.output


def test_record_dir_is_kept_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, ``--record rec1`` stayed relative in the run's config.yaml, and a replay with
    that config.yaml (relative record paths resolve beside the YAML) recorded into
    rec1/run-X/rec1/run-Y."""
    import yaml

    from livemask.config import load_config

    seen = _seen_configs(monkeypatch)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["serve", "--record", "rec1"])
    assert result.exit_code == 0, result.output
    assert seen[0].record.path == tmp_path / "rec1"
    run = tmp_path / "rec1" / "run-1"  # the recorder writes the config as YAML there
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(seen[0].model_dump(mode="json")))
    assert load_config(run / "config.yaml").record.path == tmp_path / "rec1"


def test_models_columns_are_aligned() -> None:
    from livemask.inference.models import list_models

    cards = list_models()
    width = max(len(card.name) for card in cards)
    assert width > 12  # grains_classical
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert len(lines) == len(cards)
    for card, line in zip(cards, lines, strict=True):
        assert line[:width].rstrip() == card.name and line[width:].startswith(f" {card.task} ")


@pytest.mark.timeout(60)
def test_sighup_stops_the_service_in_order(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, closing the terminal or SSH session (SIGHUP) killed the service on the spot:
    no orderly stop, recordings not closed, devices not unloaded."""
    problem, made = _serve_with_signal_in_start_up(monkeypatch, caplog, signal.SIGHUP)
    assert problem is None and made[0].pipeline.acquisition == 0
    assert "livemask stopped" in caplog.text


def _interrupted_run(module: str) -> subprocess.CompletedProcess[str]:
    """``livemask serve`` (the real entry point, in a subprocess) with a SIGINT sent to
    itself when ``module`` is first imported: a Ctrl-C at that point of its start-up."""
    pub, ctl = free_tcp_address(), free_tcp_address()
    argv = ["livemask", "serve", "--config", str(ROOT / "configs" / "simulated-nuclei.yaml"),
            "--pub", pub, "--control", ctl]
    script = "\n".join([
        "import os, signal, sys",
        "class Interrupt:",
        "    def find_spec(self, name, path=None, target=None):",
        f"        if name == {module!r}:",
        "            os.kill(os.getpid(), signal.SIGINT)",
        "sys.meta_path.insert(0, Interrupt())",
        f"sys.argv = {argv!r}",
        "from livemask.cli import main",
        "main()",
    ])
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("module", [
    "livemask.config",  # imported with the command line, before any command runs
    "livemask.service.app",  # imported by serve, before its signal handlers are in place
])
def test_ctrl_c_in_early_start_up_exits_130_with_one_line(module: str) -> None:
    """Before, a Ctrl-C while Python imported printed an importlib KeyboardInterrupt
    traceback and the process died by the signal (-2); a bit later it exited 130 silently."""
    run = _interrupted_run(module)
    assert run.returncode == 130, run.stderr
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr
    assert "livemask: interrupted" in run.stderr.splitlines()


@pytest.mark.timeout(120)
def test_view_subscribes_before_the_acquisition_and_shows_its_end(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Before, ``--view`` started its view only after the service had started the
    acquisition, and the view imports for a second or more: the first frames were gone (a
    20-frame replay showed "analysed 6"); at the end it was killed (SIGTERM) before it
    showed the last ones: a piped 50-frame run left an empty log."""
    import asyncio

    from livemask import cli
    from livemask.service import app as service_app
    from livemask.viewer import FINISHED_HINT, STOPPED_LINE
    from tests.conftest import make_config

    viewers: list[Any] = []

    class Spy(cli._Viewer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            viewers.append(self)

    ready_at_start: list[bool] = []
    real_start = service_app.Service.start_acquisition

    def start(self: Any, sequence: Any) -> int:
        ready_at_start.append(bool(viewers) and viewers[0].ready)
        return real_start(self, sequence)

    monkeypatch.setattr(cli, "_Viewer", Spy)
    monkeypatch.setattr(service_app.Service, "start_acquisition", start)
    cfg = make_config(simulation={"truth": False}, publish={"pub_address": free_tcp_address()},
                      acquisition={"autostart": True,
                                   "sequence": {"time_plan": {"interval": 0.0, "loops": 12}}})
    problem = asyncio.run(cli._serve(cfg, view=True, exit_when_done=True))
    assert problem is None and ready_at_start == [True]
    assert viewers[0].process.returncode == 0
    lines = capfd.readouterr().out.splitlines()  # the view's (a pipe here): its last lines
    assert lines[-1] == STOPPED_LINE, lines
    # the last frame's line comes just before, or before the "acquisition finished" hint
    # when a refresh printed the final state before the service stopped (CI timing)
    last = [line for line in lines[:-1] if line != FINISHED_HINT][-1]
    assert last.startswith("frame 11: ") and "acquired 12 / analysed 12" in last, lines


@pytest.mark.parametrize(("bind", "connect"), [
    ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555"),
    ("tcp://*:5555", "tcp://127.0.0.1:5555"),
    ("tcp://0.0.0.0:5555", "tcp://127.0.0.1:5555"),
    ("tcp://[::]:5555", "tcp://[::1]:5555"),
    ("ipc:///tmp/livemask.pub", "ipc:///tmp/livemask.pub"),
    ("tcp://127.0.0.1:*", None),  # the bind picks the port: the view starts after it
    ("tcp://eth0:5555", None),  # an interface name: its address is known once bound
])
def test_view_connect_address_before_the_bind(bind: str, connect: str | None) -> None:
    from livemask.cli import _connect_address

    assert _connect_address(bind) == connect


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie not yet reaped counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


#: How each test below ends ``serve --view`` early: code run in the serve process before
#: its command line (a SIGTERM in its start-up), or None (the test SIGKILLs it).
_EARLY_ENDS = {
    "sigterm_in_imports": "\n".join([  # before its handlers are in place
        "class Interrupt:",
        "    def find_spec(self, name, path=None, target=None):",
        "        if name == 'livemask.service.app':",
        "            os.kill(os.getpid(), signal.SIGTERM)",
        "sys.meta_path.insert(0, Interrupt())",
    ]),
    "second_sigterm_in_start_up": "\n".join([  # quits at once, no finally
        "import asyncio",
        "from livemask.service import app",
        "async def twice(self):",
        "    for _ in range(2):",
        "        os.kill(os.getpid(), signal.SIGTERM)",
        "        await asyncio.sleep(0.5)",
        "    await asyncio.sleep(60)",
        "app.Service._start_dashboard = twice",
    ]),
    "sigkill": None,
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("end", list(_EARLY_ENDS))
def test_serve_view_does_not_outlive_serve(tmp_path: Path, end: str) -> None:
    """Before, a ``serve --view`` that died early (a SIGTERM while it imported: killed by
    the signal, 143; a second signal in start-up: ``os._exit``; SIGKILL) left its view
    (``livemask watch``) running, reparented to PID 1, drawing forever."""
    pub, ctl = free_tcp_address(), free_tcp_address()
    argv = ["livemask", "serve", "--view", "--config",
            str(ROOT / "configs" / "simulated-nuclei.yaml"), "--pub", pub, "--control", ctl]
    script = "\n".join([
        "import os, signal, sys",
        "from livemask import cli",
        "start = cli._Viewer.start",
        "def started(self, *args, **kwargs):",
        "    start(self, *args, **kwargs)",
        "    print('view pid', self.process.pid, file=sys.stderr, flush=True)",
        "cli._Viewer.start = started",
        _EARLY_ENDS[end] or "",
        f"sys.argv = {argv!r}",
        "cli.main()",
    ])
    out, err = (tmp_path / "out.log").open("w"), tmp_path / "err.log"
    with err.open("w") as err_file:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=err_file,
                                cwd=ROOT)
    view = None
    try:
        if _EARLY_ENDS[end] is None:  # once the view has subscribed and frames come
            with Subscriber(pub, ("measurements",)) as sub:
                msg, deadline = None, time.monotonic() + 60
                while msg is None and time.monotonic() < deadline and proc.poll() is None:
                    msg = sub.recv(timeout_s=0.5)
            assert msg is not None, err.read_text()
            proc.kill()
        code = proc.wait(timeout=60)
        said = err.read_text()
        view = int(said.split("view pid ")[1].split()[0])
        deadline = time.monotonic() + 20
        while not _gone(view) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(view), f"the view outlived serve (exit code {code})"
        if _EARLY_ENDS[end] is not None:
            assert code == 130, said
            assert "Traceback" not in said
        if end == "sigterm_in_imports":
            assert "livemask: interrupted" in said.splitlines()
    finally:
        out.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if view is not None and not _gone(view):
            os.kill(view, signal.SIGKILL)


def test_quitting_at_once_in_start_up_stops_the_view_first() -> None:
    """Before, a second signal in start-up quit with ``os._exit`` (no ``finally``) and left
    the view running; the view is stopped before the exit now."""
    from livemask.cli import _Interrupts, _Viewer

    viewer = _Viewer(truth=False)
    running_at_exit: list[bool] = []
    interrupts = _Interrupts(exit_now=lambda code: running_at_exit.append(
        viewer.process is not None and viewer.process.poll() is None))
    try:
        viewer.start(free_tcp_address())
        interrupts.before_quit = viewer.quit
        interrupts()
        interrupts()  # quits at once
        assert running_at_exit == [False]
    finally:
        if viewer.process is not None and viewer.process.poll() is None:
            viewer.process.kill()
            viewer.process.wait()
