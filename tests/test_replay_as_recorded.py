"""``livemask replay`` of a livemask recording without ``--config`` analyses it as it was
recorded: its config.yaml's model, analysis, tracking and acquisition mode."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import yaml
from typer.testing import CliRunner

from livemask.acquisition.replay import ReplaySource, ReplayStack
from livemask.cli import app
from livemask.recording import open_recording
from tests.conftest import make_config
from tests.test_recording import _run_dir, _run_to_end

runner = CliRunner()
TILES = 3


async def _record_grain_scan(out: Path, **config: object) -> Path:
    """A recording of a 3-tile grain scan analysed by the grains model in synchronized
    mode (every tile), with analysis thresholds of its own."""
    from livemask.acquisition.simulated.grains import GrainParams, GrainSample
    from livemask.service.app import Service

    sample = GrainSample(GrainParams(world_shape_px=(256, 512)), seed=2)
    tiles = [sample.render((0.0, 128.0 * i), (128, 128)).image for i in range(TILES)]
    stack = ReplayStack(
        Path("tiles"), "tiff", TILES, (128, 128), np.dtype(tiles[0].dtype),
        lambda i: tiles[i],
        positions=[{"x_um": 64.0 * i, "y_um": 0.0, "z_um": None} for i in range(TILES)])
    cfg = make_config(
        model=config.get("model", {"name": "grains"}), simulation={"sample": "grains"},
        analysis={"min_area_px": 12},
        record={"enabled": True, "path": str(out)},
        acquisition={"mode": "synchronized",
                     "sequence": {"time_plan": {"interval": 0, "loops": TILES}}},
        hardware={"pixel_size_um": 0.5})
    async with Service(cfg, source=ReplaySource(stack, interval_s=0.0)) as svc:
        svc.start_acquisition(None)
        await _run_to_end(svc)
    return _run_dir(out)


def _replay(run: Path, out: Path, *more: str) -> list[str]:
    return ["replay", str(run), "--exit-when-done", "--interval", "0",
            "--pub", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
            "--record", str(out), *more]


def _config_of(run: Path) -> dict[str, object]:
    data = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_a_recording_replays_with_the_model_and_mode_it_was_recorded_with(
    tmp_path: Path,
) -> None:
    """Before, a grain scan replayed without --config was segmented by the nuclei model in
    free-run mode (tiles skipped), without a word."""
    run = asyncio.run(_record_grain_scan(tmp_path / "live"))
    result = runner.invoke(app, _replay(run, tmp_path / "again"))
    assert result.exit_code == 0, result.output
    assert "replaying as recorded" in result.output
    again = _run_dir(tmp_path / "again")
    used = _config_of(again)
    assert used["model"]["name"] == "grains"  # type: ignore[index]
    assert used["acquisition"]["mode"] == "synchronized"  # type: ignore[index]
    assert used["analysis"]["min_area_px"] == 12  # type: ignore[index]
    assert used["publish"]["pub_address"] == "tcp://127.0.0.1:*"  # type: ignore[index]
    frames = open_recording(again).frames
    assert len(frames) == TILES and all(f["analysed"] for f in frames)
    assert frames[-1]["grains"]["cumulative"]["tiles"] == TILES


def test_config_and_mode_given_win_over_the_recordings(tmp_path: Path) -> None:
    run = asyncio.run(_record_grain_scan(tmp_path / "live"))
    mode_only = runner.invoke(app, _replay(run, tmp_path / "m", "--mode", "pipelined"))
    assert mode_only.exit_code == 0, mode_only.output
    used = _config_of(_run_dir(tmp_path / "m"))
    assert used["acquisition"]["mode"] == "pipelined"  # type: ignore[index]
    assert used["model"]["name"] == "grains"  # type: ignore[index]

    config = tmp_path / "nuclei.yaml"
    config.write_text("acquisition:\n  mode: synchronized\n", encoding="utf-8")
    chosen = runner.invoke(app, _replay(run, tmp_path / "c", "-c", str(config)))
    assert chosen.exit_code == 0, chosen.output
    assert "replaying as recorded" not in chosen.output
    used = _config_of(_run_dir(tmp_path / "c"))
    assert used["model"]["name"] == "nuclei"  # type: ignore[index]
    assert "min_area_px" not in used["analysis"] or (
        used["analysis"]["min_area_px"] is None)  # type: ignore[index]


def test_a_recordings_model_card_that_is_not_here_is_named(tmp_path: Path) -> None:
    run = asyncio.run(_record_grain_scan(tmp_path / "live"))
    recorded = _config_of(run)
    gone = tmp_path / "elsewhere" / "my-grains.yaml"
    recorded["model"] = {"path": str(gone)}
    (run / "config.yaml").write_text(yaml.safe_dump(recorded), encoding="utf-8")
    result = runner.invoke(app, _replay(run, tmp_path / "again"))
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert f"model card {gone}" in out and "give --config" in out


def test_the_recording_rigs_backend_and_threads_are_not_taken(tmp_path: Path) -> None:
    """A recording made on the GPU rig (backend tensorrt) replays on a laptop: the model's
    name is the recording's, the backend and threads this machine's defaults (review:
    copying the whole model section made such a replay exit 2)."""
    run = asyncio.run(_record_grain_scan(tmp_path / "live"))
    recorded = _config_of(run)
    recorded["model"] = {"name": "grains", "backend": "tensorrt", "threads": 7,
                         "device_analysis": False}
    (run / "config.yaml").write_text(yaml.safe_dump(recorded), encoding="utf-8")
    result = runner.invoke(app, _replay(run, tmp_path / "again"))
    assert result.exit_code == 0, result.output
    used = _config_of(_run_dir(tmp_path / "again"))
    assert used["model"] == {"name": "grains", "path": None, "backend": "auto",
                             "threads": 2, "device_analysis": True}


def test_a_recording_without_its_config_says_it_takes_the_defaults(tmp_path: Path) -> None:
    """New-feature hunt: a recording whose config.yaml was lost replayed with the nuclei
    model in free-run mode without a word."""
    run = asyncio.run(_record_grain_scan(tmp_path / "live"))
    (run / "config.yaml").unlink()
    result = runner.invoke(app, _replay(run, tmp_path / "again"))
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "has no config.yaml, which says how it was analysed" in out
    assert "(model nuclei, acquisition mode free-run)" in out


def test_the_log_names_the_mode_given(tmp_path: Path) -> None:
    run = asyncio.run(_record_grain_scan(tmp_path / "live"))
    result = runner.invoke(app, _replay(run, tmp_path / "again", "--mode", "pipelined"))
    assert result.exit_code == 0, result.output
    assert "model grains, acquisition mode pipelined" in " ".join(result.output.split())
