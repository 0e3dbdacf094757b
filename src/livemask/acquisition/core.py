"""Open a Micro-Manager core from a ``.cfg`` file and describe it.

``open_core`` picks the core class: pymmcore-plus' ``UniMMCore`` for configs with
``#py `` lines (Python devices such as the simulated microscope, see the packaged
``simulated.cfg``, ``livemask.acquisition.simulated.SIMULATED_CFG``), ``CMMCorePlus`` for a
real rig's config, which needs an installed Micro-Manager (``mmcore install`` or
``MICROMANAGER_PATH``).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import re
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pymmcore_plus import CMMCorePlus, DeviceInitializationState, DeviceType
from pymmcore_plus.experimental.unicore import UniMMCore

from livemask.errors import AcquisitionError, ConfigError
from livemask.log import DropMissingInstallation, route_hardware_log

__all__ = [
    "CoreKind",
    "PythonDeviceCore",
    "check_channels",
    "check_exposures",
    "close_core",
    "describe_core",
    "devices_left_loaded",
    "exposure_limits",
    "open_core",
]

logger = logging.getLogger("livemask")
route_hardware_log()  # importing pymmcore_plus just replaced its logger's handlers

CoreKind = Literal["auto", "unicore", "cmmcore"]
_SIMULATED_MODULE = "livemask.acquisition.simulated"


class PythonDeviceCore(UniMMCore):
    """``UniMMCore`` that waits for its Python devices one after another.

    pymmcore-plus 0.18 waits for the Python devices of a type in parallel, on a new
    ``ThreadPoolExecutor`` per call, and its MDA engine calls ``waitForSystem`` before
    every event: each frame started (and joined) two threads, 0.3 ms on an idle machine and
    more when the cores are busy, where asking each device in turn takes microseconds. The
    result is the same: the call returns when no device of the type is busy, or raises
    ``TimeoutError`` after the core's timeout, per device.
    """

    def waitForDeviceType(self, devType: int) -> None:
        """Wait for the C++ devices of ``devType``, then each Python device in turn."""
        super(UniMMCore, self).waitForDeviceType(devType)
        for label in self.getLoadedDevicesOfType(devType):
            if self.isPyDevice(label):
                self.waitForDevice(label)
_PY_LINE = re.compile(r"^\s*#py ", re.MULTILINE)


@contextmanager
def _no_installation_error(python_devices: bool) -> Iterator[None]:
    """Leave out pymmcore-plus' "no compatible Micro-Manager installation" error while a
    core of Python devices (which need none) is made and loaded; as the service's log does
    (:class:`~livemask.log.HardwareLogFilter`), also for code that opens a core itself."""
    if not python_devices:
        yield
        return
    mm = logging.getLogger("pymmcore-plus")
    drop = DropMissingInstallation()
    mm.addFilter(drop)
    try:
        yield
    finally:
        mm.removeFilter(drop)


def open_core(cfg_path: str | Path, *, core: CoreKind = "auto") -> CMMCorePlus:
    """Load the Micro-Manager configuration ``cfg_path`` into a new core.

    ``core="auto"`` uses ``UniMMCore`` if the file has ``#py `` lines, else
    ``CMMCorePlus``. Raises :class:`ConfigError` if the file is missing or ``core`` is
    unknown, :class:`AcquisitionError` if loading fails.
    """
    path = Path(cfg_path).expanduser()
    _check_is_file(path)
    kind = _choose_kind(path, core)
    with _no_installation_error(kind == "unicore"):
        mmc: CMMCorePlus = PythonDeviceCore() if kind == "unicore" else CMMCorePlus()
        try:
            mmc.loadSystemConfiguration(str(path.resolve()))
        except Exception as exc:
            with suppress(Exception):
                close_core(mmc, timeout_s=0.0)
            hint = ("" if kind == "unicore"
                    else " and that Micro-Manager is installed (mmcore install)")
            raise AcquisitionError(
                f"could not load Micro-Manager config {str(path)!r} into "
                f"{type(mmc).__name__}: {str(exc).rstrip()}{_root_cause(exc)}; check "
                f"hardware.config_file (and hardware.core){hint}"
            ) from exc
    _OPEN_CORES.add(mmc)
    step = "checking the loaded devices"
    try:
        _check_initialized(mmc, path)
        _check_camera(mmc, path)
        _check_presets(mmc, path)
        step = "setting up the shutter (Core-Shutter)"
        _setup_shutter(mmc)
        step = "setting up the pixel size"
        _ensure_pixel_size(mmc)
        _check_simulated_pixel_size(mmc)
        step = "reading the core's state"
        if logger.isEnabledFor(logging.INFO):
            logger.info("opened %s from %s: %s", type(mmc).__name__, path, describe_core(mmc))
    except AcquisitionError:
        close_core(mmc, timeout_s=0.0)
        raise
    except Exception as exc:  # a device that raises: say where, with the rig's file
        close_core(mmc, timeout_s=0.0)
        raise AcquisitionError(
            f"Micro-Manager config {str(path)!r} loaded, but {step} failed: "
            f"{type(exc).__name__}: {str(exc).rstrip()}; check that device and its lines "
            "in hardware.config_file"
        ) from exc
    return mmc


def _root_cause(exc: BaseException) -> str:
    """``" (cause: ...)"`` naming the innermost ``__cause__`` of ``exc`` where its message
    does not say it already: UniMMCore reports a Python device module that fails to import
    as "not ... an importable python module", the missing package only in the chain."""
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text, message = str(cause).strip(), str(exc)
    missing = cause.name if isinstance(cause, ImportError) else None  # the module not found
    if cause is exc or text in message or (missing and repr(missing) in message):
        return ""
    return f" (cause: {type(cause).__name__}: {text})"


def _check_initialized(mmc: CMMCorePlus, path: Path) -> None:
    """Refuse a rig with a device whose initialisation failed: UniMMCore logs a Python
    device's exception and loads the rest, and every frame of that camera would be missing."""
    for label in mmc.getLoadedDevices():
        if (mmc.getDeviceType(label) != DeviceType.Core and mmc.getDeviceInitializationState(
                label) == DeviceInitializationState.InitializationFailed):
            raise AcquisitionError(
                f"device {label!r} of Micro-Manager config {str(path)!r} failed to "
                f"initialize: {_init_error(mmc, label)}; check the device (connected, powered, "
                "its driver or SDK installed) and its settings in hardware.config_file"
            )


