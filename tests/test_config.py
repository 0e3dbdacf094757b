"""Configuration loading and its error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from livemask.acquisition.simulated import SIMULATED_CFG
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
    assert cfg.hardware.config_file == SIMULATED_CFG


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"acquisition": {"mode": "turbo"}}, "acquisition.mode"),
        ({"acquisition": {"sequence": {"time_plan": {"interval": "x"}}}}, "acquisition.sequence"),
        # useq itself accepts time running backwards
        ({"acquisition": {"sequence": {"time_plan": {"interval": -1, "loops": 3}}}},
         "acquisition.sequence: time_plan interval must be >= 0 s, got -1 s"),
        ({"acquisition": {"sequence": {"time_plan": [
            {"interval": 1, "loops": 2}, {"duration": -3, "loops": 4}]}}},
         "time_plan duration must be >= 0 s, got -3 s"),
        ({"publish": {"frame_every": -1}}, "publish.frame_every"),
        ({"model": {"threads": 0}}, "model.threads"),
        ({"model": {"threads": 100_000}}, "model.threads"),  # hung the start, 17 GB
        ({"acquisition": {"sequence": {"time_pan": {"interval": 1, "loops": 3}}}},
         "acquisition.sequence: sequence.time_pan: unknown field"),
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


def test_a_large_input_is_checked_for_integers_beyond_64_bits() -> None:
    """Review: every list entry got its path formatted before anything was checked, so a
    16 MB control request of 8 M numbers held the event loop for ~4 s and took ~1.9 GB.
    The result is what is checked here, on a million entries, not its time."""
    from livemask.config import int_out_of_range

    numbers = list(range(-500_000, 500_000))
    assert int_out_of_range({"x": numbers}, "args") is None
    mixed: list[object] = [1.5, "a", None, True, *numbers]
    assert int_out_of_range({"x": mixed}, "args") is None
    numbers[700_001] = 2**63
    assert int_out_of_range({"x": numbers}, "args") == (
        "args.x.700001: 9223372036854775808 does not fit 64 bits; use a whole number from "
        "-2**63 to 2**63 - 1 (9223372036854775807)")
    numbers[900_000] = -(2**64)  # the first one is named
    assert (int_out_of_range({"x": numbers}, "args") or "").startswith("args.x.700001: ")
    mixed[999_000] = -(2**63) - 1
    assert int_out_of_range({"a": {"b": [{"c": 1}] * 1000, "m": mixed}}, "") == (
        "a.m.999000: -9223372036854775809 does not fit 64 bits; use a whole number from "
        "-2**63 to 2**63 - 1 (9223372036854775807)")
    # many small containers, and one deep inside them
    rows: list[object] = [[i, {"k": i}] for i in range(200_000)]
    assert int_out_of_range({"rows": rows}, "args") is None
    rows[123_456] = [0, {"k": 10**30}]
    assert int_out_of_range({"rows": rows}, "args") == (
        f"args.rows.123456.1.k: {10**30} does not fit 64 bits; use a whole number from "
        "-2**63 to 2**63 - 1 (9223372036854775807)")


def test_checking_a_large_input_takes_little_memory() -> None:
    """The old walk held a path string and a tuple per entry: ~240 bytes each (1.9 GB for
    the 8 M numbers of one 16 MB request)."""
    import tracemalloc

    from livemask.config import int_out_of_range

    request = {"cmd": "status", "args": {"x": [1] * 1_000_000}}
    tracemalloc.start()
    try:
        assert int_out_of_range(request, "args") is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # bytes, for a million entries


@pytest.mark.parametrize("value", [
    {"a": 2**64, "b": [2**65]},  # the first in field order, as before
    [[1, 2], [3, [2**70, 2**71]]],
    {"x": [0] * 20 + [2**64] + [0] * 20, "y": 2**66},
    (1, (2, -(2**64))),
])
def test_the_first_integer_beyond_64_bits_is_named_as_before(value: Any) -> None:
    from livemask.config import int_out_of_range

    expected = _first_big_int(value, "v")
    assert expected is not None
    assert int_out_of_range(value, "v") == expected


def _first_big_int(value: Any, at: str) -> str | None:
    """The check as it was written first (recursive, eager paths): the reference."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if -(2**63) <= value < 2**63:
            return None
        return (f"{at}: {value} does not fit 64 bits; use a whole number from -2**63 to "
                "2**63 - 1 (9223372036854775807)")
    items = (value.items() if isinstance(value, dict)
             else enumerate(value) if isinstance(value, list | tuple) else [])
    for key, item in items:
        found = _first_big_int(item, f"{at}.{key}")
        if found:
            return found
    return None


@pytest.mark.parametrize("depth", [250, 300])
def test_a_config_sequence_nested_too_deeply_is_refused_at_load(depth: int) -> None:
    """A config sequence nested ~250 levels deep (e.g. in its metadata) loaded, and then
    ``start`` replied ``internal``: its acquisition_started event could not be encoded. The
    request path refused such a sequence already (200 levels); the config now does too."""
    from livemask.protocol import MAX_NESTING

    def nested(levels: int) -> Any:
        value: Any = 1
        for _ in range(levels):
            value = {"a": value}
        return value

    sequence = {"time_plan": {"interval": 0, "loops": 2}, "metadata": nested(depth)}
    with pytest.raises(ConfigError, match=rf"acquisition\.sequence: .*more than {MAX_NESTING} "
                                          "levels deep"):
        parse_config({"acquisition": {"sequence": sequence}})
    ok = {"time_plan": {"interval": 0, "loops": 2}, "metadata": nested(MAX_NESTING - 2)}
    assert parse_config({"acquisition": {"sequence": ok}}).acquisition.sequence == ok
