"""The ``livemask`` command line."""

from __future__ import annotations

import signal
import sys

# Ctrl-C while Python imports (a second or more before a command runs): one line, exit 130;
# SIGTERM and SIGHUP too where the entry point (livemask._entry) set them up: importing this
# module changes no signal handler
try:
    import asyncio
    import contextlib
    import dataclasses
    import functools
    import ipaddress
    import logging
    import math
    import os
    import select
    import subprocess
    import tempfile
    from collections.abc import Callable, Iterator
    from pathlib import Path
    from typing import TYPE_CHECKING, Annotated, Any, NoReturn, ParamSpec, TypeVar

    import typer
    from pydantic import ValidationError

    from livemask.acquisition.mode import Mode
    from livemask.config import (
        DEFAULT_SEQUENCE,
        MAX_INTERVAL_S,
        MAX_THREADS,
        DashboardConfig,
        ServiceConfig,
        check_address,
        one_endpoint_message,
        same_endpoint,
    )
    from livemask.errors import ConfigError, LivemaskError
    from livemask.log import setup_logging
    from livemask.protocol import INT64_MAX
    from livemask.roi import ROI_FORMAT, Roi
    if TYPE_CHECKING:
        from livemask.acquisition.replay import ReplayStack
except KeyboardInterrupt:
    if "--ready-fd" not in sys.argv:  # (serve --view's view: serve says it)
        print("livemask: interrupted", file=sys.stderr, flush=True)
    sys.exit(130)  # (INTERRUPTED_EXIT, below)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
log = logging.getLogger("livemask")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Service config (YAML).")
]


RecordOpt = Annotated[
    Path | None,
    typer.Option("--record", help="Record frames, labels, measurements and events to "
                 "DIR/run-YYYYmmdd-HHMMSS (docs/recording.md)."),
]


DashboardOpt = Annotated[
    str | None,
    typer.Option("--dashboard", metavar="HOST:PORT",
                 help="Serve the web dashboard here, e.g. 127.0.0.1:8080 (port 0: a free "
                 "one; docs/dashboard.md)."),
]