def _init_error(mmc: CMMCorePlus, label: str) -> str:
    """The exception a Python device's ``initialize`` raised, which pymmcore-plus 0.18
    keeps (its ``_initialized_``), else where to find it."""
    devices = getattr(mmc, "_pydevices", None)
    try:
        state = devices[label]._initialized_ if devices is not None else None
    except Exception:  # another pymmcore-plus version, or a C++ device
        state = None
    if isinstance(state, BaseException):
        return f"{type(state).__name__}: {state}"
    return "see the log (pymmcore_plus) for its error"


def _check_is_file(path: Path) -> None:
    """``ConfigError`` naming hardware.config_file when ``path`` is not a file: a folder
    (naming a few of its .cfg files) or nothing at all."""
    if path.is_dir():
        found = sorted(itertools.islice(path.glob("*.cfg"), 100))[:3]
        inside = f" (it holds {', '.join(p.name for p in found)})" if found else ""
        raise ConfigError(
            f"Micro-Manager config file {str(path)!r} is a folder{inside}; set "
            "hardware.config_file to the .cfg file itself, e.g. "
            f"{str(found[0] if found else path / 'rig.cfg')!r}"
        )
    if not path.is_file():
        raise ConfigError(
            f"Micro-Manager config file {str(path)!r} does not exist; check "
            f"hardware.config_file{_moved_simulated_rig(path)}"
        )


def _moved_simulated_rig(path: Path) -> str:
    """For a missing ``simulated.cfg`` (configs and recordings made before it moved from
    hardware/ into the package): where the simulated rig's .cfg is now."""
    if path.name != "simulated.cfg":
        return ""
    from livemask.acquisition.simulated import SIMULATED_CFG

    return (" (the simulated rig's .cfg is part of the livemask package now: delete "
            f"hardware.config_file to use it, or set it to {str(SIMULATED_CFG)!r})")


