"""Control commands: validated arguments and dispatch to the service.

Each command has a pydantic model of its arguments (extra fields forbidden), so a bad
request gets an ``invalid_args`` reply naming the field. Handlers raise
:class:`~livemask.errors.CommandError` for requests that are valid but cannot be done now.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import TYPE_CHECKING, Annotated, Any

import useq
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, ValidationError

from livemask.acquisition.feed import SERVICE_ACTION_PREFIX
from livemask.acquisition.mode import Mode
from livemask.acquisition.plan_input import check_input, validate_model
from livemask.acquisition.sequence import check_sequence
from livemask.config import int_out_of_range
from livemask.errors import AcquisitionError, CommandError, ConfigError
from livemask.feedback.context import FEEDBACK_INDEX_KEY
from livemask.feedback.spec import MAX_RULES, RuleSpec
from livemask.protocol import format_validation_error, nested_too_deeply

if TYPE_CHECKING:
    from livemask.acquisition.replay import ReplaySource
    from livemask.service.app import Service

log = logging.getLogger("livemask")


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoArgs(_Args):
    """Commands without arguments."""


class StartArgs(_Args):
    """``start``: a useq.MDASequence (JSON); the config's sequence when omitted."""

    sequence: dict[str, Any] | None = None


#: Most events one ``enqueue`` takes: validating them holds the event loop (≈ 35 µs each);
#: send more in several requests, or ``start`` a sequence.
MAX_ENQUEUE_EVENTS = 10_000


#: The MDA index axes (an enqueued event may add keys of its own to tag its frames, e.g.
#: ``ext`` as in examples/controller.py, but not ``fb``: it marks feedback actions' frames).
INDEX_AXES = ("t", "p", "c", "z", "g")
#: Event fields whose JSON types are checked strictly (useq would read ``true`` or ``"10"``
#: as a number): numbers, integers, strings and booleans as JSON gives them.
STRICT_EVENT_FIELDS = (
    "index", "exposure", "min_start_time", "x_pos", "y_pos", "z_pos", "channel", "roi",
    "keep_shutter_open", "reset_event_timer",
)


class EnqueueArgs(_Args):
    """``enqueue``: useq.MDAEvents (JSON) to run next."""

    events: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_ENQUEUE_EVENTS)


class SetArgs(_Args):
    """``set``: change settings while running."""

    exposure_ms: Annotated[float, Strict()] | None = Field(default=None, gt=0, le=60_000)
    mode: Mode | None = None


class RulesArgs(_Args):
    """``rules``: list the feedback rules; optionally replace them or switch some on/off."""

    rules: list[dict[str, Any]] | None = Field(
        default=None, max_length=MAX_RULES,
        description=f"new rule list (feedback.rules entries, at most {MAX_RULES}); [] removes all",
    )
    enabled: dict[str, StrictBool] | None = Field(
        default=None, description="rule name -> on/off"
    )


class StopArgs(_Args):
    """``stop``: the running acquisition; with ``acquisition``, only if it is that one."""

    acquisition: Annotated[int, Strict()] | None = Field(
        default=None, ge=1,
        description="the number of the acquisition to stop (as in acquisition_started)",
    )


class SnapshotArgs(_Args):
    """``snapshot``: the latest results; ``arrays`` adds base64 image and labels."""

    arrays: StrictBool = False  # true/false only: "no" or "false" read as true before


def _parse(
    model: type[BaseModel], data: dict[str, Any], what: str, prefix: str,
    fields: str = "", empty: str | None = None,
) -> Any:
    """Validate ``data``; an invalid_args error names every wrong field (``fields`` before
    each path; ``empty``: the label of an error of the whole value, None: none). A
    library's own error names ``what`` unless ``prefix`` already ends with it."""
    try:
        return validate_model(model, data)
    except ValidationError as exc:
        problems = format_validation_error(exc, empty=empty, prefix=fields)
        raise CommandError("invalid_args", f"{prefix}{problems}") from None
    except ValueError as exc:  # a library's own validator failed (validate_model)
        named = "" if prefix.endswith(f"{what}: ") else f"{what}: "
        raise CommandError("invalid_args", f"{prefix}{named}{exc}") from None


def _validate(model: type[_Args], args: dict[str, Any], cmd: str) -> Any:
    """The command's arguments, named ``args.<name>`` (``rules: args.rules: ...``, not
    ``rules: rules: ...``)."""
    return _parse(model, args, "args", f"{cmd}: ", fields="args.", empty="args")


