"""livemask outside its checkout: the simulated rig's .cfg is package data, found from any
folder (before, the wheel had none and the default ``hardware/simulated.cfg`` was looked up
beside the YAML or in the working directory only)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import livemask
from livemask import cli
from livemask.acquisition.simulated import SIMULATED_CFG
from livemask.bench import BenchSettings
from livemask.config import load_config, parse_config
from livemask.errors import BackendUnavailable, ConfigError, ModelError
from livemask.inference import tensorrt_backend, torch_backend
from livemask.inference.models import MODELS_DIR, load_model_card
from livemask.inference.select import INSTALL_HINTS
from livemask.training import random_forest
from tests.conftest import ROOT, free_tcp_address

PACKAGE = Path(livemask.__file__).resolve().parent


def _package_data_globs() -> list[str]:
    """The package-data globs of ``livemask`` in pyproject.toml (what the wheel ships)."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        data = tomllib.load(f)
    globs: list[str] = data["tool"]["setuptools"]["package-data"]["livemask"]
    return globs


def test_the_simulated_rig_is_package_data() -> None:
    packaged = resources.files("livemask.acquisition.simulated").joinpath("simulated.cfg")
    assert packaged.is_file() and Path(str(packaged)).resolve() == SIMULATED_CFG
    shipped = {p for pattern in _package_data_globs() for p in PACKAGE.glob(pattern)}
    assert SIMULATED_CFG in shipped


@pytest.mark.parametrize("pattern", _package_data_globs())
def test_each_package_data_glob_names_a_file(pattern: str) -> None:
    """Before, ``configs/*.yaml`` matched nothing: the configs are not in the package."""
    assert any(p.is_file() for p in PACKAGE.glob(pattern)), pattern


def test_the_default_rig_is_the_packaged_one_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = parse_config({}).hardware.config_file
    assert path == SIMULATED_CFG and path.is_absolute() and path.is_file()
    assert PACKAGE in path.parents
    assert BenchSettings().config_file() == SIMULATED_CFG


def _serve(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``livemask serve`` of two frames, started in ``cwd`` on free loopback ports."""
    cmd = [sys.executable, "-m", "livemask", "serve", "--pub", free_tcp_address(),
           "--control", free_tcp_address(), "--frames", "2", "--exit-when-done", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=90)


@pytest.mark.timeout(120)
def test_serve_without_a_config_runs_and_its_recording_reruns_elsewhere(
    tmp_path: Path
) -> None:
    """``serve`` with no config in a folder without ``hardware/``; the run's recorded
    ``config.yaml`` runs again from another folder. It leaves out the packaged rig (before, it
    named this install's path, gone after a venv rebuild or on another machine): the rig of
    the install that runs it is used."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    run = _serve(first, "--record", "rec")
    assert run.returncode == 0, run.stderr
    (recorded,) = (first / "rec").glob("run-*/config.yaml")
    hardware = yaml.safe_load(recorded.read_text(encoding="utf-8"))["hardware"]
    assert "config_file" not in hardware
    again = _serve(second, "--config", str(recorded))
    assert again.returncode == 0, again.stderr
    assert "livemask stopped" in again.stderr
    assert load_config(recorded).hardware.config_file == SIMULATED_CFG


# ------------------------------------------------------------------ install hints and paths
def _message(call: Callable[[], object]) -> str:
    """The message of the exception ``call`` raises."""
    with pytest.raises((ImportError, BackendUnavailable)) as info:
        call()
    return str(info.value)


def _missing(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import`` of each of ``modules`` fail, as where the extra is not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize(("extra", "missing", "call"), [
    ("train", ("sklearn", "skl2onnx"), random_forest.require_train_extra),
    ("torch", ("torch",), torch_backend.import_torch),
    ("torch", ("onnx",), lambda: torch_backend.unet_from_onnx(MODELS_DIR / "nuclei.onnx")),
    ("gpu", ("onnx",), lambda: tensorrt_backend.onnx_to_fp16(b"")),
    ("gpu", ("tensorrt",), tensorrt_backend.import_tensorrt),
], ids=["train", "torch", "torch-onnx", "gpu-onnx", "gpu-tensorrt"])
def test_a_missing_extra_says_how_to_install_it_outside_a_checkout_too(
    monkeypatch: pytest.MonkeyPatch, extra: str, missing: tuple[str, ...],
    call: Callable[[], object]
) -> None:
    """Before, only ``pip install -e '.[extra]'``, which works in a checkout alone."""
    _missing(monkeypatch, *missing)
    text = _message(call)
    assert f"pip install 'livemask[{extra}]'" in text
    assert f"(in a checkout: pip install -e '.[{extra}]')" in " ".join(text.split())


@pytest.mark.parametrize("backend", ["tensorrt", "torch"])
def test_a_backend_named_but_not_installed_says_how_to_install_it(backend: str) -> None:
    hint = INSTALL_HINTS[backend]
    extra = "gpu" if backend == "tensorrt" else "torch"
    assert f"pip install 'livemask[{extra}]'" in hint and f"-e '.[{extra}]'" in hint


def test_train_without_the_extra_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _missing(monkeypatch, "livemask.training.cli")
    result = CliRunner().invoke(cli.app, ["train", "nuclei", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "pip install 'livemask[train]' (in a checkout: pip install -e '.[train]')" in text


def test_train_says_where_the_shipped_models_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: "copy it ... into src/livemask/models/", a folder only a checkout has."""
    from livemask.training import cli as training_cli

    card = tmp_path / "out" / "nuclei.yaml"
    monkeypatch.setattr(training_cli, "train_model", lambda *args, **kwargs: card)
    result = CliRunner().invoke(cli.app, ["train", "nuclei", "--quick", "--out",
                                          str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert f"into {MODELS_DIR} to ship it" in result.output


def test_a_file_that_is_no_model_card_points_at_an_installed_card(tmp_path: Path) -> None:
    path = tmp_path / "not-a-card.yaml"
    path.write_text("size: 3\n", encoding="utf-8")
    with pytest.raises(ModelError) as info:
        load_model_card(path)
    assert f"a model card .yaml like {MODELS_DIR / 'nuclei.yaml'}" in str(info.value)


def test_a_config_folder_names_the_example_as_part_of_a_checkout(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"configs/simulated-nuclei\.yaml in a livemask checkout"):
        load_config(tmp_path)