def close_core(mmc: CMMCorePlus, *, timeout_s: float = 5.0) -> None:
    """Cancel a running MDA, unload all devices and stop the core's callback thread.

    Call it when done with a core (idempotent). pymmcore 12.5 delivers C++ callbacks on
    a thread of its own; if that thread still runs while Python shuts down, the process
    aborts with "FATAL: exception not rethrown". Cores from :func:`open_core` that are
    still open at exit are closed by an ``atexit`` hook.
    """
    if mmc.mda.is_running():
        mmc.mda.cancel()
        deadline = time.monotonic() + timeout_s
        while mmc.mda.is_running() and time.monotonic() < deadline:
            time.sleep(0.01)
    try:
        if mmc.mda.is_running():  # stuck in a device call: unloading would wait on it forever
            _LEFT_LOADED.add(mmc)
            logger.error(
                "the MDA runner is still blocked in a device call (e.g. a camera snap that "
                "never returns) %g s after the cancel: leaving the devices loaded. Check the "
                "hardware (power-cycle a hung camera) before the next start", timeout_s,
            )
        else:
            mmc.unloadAllDevices()
    finally:
        with suppress(Exception):
            super(CMMCorePlus, mmc).registerCallback(None)
        _OPEN_CORES.discard(mmc)


_OPEN_CORES: weakref.WeakSet[CMMCorePlus] = weakref.WeakSet()
_LEFT_LOADED: weakref.WeakSet[CMMCorePlus] = weakref.WeakSet()


def devices_left_loaded() -> bool:
    """Whether :func:`close_core` left a core's devices loaded (a device call was stuck).

    Python's exit would then hang: UniMMCore unloads its Python devices in a finalizer at
    exit, which waits for the stuck device's lock. ``livemask serve`` exits with
    ``os._exit`` instead, once everything else is closed."""
    return any(mmc.mda.is_running() for mmc in _LEFT_LOADED)


@atexit.register
def _close_open_cores() -> None:
    for mmc in list(_OPEN_CORES):
        with suppress(Exception):
            close_core(mmc, timeout_s=1.0)


def _choose_kind(path: Path, core: str) -> str:
    """Resolve ``"auto"`` from the file content; reject unknown kinds."""
    if core not in ("auto", "unicore", "cmmcore"):
        raise ConfigError(
            f"unknown core {core!r}; set hardware.core to 'auto', 'unicore' or 'cmmcore'"
        )
    has_py = bool(_PY_LINE.search(path.read_text(errors="replace")))
    if core == "cmmcore" and has_py:
        logger.warning(
            "%s has '#py ' lines (Python devices) that CMMCorePlus ignores; "
            "set hardware.core to 'unicore' or 'auto' to load them",
            path,
        )
    if core == "auto":
        return "unicore" if has_py else "cmmcore"
    return core


def _setup_shutter(mmc: CMMCorePlus) -> None:
    """Make autoshutter work with what is loaded.

    Without a shutter device the MDA fails closing shutter ``""``: autoshutter off.
    UniMMCore does not open a *Python* shutter around a snap, so autoshutter would
    give dark frames: turn it off and keep the shutter open instead.
    """
    shutter = mmc.getShutterDevice()
    if not shutter:
        mmc.setAutoShutter(False)
    elif isinstance(mmc, UniMMCore) and mmc.isPyDevice(shutter):
        mmc.setAutoShutter(False)
        mmc.setShutterOpen(True)


def _ensure_pixel_size(mmc: CMMCorePlus) -> None:
    """Activate the pixel size of a single preset the C++ core cannot match.

    The C++ core matches pixel-size presets against *its* devices only, so a preset
    bound to a Python device property (``ConfigPixelSize,Res,Camera,Binning,1``) is
    never current. With exactly one preset, redefine it without conditions.
    """
    if mmc.getPixelSizeUm() > 0:
        return
    presets = list(mmc.getAvailablePixelSizeConfigs())
    if len(presets) != 1:
        if isinstance(mmc, UniMMCore) or presets:
            # what the service measures in then is its own to say (a simulated rig's
            # world has a pixel size; a real rig measures in pixels)
            logger.warning(
                "the core has no active pixel size (%d presets); calibrate the pixel size "
                "in the rig's .cfg (PixelSize_um)",
                len(presets),
            )
        return
    preset = presets[0]
    size_um = mmc.getPixelSizeUmByID(preset)
    affine = mmc.getPixelSizeAffineByID(preset)
    mmc.deletePixelSizeConfig(preset)
    mmc.definePixelSizeConfig(preset)
    mmc.setPixelSizeUm(preset, size_um)
    mmc.setPixelSizeAffine(preset, list(affine))
    mmc.setPixelSizeConfig(preset)


