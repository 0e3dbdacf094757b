"""What a rig lacks or cannot do is refused up front: x/y and grids without an XY stage,
autofocus without an autofocus device, a device whose initialisation failed, a device module
that fails to import; a failed Z move labels the frame with a read-back Z more than 0.05 µm off;
livemask's default sequence is checked against the rig only when it is used."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import useq

from livemask.acquisition.core import close_core, open_core
from livemask.acquisition.simulated.devices import SimCamera, SimZStage
from livemask.config import parse_config
from livemask.errors import AcquisitionError, ConfigError, ControlError
from livemask.service.app import Service
from tests.conftest import make_config
from tests.test_service import control, enqueue_and_watch

SIM = "livemask.acquisition.simulated.devices"
NO_XY = "the rig has no XY stage.*Core-XYStage.*hardware\\.config_file, or leave x/y"
NO_AF = "the rig has no autofocus device.*Core-AutoFocus"


class FailingCamera(SimCamera):
    """The simulated camera whose vendor SDK does not find it."""

    def initialize(self) -> None:
        raise RuntimeError("Andor SDK: camera not found on USB bus (error 12)")

    def snap(self, buffer: np.ndarray) -> Mapping[str, str]:
        raise RuntimeError("camera handle is not open")


def _rig(
    tmp_path: Path, *, xy: bool = True, channels: bool = True,
    camera: str = f"{SIM},SimCamera", name: str = "rig.cfg",
) -> str:
    """A .cfg of the simulated rig, without the XY stage or the channel group if asked."""
    lines = [
        f"#py pyDevice,Camera,{camera}",
        f"#py pyDevice,Z,{SIM},SimZStage",
        f"#py pyDevice,Shutter,{SIM},SimShutter",
        f"#py pyDevice,Filter,{SIM},SimFilterWheel",
        *([f"#py pyDevice,XY,{SIM},SimXYStage"] if xy else []),
        "#py Property,Core,Initialize,1",
        "#py Property,Core,Camera,Camera",
        *(["#py Property,Core,XYStage,XY"] if xy else []),
        "#py Property,Core,Focus,Z",
        "#py Property,Core,Shutter,Shutter",
        "#py Property,Core,AutoShutter,0",
        *(["#py ConfigGroup,Channel,DAPI,Filter,Label,DAPI",
           "#py Property,Core,ChannelGroup,Channel"] if channels else []),
        "#py ConfigGroup,System,Startup,Shutter,State,1",
        "#py ConfigPixelSize,Res10x,Camera,Binning,1",
        "#py PixelSize_um,Res10x,0.65",
    ]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _config(cfg_file: str, **sections: Any) -> Any:
    simulation = {"truth": False, "seed": 3, "sensor_shape_px": [128, 128]}
    return make_config(hardware={"config_file": cfg_file}, simulation=simulation, **sections)


# ------------------------------------------------------------------ 1: no XY stage
async def test_xy_positions_and_grids_are_refused_on_a_rig_without_an_xy_stage(
    tmp_path: Path,
) -> None:
    """pymmcore-plus skips XY moves without a word when no XY stage is set: every position
    and grid tile was the same field, published as different places."""
    grid = {"rows": 2, "columns": 2, "fov_width": 50.0, "fov_height": 50.0}
    async with Service(_config(_rig(tmp_path, xy=False))) as svc:
        for args, where in (
            ({"stage_positions": [{"z": 0.0}, {"x": 500.0, "y": 500.0}]},
             r"stage_positions\[1\]\.x"),
            ({"grid_plan": grid}, r"sequence\.grid_plan"),
            ({"stage_positions": [{"sequence": {"grid_plan": grid}}]},
             r"stage_positions\[0\]\.sequence\.grid_plan"),
        ):
            with pytest.raises(ControlError, match=rf"invalid_args.*{where}: {NO_XY}"):
                await control(svc, "start", sequence={"channels": ["DAPI"], **args})
        with pytest.raises(ControlError, match=rf"events\[1\]\.y_pos: {NO_XY}"):
            await control(svc, "enqueue", events=[{}, {"y_pos": 10.0}])
        assert (await control(svc, "status"))["acquisitions_finished"] == 0
        # z alone still runs: the rig has a focus drive
        frames, _ = await enqueue_and_watch(svc, [{"z_pos": 2.0}])
        assert [f["position"]["z_um"] for f in frames] == [pytest.approx(2.0)]
    cfg = _config(_rig(tmp_path, xy=False), acquisition={
        "sequence": {"stage_positions": [{"x": 0.0, "y": 0.0}]}})
    with pytest.raises(ConfigError, match=rf"acquisition\.sequence\.stage_positions\[0\]\.x: "
                       rf"{NO_XY}"):
        async with Service(cfg):
            pass


async def test_feedback_moves_are_refused_on_a_rig_without_an_xy_stage(tmp_path: Path) -> None:
    """A rule whose action moves x/y (move, centre, a centring burst or zstack) is refused
    when the rules load, in the config and by the ``rules`` command: before, it was taken
    and then every fire was refused with advice (give stage positions) the rig refuses
    (review). Events with x/y that a feedback action makes are refused too (the engine's
    ``check_events``: ``invalid_action``), as a channel the rig lacks is."""
    when = {"values": [{"path": "summary.count", "ge": 0}]}
    moving = {"move": {"x_um": 100.0, "y_um": 0.0}}
    cfg = _config(_rig(tmp_path, xy=False),
                  feedback={"rules": [{"name": "go", "when": when, "action": moving}]})
    with pytest.raises(ConfigError, match=r"feedback\.rules\[0\] \('go'\): its move action "
                       r"moves the XY stage, and the rig has none.*Core-XYStage"):
        async with Service(cfg):
            pass
    still = {"name": "still", "when": when, "action": {"burst": {"frames": 2, "centre": False}}}
    cfg = _config(_rig(tmp_path, xy=False), feedback={"rules": [still]})
    async with Service(cfg) as svc:  # a burst that does not centre needs no XY stage
        for action, kind in ((moving, "move"), ({"burst": {"frames": 2}}, "burst"),
                             ({"centre": {}}, "centre"),
                             ({"zstack": {"range_um": 2, "step_um": 1, "centre": True}},
                              "zstack")):
            with pytest.raises(ControlError, match=rf"invalid_args.*rules\[1\] \('new'\): "
                               rf"its {kind} action moves the XY stage"):
                await control(svc, "rules", rules=[
                    still, {"name": "new", "when": when, "action": action}])
        with pytest.raises(ConfigError, match=rf"feedback action: its x/y positions: {NO_XY}"):
            svc.rig_checks.check_feedback_events([useq.MDAEvent(x_pos=100.0, y_pos=0.0)])


# ------------------------------------------------------------------ 2: failed Z move
async def test_a_failed_z_move_within_two_um_gives_the_read_back_z_and_a_mismatch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The 2 µm tolerance is for XY read-back noise; a z-stack of 1 µm steps whose drive
    failed was labelled with the planes it never reached, and nothing was reported."""
    real_move = SimZStage.set_position_um

    def stuck_above_zero(self: SimZStage, z: float) -> None:
        if z > 0:
            raise RuntimeError("Z drive serial timeout")
        real_move(self, z)

    monkeypatch.setattr(SimZStage, "set_position_um", stuck_above_zero)
    async with Service(make_config()) as svc:
        frames, events = await enqueue_and_watch(svc, [{"z_pos": z} for z in (0.0, 1.0)])
    assert [f["position"]["z_um"] for f in frames] == [pytest.approx(0.0)] * 2
    (mismatch,) = [e for e in events if e["kind"] == "stage_mismatch"]
    assert mismatch["commanded"] == {"z_um": 1.0}
    assert mismatch["read"] == {"z_um": pytest.approx(0.0)}