def _address(value: str | None) -> str | None:
    """Callback: reject a malformed --pub / --control address before anything binds it."""
    if value is None:
        return None
    try:
        return check_address(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _service_address(value: str | None) -> str | None:
    """Callback: the address of a running service's socket to connect to (``watch --pub``,
    ``dashboard --connect``): one ZeroMQ can connect to, not a port a bind picks (``*``,
    0)."""
    from livemask.client.control import ADDRESS_FORM, check_connect_form

    if value is None:
        return None
    try:
        value = check_address(value)
    except ValueError:  # (its text offers port *, which a connect cannot take)
        raise typer.BadParameter(f"{value!r} is not a valid address: {ADDRESS_FORM}") from None
    port = value.rpartition(":")[2]
    if value.startswith("tcp://") and port in ("*", "0"):
        raise typer.BadParameter(
            f"{value}: port {port} picks a free port when the service binds; give the port "
            "it bound, which its log says (\"serving: pub tcp://...\"), e.g. "
            "tcp://127.0.0.1:5555")
    try:
        check_connect_form(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{value} is not an address to connect to ({exc}): "
                                 f"{ADDRESS_FORM}") from None
    return value


def _finite(value: float | None) -> float | None:
    """Callback: reject inf and nan (the range check already ran)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def _positive(value: float | None) -> float | None:
    """Callback: a finite number > 0 (or not given)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number > 0, got {value}")
    return value


def _output_file_like(example: str) -> Callable[[Path | None], Path | None]:
    """A callback: a file path whose folder exists or can be made, checked before the run
    (``example``: the file name a folder given instead is told to end in)."""

    def check(value: Path | None) -> Path | None:
        if value is None:
            return None
        if value.is_dir():
            raise typer.BadParameter(
                f"{value} is a folder; give a file path, e.g. {value / example}")
        if _written_in_place(value):
            if not os.access(value, os.W_OK):
                raise typer.BadParameter(f"cannot write {value}; choose a writable file")
            return value
        try:
            value.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise typer.BadParameter(f"cannot make its folder {value.parent}: {exc}") from None
        try:  # a file beside it: a folder that cannot be written fails now, not after the run
            with tempfile.NamedTemporaryFile(dir=value.parent, prefix=f".{value.name}.",
                                             suffix=".check"):
                pass
        except OSError as exc:
            raise typer.BadParameter(
                f"cannot write in its folder {value.parent}: {exc.strerror or exc}; "
                "choose a writable file") from None
        return value

    return check


_output_file = _output_file_like("out.json")


def _written_in_place(path: Path) -> bool:
    """Whether ``path`` is written through, not replaced: a symbolic link, or an existing
    file that is not a regular one (``/dev/null``, ``/dev/stdout``, a FIFO)."""
    return path.is_symlink() or (path.exists() and not path.is_file())


def _write_json(path: Path, data: Any, option: str = "--json") -> None:
    """Write ``data`` as indented JSON to ``path`` (a temporary file beside it, renamed: an
    interruption leaves no half file; beside the file a link leads to, the link kept; into a
    FIFO, a device or ``/dev/stdout`` directly, appending); an
    error is one line naming ``option`` (exit 2)."""
    import json

    from livemask.offline import not_regular_file

    text = json.dumps(data, indent=2) + "\n"
    # a link stays a link: the file it leads to is replaced
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        if not_regular_file(path):  # a FIFO, a device, /dev/stdout: appended to (>> of a
            with path.open("a", encoding="utf-8") as fh:  # shell stays whole), not replaced
                fh.write(text)
            return
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as exc:
        _fail(OSError(f"cannot write {option} {path}: {exc.strerror or exc}; "
                      "choose a writable file"))
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _output_folder(value: Path | None) -> Path | None:
    """Callback: a folder path that is not an existing file (made later, by the command,
    once the other arguments are known to be good)."""
    if value is None:
        return None
    existing = next((p for p in (value, *value.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise typer.BadParameter(f"{existing} is a file; give a folder")
    return value


PubOpt = Annotated[str | None, typer.Option(
    callback=_address, help="PUB address, e.g. tcp://127.0.0.1:5555")]
ControlOpt = Annotated[str | None, typer.Option(
    callback=_address, help="Control (ROUTER) address, e.g. tcp://127.0.0.1:5556")]
ModeOpt = Annotated[Mode | None, typer.Option(
    help="free-run (frames skip analysis when the camera is ahead), pipelined (every frame "
    "analysed; the camera waits while a frame waits for the model) or synchronized (each "
    "frame analysed before the next is acquired).")]


#: Exit code after Ctrl-C ended a command before its own signal handling took over.
INTERRUPTED_EXIT = 130

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _interrupted() -> NoReturn:
    """Ctrl-C outside the service's own handling: one line (no traceback), exit 130."""
    print("livemask: interrupted", file=sys.stderr, flush=True)
    raise typer.Exit(INTERRUPTED_EXIT)


def _exit_130_when_interrupted(command: Callable[_P, _R]) -> Callable[_P, _R]:
    """A command that Ctrl-C (``KeyboardInterrupt``) ends with :func:`_interrupted`: in
    start-up, before the command's signal handlers are in place."""

    @functools.wraps(command)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            _interrupted()

    return run


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _setup_logging(*, quiet: bool = False) -> None:
    """:func:`setup_logging`; a bad ``LIVEMASK_*`` variable is a one-line error (exit 2)."""
    try:
        setup_logging(quiet=quiet)
    except ConfigError as exc:
        _fail(exc)


def _raise_open_files_limit() -> None:
    """For a service: the soft limit on open files up to the hard one (connections, files)."""
    from livemask.service.limits import raise_open_files_limit

    raise_open_files_limit()


def _dashboard_field(name: str) -> Callable[[Any], Any]:
    """A callback: the value within the bounds ``dashboard.<name>`` has in the config."""

    def check(value: Any) -> Any:
        try:
            DashboardConfig.model_validate({name: value})
        except ValidationError as exc:
            raise typer.BadParameter(
                f"{exc.errors()[0]['msg']} (as dashboard.{name}), got {value}") from None
        return value

    return check


#: Signals that stop a service or dashboard in order: Ctrl-C, ``kill``, and the terminal or
#: SSH session it was started from closing.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stop_signals() -> tuple[signal.Signals, ...]:
    """The ``STOP_SIGNALS`` to handle: SIGTERM and SIGHUP stay ignored where they are
    (``nohup livemask serve`` ignores SIGHUP); SIGINT is always handled (a shell ignores
    it in its background jobs, which ``kill -INT`` still stops in order)."""
    return tuple(sig for sig in STOP_SIGNALS
                 if sig == signal.SIGINT or signal.getsignal(sig) is not signal.SIG_IGN)


def _plan_interval(value: float | None) -> float | None:
    """Callback: a finite interval a time plan can hold (the range check already ran)."""
    value = _finite(value)
    if value is not None and value > MAX_INTERVAL_S:
        raise typer.BadParameter(
            f"must be at most {MAX_INTERVAL_S:.0f} s (999,999,999 days), got {value:g}")
    return value


def _fail_run(problem: str) -> None:
    """Exit 1: the run went to its end, but not every frame was handled. Printed, and
    logged too where the log goes to a file (``LIVEMASK_LOG_FILE``), not to the console."""
    from livemask.log import logs_to_stderr

    if not logs_to_stderr():
        log.error("exit code 1: %s", problem)
    typer.secho(f"error: {problem}", err=True, fg=typer.colors.RED)
    raise typer.Exit(1)


#: ``--exit-when-done`` waits for the frames in flight as long as they keep getting through;
#: when none has for this long (a stage is stuck), it stops waiting (a run problem).
DONE_STALL_S = 60.0


def _run_problem(service: Any) -> str | None:
    """What went wrong in a run that exits when done (exit code 1), or None."""
    if service.last_error is not None:
        return f"the run ended with an error: {service.last_error}"
    counts = service.pipeline.counters.counts
    acquired = int(counts["acquired"])
    # in flight: not through the publish stage (skipped frames of free-run go through it)
    never = service.pipeline.in_flight
    if never:
        return (f"{never} of {acquired} frame(s) were never analysed nor published: the "
                "service stopped before their turn")
    if counts["publish_failed"]:
        return (f"{counts['publish_failed']} of {acquired} frame(s) could not be published; "
                f"the last: {service.pipeline.last_failure}")
    if counts["failed"]:
        return (f"{counts['failed']} of {acquired} frame(s) failed; "
                f"the last: {service.pipeline.last_failure}")
    return None


def _apply_service_flags(
    cfg: Any, *, pub: str | None, control: str | None, mode: str | None, record: Path | None
) -> None:
    """The flags ``serve`` and ``replay`` share, over the loaded config."""
    if pub or control:
        _set_endpoints(cfg, pub, control)
    if mode:
        cfg.acquisition.mode = mode
    if record is not None:  # absolute: a reused config.yaml of the run records here too
        cfg.record.enabled, cfg.record.path = True, record.expanduser().absolute()


def _set_endpoints(cfg: Any, pub: str | None, control: str | None) -> None:
    """``--pub`` / ``--control`` over the config's; one endpoint for both sockets is refused,
    naming the flag or key each came from (``ConfigError``)."""
    pub_address = pub or cfg.publish.pub_address
    control_address = control or cfg.publish.control_address
    if same_endpoint(pub_address, control_address):
        first = "--pub" if pub else "publish.pub_address"
        second = "--control" if control else "publish.control_address"
        raise ConfigError(one_endpoint_message(first, pub_address, second, control_address))
    # both at once: one at a time could pass through a clash (--pub B --control A over A, B)
    cfg.publish = cfg.publish.model_copy(
        update={"pub_address": pub_address, "control_address": control_address})


def _check_own_ports(cfg: Any, *, pub: str | None, control: str | None,
                     dashboard: str | None = None) -> None:
    """The config's port check (:func:`livemask.config.check_own_ports`) again once the
    flags are applied, naming the flags that set a clashing port (``ConfigError``)."""
    from livemask.config import check_own_ports

    flags = {"publish.pub_address": ("--pub", pub),
             "publish.control_address": ("--control", control),
             "dashboard.port": ("--dashboard", dashboard)}
    check_own_ports(cfg, {key: flag for key, (flag, value) in flags.items() if value})


def _duration_interval(plan: dict[str, Any]) -> float:
    """The interval (s) of a duration-and-loops time plan (as the config gave it)."""
    import useq

    return useq.TDurationLoops.model_validate(
        {"duration": plan["duration"], "loops": plan["loops"]}).interval.total_seconds()


def _time_lapse(cfg: Any, frames: int | None, interval: float | None) -> None:
    """Apply ``serve --frames/--interval`` to the sequence's time plan, checked like the
    config file (``ConfigError``) and refused, naming the flag, where they do not apply."""
    from livemask.config import parse_config

    seq = dict(cfg.acquisition.sequence)
    given = seq.get("time_plan")
    if isinstance(given, list) or (isinstance(given, dict) and "phases" in given):
        flag = "--frames" if frames is not None else "--interval"
        raise typer.BadParameter(
            "the sequence has a multi-phase time plan (acquisition.sequence.time_plan."
            "phases); set each phase's loops and interval in the config instead",
            param_hint=f"'{flag}'")
    if given is None and frames is None:
        raise typer.BadParameter(
            "the sequence has no time plan to set the interval of; give --frames N too, to "
            "add a time-lapse of N time points", param_hint="'--interval'")
    order = "".join(cfg.acquisition.mda_sequence().axis_order)
    if "t" not in order:  # (useq would run the sequence without its time plan)
        raise typer.BadParameter(
            f"the sequence's axis_order '{order}' leaves out 't', so a time plan would be "
            "ignored; add 't' to acquisition.sequence.axis_order",
            param_hint=f"'{'--frames' if frames is not None else '--interval'}'")
    default = {"interval": DEFAULT_SEQUENCE["time_plan"]["interval"]}
    plan = dict(given if given is not None else default)
    if frames is not None and "interval" not in plan and "duration" in plan:
        # duration and loops: keep their interval, not the duration (N frames over the
        # whole duration would stretch a quick test run to the full time-lapse)
        plan["interval"] = _duration_interval(plan)
    if frames is not None:
        plan["loops"] = frames
    if interval is not None:
        plan["interval"] = interval
    if "loops" in plan and "interval" in plan:  # they fix its length: not a duration
        plan.pop("duration", None)
    seq["time_plan"] = plan
    flags = " ".join(f"{flag} {value}" for flag, value in
                     (("--frames", frames), ("--interval", interval)) if value is not None)
    parse_config({"acquisition": {"sequence": seq}}, source=f"sequence with {flags}")
    cfg.acquisition.sequence = seq


@app.command()
@_exit_130_when_interrupted
def serve(
    config: ConfigOpt = None,
    pub: PubOpt = None,
    control: ControlOpt = None,
    truth: Annotated[bool, typer.Option("--truth", help="Publish simulator ground truth.")] = False,
    mode: ModeOpt = None,
    frames: Annotated[int | None, typer.Option(
        min=1, max=INT64_MAX,
        help="Time points: sets the length of the sequence's time plan, or adds a time-lapse "
        "(every 0.1 s unless --interval) to a sequence without one.")] = None,
    interval: Annotated[float | None, typer.Option(
        min=0, callback=_plan_interval,
        help="Seconds between time points of the time plan (without one, give --frames "
        "too).")] = None,
    view: Annotated[bool, typer.Option("--view", help="Show live measurements here.")] = False,
    exit_when_done: Annotated[
        bool, typer.Option("--exit-when-done", help=(
            "Exit when the acquisition finishes and its frames are through the pipeline: "
            "exit code 1 if it ended with an error, a frame failed or was never analysed, "
            "or the recording failed."))
    ] = False,
    autostart: Annotated[
        bool | None, typer.Option("--autostart/--no-autostart", help="Start the sequence now.")
    ] = None,
    record: RecordOpt = None,
    dashboard: DashboardOpt = None,
) -> None:
    """Run the service until SIGINT/SIGTERM/SIGHUP (exit code 0 after a clean shutdown; see
    --exit-when-done for 1)."""
    from livemask.config import load_config

    _setup_logging(quiet=view)
    _raise_open_files_limit()
    try:
        cfg = load_config(config)
        _apply_service_flags(cfg, pub=pub, control=control, mode=mode, record=record)
        if truth:
            cfg.simulation.truth = True
        if autostart is not None:
            cfg.acquisition.autostart = autostart
        if dashboard is not None:
            from livemask.dashboard.server import parse_listen

            host, port = parse_listen(dashboard)
            cfg.dashboard.enabled, cfg.dashboard.address, cfg.dashboard.port = True, host, port
        if frames is not None or interval is not None:
            _time_lapse(cfg, frames, interval)
        _check_own_ports(cfg, pub=pub, control=control, dashboard=dashboard)
    except (LivemaskError, ValueError) as exc:
        _fail(exc)
    code = 0
    try:
        problem = asyncio.run(_serve(cfg, view=view, exit_when_done=exit_when_done))
        if problem is not None:
            code = 1
            _fail_run(problem)
    except LivemaskError as exc:
        code = 2
        _fail(exc)
    except KeyboardInterrupt:
        code = 130
        raise
    except BaseException:
        code = 1
        raise
    finally:
        _exit_past_a_stuck_device(code)


def _exit_past_a_stuck_device(code: int) -> None:
    """Exit now if a device call is still stuck (a camera hung in a snap): everything is
    closed, but Python's exit would wait forever to unload that device."""
    from livemask.acquisition.core import devices_left_loaded
    from livemask.service.hardware_calls import calls_still_stuck

    if devices_left_loaded() or calls_still_stuck():
        print("livemask: a device call is still stuck (see the log); exiting without "
              "unloading the devices", file=sys.stderr, flush=True)
        sys.stdout.flush()
        logging.shutdown()
        os._exit(code)


def _still_to_write(service: Any) -> str | None:
    """The recorder's backlog, as a clause for the log, or None."""
    rec = service.recorder
    queued = rec.report()["frames_queued"] if rec is not None else 0
    return f": writing {queued} queued frame(s) to {rec.path}" if queued else None


class _Interrupts:
    """SIGINT/SIGTERM/SIGHUP: stop the service. During start-up (loading a model, or building a
    TensorRT engine, can take minutes) the stop waits for it to finish, so say so, and let a
    second signal quit at once."""

    def __init__(self, exit_now: Any = os._exit) -> None:
        self.stop = asyncio.Event()
        self.starting = True
        self._exit_now = exit_now
        #: What the shutdown still waits for, said when interrupted again while stopping.
        self.still_to_do: Any = lambda: None
        #: Called before quitting at once (no ``finally`` runs then): stops the view.
        self.before_quit: Callable[[], None] = lambda: None

    def __call__(self) -> None:
        if self.starting and self.stop.is_set():
            print("interrupted again during start-up: quitting now", file=sys.stderr, flush=True)
            self.before_quit()
            self._exit_now(130)
            return
        if self.starting:
            log.warning("interrupted during start-up: stopping as soon as it has finished "
                        "(interrupt again to quit at once)")
        elif self.stop.is_set():  # an orderly stop is under way: say what it waits for
            log.warning("already stopping%s; it goes on (SIGKILL quits at once: what is "
                        "recorded so far stays readable)", self.still_to_do() or "")
        self.stop.set()


async def _serve(
    cfg: Any, *, view: bool, exit_when_done: bool, source: Any = None
) -> str | None:
    """Serve until interrupted (or done); with ``exit_when_done``, what went wrong, or None."""
    viewer = _Viewer(cfg.simulation.truth) if view else None
    interrupts = _Interrupts()
    stop = interrupts.stop
    if viewer is not None:
        interrupts.before_quit = viewer.quit
    signals = _stop_signals()
    try:
        with _interrupted_until_handled(signals):
            if viewer is not None and (early := _connect_address(cfg.publish.pub_address)):
                viewer.start(early)  # (it imports while we do)
            from livemask.service.app import Service

        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, interrupts)
        if viewer is not None and viewer.process is not None:
            await viewer.wait_ready(VIEWER_READY_S, stop)
        async with Service(cfg, source=source, stop=stop) as service:
            interrupts.starting = False
            interrupts.still_to_do = lambda: _still_to_write(service)
            if viewer is not None and viewer.process is None:  # the bind picked the port
                viewer.start(service.publisher.bound_address, truth=service.truth)
            waiter = asyncio.create_task(_wait_done(service, stop)) if exit_when_done else None
            await stop.wait()
            log.info("shutting down")
            if waiter is not None:
                waiter.cancel()
    finally:
        if viewer is not None:  # after the close: it shows the last messages too
            await viewer.stop()
    # after the close: the recorder's last writes can fail too
    return _run_problem(service) if exit_when_done else None


@contextlib.contextmanager
def _interrupted_until_handled(signals: tuple[signal.Signals, ...]) -> Iterator[None]:
    """Until ``_serve`` installs its handlers: ``signals`` (SIGINT, SIGTERM and SIGHUP but
    ignored ones) raise ``KeyboardInterrupt`` at once (even in an import), so ``finally``
    stops the view and serve exits 130 (SIGTERM's default action killed it, 143, and left the
    view running)."""
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in signals}
    try:
        yield  # (then the event loop's handlers replace these)
    except BaseException:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise


async def _wait_done(service: Any, stop: asyncio.Event) -> None:
    """``--exit-when-done``: set ``stop`` once the acquisition finished and its frames are
    through the pipeline."""
    while service.acquiring or not service.acquisitions_finished:
        await asyncio.sleep(0.1)
    # no deadline while frames get through: a slow model finishes the run
    if not await service.pipeline.settle(DONE_STALL_S):
        log.error("no frame got through the pipeline for %.0f s; stopping with "
                  "%d frame(s) in flight", DONE_STALL_S, service.pipeline.in_flight)
    stop.set()


@app.command()
@_exit_130_when_interrupted
def replay(
    path: Annotated[Path, typer.Argument(
        help="A livemask recording (run folder), an OME-Zarr image or a TIFF stack.")],
    config: ConfigOpt = None,
    interval: Annotated[float | None, typer.Option(
        min=0, callback=_plan_interval,
        help="Seconds between frames (default: the recorded timing, else 0.1).")] = None,
    pub: PubOpt = None,
    control: ControlOpt = None,
    mode: ModeOpt = None,
    view: Annotated[bool, typer.Option("--view", help="Show live measurements here.")] = False,
    exit_when_done: Annotated[
        bool, typer.Option("--exit-when-done", help=(
            "Exit when every frame was played: exit code 1 if a frame could not be read or "
            "failed, or the recording failed."))
    ] = False,
    record: RecordOpt = None,
) -> None:
    """Run stored frames through the service as if they came from the camera."""
    from livemask.acquisition.replay import ReplaySource, open_stack, replay_pixel_size
    from livemask.config import load_config

    _setup_logging(quiet=view)
    _raise_open_files_limit()
    try:
        cfg = load_config(config)
        stack = open_stack(path)
        if config is None:
            cfg = _as_recorded(cfg, stack, mode)
        _apply_service_flags(cfg, pub=pub, control=control, mode=mode, record=record)
        # the config's, else the file's; a recording of an uncalibrated rig has none
        cfg.hardware.pixel_size_um = replay_pixel_size(stack, cfg.hardware.pixel_size_um)
        cfg.simulation.truth = False
        cfg.acquisition.autostart = True
        cfg.acquisition.sequence = {"time_plan": {"interval": 0, "loops": stack.frames}}
        _check_own_ports(cfg, pub=pub, control=control)
    except (LivemaskError, ValueError) as exc:
        _fail(exc)
    if interval is None and stack.times is None:
        interval = 0.1
    source = ReplaySource(stack, interval_s=interval,
                          sync_timeout_s=cfg.acquisition.frame_timeout_s)
    log.info("replaying %s: %d frames of %s (%s)", stack.path, stack.frames,
             "x".join(map(str, stack.shape)), stack.kind)
    try:
        problem = asyncio.run(_serve(cfg, view=view, exit_when_done=exit_when_done,
                                     source=source))
    except LivemaskError as exc:
        _fail(exc)
    finally:
        source.close()
    if problem is not None:
        _fail_run(problem)


def _as_recorded(cfg: ServiceConfig, stack: ReplayStack, mode: str | None) -> ServiceConfig:
    """The config of a replay without ``--config``: for a livemask recording, its
    ``config.yaml``'s model, analysis, tracking and acquisition mode (how its frames were
    analysed: a grain scan by a grains model, every tile), else ``cfg``. ``mode``: the
    ``--mode`` given, which overrides the recorded one."""
    from livemask.config import load_analysis_config

    if stack.kind != "recording":
        return cfg
    recorded = stack.path / "config.yaml"
    if not recorded.is_file():
        log.warning("%s has no config.yaml, which says how it was analysed: it is analysed "
                    "with the defaults (model %s, acquisition mode %s); give --config with "
                    "its model and mode (a grain scan: model grains, mode synchronized)",
                    stack.path, cfg.model.name, mode or cfg.acquisition.mode)
        return cfg
    again = "; or give --config with the model and mode to analyse it with"
    try:
        as_recorded = load_analysis_config(recorded)
    except ConfigError as exc:
        raise ConfigError(f"{exc}{again}") from None
    card = as_recorded.model.path
    if card is not None and not card.is_file():
        raise ConfigError(f"the recording was analysed with the model card {card}, which is "
                          f"not here (its {recorded}): copy it there{again}")
    log.info("replaying as recorded (%s): model %s, acquisition mode %s; --config chooses "
             "others", recorded, card or as_recorded.model.name,
             mode or as_recorded.acquisition.mode)
    return as_recorded


@app.command("dashboard")
@_exit_130_when_interrupted
def dashboard_cmd(
    connect: Annotated[str, typer.Option(
        callback=_service_address, help="The service's PUB address.")] = (
        "tcp://127.0.0.1:5555"),
    listen: Annotated[str, typer.Option(
        metavar="HOST:PORT", help="Where to serve the page; anything but loopback is public."
    )] = "127.0.0.1:8080",
    update_hz: Annotated[float, typer.Option(
        callback=_dashboard_field("update_hz"),
        help="Most updates per second (> 0, at most 30).")] = 5.0,
    max_image_px: Annotated[int, typer.Option(
        callback=_dashboard_field("max_image_px"),
        help="Longest image side sent (64 to 4096 px).")] = 512,
) -> None:
    """Serve the web dashboard of a service running elsewhere (a subscriber like any other)."""
    from livemask.dashboard.server import DashboardServer, parse_listen

    _setup_logging()
    _raise_open_files_limit()
    try:
        host, port = parse_listen(listen)
        server = DashboardServer(connect, address=host, port=port, update_hz=update_hz,
                                 max_image_px=max_image_px, hint="--listen HOST:PORT")
    except LivemaskError as exc:
        _fail(exc)

    async def _run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in _stop_signals():
            loop.add_signal_handler(sig, stop.set)
        async with server:
            typer.echo(f"dashboard of {connect}: {server.url}  (Ctrl-C stops)")
            await stop.wait()

    try:
        asyncio.run(_run())
    except LivemaskError as exc:
        _fail(exc)


#: Longest wait (s) for the ``--view`` viewer to subscribe before the service starts (it
#: imports for a second or more).
VIEWER_READY_S = 15.0
#: Longest wait (s) for the viewer to show the last messages and exit once told to stop.
VIEWER_STOP_S = 5.0
#: Longest wait (s) for the viewer to exit when serve quits at once (then SIGKILL).
VIEWER_QUIT_S = 2.0


def _connect_address(bind: str) -> str | None:
    """Where a subscriber on this machine reaches a PUB socket that is to bind ``bind``;
    None when that is known only once it is bound (port ``*`` or 0, a host name or an
    interface name)."""
    from livemask.transport._sockets import local_connect_address

    if not bind.startswith("tcp://"):
        return bind  # ipc://PATH
    if bind.rpartition(":")[2] in ("*", "0"):
        return None
    local = local_connect_address(bind)
    try:
        ipaddress.ip_address(local.removeprefix("tcp://").rpartition(":")[0].strip("[]"))
    except ValueError:
        return None
    return local


class _Viewer:
    """``--view``: the console view (``livemask watch``) as its own process, a subscriber
    like any other, off the service's CPU. Started before the service where the PUB
    address is known, and waited for until it has subscribed, it sees the first frames;
    stopped after the service closed (SIGTERM: it takes what is still on its way, prints
    its last view and exits), it shows the last ones. It also exits once serve closed its
    end of the ready pipe, which serve holds until then: serve died (even by SIGKILL)."""

    def __init__(self, truth: bool) -> None:
        self.truth = truth
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = False  # it said it has subscribed
        self._ready_fd: int | None = None  # read end of the pipe it says so on

    def start(self, address: str, *, truth: bool | None = None) -> None:
        """Start ``livemask watch --pub address`` (``truth``: instead of the config's)."""
        read, write = os.pipe()
        cmd = [sys.executable, "-m", "livemask", "watch", "--pub", address,
               "--ready-fd", str(write)]
        if self.truth if truth is None else truth:
            cmd.append("--truth")
        try:  # (its own session: a Ctrl-C in the terminal reaches serve, which stops it)
            self.process = subprocess.Popen(cmd, pass_fds=(write,), start_new_session=True)
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)  # ours: EOF once it has written, or exited
        self._ready_fd = read

    async def wait_ready(self, timeout_s: float, stop: asyncio.Event) -> None:
        """Until it has subscribed or exited, ``stop`` is set or ``timeout_s`` passed (the
        pipe stays open: see the class)."""
        fd = self._ready_fd
        if fd is None:
            return
        loop = asyncio.get_running_loop()
        said: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:  # its line, or EOF (b""): it exited
            if not said.done():
                said.set_result(os.read(fd, 64))

        loop.add_reader(fd, readable)
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([said, stopped], timeout=timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            loop.remove_reader(fd)
        self.ready = said.done() and bool(said.result())
        if not self.ready and not stop.is_set():
            code = self.process.poll() if self.process is not None else None
            log.warning("the view (livemask watch) %s; starting the service (the view may "
                        "miss its first frames)",
                        f"exited with code {code}" if code is not None else
                        f"did not subscribe within {timeout_s:.0f} s")

    async def stop(self) -> None:
        """SIGTERM; SIGKILL if it has not exited ``VIEWER_STOP_S`` later (or the wait is cut
        short: cancelled, interrupted)."""
        proc = self.process
        try:
            if proc is None:
                return
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, VIEWER_STOP_S)
            except subprocess.TimeoutExpired:
                log.warning("the view (livemask watch) did not exit; killing it")
                proc.kill()
                await asyncio.to_thread(proc.wait)
            except BaseException:
                proc.kill()
                raise
        finally:
            self._close_pipe()

    def quit(self) -> None:
        """Serve quits at once: SIGTERM (its last view), SIGKILL after ``VIEWER_QUIT_S``."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(VIEWER_QUIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self._ready_fd is not None:
            os.close(self._ready_fd)
            self._ready_fd = None


def _ready_signal(fd: int | None) -> Callable[[], None] | None:
    """``watch --ready-fd``: tell the ``serve --view`` that started it it has subscribed (the
    pipe stays open: see :func:`_serve_gone`)."""
    if fd is None:
        return None

    def ready() -> None:
        with contextlib.suppress(OSError):  # it stopped waiting, or is gone
            os.write(fd, b"ready\n")

    return ready


def _serve_gone(fd: int | None) -> Callable[[], bool] | None:
    """``watch --ready-fd``: whether the ``serve --view`` that started it closed its end of
    the pipe: it is gone (it holds that end until it stops the view; the system closes it
    when serve dies, even by SIGKILL)."""
    if fd is None:
        return None
    poller = select.poll()
    poller.register(fd, 0)  # (errors and hang-ups are reported for any mask)
    closed = select.POLLERR | select.POLLHUP | select.POLLNVAL
    return lambda: any(events & closed for _, events in poller.poll(0))


@app.command()
def watch(
    pub: Annotated[str, typer.Option(
        callback=_service_address, help="The service's PUB address.")] = "tcp://127.0.0.1:5555",
    truth: Annotated[bool, typer.Option("--truth", help="Score labels against truth.")] = False,
    duration: Annotated[float | None, typer.Option(
        callback=_positive, help="Stop after this many seconds.")] = None,
    ready_fd: Annotated[int | None, typer.Option(
        hidden=True, help="serve --view: write a line to this pipe once subscribed (and "
        "leave out the hint when nothing comes: the service starts); end once serve closed "
        "the pipe's other end (it is gone).")] = None,
) -> None:
    """Show live measurements of a running service in the terminal (until Ctrl-C or
    SIGTERM; a pipe gets the last state as its last line)."""
    from livemask.viewer import watch as run_watch

    # SIGTERM ends it like Ctrl-C: the last state is shown (serve --view stops it so)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            run_watch(pub, truth=truth, duration_s=duration, on_ready=_ready_signal(ready_fd),
                      nothing_hint=ready_fd is None, stop_when=_serve_gone(ready_fd))
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def segment(
    input: Annotated[
        Path, typer.Argument(help="A 2-D image or a stack (TIFF; a PNG or JPEG is one plane).")
    ],
    output: Annotated[Path, typer.Option(
        "-o", "--output", callback=_output_file_like("labels.tif"),
        help="Label TIFF to write (.tif or .tiff; the input's shape, plus an axis P when a "
        "TIFF holds one image series per stage position).")],
    model: Annotated[str, typer.Option(help="Model name or card path.")] = "nuclei",
    table: Annotated[Path | None, typer.Option(
        callback=_output_file_like("objects.csv"),
        help="Write measurements CSV here.")] = None,
    grains: Annotated[Path | None, typer.Option(
        callback=_output_file_like("grains.json"),
        help="Write grain size statistics (ASTM E112 G, N_A, intercepts, size "
        "distribution) of each plane and of all planes pooled here (JSON; grains models)."
    )] = None,
    roi: Annotated[Roi | None, typer.Option(
        parser=_roi, metavar=ROI_FORMAT,
        help="Segment and measure only this rectangle (px; e.g. a micrograph without its "
        "data bar); labels are 0 outside it.")] = None,
    pixel_size_um: Annotated[float | None, typer.Option(
        callback=_positive,
        help="µm per pixel for the µm columns (default: the file's, else 1).")] = None,
    threads: Annotated[int, typer.Option(min=1, max=MAX_THREADS, help="CPU threads.")] = 2,
) -> None:
    """Segment an image or a stack offline and write a label TIFF."""
    from livemask.offline import segment_file

    _setup_logging()
    try:
        done = segment_file(input, output, model=model, table=table, grains=grains, roi=roi,
                            pixel_size_um=pixel_size_um, threads=threads)
    except (LivemaskError, OSError, ValueError) as exc:
        _fail(exc)
    axes = f", axes {done.axes}" if done.axes else ""
    planes = f"{done.planes} plane" + ("s" if done.planes != 1 else "")
    also = [str(p) for p in (table, grains) if p is not None]
    # an output written to stdout (--table /dev/stdout | ...) gets nothing else there
    err = any(_is_stdout(p) for p in (output, table, grains) if p is not None)
    typer.echo(f"wrote {output} (labels of shape {done.shape}{axes}; {planes})"
               + (f" and {' and '.join(also)}" if also else ""), err=err)
    if done.grains is not None:
        typer.echo(_grains_line(done.grains), err=err)


def _is_stdout(path: Path) -> bool:
    """Whether ``path`` is this process's standard output (``/dev/stdout``, or the pipe or
    file it leads to)."""
    try:
        here, out = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):  # no such file, or no stdout
        return False
    return (here.st_dev, here.st_ino) == (out.st_dev, out.st_ino)


def _roi(text: str) -> Roi:
    """Parser of ``--roi``: a :class:`Roi`, or the reason it is not one."""
    try:
        return Roi.parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _grains_line(report: dict[str, Any]) -> str:
    """One line of ``segment --grains``'s pooled statistics for the terminal (``report``:
    the JSON it wrote)."""
    known = bool(report.get("pixel_size_known"))
    stats = report["pooled"]

    def value(key: str, unit: str = "", digits: int = 2) -> str:
        v = stats.get(key)
        return "n/a" if v is None else f"{v:.{digits}f}{unit}"

    # without a pixel size the values are in pixels (grains per 10^6 px: per megapixel)
    area, length = (("/mm²", " µm") if known else (" per megapixel", " px"))
    return (f"grains: {stats['count']} ({stats['count_inside']} inside) in "
            f"{stats['tiles']} field(s); N_A {value('n_a_per_mm2', area, 1)}, "
            f"mean diameter {value('mean_equivalent_diameter_um', length)}, mean intercept "
            f"{value('mean_intercept_um', length)}, ASTM G {value('astm_g_planimetric')} "
            f"(planimetric), {value('astm_g_intercept')} (intercept)"
            + ("" if known else "; no pixel size: give --pixel-size-um for µm and G"))


@app.command()
def train(
    task: Annotated[
        str, typer.Argument(help="nuclei, grains (U-Nets) or nuclei-rf, grains-rf (forests).")
    ] = "nuclei",
    out: Annotated[Path | None, typer.Option(
        callback=_output_folder,
        help="Output folder (default runs/TASK); the shipped models folder only with --force."
    )] = None,
    iterations: Annotated[int | None, typer.Option(
        min=1, help="Training iterations of the U-Nets (default 7000; --quick: 20; the "
        "forests have none).")] = None,
    minutes: Annotated[float | None, typer.Option(
        callback=_positive, help="Time budget of the U-Nets, rendering included; stops early "
        "(default 40; the forests have none).")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="A tiny run, for tests (explicit --iterations/--minutes still apply)."
    )] = False,
    seed: Annotated[int, typer.Option(min=0, help="Random seed.")] = 0,
    force: Annotated[bool, typer.Option(
        "--force", help="Allow --out to be the shipped models folder (overwrites them).")] = False,
) -> None:
    r"""Train a model on the simulator (needs the train extra: pip install 'livemask\[train]';
    in a checkout: pip install -e '.\[train]')."""
    _setup_logging()
    # SIGTERM ends a run like Ctrl-C: the output folder is left as it was
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        _train(task, out, iterations, minutes, quick, seed, force)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(task: str, out: Path | None, iterations: int | None, minutes: float | None,
           quick: bool, seed: int, force: bool) -> None:
    if task not in ("nuclei", "grains", "nuclei-rf", "grains-rf"):
        _fail(ValueError(f"unknown task {task!r}; choose nuclei, grains, nuclei-rf or grains-rf"))
    folder = out or Path("runs") / task
    if task.endswith("-rf"):
        try:
            from livemask.training.random_forest import require_train_extra, train_random_forest

            require_train_extra()
        except ImportError as exc:
            msg = str(exc)
            if "train extra" not in msg:
                msg += ("; install the train extra: pip install 'livemask[train]' (in a "
                        "checkout: pip install -e '.[train]')")
            _fail(ImportError(msg))
        if iterations is not None or minutes is not None:
            log.warning("%s is a random forest: --iterations and --minutes do not apply and "
                        "are ignored", task)
        try:
            card_path = train_random_forest(folder, task=task.removesuffix("-rf"), seed=seed,
                                            evaluate=not quick, force=force)
        except LivemaskError as exc:
            _fail(exc)
        typer.echo(f"wrote {card_path}")
        return
    try:
        from livemask.training.cli import train_model
        from livemask.training.train import TrainSettings
    except ImportError as exc:
        _fail(ImportError(f"{exc}; install the train extra: pip install 'livemask[train]' "
                          "(in a checkout: pip install -e '.[train]')"))
    base = (TrainSettings(iterations=20, pool_size=16, refresh_every=10, seed=seed, task=task)
            if quick else TrainSettings(seed=seed, task=task))
    settings = dataclasses.replace(
        base,
        iterations=base.iterations if iterations is None else iterations,
        max_minutes=base.max_minutes if minutes is None else minutes,
    )
    try:
        card = train_model(folder, settings, eval_images=(2, 4) if quick else (20, 60),
                           force=force)
    except LivemaskError as exc:
        _fail(exc)
    from livemask.inference.models import MODELS_DIR

    typer.echo(f"wrote {card}; set model.path to it in a config, or copy it and its .onnx "
               f"into {MODELS_DIR} to ship it")


@app.command()
def evaluate(
    model: Annotated[list[str], typer.Option(help="Model name or card; repeat to compare.")],
    images: Annotated[Path | None, typer.Option(help="Folder of your images.")] = None,
    masks: Annotated[Path | None, typer.Option(help="Folder of their instance masks.")] = None,
    holdout: Annotated[str, typer.Option(help="Simulator hold-out: live or varied.")] = "live",
    n: Annotated[int, typer.Option("-n", min=1, help="Simulator images.")] = 20,
    threads: Annotated[int, typer.Option(min=1, max=MAX_THREADS, help="CPU threads.")] = 2,
    json_out: Annotated[Path | None, typer.Option(
        "--json", callback=_output_file, help="Write results here.")] = None,
) -> None:
    """Score models on a simulator hold-out or on annotated image/mask folders."""
    from rich.console import Console
    from rich.table import Table

    from livemask import evaluation as ev
    from livemask.offline import load_segmenter

    _setup_logging(quiet=True)
    if (images is None) != (masks is None):
        _fail(ValueError("give both --images and --masks, or neither"))
    try:
        grains = _one_task(model) == "grains"
        if images is not None and masks is not None:
            pairs = ev.load_folder(images, masks)
            name = f"{images}"
        elif holdout in ("live", "varied"):
            make = {
                ("live", False): ev.live_holdout, ("varied", False): ev.varied_holdout,
                ("live", True): ev.grain_live_holdout, ("varied", True): ev.grain_varied_holdout,
            }[(holdout, grains)]
            pairs = list(make(n))
            name = f"simulator-{holdout}" + (" (grains)" if grains else "")
        else:
            raise ValueError(f"unknown --holdout {holdout!r}; use live or varied")
        results = [ev.evaluate(load_segmenter(m, threads), pairs, name, model=m) for m in model]
    except (LivemaskError, OSError, ValueError) as exc:
        _fail(exc)
    table = Table(title=f"{name}: {len(pairs)} images")
    cols = ["model", "F1@0.5", "precision", "recall", "F1 0.5-0.9", "mean IoU",
            "count err", "ms model", "ms post"]
    grain_cols = (["area err", "area bias", "1/N_A err", "ASTM ΔG", "diam. KS"]
                  if any(r.area_biases for r in results) else [])
    for c in cols + grain_cols:
        table.add_column(c, justify="right", no_wrap=c == "model")
    if grain_cols:
        table.caption = ("area err / bias: mean area of the grains not cut by the image edge; "
                         "1/N_A err: ASTM E112 planimetric mean area; ASTM ΔG: planimetric")
    for r in results:
        d = r.as_dict()
        row = [d["model"], f"{d['f1_iou50']:.3f}", f"{d['precision_iou50']:.3f}",
               f"{d['recall_iou50']:.3f}", f"{d['f1_mean_iou50_90']:.3f}",
               f"{d['mean_matched_iou']:.3f}", f"{d['count_error']:.1%}",
               f"{d['predict_ms']:.1f}", f"{d['postprocess_ms']:.1f}"]
        if grain_cols:
            row += _grain_cells(d)
        table.add_row(*row)
    Console(width=max(180 if grain_cols else 140, Console().width)).print(table)
    if json_out:
        _write_json(json_out, [r.as_dict() for r in results])


def _one_task(model: list[str]) -> str:
    """The task shared by all ``--model``s; ValueError naming each model's task if they
    differ (their scores would not be comparable)."""
    from livemask.inference.models import load_model_card

    tasks = {m: load_model_card(m).task for m in model}
    if len(set(tasks.values())) > 1:
        named = ", ".join(f"{m} ({t})" for m, t in tasks.items())
        raise ValueError(f"compare models of one task at a time: {named}; run evaluate once "
                         "per task")
    return str(next(iter(tasks.values())))


def _grain_cells(d: dict[str, Any]) -> list[str]:
    """The grain columns of the evaluate table ("-" where undefined or for a model without
    grain figures; ΔG names the images left out of it because nothing was predicted in
    them)."""

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    if "astm_g_error" not in d:
        return ["-"] * 5
    g = fmt(d["astm_g_error"], ".2f")
    if d["g_undefined"]:
        g += f" ({d['g_undefined']} img no grain)"
    return [fmt(d["mean_area_error"], ".1%"), fmt(d["mean_area_bias"], "+.1%"),
            fmt(d["planimetric_area_error"], ".1%"), g, fmt(d["diameter_ks"], ".3f")]


@app.command("evaluate-tracking")
def evaluate_tracking(
    frames: Annotated[int, typer.Option(
        min=2, help="Time points of the simulated time-lapse.")] = 150,
    positions: Annotated[int, typer.Option(
        min=1, max=4, help="Stage positions (1-4), 512x512 each.")] = 1,
    model: Annotated[str, typer.Option(help="Model name or card that segments.")] = "nuclei",
    truth_labels: Annotated[bool, typer.Option(
        "--truth-labels", help="Segment with the truth labels (tracking errors only).")] = False,
    seed: Annotated[int, typer.Option(
        min=0, help="Simulator seed (defaults were tuned on 7).")] = 11,
    threads: Annotated[int, typer.Option(
        min=1, max=MAX_THREADS, help="CPU threads of the model.")] = 2,
    json_out: Annotated[Path | None, typer.Option(
        "--json", callback=_output_file, help="Write results here.")] = None,
) -> None:
    """Score the tracker against the simulator's ground-truth tracks (see docs/tracking.md)."""
    from rich.console import Console
    from rich.table import Table

    from livemask import tracking_eval as te
    from livemask.offline import load_segmenter

    _setup_logging(quiet=True)
    try:
        segment = None if truth_labels else load_segmenter(model, threads, task="nuclei").segment
        result = te.evaluate_tracking(
            segment, frames=frames, positions=positions, seed=seed,
            name="truth labels" if truth_labels else model,
        )
    except (LivemaskError, OSError, ValueError) as exc:
        _fail(exc)
    cols, rows = te.format_rows([result])
    table = Table(title=f"tracking on the simulated nuclei time-lapse (seed {seed})")
    for c in cols:
        table.add_column(c, justify="right", no_wrap=c == "segmentation")
    for row in rows:
        table.add_row(*row)
    Console(width=max(160, Console().width)).print(table)
    if json_out:
        _write_json(json_out, result.as_dict())


