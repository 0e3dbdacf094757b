"""Wrongly typed sequence values (``start`` and the config file) are refused as ``enqueue``
refuses them for events; a DEALER's empty frame is answered as an empty request."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import useq
import zmq

from livemask.acquisition.plan_input import validate_model
from livemask.acquisition.sequence import check_sequence
from livemask.config import load_config
from livemask.errors import ConfigError, ControlError
from livemask.service.app import Service
from livemask.transport import ControlServer
from tests.conftest import make_config
from tests.test_acquisition_end import control

#: The ports these tests bind (loopback only).
PORTS = range(48100, 48300)
DEADLINE_S = 10.0  # upper bound only: a reply normally comes in milliseconds


def free_addresses(n: int) -> list[str]:
    """``n`` loopback addresses with ports of :data:`PORTS` that were free a moment ago."""
    held: list[socket.socket] = []
    try:
        for port in PORTS:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            if len(held) == n:
                return [f"tcp://127.0.0.1:{h.getsockname()[1]}" for h in held]
    finally:
        for h in held:
            h.close()
    raise RuntimeError(f"no {n} free ports in {PORTS}")


def _check(data: dict[str, Any]) -> None:
    check_sequence(validate_model(useq.MDASequence, data), data)


#: (sequence, the message naming its wrongly typed value): useq took each of them (true as
#: 1, "10" as 10, 2.0 loops as 2) and ran another acquisition than the one given.
WRONG = [
    ({"channels": [{"config": "DAPI", "exposure": True}]},
     r"sequence\.channels\[0\]\.exposure: expected a number, got true"),
    ({"channels": [{"config": "DAPI", "exposure": "10"}]},
     r'sequence\.channels\[0\]\.exposure: expected a number, got "10"'),
    ({"time_plan": {"interval": 0.1, "loops": "2"}},
     r'sequence\.time_plan\.loops: expected an integer, got "2"'),
    ({"time_plan": {"interval": 0.1, "loops": 2.0}},
     r"sequence\.time_plan\.loops: expected an integer, got 2\.0"),
    ({"time_plan": {"interval": True, "loops": 2}},
     r"sequence\.time_plan\.interval: expected a number of seconds, .* got true"),
    ({"stage_positions": [{"x": "100", "y": True}]},
     r'stage_positions\[0\]\.x: expected a number, got "100"; '
     r"sequence\.stage_positions\[0\]\.y: expected a number, got true"),
]

#: Deeper places: plans, phases, a position's own sequence, grid and well plate fields.
WRONG_DEEP = [
    ({"time_plan": {"interval": {"seconds": True}, "loops": 2}},
     r"time_plan\.interval\.seconds: expected a number, got true"),
    ({"time_plan": [{"interval": 1, "loops": 2}, {"interval": 1, "loops": True}]},
     r"time_plan\[1\]\.loops: expected an integer, got true"),
    ({"stage_positions": [{"x": 1, "y": 2, "sequence": {"grid_plan": {
        "rows": "2", "columns": 2}}}]},
     r"stage_positions\[0\]\.sequence\.grid_plan\.rows: expected an integer"),
    ({"stage_positions": [{"x": 0, "y": 0, "row": True}]},
     r"stage_positions\[0\]\.row: expected an integer, got true"),
    ({"grid_plan": {"rows": 2, "columns": 2, "overlap": [1, "5"]}},
     r'grid_plan\.overlap\[1\]: expected a number, got "5"'),
    ({"grid_plan": {"rows": 2, "columns": 2, "overlap": True}},
     r"grid_plan\.overlap: expected a number, got true"),
    ({"z_plan": {"absolute": [1, True]}}, r"z_plan\.absolute\[1\]: expected a number"),
    ({"z_plan": {"range": 4, "step": "1"}}, r'z_plan\.step: expected a number, got "1"'),
    ({"z_plan": {"range": 4, "step": 1, "go_up": "yes"}},
     r'z_plan\.go_up: expected true or false, got "yes"'),
    ({"channels": ["DAPI", {"config": "DAPI", "acquire_every": "2"}]},
     r'channels\[1\]\.acquire_every: expected an integer, got "2"'),
    ({"stage_positions": {"plate": "96-well", "a1_center_xy": [0, "1"],
                          "selected_wells": [[0], [0]]}},
     r'stage_positions\.a1_center_xy\[1\]: expected a number, got "1"'),
    ({"stage_positions": {"plate": "96-well", "a1_center_xy": [0, 0], "rotation": True}},
     r"stage_positions\.rotation: expected degrees, .* got true"),
]

#: The forms useq documents, and those the configs, docs and tests use.
RIGHT = [
    {"channels": ["DAPI", {"config": "DAPI", "exposure": 10, "z_offset": 1,
                           "acquire_every": 2, "do_stack": False}], "axis_order": "tpgcz"},
    {"time_plan": {"interval": 1, "loops": 2}},
    {"time_plan": {"interval": "0:00:01", "loops": 2}},
    {"time_plan": {"interval": "PT1S", "loops": 2}},
    {"time_plan": {"interval": {"seconds": 1, "milliseconds": 500}, "loops": 2}},
    {"time_plan": [{"interval": 1, "loops": 2}, {"interval": 0.5, "duration": 3}]},
    {"stage_positions": [{"x": 100, "y": 2.5, "z": 0, "row": 0, "col": 1, "sequence": {
        "grid_plan": {"rows": 1, "columns": 2, "overlap": 10}}}]},
    {"grid_plan": {"rows": 2, "columns": 2, "overlap": [10, 5.5], "relative_to": "center"}},
    {"grid_plan": {"num_points": 3, "max_width": 10, "max_height": 10, "start_at": 1,
                   "fov_width": 1, "fov_height": 1}},
    {"z_plan": {"absolute": [1, 2.5]}},
    {"stage_positions": {"plate": "96-well", "a1_center_xy": [0, 0],
                         "selected_wells": [[0], [0]]}},
    {"metadata": {"anything": True, "goes": "10"}, "time_plan": {"interval": 1, "loops": 2}},
    # a plate's rotation: useq converts an angle with its unit or a rotation matrix
    *({"stage_positions": {"plate": "96-well", "a1_center_xy": [0, 0], "rotation": r,
                           "selected_wells": 0}}
      for r in ("1.5deg", "0.05rad", "1.5°", [[1.0, -0.02], [0.02, 1.0]],
                [1.0, -0.02, 0.02, 1.0], 1.5)),
]


@pytest.mark.parametrize(("data", "message"), WRONG + WRONG_DEEP)
def test_a_sequence_value_of_the_wrong_json_type_is_named(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _check(data)


@pytest.mark.parametrize("data", RIGHT)
def test_the_documented_forms_of_sequence_values_stay_accepted(data: dict) -> None:
    _check(data)


def test_many_wrong_values_are_listed_ten_at_a_time() -> None:
    data = {"stage_positions": [{"x": True, "y": 0}] * 25}
    with pytest.raises(ValueError, match=r"stage_positions\[9\]\.x: .*; and 15 more$"):
        _check(data)


@pytest.mark.parametrize("value", ["true", "yes", "'10'"])
def test_a_config_file_sequence_value_of_the_wrong_type_is_an_error(
    tmp_path: Path, value: str
) -> None:
    """Before, ``exposure: true`` (or ``yes``) started the acquisition at 1 ms."""
    path = tmp_path / "service.yaml"
    path.write_text("acquisition:\n  sequence:\n    channels:\n"
                    f"      - {{config: DAPI, exposure: {value}}}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"acquisition\.sequence.*"
                       r"sequence\.channels\[0\]\.exposure: expected a number"):
        load_config(path)
    path.write_text("acquisition:\n  sequence:\n    time_plan: {interval: 1, loops: 3}\n"
                    "    channels:\n      - {config: DAPI, exposure: 10}\n", encoding="utf-8")
    assert load_config(path).acquisition.mda_sequence().channels[0].exposure == 10.0


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    pub, ctl = free_addresses(2)
    publish = {"pub_address": pub, "control_address": ctl}
    async with Service(make_config(publish=publish)) as svc:
        yield svc


async def test_start_refuses_sequence_values_of_the_wrong_json_type(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, each was answered ``started`` (``exposure: true`` ran its frames at 1 ms),
    while ``enqueue`` refused the same values in events. The checks run off the event loop
    (100,000 stage positions took seconds there, status and heartbeats stopped)."""
    import threading

    from livemask.service import commands

    checked_in: list[threading.Thread] = []
    real_check = commands.check_sequence

    def check(*args: Any, **kwargs: Any) -> None:
        checked_in.append(threading.current_thread())
        real_check(*args, **kwargs)

    monkeypatch.setattr(commands, "check_sequence", check)
    for sequence, message in WRONG:
        with pytest.raises(ControlError, match=rf"invalid sequence: .*{message}") as info:
            await control(service, "start", sequence=sequence)
        assert info.value.code == "invalid_args"
        assert not service.acquiring and service.pipeline.acquisition == 0
    right = {"time_plan": {"interval": "0:00:00", "loops": 2},
             "channels": [{"config": "DAPI", "exposure": 10}]}
    assert (await control(service, "start", sequence=right))["started"] is True
    assert checked_in and threading.main_thread() not in checked_in