# ------------------------------------------------------------------ 3: failed initialisation
def test_a_device_whose_initialisation_failed_is_refused_with_its_error(tmp_path: Path) -> None:
    """UniMMCore logs the exception and loads the rest: the service served with every frame
    missing."""
    cfg = _rig(tmp_path, camera="tests.test_rig_checks,FailingCamera")
    with pytest.raises(AcquisitionError, match=r"device 'Camera' of Micro-Manager config .* "
                       r"failed to initialize: RuntimeError: Andor SDK: camera not found"):
        open_core(cfg)


def test_pymmcore_plus_module_loggers_reach_our_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The device's traceback is logged on ``pymmcore_plus.experimental...`` (underscore),
    which went to stderr, not to livemask's log (file)."""
    from livemask.log import route_hardware_log

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    monkeypatch.setattr(logging.getLogger("livemask"), "handlers", [Keep()])
    for name in ("pymmcore-plus", "pymmcore_plus"):  # as they were, after the test
        theirs = logging.getLogger(name)
        for attr in ("handlers", "filters"):
            monkeypatch.setattr(theirs, attr, list(getattr(theirs, attr)))
        monkeypatch.setattr(theirs, "propagate", theirs.propagate)
        monkeypatch.setattr(theirs, "level", theirs.level)
    monkeypatch.delenv("LIVEMASK_MM_LOG_LEVEL", raising=False)
    route_hardware_log()
    core = None
    with contextlib.suppress(AcquisitionError):
        core = open_core(_rig(tmp_path, camera="tests.test_rig_checks,FailingCamera"))
    if core is not None:
        close_core(core)
    assert any("Failed to initialize device 'Camera'" in r.getMessage() and r.exc_info
               for r in records)