def _useq(model: type[BaseModel], data: dict[str, Any], what: str) -> Any:
    """``data`` as ``model``; errors ``invalid <what>: <field>: ...``, one of the whole
    value ``invalid <what>: ...`` (not ``invalid rules[0]: rules[0]: ...``)."""
    return _parse(model, data, what, f"invalid {what}: ")


def _checked_sequence(data: dict[str, Any]) -> useq.MDASequence:
    """The ``sequence`` of a ``start`` request, validated and checked (invalid_args)."""
    seq: useq.MDASequence = _useq(useq.MDASequence, data, "sequence")
    try:
        check_sequence(seq, data)
    except ValueError as exc:
        raise CommandError("invalid_args", f"invalid sequence: {exc}") from None
    return seq


def _check_event_types(data: dict[str, Any], what: str) -> None:
    """invalid_args naming each field of an event (JSON ``data``, already validated and
    checked for finite numbers) of the wrong JSON type: a boolean or a string where a
    number goes, a fraction where an integer goes."""
    fields = {k: data[k] for k in STRICT_EVENT_FIELDS if k in data}
    try:
        useq.MDAEvent.model_validate_json(json.dumps(fields), strict=True)
    except ValidationError as exc:
        problems = format_validation_error(exc, empty=what, prefix=f"{what}.", with_input=True)
        raise CommandError("invalid_args", f"invalid {problems}") from None


def _check_index(event: useq.MDAEvent, what: str) -> None:
    """invalid_args for the index key ``fb`` (its frames would pass for a feedback action's:
    rules for overview frames would skip them), or a negative index."""
    for key, value in event.index.items():
        if key == FEEDBACK_INDEX_KEY:
            raise CommandError(
                "invalid_args",
                f"invalid {what}.index.{key}: reserved for the frames of feedback actions; "
                f"use the axes {', '.join(INDEX_AXES)}, or a key of your own to tag the "
                "frames (e.g. ext)")
        if value < 0:
            raise CommandError(
                "invalid_args", f"invalid {what}.index.{key}: {value} is negative; give >= 0")


def _check_action(event: useq.MDAEvent, what: str) -> None:
    """invalid_args for a custom action named as the service's own events are: those are
    not counted against the pending-event limit nor reported as not run."""
    action = event.action
    if isinstance(action, useq.CustomAction) and action.name.startswith(SERVICE_ACTION_PREFIX):
        raise CommandError(
            "invalid_args",
            f"invalid {what}.action.name: {action.name!r}: names starting with "
            f"{SERVICE_ACTION_PREFIX!r} are reserved for the service's own events; choose "
            "another name")


def _encode_array(array: Any) -> dict[str, Any]:
    return {
        "dtype": array.dtype.str,
        "shape": list(array.shape),
        "data_b64": base64.b64encode(array.tobytes()).decode("ascii"),
    }