@app.command()
def bench(
    model: Annotated[str, typer.Option(help="Model name or card path.")] = "nuclei",
    backend: Annotated[str, typer.Option(help="Inference backend (auto picks).")] = "auto",
    size: Annotated[int, typer.Option(help="Square frame size (px).")] = 512,
    frames: Annotated[int, typer.Option(help="Frames per measurement.")] = 200,
    interval: Annotated[float, typer.Option(
        min=0, callback=_finite,
        help="Pipeline time-lapse interval (s); 0 = as fast as the camera goes.")] = 0.0,
    camera_fps: Annotated[float | None, typer.Option(
        callback=_positive,
        help="Pace the camera at this rate instead (latency at a sustained rate).")] = None,
    exposure_ms: Annotated[float, typer.Option(
        max=60_000, callback=_positive,
        help="Camera exposure; each snap lasts at least this long.")] = 10.0,
    threads: Annotated[int, typer.Option(
        min=1, max=MAX_THREADS, help="CPU threads of the backend.")] = 2,
    stage_threads: Annotated[str, typer.Option(
        help="Pipeline layout: two (a thread per stage) or one (infer, then analyse, in one "
        "thread).")] = "two",
    mode: Annotated[Mode, typer.Option(
        help="Acquisition mode of the pipeline run: pipelined (every frame analysed; the "
        "maximum sustained rate), free-run (frames skip analysis while the camera is ahead) "
        "or synchronized.")] = "pipelined",
    gc_freeze: Annotated[bool, typer.Option(
        "--gc-freeze/--no-gc-freeze",
        help="Freeze the heap once the service has started (pipeline.gc_freeze).")] = True,
    gc_threshold: Annotated[int, typer.Option(
        help="Young-generation GC threshold during the pipeline run (pipeline.gc_threshold; "
        "Python's default is 700).")] = 10_000,
    prefault_frames: Annotated[int, typer.Option(
        help="Frame-sized arrays touched once at service start (pipeline.prefault_frames; "
        "0 = off).")] = 8,
    queue_size: Annotated[int, typer.Option(
        help="Frames that may wait for inference in the pipeline run (pipeline.queue_size)."
    )] = 2,
    latency_warmup_s: Annotated[float, typer.Option(
        min=0, callback=_finite,
        help="Pipeline latencies leave out frames acquired in the first this many seconds "
        "(start-up); latency_ms_with_warmup keeps them.")] = 1.0,
    live_render: Annotated[bool, typer.Option(
        "--live-render", help="Render each frame in the camera (default: replay).")] = False,
    dashboard: Annotated[bool, typer.Option(
        "--dashboard", help="Serve the web dashboard during the pipeline run, with one "
        "WebSocket client reading it (see benchmarks/dashboard_overhead.py).")] = False,
    json_out: Annotated[Path | None, typer.Option(
        "--json", callback=_output_file, help="Write the result here.")] = None,
) -> None:
    """Measure inference_fps, naive_fps and pipeline_fps on the simulated camera, in one run."""
    from rich.console import Console
    from rich.table import Table

    from livemask.bench import BenchSettings, format_report, run_bench

    _setup_logging(quiet=True)
    console = Console(stderr=True)
    try:
        settings = BenchSettings(
            model=model, backend=backend, size=size, frames=frames, interval_s=interval,
            camera_fps=camera_fps, exposure_ms=exposure_ms, threads=threads,
            stage_threads=stage_threads, mode=mode, live_render=live_render, dashboard=dashboard,
            gc_freeze=gc_freeze, gc_threshold=gc_threshold, latency_warmup_s=latency_warmup_s,
            prefault_frames=prefault_frames, queue_size=queue_size,
        )
        result = run_bench(settings, progress=lambda msg: console.print(f"[dim]{msg}…[/dim]"))
    except (LivemaskError, OSError, ValueError) as exc:
        _fail(exc)
    table = Table(title="livemask bench")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for name, value in format_report(result):
        table.add_row(name, value)
    Console().print(table)
    if json_out:
        _write_json(json_out, result)
        typer.echo(f"wrote {json_out}")


@app.command()
def models() -> None:
    """List the shipped models."""
    from livemask.inference.models import list_models

    cards = list_models()
    width = max((len(card.name) for card in cards), default=0)
    for card in cards:
        f1 = card.metrics.get("f1_iou50")
        typer.echo(f"{card.name:{width}s} {card.task:8s} {card.architecture}  "
                   f"F1@0.5={f1 if f1 is not None else '?'}  ({card.file or card.runtime})")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # before a command runs (typer ends one with 130 itself)
        if "--ready-fd" not in sys.argv:
            print("livemask: interrupted", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT)


if __name__ == "__main__":
    main()
