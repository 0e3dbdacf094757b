"""Bad input in config files: each gives one ConfigError naming the file, field and fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from livemask.config import load_config, parse_config
from livemask.errors import ConfigError
from tests.conftest import ROOT


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "service.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        # a negative seed crashed numpy at run time (150-line traceback)
        ("simulation:\n  seed: -1\n", ["simulation.seed", "greater than or equal to 0"]),
        # a seed beyond 64 bits failed later in the JSON encoder, naming no field
        ("simulation:\n  seed: 100000000000000000000000\n",
         ["simulation.seed", "less than 9223372036854775808"]),
        ("simulation:\n  seed: 9223372036854775808\n", ["simulation.seed", "less than"]),
        # libzmq and the garbage collector take a C int: OverflowError at start
        ("publish:\n  sndhwm: 4294967296\n", ["publish.sndhwm", "less than or equal to"]),
        ("pipeline:\n  gc_threshold: 4294967296\n",
         ["pipeline.gc_threshold", "less than or equal to"]),
        # ints inside the sequence and elsewhere are sent as JSON too (orjson: 64 bits)
        ("acquisition:\n  sequence:\n    time_plan: {interval: 0.1, "
         "loops: 100000000000000000000000}\n",
         ["acquisition.sequence.time_plan.loops", "2**63 - 1"]),
        ("analysis:\n  min_area_px: 100000000000000000000000\n",
         ["analysis.min_area_px", "2**63 - 1"]),
        # each snap ran this many sample steps first: a billion hung the service
        ("simulation:\n  steps_per_frame: 1000000000\n",
         ["simulation.steps_per_frame", "less than or equal to 1000"]),
        # useq's before-validator raised TypeError: a traceback, naming no field
        ("acquisition:\n  sequence:\n    time_plan: {interval: {a: 1}, loops: 2}\n",
         ["acquisition.sequence", "a value has the wrong type or size", "'a' is an invalid"]),
    ],
)
def test_integers_are_bounded_at_load(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message
    assert load_config(_write(tmp_path, "simulation:\n  seed: 9223372036854775807\n"))


def _fake_memory(monkeypatch: pytest.MonkeyPatch, gib: int) -> None:
    """Make os.sysconf report ``gib`` GiB of physical memory (4 KiB pages)."""
    real = os.sysconf
    sizes = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": gib * 2**30 // 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: sizes.get(name) or real(name))


def test_prefault_buffers_beyond_half_the_memory_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_memory(monkeypatch, 32)
    path = _write(tmp_path, "simulation:\n  sensor_shape_px: [16384, 16384]\n"
                            "pipeline:\n  prefault_frames: 64\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    for needle in (str(path), "64.0 GiB", "pipeline.prefault_frames",
                   "simulation.sensor_shape_px", "32.0 GiB", "lower"):
        assert needle in message
    # the default 8 frames at that size: 8 GiB, refused on 8 GiB of memory, not on 32 GiB
    default = {"simulation": {"sensor_shape_px": [16384, 16384]}}
    assert parse_config(default).pipeline.prefault_frames == 8
    _fake_memory(monkeypatch, 8)
    with pytest.raises(ConfigError, match=r"8\.0 GiB"):
        parse_config(default)
    assert parse_config({**default, "pipeline": {"prefault_frames": 0}})
    # the simulated grain sample pre-renders a world of twice the sensor a side
    _fake_memory(monkeypatch, 32)
    grains = {"simulation": {"sample": "grains", "sensor_shape_px": [16384, 16384]},
              "pipeline": {"prefault_frames": 0}}
    with pytest.raises(ConfigError, match=r"the simulated grain world of 1074 Mpx .* 28\.0 GiB"):
        parse_config(grains)
    assert parse_config({"simulation": {"sample": "grains", "sensor_shape_px": [4096, 4096]}})


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "is a directory" in message
    assert "YAML file" in message
    assert "does not exist" not in message


def test_model_name_and_path_together_are_refused(tmp_path: Path) -> None:
    (tmp_path / "card.yaml").write_text("name: mine\n", encoding="utf-8")
    path = _write(tmp_path, "model:\n  name: grains\n  path: card.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    for needle in (str(path), "model.name", "model.path", "not both"):
        assert needle in message
    # either one alone is fine
    assert load_config(_write(tmp_path, "model:\n  path: card.yaml\n")).model.path
    assert load_config(_write(tmp_path, "model:\n  name: grains\n")).model.name == "grains"


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "simulation:\n  seed: 1\n  truth: true\n  seed: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    for needle in (str(path), "duplicate key 'seed'", "line 4", "line 2", "keep one"):
        assert needle in message
    top = _write(tmp_path, "model:\n  name: grains\nsimulation: {}\nmodel:\n  threads: 1\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'model' on line 4 \(first on line 1\)"):
        load_config(top)
    # merge keys (<<) may be overridden: that is not a duplicate
    merged = _write(tmp_path, "simulation:\n  <<: {seed: 1, truth: true}\n  seed: 2\n")
    assert load_config(merged).simulation.seed == 2


@pytest.mark.parametrize(
    "path", sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "examples").glob("*.yaml")]),
    ids=lambda p: p.name,
)
def test_shipped_configs_still_load(path: Path) -> None:
    assert load_config(path)


def test_a_key_repeated_within_one_line_is_refused(tmp_path: Path) -> None:
    """The review found `{seed: 1, seed: 2}` on one line accepted (duplicates were told
    apart by line)."""
    path = _write(tmp_path, "simulation: {seed: 1, seed: 2}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'seed' on line 1 \(first on line 1\)"):
        load_config(path)