def _check_camera(mmc: CMMCorePlus, path: Path) -> None:
    """Refuse a rig without a camera (every event would snap nothing, with only a warning
    from pymmcore-plus) or with a colour camera: the models segment one channel, so every
    frame would fail ("expected a 2-D image")."""
    camera = mmc.getCameraDevice()
    if not camera:
        raise AcquisitionError(
            f"Micro-Manager config {str(path)!r} sets no camera (Core-Camera is empty): "
            "load a camera device and set it with 'Property,Core,Camera,<label>' in "
            "hardware.config_file"
        )
    kind = mmc.getDeviceType(camera)
    if kind != DeviceType.Camera:
        raise AcquisitionError(
            f"Micro-Manager config {str(path)!r} sets Core-Camera to {camera!r}, a "
            f"{DeviceType(kind).name} device, not a camera: set 'Property,Core,Camera,"
            f"<label>' to one of {_labels(mmc, DeviceType.Camera)} in hardware.config_file"
        )
    components = mmc.getNumberOfComponents()
    if components > 1:
        raise AcquisitionError(
            f"camera {camera!r} delivers {components}-component (colour) images; livemask "
            "segments single-channel images: set the camera to a grey pixel type (e.g. its "
            "PixelType property) in hardware.config_file, or use a monochrome camera"
        )
    pixel_bytes = mmc.getBytesPerPixel()
    if pixel_bytes not in (1, 2, 4):  # pymmcore-plus cannot describe 64-bit grey images
        raise AcquisitionError(
            f"camera {camera!r} delivers {8 * pixel_bytes}-bit pixels; livemask takes 8-, "
            "16- and 32-bit grey images: set the camera to such a pixel type (e.g. its "
            "PixelType property) in hardware.config_file"
        )


def _labels(mmc: CMMCorePlus, kind: DeviceType) -> str:
    """The loaded devices of ``kind``, for a message (``none loaded`` where there is none)."""
    found = list(mmc.getLoadedDevicesOfType(kind))
    return ", ".join(repr(label) for label in found) if found else "none loaded"


def _check_presets(mmc: CMMCorePlus, path: Path) -> None:
    """Refuse a configuration preset that names a device not loaded (a typo in a
    ``ConfigGroup`` line): Micro-Manager loads it, then every use of its group fails,
    reading the current channel included."""
    loaded = set(mmc.getLoadedDevices())
    for group in mmc.getAvailableConfigGroups():
        for preset in mmc.getAvailableConfigs(group):
            for device, prop, value in mmc.getConfigData(group, preset):
                if device not in loaded:
                    raise AcquisitionError(
                        f"Micro-Manager config {str(path)!r}: preset {preset!r} of group "
                        f"{group!r} sets {device}-{prop} to {value!r}, but no device "
                        f"{device!r} is loaded (loaded: {', '.join(sorted(loaded))}); fix "
                        f"the 'ConfigGroup,{group},{preset},{device},...' line in "
                        "hardware.config_file"
                    )


def _check_simulated_pixel_size(mmc: CMMCorePlus) -> None:
    """Give the core the simulated world's pixel size (``simulation.pixel_size_um``): the
    images are rendered at it, so measurements and stage moves must use it too."""
    camera = mmc.getCameraDevice()
    if not camera or not mmc.getDeviceLibrary(camera).startswith(_SIMULATED_MODULE):
        return
    from livemask.acquisition.simulated.world import get_world

    world_um, core_um = get_world().pixel_size_um, mmc.getPixelSizeUm()
    if abs(world_um - core_um) <= 1e-6 * world_um:
        return
    preset = mmc.getCurrentPixelSizeConfig()
    if preset:
        mmc.setPixelSizeUm(preset, world_um)
        logger.info("simulated world: pixel size %.4g um (simulation.pixel_size_um) set on "
                    "the core's preset %r (the .cfg says %.4g um)", world_um, preset, core_um)
    else:
        logger.warning(
            "simulated world pixel size %.4g um differs from the core's %.4g um and the core "
            "has no active pixel size preset to set: stage moves will not match image shifts; "
            "make simulation.pixel_size_um and PixelSize_um in the .cfg agree",
            world_um,
            core_um,
        )