class CommandHandler:
    """Maps control commands to service actions."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._arrays_of: tuple[Any, dict[str, Any]] | None = None  # (frame, encoded arrays)
        self._commands = {
            "status": self.status,
            "start": self.start,
            "stop": self.stop,
            "enqueue": self.enqueue,
            "set": self.set,
            "snapshot": self.snapshot,
            "rules": self.rules,
        }

    async def __call__(self, cmd: str, args: dict[str, Any]) -> Any:
        """Dispatch one request."""
        handler = self._commands.get(cmd)
        if handler is None:
            known = ", ".join(sorted(self._commands))
            raise CommandError("unknown_command", f"unknown command {cmd!r}; known: {known}")
        # no command takes an integer beyond 64 bits: replies, events and the rig could not
        # carry it (a start with loops 10**20 used to run with no acquisition_started)
        problem = int_out_of_range(args, "args")
        # nor an argument nested deeper than events can echo (a start with a sequence 300
        # levels deep failed with internal, one 252 deep never got its acquisition_started)
        problem = problem or nested_too_deeply(args)
        if problem is not None:
            raise CommandError("invalid_args", f"{cmd}: {problem}")
        return await handler(args)

    async def status(self, args: dict[str, Any]) -> Any:
        """The status snapshot (same content as the ``status`` topic)."""
        _validate(NoArgs, args, "status")
        return self.service.status()

    async def start(self, args: dict[str, Any]) -> Any:
        """Start an acquisition (in a replay: the file's frames, as many as a sequence's
        time plan plans, at most the file's)."""
        a: StartArgs = _validate(StartArgs, args, "start")
        replay = self._replay()
        seq = None
        if a.sequence is not None:  # (seconds for 100,000 positions: off the event loop)
            seq = await asyncio.to_thread(_checked_sequence, a.sequence)
            if replay is not None:
                _check_replay_sequence(seq)
        if self.service.acquiring:
            raise CommandError("invalid_state", "an acquisition is running; send 'stop' first")
        await self.service.last_run_exited()
        try:
            events = self.service.start_acquisition(seq)
        except ConfigError as exc:  # e.g. a channel preset the microscope does not have
            raise CommandError("invalid_args", str(exc)) from None
        except AcquisitionError as exc:  # e.g. the last one's thread still exiting
            raise CommandError("invalid_state", str(exc)) from None
        if replay is not None:  # one frame per event, at most the file's
            events = min(events, replay.stack.frames)
        return {"started": True, "events": events,
                "acquisition": self.service.pipeline.acquisition}

    def _replay(self) -> ReplaySource | None:
        """The service's source where it replays stored frames, else None."""
        from livemask.acquisition.replay import ReplaySource

        source = getattr(self.service, "source", None)
        return source if isinstance(source, ReplaySource) else None

    async def stop(self, args: dict[str, Any]) -> Any:
        """Stop the running acquisition; with ``acquisition``, only if it is that one (a
        stop sent again, late, must not stop the next one another client started)."""
        a: StopArgs = _validate(StopArgs, args, "stop")
        svc = self.service
        was_running = svc.acquiring
        pipe = getattr(svc, "pipeline", None)
        number = (pipe.acquisition if pipe is not None else 0) or None  # running or last
        if a.acquisition is not None and a.acquisition != number:
            return {"stopped": False, "still_running": was_running, "acquisition": number}
        await svc.stop_acquisition()
        # still running: the runner is stuck in a device call (the log says which)
        reply = {"stopped": was_running, "still_running": svc.acquiring}
        return reply if a.acquisition is None else {**reply, "acquisition": number}

    async def enqueue(self, args: dict[str, Any]) -> Any:
        """Add events to the running acquisition, or start one made of them."""
        a: EnqueueArgs = _validate(EnqueueArgs, args, "enqueue")
        events = [
            _useq(useq.MDAEvent, e, f"events[{i}]") for i, e in enumerate(a.events)
        ]
        try:
            for i, (event, data) in enumerate(zip(events, a.events, strict=True)):
                check_input(event, data, f"events[{i}]")
        except ValueError as exc:
            raise CommandError("invalid_args", f"invalid {exc}") from None
        for i, (event, data) in enumerate(zip(events, a.events, strict=True)):
            _check_event_types(data, f"events[{i}]")
            _check_index(event, f"events[{i}]")
            _check_action(event, f"events[{i}]")
        try:
            return await self.service.enqueue(events)
        except ConfigError as exc:
            raise CommandError("invalid_args", str(exc)) from None
        except AcquisitionError as exc:
            raise CommandError("invalid_state", str(exc)) from None

    async def set(self, args: dict[str, Any]) -> Any:
        """Change exposure and/or mode."""
        a: SetArgs = _validate(SetArgs, args, "set")
        if a.exposure_ms is None and a.mode is None:
            raise CommandError("invalid_args", "set: give exposure_ms and/or mode")
        try:
            return await self.service.apply_settings(exposure_ms=a.exposure_ms, mode=a.mode)
        except AcquisitionError as exc:
            raise CommandError("invalid_state", str(exc)) from None
        except ValueError as exc:  # the camera refused the value
            raise CommandError("invalid_args", f"set: {exc}") from None

    async def snapshot(self, args: dict[str, Any]) -> Any:
        """Latest frame/labels/measurements and per-topic seq numbers, for late joiners."""
        a: SnapshotArgs = _validate(SnapshotArgs, args, "snapshot")
        svc = self.service
        pipe = svc.pipeline
        result: dict[str, Any] = {
            "latest": pipe.latest,
            "next_seq": svc.next_seq(),
            "status": svc.status(),
        }
        if a.arrays and pipe.last_analysed is not None:
            result["arrays"] = self._encoded_arrays(pipe.last_analysed)
        return result

    def _encoded_arrays(self, last: Any) -> dict[str, Any]:
        """The frame's base64 arrays, encoded once per frame however many clients ask
        (1.4 ms for a 512² frame, on the event loop)."""
        cached = self._arrays_of
        if cached is None or cached[0] is not last:
            encoded = {
                "frame_id": last.frame_id,
                "image": _encode_array(last.image),
                "labels": _encode_array(last.labels),
            }
            self._arrays_of = cached = (last, encoded)
        return cached[1]

    def _check_user_rules(self, specs: list[RuleSpec]) -> None:
        """Refuse ``use:`` rules the config file does not already name.

        A user rule imports and calls ``package.module:factory`` with ``params``: over the
        control channel that would let any client run code as the service's user."""
        allowed = {r.use for r in self.service.config.feedback.rules if r.use is not None}
        for i, spec in enumerate(specs):
            if spec.use is not None and spec.use not in allowed:
                raise CommandError(
                    "invalid_args",
                    f"rules[{i}]: use: {spec.use!r} is not in the config file's "
                    "feedback.rules; a user rule runs code in the service, so the control "
                    "channel may only use the factories named there (add a rule with it to "
                    f"the config and restart; allowed now: {sorted(allowed)})",
                )

    async def rules(self, args: dict[str, Any]) -> Any:
        """Feedback rules: list them, replace them, enable or disable some."""
        a: RulesArgs = _validate(RulesArgs, args, "rules")
        fb = self.service.feedback
        if fb is None:
            raise CommandError(
                "invalid_state", "feedback is off in this service (feedback.enabled: false)"
            )
        specs: list[RuleSpec] | None = None
        if a.rules is not None:
            specs = [_useq(RuleSpec, r, f"rules[{i}]") for i, r in enumerate(a.rules)]
            self._check_user_rules(specs)
            try:
                self.service.check_rules_on_rig(specs, "rules")
            except ConfigError as exc:
                raise CommandError("invalid_args", str(exc)) from None
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise CommandError("invalid_args", f"rules: names must be unique: {names}")
        # every name checked before anything changes: an error reply means nothing applied
        known = [s.name for s in specs] if specs is not None else [
            s.name for s in fb.engine.slots]
        unknown = [name for name in a.enabled or {} if name not in known]
        if unknown:
            raise CommandError(
                "invalid_args", f"rules: no rule named {unknown[0]!r}; known: {known}"
            )
        if specs is not None:
            try:
                fb.set_rules(specs)
            except ConfigError as exc:  # ("rules[0] ('w'): ..." names the argument already)
                named = str(exc).startswith("rules")
                raise CommandError("invalid_args", str(exc) if named else f"rules: {exc}") from None
        for name, on in (a.enabled or {}).items():
            fb.set_enabled(name, on)
        return fb.report()["rules"]


#: The parts of a sequence a replay cannot run (it plays the file's frames): field, name
_NOT_REPLAYED = (("channels", "channels"), ("stage_positions", "stage positions"),
                 ("z_plan", "a z plan"), ("grid_plan", "a grid plan"),
                 ("autofocus_plan", "an autofocus plan"))


def _check_replay_sequence(seq: useq.MDASequence) -> None:
    """invalid_args for a ``start`` sequence in a replay with parts it cannot run (channels,
    positions, z, grid, autofocus: they would be ignored); a time plan alone limits the
    frames played (its loops), and a warning says where its interval is not used."""
    parts = [(field, name) for field, name in _NOT_REPLAYED if getattr(seq, field)]
    if parts:
        names = " and ".join(name for _, name in parts)
        fields = ", ".join(f"sequence.{field}" for field, _ in parts)
        raise CommandError(
            "invalid_args",
            f"start: a replay plays the file's frames and cannot run a sequence's {names} "
            f"({fields}), which it would ignore; remove "
            f"{'it' if len(parts) == 1 else 'them'} (a time plan alone is taken: its loops "
            "limit the frames played), send start without a sequence, or run the sequence "
            "on a service that drives the microscope (livemask serve)")
    if _paced(seq.time_plan):
        log.warning("start in a replay: the time plan's interval is not used; frames play at "
                    "the replay's own pace (livemask replay --interval, else the recorded "
                    "timing), its loops limit how many")


def _paced(plan: Any) -> bool:
    """Whether a useq time plan (or a phase of a multi-phase one) has an interval above 0."""
    phases = getattr(plan, "phases", None) or ([plan] if plan is not None else [])
    intervals = (getattr(phase, "interval", None) for phase in phases)
    return any(i is not None and i.total_seconds() > 0 for i in intervals)
