"""Session 21 config fixes: a recorded config.yaml keeps number-like text, a card path in
model.name is refused, null nested sections keep their defaults, null paths say what to do,
a sequence that plans no events is refused, and unknown keys get a suggestion."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import useq

from livemask.acquisition.sequence import check_sequence
from livemask.bench import BenchSettings, service_config
from livemask.config import DEFAULT_SEQUENCE, load_config, parse_config
from livemask.errors import CommandError, ConfigError
from livemask.feedback.spec import LimitsSpec
from livemask.inference.models import MODELS_DIR
from livemask.recording import Recorder
from livemask.service.commands import _checked_sequence


def _write(tmp_path: Path, text: str, name: str = "service.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _own_card(folder: Path) -> Path:
    """A copy of the shipped nuclei card and model: a model card of one's own."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("nuclei.yaml", "nuclei.onnx"):
        shutil.copy(MODELS_DIR / name, folder / name)
    return folder / "nuclei.yaml"


STOP_RULE = {"when": {"values": [{"path": "summary.count", "gt": 1e6}]}, "action": {"stop": True}}


# ------------------------------------------------------------------ (1) config.yaml dump
@pytest.mark.parametrize("text", ["1e1", "3e5", "2E3", ".5e1", "1e+3"])
def test_a_recorded_config_keeps_text_that_looks_like_a_number(tmp_path: Path,
                                                               text: str) -> None:
    """Before, config.yaml held ``name: 1e1`` unquoted (PyYAML's dumper, YAML 1.1), which
    livemask's loader reads as a float: reusing it failed (rule name: "Input should be a
    valid string") or silently turned sequence metadata into 300000.0."""
    source = _write(tmp_path, "acquisition:\n  sequence:\n"
                    "    time_plan: {interval: 0, loops: 2}\n"
                    f"    metadata: {{sample_id: '{text}'}}\n"
                    f"    stage_positions: [{{x: 0, y: 0, name: '{text}'}}]\n"
                    f"feedback:\n  rules:\n    - name: '{text}'\n"
                    "      when: {values: [{path: summary.count, gt: 1000000}]}\n"
                    "      action: {stop: true}\n")
    cfg = load_config(source)
    rec = Recorder(tmp_path / "run", pixel_size_um=0.65,
                   config=cfg.model_dump(mode="json")).start()
    rec.close()
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again.feedback.rules[0].name == text
    assert again.acquisition.sequence["metadata"] == {"sample_id": text}
    assert again.model_dump() == cfg.model_dump()


# ------------------------------------------------------------------ (2) model.name
@pytest.mark.parametrize("name", ["cards/mine.yaml", "mine.YML", "~/cards/mine.yaml"])
def test_a_card_path_in_model_name_is_refused(tmp_path: Path, name: str) -> None:
    """Before, it was taken as a path from the working directory (not the YAML file's
    folder, no ~), and the error, if any, named model.path, which was not set."""
    _own_card(tmp_path / "cards")
    path = _write(tmp_path, f"model:\n  name: {name}\n")
    with pytest.raises(ConfigError, match=r"model\.name: .*is a model card file.*put the "
                       r"card's path in model\.path instead"):
        load_config(path)
    cfg = load_config(_write(tmp_path, "model:\n  path: cards/nuclei.yaml\n", "ok.yaml"))
    assert cfg.model.path == tmp_path / "cards" / "nuclei.yaml"


def test_bench_model_flag_still_takes_a_card_path(tmp_path: Path) -> None:
    card = _own_card(tmp_path / "cards")
    cfg = service_config(BenchSettings(model=str(card)))
    assert cfg.model.path == card
    assert service_config(BenchSettings(model="grains")).model.name == "grains"


# ------------------------------------------------------------------ (3) null values
@pytest.mark.parametrize(
    ("text", "check"),
    [
        ("feedback:\n  rules:\n  # - name: x\n", lambda c: c.feedback.rules == []),
        ("feedback:\n  limits:\n", lambda c: c.feedback.limits == LimitsSpec()),
        ("feedback:\n  rules: ~\n  limits: null\n",
         lambda c: c.feedback.rules == [] and c.feedback.limits == LimitsSpec()),
        ("acquisition:\n  mode: pipelined\n  sequence:\n",
         lambda c: c.acquisition.sequence == DEFAULT_SEQUENCE
         and c.acquisition.mode == "pipelined"),
    ],
)
def test_an_empty_nested_section_keeps_its_default(tmp_path: Path, text: str,
                                                   check: Any) -> None:
    """Before: "feedback.rules: Input should be a valid list" and the like."""
    assert check(load_config(_write(tmp_path, text)))


@pytest.mark.parametrize("text", ["hardware:\n  config_file:\n",
                                  "hardware:\n  config_file: ~\n"])
def test_an_empty_hardware_file_says_what_to_give(tmp_path: Path, text: str) -> None:
    """Before: "Input is not a valid path for <class 'pathlib.Path'>"."""
    with pytest.raises(ConfigError, match=r"hardware\.config_file: .*no file given.*"
                       r"YAML's null, not your home folder.*leave the line out"):
        load_config(_write(tmp_path, text))


