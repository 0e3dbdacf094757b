"""Checks of sequences, events and rules against the rig the service opened.

pymmcore-plus would only warn (or log the core's error) and acquire anyway, so these
refuse up front, with a :class:`ConfigError` naming what the rig lacks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import useq

from livemask.acquisition.sequence import check_plans_events, sequence_channels
from livemask.acquisition.source import FrameSource, MicroscopeSource
from livemask.config import ServiceConfig
from livemask.errors import ConfigError
from livemask.feedback.context import TRACK_FEATURES
from livemask.feedback.controller import BINNING
from livemask.feedback.spec import RuleSpec

if TYPE_CHECKING:
    from livemask.recording import Recorder

log = logging.getLogger("livemask")

def _position_properties(seq: useq.MDASequence) -> list[Any]:
    """The ``properties`` of ``seq``'s stage positions, their own sequences' included."""
    found: list[Any] = []
    for pos in seq.stage_positions:
        found.extend(pos.properties or ())
        if pos.sequence is not None:
            found.extend(_position_properties(pos.sequence))
    return found


def _z_planned(seq: useq.MDASequence, what: str) -> str | None:
    """What of ``seq`` moves z (its ``z_plan``, a position's ``z``, in positions' own
    sequences too), named for an error message, or None."""
    if seq.z_plan is not None:
        return f"{what}.z_plan"
    for i, pos in enumerate(seq.stage_positions):
        where = f"{what}.stage_positions[{i}]"
        if pos.z is not None:
            return f"{where}.z"
        if pos.sequence is not None and (inner := _z_planned(pos.sequence, f"{where}.sequence")):
            return inner
    return None


def _xy_planned(seq: useq.MDASequence, what: str) -> str | None:
    """What of ``seq`` moves the XY stage (its ``grid_plan``, a position's ``x`` or ``y``,
    in positions' own sequences too), named for an error message, or None."""
    if seq.grid_plan is not None:
        return f"{what}.grid_plan"
    for i, pos in enumerate(seq.stage_positions):
        where = f"{what}.stage_positions[{i}]"
        if pos.x is not None or pos.y is not None:
            return f"{where}.{'x' if pos.x is not None else 'y'}"
        if pos.sequence is not None and (
                inner := _xy_planned(pos.sequence, f"{where}.sequence")):
            return inner
    return None


def _autofocus_plans(seq: useq.MDASequence, what: str) -> list[tuple[str, Any]]:
    """``seq``'s autofocus plans (positions' own sequences' too), each with its name for an
    error message."""
    found: list[tuple[str, Any]] = []
    if seq.autofocus_plan is not None:
        found.append((f"{what}.autofocus_plan", seq.autofocus_plan))
    for i, pos in enumerate(seq.stage_positions):
        if pos.sequence is not None:
            found.extend(_autofocus_plans(
                pos.sequence, f"{what}.stage_positions[{i}].sequence"))
    return found


#: The feedback actions that can move the XY stage (a burst and a zstack when they centre).
_XY_ACTIONS = ("centre", "move", "burst", "zstack")


def _moves_xy(action: Any, kind: str) -> bool:
    """Whether ``action`` (an ``ActionSpec``) is a ``kind`` action that moves x/y."""
    spec = getattr(action, kind, None)
    if spec is None:
        return False
    return kind in ("centre", "move") or bool(getattr(spec, "centre", False))


#: How errors name the configured sequence when the config does not set it.
DEFAULT_SEQUENCE_NAME = (
    "livemask's default sequence (acquisition.sequence is not set; set it to a sequence for "
    "this rig, or give start a sequence)"
)


class RigOwner(Protocol):
    """What the checks read of the service, as it is at each check (the source, rig
    description and recorder are set during start-up)."""

    @property
    def config(self) -> ServiceConfig: ...

    @property
    def source(self) -> FrameSource | None: ...

    @property
    def core_info(self) -> dict[str, Any]: ...

    @property
    def recorder(self) -> Recorder | None: ...


class RigChecks:
    """The rig checks of one service: ConfigError for what its microscope cannot do."""

    def __init__(self, owner: RigOwner) -> None:
        self._owner = owner

    def check_enqueued(self, events: Sequence[useq.MDAEvent]) -> None:
        """ConfigError for ``enqueue``'s events: a roi while the service records, then
        what :meth:`check_on_rig`, :meth:`check_binning`, :meth:`check_focus`,
        :meth:`_check_events_xy_and_autofocus` and :meth:`check_rois` refuse."""
        if self._owner.recorder is not None and any(e.roi is not None for e in events):
            raise ConfigError(
                "events: a roi changes the frame shape, and a recording holds frames of one "
                "shape; record the new region in a service of its own (or without --record)"
            )
        properties = [p for e in events for p in e.properties or ()]
        self.check_on_rig(
            "events",
            [e.channel for e in events if e.channel is not None],
            [e.exposure for e in events if e.exposure is not None],
            properties,
        )
        self.check_binning("events", properties)  # as the roi above: one frame shape
        self.check_focus(next((f"events[{i}].z_pos" for i, e in enumerate(events)
                               if e.z_pos is not None), None))
        self._check_events_xy_and_autofocus(events)
        self.check_rois(events)

    def check_feedback_events(self, events: Sequence[useq.MDAEvent]) -> None:
        """ConfigError for a feedback action's channel preset the microscope lacks or an
        exposure outside its camera's limits (as ``enqueue`` checks; pymmcore-plus would
        only log it and take the frames with the settings in effect)."""
        self.check_on_rig(
            "feedback action",
            [e.channel for e in events if e.channel is not None],
            [e.exposure for e in events if e.exposure is not None],
        )
        if any(e.z_pos is not None for e in events):
            self.check_focus("feedback action: its z positions")
        if any(e.x_pos is not None or e.y_pos is not None for e in events):
            self.check_xy_stage("feedback action: its x/y positions")  # centre, move

    def _check_events_xy_and_autofocus(self, events: Sequence[useq.MDAEvent]) -> None:
        """:meth:`check_xy_stage` for enqueued events' x/y positions, :meth:`check_autofocus`
        for their hardware autofocus actions (``events[i]`` names the event)."""
        self.check_xy_stage(next(
            (f"events[{i}].{'x_pos' if e.x_pos is not None else 'y_pos'}"
             for i, e in enumerate(events) if e.x_pos is not None or e.y_pos is not None),
            None))
        self.check_autofocus([(f"events[{i}].action", e.action) for i, e in enumerate(events)
                              if isinstance(e.action, useq.HardwareAutofocus)])
        self.check_slm([(f"events[{i}].slm_image", e.slm_image) for i, e in enumerate(events)
                        if e.slm_image is not None])

    def check_slm(self, images: Sequence[tuple[str, Any]]) -> None:
        """ConfigError for an SLM image (``(name, image)``) that no SLM would show: none
        named (``device``) on a rig without Core-SLM, or a device the rig does not load.
        pymmcore-plus would log "No SLM device found" and take the frame without the
        pattern (a photostimulation that never happens)."""
        if not images or not isinstance(self._owner.source, MicroscopeSource):
            return
        slms = self._owner.core_info.get("slms") or []
        for where, image in images:
            device = getattr(image, "device", None)
            if device and device not in slms:
                raise ConfigError(
                    f"{where}.device: {device!r} is not an SLM of the rig (SLMs: "
                    f"{', '.join(slms) or 'none'}); give the label of its SLM, or leave "
                    "device out to use Core-SLM")
            if not device and self._owner.core_info.get("slm") == "":  # getSLMDevice()
                raise ConfigError(
                    f"{where}: the rig has no SLM (Core-SLM), so the pattern would not be "
                    "shown; set one in hardware.config_file, name a loaded SLM in its "
                    "device, or leave slm_image out")

    def check_on_rig(
        self, what: str, channels: Sequence[Any] = (), exposures: Sequence[float] = (),
        properties: Sequence[Any] = (),
    ) -> None:
        """ConfigError for a channel preset the microscope does not define, an exposure
        its camera's limits rule out, or a device property it cannot take (pymmcore-plus
        would warn and acquire anyway)."""
        if not isinstance(self._owner.source, MicroscopeSource) or not (
                channels or exposures or properties):
            return
        from livemask.acquisition.core import check_channels, check_exposures
        from livemask.acquisition.properties import check_properties

        check_channels(self._owner.source.core, channels, what)
        check_exposures(self._owner.source.exposure_limits, exposures, what)
        check_properties(self._owner.source.properties, properties, what)

    def check_rois(self, events: Sequence[useq.MDAEvent]) -> None:
        """ConfigError for an empty roi, or one beyond the camera's image at the binning in
        effect when its event runs: the binning now, or as the request's events set it (an
        event's own properties are set before its roi; pymmcore-plus would only log the
        core's error and image the old region)."""
        from livemask.acquisition.properties import binning_set

        binning = self._binning_now()
        for i, event in enumerate(events):
            binning = binning_set(event.properties, self._owner.core_info.get("camera")) or binning
            roi = event.roi
            if roi is None:
                continue
            shape = self._image_shape_binned(binning)
            where = (f"events[{i}].roi (offset_x {roi.offset_x}, offset_y {roi.offset_y}, "
                     f"width {roi.width}, height {roi.height})")
            if roi.width < 1 or roi.height < 1:
                raise ConfigError(f"{where} is empty; give a width and height of at least 1")
            if shape and (roi.offset_y + roi.height > shape[0]
                          or roi.offset_x + roi.width > shape[1]):
                raise ConfigError(
                    f"{where} goes beyond the camera's {shape[1]}x{shape[0]} (width x height) "
                    f"image{'' if binning is None else f' at binning {binning}'}; keep "
                    "offset + size within it"
                )

    def _binning_now(self) -> int | None:
        """The camera's binning factor now, as the core's property cache has it (no device
        call: a running snap holds the camera); None where not known."""
        from livemask.acquisition.properties import binning_factor

        camera = self._owner.core_info.get("camera")
        if not camera or not isinstance(self._owner.source, MicroscopeSource):
            return None
        if BINNING not in self._owner.source.properties.properties.get(camera, {}):
            return None
        try:
            return binning_factor(self._owner.source.core.getPropertyFromCache(camera, BINNING))
        except Exception:  # not in the cache: the ROI is checked against the image at open
            return None

    def _image_shape_binned(self, binning: int | None) -> tuple[int, int] | None:
        """The camera's full image (rows, cols) at ``binning``: its image at open, scaled
        by the binning then over ``binning`` (as opened where either is not known)."""
        from livemask.acquisition.properties import binned_shape

        shape = self._owner.core_info.get("image_shape")
        if not shape or not isinstance(self._owner.source, MicroscopeSource):
            return tuple(shape) if shape else None
        camera = self._owner.core_info.get("camera") or ""
        at_open = self._owner.source.properties.binning.get(camera)
        return binned_shape((int(shape[0]), int(shape[1])), at_open, binning)

    def check_sequence(
        self, seq: useq.MDASequence, what: str = "acquisition.sequence", *, events: bool = True
    ) -> None:
        """:meth:`check_on_rig` for the channels, channel exposures and stage positions'
        properties of ``seq`` (``what`` names it in errors); with ``events``, that it plans
        some (:func:`check_plans_events`)."""
        if events:
            try:
                check_plans_events(seq, what)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        channels = sequence_channels(seq)
        exposures = [c.exposure for c in channels if c.exposure is not None]
        properties = _position_properties(seq)
        self.check_on_rig(what, channels, exposures, properties)
        self.check_binning(what, properties)
        self.check_focus(_z_planned(seq, what))
        self.check_xy_stage(_xy_planned(seq, what))
        self.check_autofocus(_autofocus_plans(seq, what))

    def configured_sequence_name(self) -> str:
        """How errors name the config's sequence: ``acquisition.sequence`` where the config
        sets it, else :data:`DEFAULT_SEQUENCE_NAME` (not the user's: say whose it is)."""
        if "sequence" in self._owner.config.acquisition.model_fields_set:
            return "acquisition.sequence"
        return DEFAULT_SEQUENCE_NAME

    def check_configured_sequence(self) -> None:
        """The config's sequence against the rig at start-up, not at the first ``start``:
        one the config sets always; livemask's default only when autostart runs it (a rig
        without its 'DAPI' preset is fine for a service driven by ``start`` requests and
        ``enqueue``; a ``start`` without a sequence is checked then)."""
        acq = self._owner.config.acquisition
        if "sequence" in acq.model_fields_set or acq.autostart:
            self.check_sequence(acq.mda_sequence(), self.configured_sequence_name(),
                                        events=acq.autostart)

    def check_binning(self, what: str, properties: Sequence[Any]) -> None:
        """ConfigError, while the service records, for properties that set the camera's
        binning: its later frames would have another shape, which the recording rejects."""
        if not properties or not isinstance(self._owner.source, MicroscopeSource) or not (
                self._owner.recorder is not None or self._owner.config.record.enabled):
            return
        camera = self._owner.core_info.get("camera")  # as opened: no device call (a hung snap)
        for entry in properties:
            device, name = tuple(entry)[:2]
            if camera and device == camera and name == BINNING:
                raise ConfigError(
                    f"{what}: property {BINNING!r} of camera {camera!r} changes the frame "
                    "shape, and a recording holds frames of one shape: change binning between "
                    "runs, not while the service records"
                )

    def check_focus(self, where: str | None) -> None:
        """ConfigError for z positions (``where`` names them; None: there are none) on a
        rig without a focus device: pymmcore-plus would skip the moves and take every
        plane at one focus."""
        self._require_device(
            where, "focus", "the rig has no focus device, so z cannot move (every plane would "
            "be taken at the same focus); set a focus device (Core-Focus) in "
            "hardware.config_file, or leave z out")

    def check_xy_stage(self, where: str | None) -> None:
        """ConfigError for x/y positions or a grid (``where`` names them; None: there are
        none) on a rig without an XY stage: pymmcore-plus would skip the moves and take
        every position at the same place."""
        self._require_device(
            where, "xy_stage", "the rig has no XY stage, so x and y cannot move (every "
            "position would be imaged at the same place); set an XY stage (Core-XYStage) in "
            "hardware.config_file, or leave x/y (and grid plans) out")

    def _require_device(self, where: str | None, role: str, problem: str) -> None:
        """ConfigError ``where: problem`` when something (``where``; None: nothing) needs
        the rig's ``role`` device (a key of ``core_info``, as the core had it when the rig
        was opened: no device call) and the rig has none."""
        if where is None or not isinstance(self._owner.source, MicroscopeSource):
            return
        if self._owner.core_info.get(role) == "":
            raise ConfigError(f"{where}: {problem}")

    def check_autofocus(self, plans: Sequence[tuple[str, Any]]) -> None:
        """ConfigError for an autofocus plan or action (``(name, plan)``) on a rig without
        an autofocus device, or whose ``autofocus_device_name`` is no device of the rig:
        pymmcore-plus would skip the autofocus with a warning in its log (or fail it)."""
        if not plans or not isinstance(self._owner.source, MicroscopeSource):
            return
        devices = self._owner.core_info.get("devices") or []
        for where, plan in plans:
            problems = []
            if self._owner.core_info.get("autofocus") == "":  # as opened (getAutoFocusDevice())
                problems.append("the rig has no autofocus device, so the autofocus would be "
                                "skipped: set one (Core-AutoFocus) in hardware.config_file")
            name = getattr(plan, "autofocus_device_name", None)
            if name and name not in devices:
                problems.append(
                    f"autofocus_device_name {name!r} is not a device of the rig (devices: "
                    f"{', '.join(devices) or 'none'}): give the label of its autofocus "
                    "offset drive as hardware.config_file loads it")
            if problems:
                raise ConfigError(f"{where}: {'; '.join(problems)}; or leave the autofocus out")

    def check_rules(self, specs: Sequence[RuleSpec], what: str) -> None:
        """ConfigError for a declarative rule whose action names a channel preset the
        microscope does not define, or an ``exposure_ms`` outside its camera's limits
        (pymmcore-plus would warn and take the frames anyway), as ``enqueue`` checks, or
        moves the XY stage on a rig without one (every fire would be refused); the error
        names the rule (``what[i] ('name')``)."""
        for i, spec in enumerate(specs):
            where = f"{what}[{i}] ({spec.name!r})"
            params = [p for action in spec.actions
                      for p in action.model_dump().values() if isinstance(p, dict)]
            channels = [useq.Channel.model_validate({"config": p["channel"]})
                        for p in params if p.get("channel")]
            exposures = [float(p["exposure_ms"]) for p in params
                         if p.get("exposure_ms") is not None]
            self.check_on_rig(where, channels, exposures)
            self._warn_track_features(where, spec)
            moving = next((kind for action in spec.actions
                           for kind in _XY_ACTIONS if _moves_xy(action, kind)), None)
            if moving is not None and isinstance(self._owner.source, MicroscopeSource) and (
                    self._owner.core_info.get("xy_stage") == ""):
                raise ConfigError(
                    f"{where}: its {moving} action moves the XY stage, and the rig has none "
                    "(every fire would be refused); set an XY stage (Core-XYStage) in "
                    "hardware.config_file, or leave the action out (burst and zstack: "
                    "centre: false)")

    def _warn_track_features(self, where: str, spec: RuleSpec) -> None:
        """Warn where a rule tests the tracker's ids (``track_id``, ``parent_track_id``)
        while tracking is off: objects then have none, and the rule never fires."""
        if self._owner.config.tracking.enabled:
            return
        named = sorted(set(spec.object_features()) & set(TRACK_FEATURES))
        if named:
            log.warning("%s uses %s, which objects have only with tracking on "
                        "(tracking.enabled: true): as it is, the rule never fires",
                        where, " and ".join(named))