# ------------------------------------------------------------------ 4: autofocus
async def test_autofocus_is_refused_on_a_rig_without_an_autofocus_device(
    tmp_path: Path,
) -> None:
    """pymmcore-plus skipped the autofocus with a warning in its log: a whole time-lapse
    without the focus correction it was planned with."""
    af = {"autofocus_device_name": "Z", "axes": ["t"], "autofocus_motor_offset": 10.0}
    async with Service(_config(_rig(tmp_path))) as svc:
        for args, where in (
            ({"autofocus_plan": af}, r"sequence\.autofocus_plan"),
            ({"stage_positions": [{"x": 0.0, "y": 0.0, "sequence": {"autofocus_plan": af}}]},
             r"stage_positions\[0\]\.sequence\.autofocus_plan"),
        ):
            with pytest.raises(ControlError, match=rf"invalid_args.*{where}: {NO_AF}"):
                await control(svc, "start", sequence={"time_plan": {"interval": 0.0,
                                                                    "loops": 2}, **args})
        action = {"type": "hardware_autofocus", "autofocus_device_name": "Z"}
        with pytest.raises(ControlError, match=rf"events\[0\]\.action: {NO_AF}"):
            await control(svc, "enqueue", events=[{"action": action}])
        # a device name the rig does not have is named too (checked also where the rig has
        # an autofocus device: no Python autofocus device exists to load one here)
        svc.core_info = {**svc.core_info, "autofocus": "PFS"}
        with pytest.raises(ControlError, match=r"autofocus_plan: autofocus_device_name "
                           r"'PFSOffset' is not a device of the rig \(devices: .*'?Z"):
            await control(svc, "start", sequence={
                "time_plan": {"interval": 0.0, "loops": 2},
                "autofocus_plan": {**af, "autofocus_device_name": "PFSOffset"}})
        assert (await control(svc, "status"))["acquisitions_finished"] == 0
    cfg = _config(_rig(tmp_path), acquisition={"sequence": {
        "time_plan": {"interval": 0.0, "loops": 2}, "autofocus_plan": af}})
    with pytest.raises(ConfigError, match=rf"acquisition\.sequence\.autofocus_plan: {NO_AF}"):
        async with Service(cfg):
            pass