@pytest.mark.parametrize(("text", "key"), [
    ("record:\n  enabled: true\n  path: ~\n", "record.path"),
    ("record: {path: ~}\n", "record.path"),
    ("model:\n  path: ~\n", "model.path"),
])
def test_a_bare_tilde_path_is_refused(tmp_path: Path, text: str, key: str) -> None:
    """Before, ``record.path: ~`` was YAML's null and recorded to ./recordings (the docs
    say a leading ~ is the home folder), and ``model.path: ~`` ran model.name."""
    with pytest.raises(ConfigError, match=rf"{key}: ~ alone is YAML's null \(no path\), not "
                       r"your home folder; quote it \('~/\.\.\.'\)"):
        load_config(_write(tmp_path, text))


def test_quoted_tilde_and_null_paths_still_load(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A quoted ~ is the home folder; ``null`` (as a dump writes it) is the default."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(_write(tmp_path, "record: {path: '~/recs'}\n")).record.path == (
        tmp_path / "recs")
    cfg = load_config(_write(tmp_path, "record: {path: null}\nmodel: {path: null}\n"))
    assert cfg.record.path is None and cfg.model.path is None
    assert cfg.model.name == "nuclei"


# ------------------------------------------------------------------ (5) no events
@pytest.mark.parametrize("sequence", [{}, {"stage_positions": []},
                                      {"metadata": {"a": 1}, "channels": []}])
def test_a_sequence_that_plans_no_events_is_refused(sequence: dict[str, Any]) -> None:
    """Before, it ran an acquisition of 0 events and `serve --exit-when-done` exited 0."""
    assert len(list(useq.MDASequence.model_validate(sequence))) == 0
    with pytest.raises(CommandError, match=r"invalid sequence: sequence plans no events") as e:
        _checked_sequence(sequence)
    assert e.value.code == "invalid_args"


@pytest.mark.timeout(60)
async def test_a_configured_sequence_without_events_is_refused_where_it_runs() -> None:
    """A config's sequence is checked for events where it runs (autostart, a bare start),
    not when the file loads: ``serve --frames`` adds its time plan afterwards, and a
    config that does not autostart need not plan anything (review F: both were refused)."""
    from livemask import cli
    from livemask.service.app import Service
    from tests.conftest import make_config
    from tests.test_acquisition_end import control

    cfg = parse_config({"acquisition": {"autostart": False, "sequence": {"metadata": {"a": 1}}}})
    cli._time_lapse(cfg, 3, None)  # serve --frames 3
    assert cfg.acquisition.sequence["time_plan"]["loops"] == 3
    async with Service(make_config(acquisition={"sequence": {"metadata": {"a": 1}}})) as svc:
        with pytest.raises(Exception, match=r"acquisition\.sequence plans no events"):
            await control(svc, "start")
    with pytest.raises(ConfigError, match=r"acquisition\.sequence plans no events"):
        async with Service(make_config(acquisition={
                "autostart": True, "sequence": {"metadata": {"a": 1}}})):
            pass


@pytest.mark.parametrize("sequence", [
    {"time_plan": {"interval": 0, "loops": 3}},  # a replay's start
    {"stage_positions": [{"x": 0, "y": 0}]},
    {"stage_positions": [{"x": 0, "y": 0, "sequence": {}}]},
    {"channels": ["DAPI"]},
    {"z_plan": {"range": 2, "step": 1}},
    {"grid_plan": {"rows": 1, "columns": 2, "fov_width": 10, "fov_height": 10}},
])
def test_a_sequence_with_events_passes(sequence: dict[str, Any]) -> None:
    seq = useq.MDASequence.model_validate(sequence)
    assert len(list(seq)) > 0
    check_sequence(seq, sequence)


# ------------------------------------------------------------------ (6) unknown keys
@pytest.mark.parametrize(
    ("data", "line"),
    [
        ({"tracking": {"max_distance": 5}},
         "tracking.max_distance: unknown field (did you mean 'max_distance_px'? known: "
         "area_weight, "),
        ({"simulation": {"sensor_shape": [64, 64]}},
         "simulation.sensor_shape: unknown field (did you mean 'sensor_shape_px'? known: "),
        ({"feedback": {"rules": [{"name": "r", "acton": {"stop": True},
                                  "when": STOP_RULE["when"]}]}},
         "feedback.rules.0.acton: unknown field (did you mean 'action'? known: action, "
         "actions, "),
        ({"feedback": {"rules": [{"name": "r", **STOP_RULE,
                                  "action": {"burst": {"framez": 3}}}]}},
         "feedback.rules.0.actions.0.burst.framez: unknown field (did you mean 'frames'?"),
        ({"feedback": {"limits": {"max_z_rang_um": 3}}},
         "feedback.limits.max_z_rang_um: unknown field (did you mean 'max_z_range_um'?"),
        ({"dashboard": {"host": "0.0.0.0"}},
         "dashboard.host: unknown field (known: address, enabled, max_image_px, port, "
         "update_hz)"),
        ({"trackin": {}}, "trackin: unknown field (did you mean 'tracking'? known: "),
    ],
)
def test_an_unknown_key_gets_a_suggestion(data: dict[str, Any], line: str) -> None:
    """Before: pydantic's "Extra inputs are not permitted", with no suggestion, while the
    same mistake inside acquisition.sequence got one."""
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert f"  {line}" in str(info.value)
    assert "Extra inputs" not in str(info.value)
