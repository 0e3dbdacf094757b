"""Mistakes in a rig's Micro-Manager .cfg found when it is opened, each as an
AcquisitionError that says what to change (before: a raw ValueError or RuntimeError from the
core, and the core left open), on the real UniMMCore with the simulated devices."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from livemask.acquisition import core as core_module
from livemask.acquisition.core import open_core
from livemask.acquisition.simulated import SIMULATED_CFG
from livemask.acquisition.simulated.world import configure_world
from livemask.errors import AcquisitionError

DEVICES = "livemask.acquisition.simulated.devices"
FAULTY = textwrap.dedent('''
    """Devices that fail as real ones do, for a test's .cfg."""
    import numpy as np
    from livemask.acquisition.simulated.devices import SimCamera, SimShutter

    class ShutterOffline(SimShutter):
        def set_open(self, open):
            raise RuntimeError("shutter controller not responding on COM3")

    class Camera64(SimCamera):
        def dtype(self):
            return np.dtype(np.float64)
''')


@pytest.fixture
def rig_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on sys.path holding ``faulty_rig_devices``; a fresh simulated world."""
    (tmp_path / "faulty_rig_devices.py").write_text(FAULTY)
    monkeypatch.syspath_prepend(str(tmp_path))
    configure_world("nuclei", seed=0, sensor_shape=(64, 64))
    before = set(core_module._OPEN_CORES)
    yield tmp_path
    assert set(core_module._OPEN_CORES) == before  # a refused core is closed again


def _cfg(folder: Path, *edits: tuple[str, str]) -> Path:
    text = SIMULATED_CFG.read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    path = folder / "rig.cfg"
    path.write_text(text)
    return path


def test_a_core_camera_that_is_not_a_camera_is_named(rig_dir: Path) -> None:
    cfg = _cfg(rig_dir, ("#py Property,Core,Camera,Camera", "#py Property,Core,Camera,XY"))
    with pytest.raises(AcquisitionError, match=r"Core-Camera to 'XY', a XYStageDevice device, "
                       r"not a camera: set 'Property,Core,Camera,<label>' to one of 'Camera'"):
        open_core(cfg)


def test_a_preset_naming_a_device_not_loaded_is_named(rig_dir: Path) -> None:
    cfg = _cfg(rig_dir, ("#py ConfigGroup,Channel,GFP,Filter,Label,GFP",
                         "#py ConfigGroup,Channel,GFP,Filter,Label,GFP\n"
                         "#py ConfigGroup,Channel,RFP,Filtr,Label,RFP"))
    with pytest.raises(AcquisitionError, match=r"preset 'RFP' of group 'Channel' sets "
                       r"Filtr-Label to 'RFP', but no device 'Filtr' is loaded.*"
                       r"'ConfigGroup,Channel,RFP,Filtr,\.\.\.' line"):
        open_core(cfg)


def test_a_shutter_that_fails_at_set_up_is_an_acquisition_error(rig_dir: Path) -> None:
    cfg = _cfg(rig_dir,
               (f"pyDevice,Shutter,{DEVICES},SimShutter", "pyDevice,Shutter,faulty_rig_devices,"
                "ShutterOffline"),
               ("#py ConfigGroup,System,Startup,Shutter,State,1\n", ""))
    with pytest.raises(AcquisitionError, match=r"loaded, but setting up the shutter "
                       r"\(Core-Shutter\) failed: RuntimeError: shutter controller not "
                       r"responding on COM3; check that device"):
        open_core(cfg)


def test_a_64_bit_camera_is_refused_when_the_rig_opens(rig_dir: Path) -> None:
    """pymmcore-plus cannot describe 64-bit grey images: every start failed later with
    "Unsupported Pixel Format bit_depth=64"."""
    cfg = _cfg(rig_dir, (f"pyDevice,Camera,{DEVICES},SimCamera",
                         "pyDevice,Camera,faulty_rig_devices,Camera64"))
    with pytest.raises(AcquisitionError, match=r"'Camera' delivers 64-bit pixels; livemask "
                       r"takes 8-, 16- and 32-bit grey images"):
        open_core(cfg)