# ------------------------------------------------------------------ 5a: broken device module
def test_a_device_module_that_fails_to_import_names_the_missing_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """UniMMCore says the module is "not ... an importable python module"; the package it
    could not import was only in the exception chain."""
    (tmp_path / "lm_test_brokendev.py").write_text("import andor_sdk3_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _rig(tmp_path, camera="lm_test_brokendev,Cam")
    with pytest.raises(AcquisitionError, match=r"'lm_test_brokendev' is not a known .*\(cause: "
                       r"ModuleNotFoundError: No module named 'andor_sdk3_missing'\)"):
        open_core(cfg)


def test_a_missing_device_module_is_not_named_twice(tmp_path: Path) -> None:
    cfg = _rig(tmp_path, camera="lm_test_no_such_module,Cam")
    with pytest.raises(AcquisitionError) as info:
        open_core(cfg)
    assert "cause:" not in str(info.value) and "lm_test_no_such_module" in str(info.value)


# ------------------------------------------------------------------ 5b: the default sequence
def _default_sequence_config(cfg_file: str, **acquisition: Any) -> Any:
    """A config that does not set acquisition.sequence (make_config always does)."""
    return parse_config({
        "hardware": {"config_file": cfg_file},
        "simulation": {"truth": False, "seed": 3, "sensor_shape_px": [128, 128]},
        "acquisition": {"mode": "synchronized", **acquisition},
        "publish": {"pub_address": "tcp://127.0.0.1:*", "control_address": "tcp://127.0.0.1:*",
                    "heartbeat_s": 0.2},
    })


async def test_the_default_sequence_is_checked_only_when_it_is_used(tmp_path: Path) -> None:
    """Before, a rig without the default's 'DAPI' preset failed to start even with
    autostart off, blaming hardware.config_file for a sequence the user never gave."""
    rig = _rig(tmp_path, channels=False)
    async with Service(_default_sequence_config(rig, autostart=False)) as svc:
        with pytest.raises(ControlError, match=r"invalid_args.*livemask's default sequence "
                           r"\(acquisition\.sequence is not set.*\): channel group 'Channel'"):
            await control(svc, "start")
        frames, _ = await enqueue_and_watch(svc, [{}])  # the rig itself works
        assert len(frames) == 1
    with pytest.raises(ConfigError, match=r"^livemask's default sequence \(acquisition"):
        async with Service(_default_sequence_config(rig, autostart=True)):
            pass
    # a sequence the config gives is still checked at start-up, named as the user's
    given = {"time_plan": {"interval": 0.0, "loops": 2}, "channels": ["DAPI"]}
    with pytest.raises(ConfigError, match=r"^acquisition\.sequence: channel group 'Channel'"):
        async with Service(_default_sequence_config(rig, autostart=False, sequence=given)):
            pass



# ------------------------------------------------------------------ s25: SLM
async def test_an_slm_image_is_refused_on_a_rig_without_an_slm() -> None:
    """pymmcore-plus logged "No SLM device found" and took the frame without the pattern:
    a photostimulation that silently never happened (hardware and client hunts)."""
    async with Service(make_config()) as svc:
        assert svc.core_info["slm"] == ""  # the simulated rig has none
        image = {"data": [[0, 1], [1, 0]]}
        with pytest.raises(ControlError, match=r"invalid_args.*events\[1\]\.slm_image: the rig "
                           r"has no SLM.*Core-SLM"):
            await control(svc, "enqueue", events=[{}, {"slm_image": image}])
        # a device named: it must be an SLM the rig loads (the camera is none)
        with pytest.raises(ControlError, match=r"events\[0\]\.slm_image\.device: 'Camera' is "
                           r"not an SLM of the rig \(SLMs: none\)"):
            await control(svc, "enqueue", events=[{"slm_image": {**image, "device": "Camera"}}])
        assert not svc.acquiring and svc.acquisitions_finished == 0
        # a rig that loads an SLM but sets no Core-SLM takes an image that names it (review)
        svc.core_info = {**svc.core_info, "slms": ["SLM1"]}
        svc.rig_checks.check_slm([("events[0].slm_image",
                                   useq.SLMImage(data=[[0, 1]], device="SLM1"))])
