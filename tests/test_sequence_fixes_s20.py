"""Bug hunt s20 (a useq power user): random points in random order across chunks, an
axis_order without 't', and plans whose axis letter axis_order leaves out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import useq

from livemask.acquisition.sequence import check_sequence, iter_events
from livemask.cli import app
from livemask.errors import ConfigError, ControlError
from livemask.service.app import Service
from tests.conftest import make_config
from tests.test_cli import _config_with_sequence, _flat, _seen_configs, runner
from tests.test_service import control

_RANDOM_ORDER = {"num_points": 4, "max_width": 300, "max_height": 200, "random_seed": 3,
                 "order": "random"}


@pytest.fixture
def numpy_seeded() -> Iterator[None]:
    """numpy's global generator (useq shuffles ``order: random`` with it) seeded, then
    put back as it was."""
    state = np.random.get_state()
    np.random.seed(11)
    try:
        yield
    finally:
        np.random.set_state(state)


def _random_order_sequence(where: str, loops: int) -> dict[str, Any]:
    data: dict[str, Any] = {"time_plan": {"interval": 0, "loops": loops}}
    if where == "sequence":
        data["grid_plan"] = dict(_RANDOM_ORDER)
    else:
        data["stage_positions"] = [
            {"x": 10, "y": 20, "sequence": {"grid_plan": dict(_RANDOM_ORDER)}}]
    return data


def _places(events: Any) -> list[tuple[dict[str, int], float, float]]:
    return [(dict(e.index), round(e.x_pos, 6), round(e.y_pos, 6)) for e in events]


@pytest.mark.usefixtures("numpy_seeded")
@pytest.mark.parametrize("where", ["sequence", "position"])
def test_random_order_of_random_points_is_drawn_once_per_run(where: str) -> None:
    """Before, useq shuffled the points (unseeded) on each chunk's pass: after the first
    chunk a grid index imaged other points (g 0 at 2 places, g 1 at 3, ...)."""
    seq = useq.MDASequence.model_validate(_random_order_sequence(where, 9))
    by_g: dict[int, set[tuple[float, float]]] = {}
    for index, x, y in _places(iter_events(seq, 2)):
        by_g.setdefault(index["g"], set()).add((x, y))
    assert sorted(by_g) == [0, 1, 2, 3]
    assert all(len(spots) == 1 for spots in by_g.values()), by_g


@pytest.mark.parametrize("where", ["sequence", "position"])
def test_the_first_chunk_of_random_order_is_useqs_own(where: str) -> None:
    """With numpy's generator in the same state, the first chunk is what useq lists."""
    data = _random_order_sequence(where, 9)
    state = np.random.get_state()
    try:
        np.random.seed(5)
        expected = _places(useq.MDASequence.model_validate(data))[:8]  # t 0 and 1
        np.random.seed(5)
        got = _places(iter_events(useq.MDASequence.model_validate(data), 2))[:8]
    finally:
        np.random.set_state(state)
    assert got == expected


def test_a_time_plan_without_t_in_axis_order_does_not_crash_the_chunking() -> None:
    """Before: IndexError (an `internal` reply, a traceback at serve start)."""
    seq = useq.MDASequence(axis_order="cz", time_plan={"interval": 0, "loops": 5})
    assert list(iter_events(seq, 2)) == list(seq) == []