def _pymmcore_class_name(mmc: CMMCorePlus) -> str:
    """The pymmcore-plus class the core is or extends (``UniMMCore`` or ``CMMCorePlus``)."""
    return next(c.__name__ for c in type(mmc).__mro__ if c.__module__.startswith("pymmcore"))


def describe_core(mmc: CMMCorePlus) -> dict[str, Any]:
    """A JSON-ready summary of the core for status messages."""
    camera = mmc.getCameraDevice()
    group = mmc.getChannelGroup()
    info: dict[str, Any] = {
        "core": _pymmcore_class_name(mmc),
        "config_file": mmc.systemConfigurationFile() or "",
        "camera": camera,
        "image_shape": [mmc.getImageHeight(), mmc.getImageWidth()] if camera else None,
        "bit_depth": mmc.getImageBitDepth() if camera else None,
        "exposure_ms": mmc.getExposure() if camera else None,
        "pixel_size_um": mmc.getPixelSizeUm(),
        "xy_stage": mmc.getXYStageDevice(),
        "focus": mmc.getFocusDevice(),
        "autofocus": mmc.getAutoFocusDevice(),
        "slm": mmc.getSLMDevice(),
        "slms": list(mmc.getLoadedDevicesOfType(DeviceType.SLM)),
        "shutter": mmc.getShutterDevice(),
        "auto_shutter": mmc.getAutoShutter(),
        "channel_group": group,
        "channels": list(mmc.getAvailableConfigs(group)) if group else [],
        "channel": mmc.getCurrentConfig(group) if group else "",
        "python_devices": [
            label
            for label in mmc.getLoadedDevices()
            if isinstance(mmc, UniMMCore) and mmc.isPyDevice(label)
        ],
        "devices": [
            label for label in mmc.getLoadedDevices() if mmc.getDeviceType(label) != DeviceType.Core
        ],
    }
    return info


def check_channels(mmc: CMMCorePlus, channels: Iterable[Any], what: str) -> None:
    """Raise :class:`ConfigError` for a channel (``useq`` channel: ``group``, ``config``)
    whose preset the core does not define.

    pymmcore-plus would log a warning and acquire with whatever preset is set: a whole
    time-lapse in the wrong channel."""
    for channel in channels:
        group, preset = str(channel.group), str(channel.config)
        if not mmc.isGroupDefined(group):
            raise ConfigError(
                f"{what}: channel group {group!r} is not defined in hardware.config_file "
                f"(groups: {', '.join(mmc.getAvailableConfigGroups()) or 'none'})"
            )
        if not mmc.isConfigDefined(group, preset):
            raise ConfigError(
                f"{what}: channel {preset!r} is not a preset of group {group!r} "
                f"(presets: {', '.join(mmc.getAvailableConfigs(group)) or 'none'})"
            )


@dataclass(frozen=True)
class ExposureLimits:
    """The camera's ``Exposure`` property limits, read once when the core is opened."""

    camera: str
    lo: float
    hi: float


def exposure_limits(mmc: CMMCorePlus) -> ExposureLimits | None:
    """The current camera's exposure limits, or None if it has none.

    Read them while no acquisition runs: the call takes the camera's device lock, which a
    running (or hung) snap holds."""
    camera = mmc.getCameraDevice()
    if not camera or not mmc.hasPropertyLimits(camera, "Exposure"):
        return None
    return ExposureLimits(camera, mmc.getPropertyLowerLimit(camera, "Exposure"),
                          mmc.getPropertyUpperLimit(camera, "Exposure"))


def check_exposures(limits: ExposureLimits | None, exposures: Iterable[float], what: str) -> None:
    """Raise :class:`ConfigError` for an exposure outside the camera's ``Exposure`` property
    limits (when it has them): pymmcore-plus would log a warning and snap with the old one."""
    if limits is None:
        return
    for exposure in exposures:
        if not limits.lo <= exposure <= limits.hi:
            raise ConfigError(
                f"{what}: exposure {exposure:g} ms is outside the range of camera "
                f"{limits.camera!r}: {limits.lo:g}..{limits.hi:g} ms"
            )