@pytest.fixture
async def server() -> AsyncIterator[ControlServer]:
    async def echo(cmd: str, args: dict[str, Any]) -> Any:
        return {"cmd": cmd, **args}

    srv = ControlServer(free_addresses(1)[0], echo).start()
    task = asyncio.create_task(srv.serve())
    yield srv
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    srv.close()


async def test_an_empty_frame_is_answered_as_an_empty_request(
    server: ControlServer, raw_socket: Any
) -> None:
    """Before, a DEALER's empty frame got ``[b"", reply]`` (a delimiter it never sent)
    saying the message had more than one frame."""
    replies = []
    for kind in (zmq.DEALER, zmq.REQ):
        sock = raw_socket(kind, server.bound_address)
        await sock.send(b"")
        frames = await asyncio.wait_for(sock.recv_multipart(), DEADLINE_S)
        assert len(frames) == 1  # the reply alone: no envelope frame comes back
        replies.append(json.loads(frames[0]))
        await sock.send(b'{"id": 1, "cmd": "status"}')  # the socket goes on as before
        (reply,) = await asyncio.wait_for(sock.recv_multipart(), DEADLINE_S)
        assert json.loads(reply) == {"id": 1, "ok": True, "result": {"cmd": "status"}}
    dealer, req = replies
    assert dealer == req and dealer["error"]["code"] == "bad_json"


def test_a_well_plate_sequence_as_useq_dumps_it_is_accepted() -> None:
    """Before, ``ControlClient.start`` of a well plate sequence (sent as useq's JSON dump,
    whose well points position has ``grid_row: null``) was refused: "grid_row: unknown
    field (did you mean 'rows'?)"."""
    seq = useq.MDASequence(stage_positions=useq.WellPlatePlan(
        plate=96, a1_center_xy=(0, 0), selected_wells=[[0], [0]]))
    _check(seq.model_dump(mode="json"))
    with pytest.raises(ValueError, match=r"grid_plan\.grid_row: unknown field"):
        _check({"grid_plan": {"grid_row": 2, "grid_col": 2}})  # still a typo with a value
