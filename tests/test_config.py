"""Configuration loading and its error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from livemask.config import load_config, parse_config
from livemask.errors import ConfigError
from tests.conftest import ROOT


def test_defaults_are_valid() -> None:
    cfg = parse_config({})
    assert cfg.acquisition.mode == "free-run"
    assert cfg.publish.pub_address.startswith("tcp://127.0.0.1")
    assert cfg.acquisition.mda_sequence().sizes["t"] == 170


def test_shipped_config_resolves_hardware_path() -> None:
    cfg = load_config(ROOT / "configs" / "simulated-nuclei.yaml")
    assert cfg.hardware.config_file.resolve() == (ROOT / "hardware" / "simulated.cfg").resolve()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"acquisition": {"mode": "turbo"}}, "acquisition.mode"),
        ({"acquisition": {"sequence": {"time_plan": {"interval": "x"}}}}, "acquisition.sequence"),
        # useq itself accepts time running backwards
        ({"acquisition": {"sequence": {"time_plan": {"interval": -1, "loops": 3}}}},
         "acquisition.sequence: Value error, time_plan interval must be >= 0 s, got -1 s"),
        ({"acquisition": {"sequence": {"time_plan": [
            {"interval": 1, "loops": 2}, {"duration": -3, "loops": 4}]}}},
         "time_plan duration must be >= 0 s, got -3 s"),
        ({"publish": {"frame_every": -1}}, "publish.frame_every"),
        ({"model": {"threads": 0}}, "model.threads"),
        ({"model": {"threads": 100_000}}, "model.threads"),  # hung the start, 17 GB
        ({"acquisition": {"sequence": {"time_pan": {"interval": 1, "loops": 3}}}},
         "acquisition.sequence: Value error, sequence.time_pan: unknown field"),
        ({"acquisition": {"sequence": {"stage_positions": [{"x": float("nan"), "y": 0}]}}},
         "x: nan is not a finite number"),
        ({"simulation": {"sensor_shape_px": [0, 0]}}, "simulation.sensor_shape_px"),
        ({"simulation": {"sensor_shape_px": [100_000, 100_000]}}, "simulation.sensor_shape_px"),
        ({"simulation": {"pixel_size_um": float("inf")}}, "simulation.pixel_size_um"),
        ({"hardware": {"pixel_size_um": float("nan")}}, "hardware.pixel_size_um"),
        ({"publish": {"heartbeat_s": 1e-9}}, "publish.heartbeat_s"),
        # libzmq would bind port 473430 mod 65536 = 14678 without a word
        ({"publish": {"pub_address": "tcp://127.0.0.1:473430"}}, "publish.pub_address"),
        ({"publish": {"control_address": "localhost:5556"}}, "publish.control_address"),
        ({"hardwre": {}}, "hardwre"),
    ],
)
def test_errors_name_the_field(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        parse_config(data)


def test_non_mapping_yaml(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_invalid_yaml(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_division_rate_reaches_the_simulated_sample() -> None:
    from livemask.acquisition.simulated.world import configure_world
    from livemask.config import SimulationConfig

    def world_params(sim: SimulationConfig) -> Any:
        world = configure_world(sim.sample, sensor_shape=(512, 512),
                                overrides=sim.sample_overrides())
        return world.sample.params

    assert SimulationConfig().sample_overrides() == {}  # simulator defaults
    assert world_params(SimulationConfig()).division_rate_per_step == 0.004
    params = world_params(SimulationConfig(division_rate_per_step=0.00015))
    assert params.division_rate_per_step == 0.00015
    assert params.world_shape_px[0] >= 2 * 512
    assert SimulationConfig(sample="grains", division_rate_per_step=0.1).sample_overrides() == {}
    with pytest.raises(ConfigError, match="division_rate_per_step"):
        parse_config({"simulation": {"division_rate_per_step": -1}})


def test_device_analysis_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """model.device_analysis decides whether a CUDA torch backend keeps frames on the GPU."""
    pytest.importorskip("torch")
    from livemask.inference.models import ModelCard
    from livemask.inference.torch_backend import TorchBackend
    from livemask.service import app

    preferred: list[bool] = []

    def fake_cuda_backend(name: str, card: ModelCard, threads: int = 2,
                          frame_shape: object = None,
                          device_analysis: bool = False) -> TorchBackend:
        preferred.append(device_analysis)  # auto then prefers torch to TensorRT
        backend = TorchBackend(threads=1, device="cpu")
        backend.load(card)
        backend.device = "cuda"  # as if on a GPU; its tensors stay on the CPU here
        return backend

    monkeypatch.setattr(app, "load_backend", fake_cuda_backend)
    assert parse_config({}).model.device_analysis is True
    assert app.build_segmenter(parse_config({})).device_resident is True
    off = parse_config({"model": {"device_analysis": False}})
    assert app.build_segmenter(off).device_resident is False
    assert preferred == [True, False]


def test_integers_beyond_64_bits_are_found_at_any_depth() -> None:
    """Review: the check recursed, so ~980 nested lists (which JSON still parses) raised
    RecursionError and a request got `internal` instead of `invalid_args`."""
    from livemask.config import int_out_of_range

    nested: object = 2**70
    for _ in range(5000):
        nested = [nested]
    problem = int_out_of_range({"events": [1, nested]}, "args")
    assert problem is not None and problem.startswith("args.events.1.0.0.")
    assert int_out_of_range({"a": [-(2**63), 2**63 - 1, True]}, "args") is None