@pytest.mark.parametrize(("data", "message"), [
    ({"axis_order": "pcz", "time_plan": {"interval": 0, "loops": 3},
      "stage_positions": [{"x": 0, "y": 0}, {"x": 50, "y": 0}]},
     r"^sequence\.axis_order: 'pcz' leaves out 't', so time_plan would be ignored; add 't' "
     r"to axis_order or remove time_plan$"),
    ({"axis_order": "cz", "time_plan": {"interval": 0, "loops": 3}}, r"'cz' leaves out 't'"),
    ({"axis_order": "tcz", "stage_positions": [{"x": 0, "y": 0}, {"x": 50, "y": 0}]},
     r"'tcz' leaves out 'p', so stage_positions would be ignored"),
    ({"axis_order": "tpcz", "grid_plan": {"rows": 2, "columns": 2}},
     r"'tpcz' leaves out 'g', so grid_plan would be ignored"),
    ({"axis_order": "tpgz", "channels": ["DAPI"]}, r"leaves out 'c', so channels would be"),
    ({"axis_order": "tpgc", "z_plan": {"range": 2, "step": 1}},
     r"leaves out 'z', so z_plan would be ignored; add 'z' to axis_order or remove z_plan"),
    ({"stage_positions": [{"x": 0, "y": 0, "sequence": {
        "axis_order": "zc", "grid_plan": {"rows": 1, "columns": 2}}}]},
     r"^sequence\.stage_positions\[0\]\.sequence\.axis_order: 'zc' leaves out 'g', so "
     r"grid_plan would be ignored"),
], ids=["time", "time-only", "positions", "grid", "channels", "z", "position-grid"])
def test_a_plan_whose_axis_axis_order_leaves_out_is_refused(data: dict, message: str) -> None:
    """Before, useq silently dropped the plan (one time point, one place, no tiles)."""
    seq = useq.MDASequence.model_validate(data)
    with pytest.raises(ValueError, match=message):
        check_sequence(seq, data)


@pytest.mark.parametrize("data", [
    {"axis_order": "ptc", "time_plan": {"interval": 0, "loops": 3},
     "stage_positions": [(0, 0, 0), (10, 10, 0)], "channels": ["DAPI"]},
    {"axis_order": "pcz", "stage_positions": [{"x": 0, "y": 0}], "channels": ["DAPI"]},
    {"time_plan": {"interval": 0, "loops": 3}, "stage_positions": [
        {"x": 0, "y": 0, "sequence": {"axis_order": "gc", "grid_plan": {"rows": 1, "columns": 2}}}
    ]},
], ids=["time-not-outermost", "no-time-plan", "position-sequence-without-p"])
def test_plans_with_their_axes_in_axis_order_pass(data: dict) -> None:
    check_sequence(useq.MDASequence.model_validate(data), data)


def test_a_config_whose_axis_order_leaves_out_a_plan_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"acquisition\.sequence.*leaves out 'c'"):
        make_config(acquisition={"sequence": {"axis_order": "tz", "channels": ["DAPI"],
                                              "time_plan": {"interval": 0, "loops": 2}}})


async def test_a_start_whose_axis_order_leaves_out_its_time_plan_is_refused() -> None:
    """Before: `start` answered events 3 and the acquisition ran no frame."""
    cfg = make_config(publish={"pub_address": "tcp://127.0.0.1:48011",
                               "control_address": "tcp://127.0.0.1:48012"})
    async with Service(cfg) as svc:
        with pytest.raises(ControlError) as info:
            await control(svc, "start", sequence={
                "axis_order": "cz", "time_plan": {"interval": 0, "loops": 3}})
        assert info.value.code == "invalid_args"
        assert "sequence.axis_order: 'cz' leaves out 't'" in info.value.message
        assert (await control(svc, "status"))["state"] == "idle"


def test_serve_frames_on_a_sequence_without_t_in_axis_order_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, --frames 3 added a time plan useq ignored: one pass, exit 0."""
    seen = _seen_configs(monkeypatch)
    config = _config_with_sequence(
        tmp_path, "{axis_order: pcz, channels: [{config: DAPI, exposure: 5}], "
                  "stage_positions: [{x: 0, y: 0}, {x: 50, y: 0}]}")
    result = runner.invoke(app, ["serve", "-c", str(config), "--frames", "3"])
    text = _flat(result.output)
    assert result.exit_code == 2, text
    assert seen == []
    assert "Invalid value for '--frames'" in text and "axis_order 'pcz' leaves out 't'" in text

