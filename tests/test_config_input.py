"""Bad input in config files: each gives one ConfigError naming the file, field and fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import useq
import yaml

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
         ["acquisition.sequence", "time_plan: a value has the wrong type or size",
          "'a' is an invalid"]),
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
    with pytest.raises(ConfigError, match=r"the simulated grain world of 1074 Mpx .* 28\.0 GiB"
                       ) as info:
        parse_config(grains)
    # before: "lower pipeline.prefault_frames (0 turns it off)" though it was 0 already
    assert "prefault_frames" not in str(info.value)
    assert "simulation.sensor_shape_px: the simulated grain world" in str(info.value)
    assert str(info.value).endswith("; give a smaller simulation.sensor_shape_px")
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


def test_a_tilde_in_a_path_is_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: ``record: {path: ~/recs}`` recorded into a folder named ``~`` beside the YAML,
    and ``hardware.config_file: ~/rig.cfg`` was looked up there."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    (home / "card.yaml").write_text("name: mine\n", encoding="utf-8")
    folder = tmp_path / "configs"
    folder.mkdir()
    path = folder / "service.yaml"
    path.write_text("hardware: {config_file: ~/rig.cfg}\nmodel: {path: ~/card.yaml}\n"
                    "record: {path: ~/recs}\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.hardware.config_file == home / "rig.cfg"
    assert cfg.model.path == home / "card.yaml"
    assert cfg.record.path == home / "recs"
    assert not (folder / "~").exists()
    # also without a YAML file (parse_config, as tests and tools call it)
    assert parse_config({"record": {"path": "~/r"}}).record.path == home / "r"
    # relative paths are still taken beside the YAML
    path.write_text("record: {path: recs}\n", encoding="utf-8")
    assert load_config(path).record.path == folder / "recs"


def test_paths_from_a_relative_config_path_are_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--config configs/x.yaml`` (as ``make run``): the paths it gives are made absolute, so
    the run's recorded ``config.yaml`` works from any folder (before: ``configs/rig.cfg``,
    which a later start from the recording's folder could not find)."""
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "rig.cfg").write_text("# rig\n", encoding="utf-8")
    (folder / "card.yaml").write_text("name: mine\n", encoding="utf-8")
    (folder / "x.yaml").write_text("hardware: {config_file: rig.cfg}\nmodel: {path: card.yaml}\n"
                                   "record: {path: recs}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("configs") / "x.yaml")
    assert cfg.hardware.config_file == folder / "rig.cfg"
    assert cfg.model.path == folder / "card.yaml"
    assert cfg.record.path == folder / "recs"


@pytest.mark.parametrize(("value", "seconds"), [("5e-2", 0.05), ("1e1", 10.0), ("1.5E0", 1.5),
                                                ("1E+0", 1.0)])
def test_scientific_notation_is_a_number(tmp_path: Path, value: str, seconds: float) -> None:
    """PyYAML (YAML 1.1) read ``5e-2`` as a string: the interval, a timedelta, gave five
    errors about the time plans."""
    path = _write(tmp_path, f"acquisition:\n  sequence:\n    time_plan: {{interval: {value}, "
                            "loops: 3}\nsimulation: {pixel_size_um: 6.5e-1}\n")
    cfg = load_config(path)
    plan = cfg.acquisition.mda_sequence().time_plan
    assert plan is not None and plan.interval.total_seconds() == seconds
    assert cfg.simulation.pixel_size_um == 0.65
    # yaml's own SafeLoader is left as it was; quoted values stay strings
    assert yaml.safe_load("a: 5e-2") == {"a": "5e-2"}
    channel = _write(tmp_path, "acquisition:\n  sequence:\n    channels: [{config: '1e1'}]\n")
    assert load_config(channel).acquisition.sequence["channels"][0]["config"] == "1e1"


@pytest.mark.parametrize(("plan", "needle"), [
    ("{interval: 0.1, loop: 3}", "acquisition.sequence.time_plan.loop: unknown field (did you "
                                 "mean 'loops'?"),
    ("{interval: 0.1, loops: 0}", "acquisition.sequence.time_plan.loops: Input should be "
                                  "greater than 0"),
    ("{interval: 0.1, loops: many}", "acquisition.sequence.time_plan.loops: Input should be a "
                                     "valid integer"),
    ("{interval: soon, loops: 3}", "acquisition.sequence.time_plan.interval: Input should be a "
                                   "valid timedelta"),
])
def test_a_bad_time_plan_names_its_one_problem(tmp_path: Path, plan: str, needle: str) -> None:
    """Before: five lines about MultiPhaseTimePlan, TIntervalDuration, TIntervalLoops and
    TDurationLoops, and the misspelt ``loop`` was never named."""
    path = _write(tmp_path, f"acquisition:\n  sequence:\n    time_plan: {plan}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert lines[1:] == [f"  {lines[1].strip()}"]  # one error
    assert needle in lines[1]
    assert "TIntervalLoops" not in lines[1] and "MultiPhaseTimePlan" not in lines[1]


def _grains_config(tmp_path: Path, old: str, new: str) -> Path:
    """configs/simulated-grains.yaml with ``old`` replaced by ``new``, in ``tmp_path``."""
    text = (ROOT / "configs" / "simulated-grains.yaml").read_text(encoding="utf-8")
    assert old in text
    return _write(tmp_path, text.replace(old, new))


@pytest.mark.parametrize(("old", "new", "needles"), [
    ("rows: 4", "rows: 0", ["sequence.grid_plan.rows: Input should be greater than or equal "
                            "to 1"]),
    ("rows: 4", "rows: -1", ["sequence.grid_plan.rows: Input should be greater than or "
                             "equal to 1"]),
    ("overlap: 0", "overlap: 0\n      mode: snake",
     ["sequence.grid_plan.mode: Input should be 'row_wise'"]),
    ("columns: 4", "colums: 4", ["sequence.grid_plan.columns: Field required",
                                 "sequence.grid_plan.colums: unknown field (did you mean "
                                 "'columns'?"]),
])
def test_a_bad_grid_in_the_shipped_grain_config_is_named(
    tmp_path: Path, old: str, new: str, needles: list[str]
) -> None:
    """Before: ``rows: 0`` said "rows: unknown field", "columns: unknown field" and
    "overlap: unknown field" (known: the fields of a RelativePosition)."""
    with pytest.raises(ConfigError) as info:
        load_config(_grains_config(tmp_path, old, new))
    message = str(info.value)
    for needle in needles:
        assert needle in message
    for key in ("rows", "columns", "overlap", "fov_width", "fov_height", "mode"):
        assert f"grid_plan.{key}: unknown field" not in message
    assert "RelativePosition" not in message and "grid_col" not in message


@pytest.mark.parametrize("text", [
    "model:\n  # name: nuclei\n",  # every line of a section commented out
    "model:\nsimulation:\nacquisition:\nfeedback:\nrecord:\n",
    "hardware: null\npublish: ~\n",
])
def test_an_empty_section_takes_the_defaults(tmp_path: Path, text: str) -> None:
    """Before: "model: Input should be a valid dictionary or instance of ModelConfig"."""
    cfg = load_config(_write(tmp_path, text))
    assert cfg.model.name == "nuclei" and cfg.publish.pub_address == "tcp://127.0.0.1:5555"
    assert cfg.acquisition.mda_sequence().sizes["t"] == 170


def test_a_folder_as_the_micro_manager_config_is_named(tmp_path: Path) -> None:
    """Before: "Micro-Manager config file '/tmp' does not exist" for an existing folder."""
    from livemask.acquisition.core import open_core

    (tmp_path / "rig.cfg").write_text("# a rig\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        open_core(tmp_path)
    message = str(info.value)
    assert f"{str(tmp_path)!r} is a folder (it holds rig.cfg)" in message
    assert f"hardware.config_file to the .cfg file itself, e.g. {str(tmp_path / 'rig.cfg')!r}" in (
        message)
    assert "does not exist" not in message
    with pytest.raises(ConfigError, match=r"does not exist; check hardware\.config_file"):
        open_core(tmp_path / "nope.cfg")


@pytest.mark.parametrize(("sequence", "needle"), [
    # review: "stage_positions.sequence.time_plan: Field required: add duration or loops or
    # phases", never naming the typo nor the position
    ("stage_positions: [{x: 0, y: 0}, {x: 5, y: 5, sequence: {time_plan: "
     "{interval: 1, loopz: 2}}}]",
     "acquisition.sequence.stage_positions.1.sequence.time_plan.loopz: unknown field (did you "
     "mean 'loops'?"),
    ("stage_positions: [{x: 0, y: 0, sequence: {z_plan: {range: 4, stp: 1}}}]",
     "acquisition.sequence.stage_positions.0.sequence.z_plan.stp: unknown field (did you mean "
     "'step'?"),
    # review: accepted as one tile (a RelativePosition named grid row 2, column 2)
    ("grid_plan: {row: 2, col: 2}",
     "sequence.grid_plan.row: unknown field (did you mean 'rows'?"),
    ("grid_plan: {rows: 2, col: 2}",
     "sequence.grid_plan.col: unknown field (did you mean 'columns'?"),
])
def test_a_typo_in_a_plan_is_named_where_it_is(tmp_path: Path, sequence: str, needle: str
                                               ) -> None:
    path = _write(tmp_path, f"acquisition:\n  sequence:\n    {sequence}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert needle in message
    assert "or phases" not in message and "grid_plan.rows: unknown" not in message


def test_a_grid_of_random_points_loads(tmp_path: Path) -> None:
    """Review: AttributeError ('RandomPoints' object has no attribute '_step_size') at load."""
    path = _write(tmp_path, "acquisition:\n  sequence:\n    grid_plan: {num_points: 4, "
                            "max_width: 50, max_height: 50, fov_width: 5, fov_height: 5}\n")
    seq = load_config(path).acquisition.mda_sequence()
    assert isinstance(seq.grid_plan, useq.RandomPoints) and seq.sizes["g"] == 4
