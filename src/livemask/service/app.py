"""The livemask service: wires core, model, pipeline, publisher and control server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import useq
import yaml

from livemask import __version__
from livemask.acquisition.engine import EventWatch
from livemask.acquisition.mode import Mode
from livemask.acquisition.sequence import (
    event_count,
    iter_events,
    release_iteration_caches,
    sequence_channels,
    with_field_of_view,
)
from livemask.acquisition.source import FrameSource, MicroscopeSource, RawFrame
from livemask.config import ServiceConfig, check_own_ports, physical_memory_bytes
from livemask.errors import (
    AcquisitionEnding,
    AcquisitionError,
    ConfigError,
    HardwareTimeout,
    ProtocolError,
)
from livemask.feedback.controller import (
    FeedbackController,
    SettingsInEffect,
    known_camera_settings,
)
from livemask.feedback.spec import RuleSpec
from livemask.inference.models import ModelCard, load_model_card
from livemask.inference.segmenter import Segmenter, postprocessing_for
from livemask.inference.select import load_backend
from livemask.protocol import TOPICS, dumps_json, plain_index
from livemask.service.commands import CommandHandler
from livemask.service.exposure import CameraExposure
from livemask.service.gc_policy import GcMonitor, GcPolicy
from livemask.service.hardware_calls import (
    HARDWARE_TIMEOUT_S,
    call_hardware,
)
from livemask.service.pipeline import Pipeline
from livemask.service.prefault import Prefault, prefault_frame_memory
from livemask.service.restore import RESTORE_ACTION as RESTORE_ACTION
from livemask.service.restore import restore_after
from livemask.service.rig_checks import RigChecks
from livemask.transport.control_server import ControlServer
from livemask.transport.publisher import CLOSE_LINGER_S, ZmqPublisher, queue_hwm

if TYPE_CHECKING:
    from livemask.dashboard.server import DashboardServer
    from livemask.recording import Recorder
    from livemask.service.metrics import MetricsServer

log = logging.getLogger("livemask")

SIMULATED_MODULE = "livemask.acquisition.simulated"
#: Most events one acquisition may plan: the count travels as a 64-bit JSON integer.
MAX_PLANNED_EVENTS = 2**63 - 1
#: CPython thread switch interval while a GPU (device-resident) pipeline runs.
GPU_SWITCH_INTERVAL_S = 0.0005
#: How long a ``start`` (or an ``enqueue`` that starts a run) waits for the last run's
#: ``acquisition_finished`` (its last frames still in the pipeline) before it sends it early.
FINISH_WAIT_S = 1.0


def uses_simulated_devices(cfg_path: Path) -> bool:
    """Whether a Micro-Manager .cfg loads livemask's simulated Python devices."""
    try:
        return SIMULATED_MODULE in cfg_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False



def build_segmenter(
    config: ServiceConfig, frame_shape: tuple[int, int] | None = None,
    card: ModelCard | None = None,
) -> Segmenter:
    """Load the configured model card (unless given) and backend, with config overrides
    applied; ``frame_shape`` is the camera's (H, W) where known (a TensorRT engine is built
    for it)."""
    if card is None:
        card = load_model_card(config.model.path or config.model.name)
    backend = load_backend(config.model.backend, card, threads=config.model.threads,
                           frame_shape=frame_shape,
                           device_analysis=config.model.device_analysis)
    overrides = {k: v for k, v in config.analysis.model_dump().items() if v is not None}
    post = postprocessing_for(card, overrides)  # (warns of a setting the card ignores)
    return Segmenter(card, backend, post,
                     device_resident=None if config.model.device_analysis else False)


class Service:
    """One running livemask service. Use ``async with Service(cfg) as svc: ...``.

    Embedding it, call :func:`livemask.log.setup_logging` first (as ``livemask serve``
    does): it also routes pymmcore-plus' log through ours at WARNING (hardware faults it
    reports only there); otherwise pymmcore-plus logs every MDA event at INFO to its own log
    file (≈ 0.15 ms of the camera thread per frame).
    """

    def __init__(
        self,
        config: ServiceConfig,
        *,
        source: FrameSource | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        """``stop``: set when the service is asked to stop (``livemask serve`` sets it on
        SIGINT/SIGTERM); once it is set, :meth:`start` does not autostart the acquisition."""
        self.config = config
        self._stop = stop
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()  # uptime: not moved by clock steps (NTP)
        self.state = "starting"
        self.simulated = False
        self.truth = config.simulation.truth
        self.pixel_size_um = config.hardware.pixel_size_um or 1.0
        #: False on a rig that has no pixel-size calibration, or a replay of a file without
        #: one (µm values are pixel values); a microscope sets it when it is opened
        self.pixel_size_known = source is None or config.hardware.pixel_size_um is not None
        #: The core's pixel size when the rig was opened, where it has one: each frame's
        #: pixel size then follows the core's for that frame (binning, objective)
        self.core_pixel_size_um: float | None = None
        self.core_info: dict[str, Any] = {}
        self.publisher = ZmqPublisher(config.publish.pub_address, sndhwm=config.publish.sndhwm)
        self.control = ControlServer(config.publish.control_address, CommandHandler(self))
        self.pipeline: Pipeline
        self.source: FrameSource | None = source
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._acquiring = False
        self.acquisitions_finished = 0
        self._acquisition_started = 0.0
        self._acquired_at_start = 0  # the acquired-frames counter when the acquisition began
        self._counts_at_start: dict[str, int] = {}  # every counter then
        self._missing_at_start = 0  # the missing-frames counter when it began
        self._stop_requested = False  # stop_acquisition was called for the running one
        self._last_error: str | None = None
        #: the imaging event reported as stalled (acquisition_stalled) and its limit (s)
        self._stalled: tuple[EventWatch, float] | None = None
        self.metrics: MetricsServer | None = None
        self.dashboard: DashboardServer | None = None
        self.feedback: FeedbackController | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._switch_interval: float | None = None
        self.gc_monitor = GcMonitor()
        self.gc_policy = GcPolicy(
            freeze=config.pipeline.gc_freeze, threshold=config.pipeline.gc_threshold
        )
        self.recorder: Recorder | None = None
        self.prefault: Prefault | None = None  # frame-sized memory touched at start
        self._segmenter: Segmenter | None = None  # its backend is released at close
        # what enqueue and feedback actions put back after their events
        self._settings = SettingsInEffect()
        #: ``set exposure_ms``: the camera's and the running plan's (events published through
        #: ``_event`` as it is at each call)
        self.exposure = CameraExposure(
            self, self._settings, lambda kind, detail: self._event(kind, detail))
        # the ended acquisition's acquisition_finished, until its last frames are through
        self._pending_finish: dict[str, Any] | None = None
        self._finish_task: asyncio.Task[None] | None = None
        #: sequences, events and rules against the rig (reads source, core_info, recorder)
        self.rig_checks = RigChecks(self)

    # ------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Service:
        try:
            await self.start()
        except BaseException as exc:
            said = isinstance(exc, Exception) and self._say_start_failed(exc)
            # release whatever was opened before the failure (giving subscribers the
            # error and the last status, where they were sent)
            await self.close(graceful=said)
            raise
        return self

    def _say_start_failed(self, exc: Exception) -> bool:
        """Publish why start-up failed (an ``error`` event and a last status with it as
        ``last_error``): subscribers saw ``starting`` heartbeats, which would otherwise just
        stop. False where the publisher never started."""
        if not self.publisher.started:  # (the failure was in binding it, or before)
            return False
        self._last_error = f"start-up failed: {type(exc).__name__}: {exc}"
        self._event("error", {"detail": self._last_error, "source": "start-up"})
        try:
            self._publish_status()
        except Exception:  # the event said it: best effort
            log.exception("the status after a failed start-up could not be sent")
        return True

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        await self.close(graceful=exc_type is None)

    async def start(self) -> None:
        """Bind sockets, load the model and the microscope, start the stages."""
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        check_own_ports(cfg)  # before any bind: a clash would fail as "Address already in use"
        self.publisher.start()
        # status heartbeats from now on (state "starting"): a model's warm-up, or a TensorRT
        # engine build of minutes, must not look like a service that is gone
        self._tasks = [asyncio.create_task(self._heartbeat(), name="livemask-heartbeat")]
        self.control.start()
        self._start_metrics()  # early too: a port in use fails before hardware and recording
        await self._start_dashboard()  # early: its subscriber joins before the first events
        # the card first: a wrong model name or card fails before the hardware is touched
        card = await asyncio.to_thread(load_model_card, cfg.model.path or cfg.model.name)
        if self.source is None:
            self.source = await asyncio.to_thread(self._open_microscope)
            self.rig_checks.check_configured_sequence()
        elif (connect := getattr(self.source, "connect", None)) is not None:
            # e.g. a ReplaySource: its frames come here, and where the recorded run began
            # another acquisition, so does the replay
            connect(self._on_camera_frame, on_acquisition=self._on_recorded_acquisition)
            # a recording's frames carry their own pixel size, relative to its scale
            self.core_pixel_size_um = getattr(self.source, "reference_pixel_size_um", None)
        if isinstance(self.source, MicroscopeSource):  # the settings enqueue puts back
            self.source.core.mda.events.eventStarted.connect(self._on_event_started)
        # the model is built (a TensorRT engine's profile) and warmed up at the frame size
        # of the opened camera or the given source (a replay), so the first frame does not
        # pay for a shape the model has not seen yet
        frame_shape = self._frame_shape()
        self._limit_publish_queue(frame_shape)
        segmenter = await asyncio.to_thread(build_segmenter, cfg, frame_shape, card)
        self._segmenter = segmenter  # released by close(), also when the warm-up fails
        await asyncio.to_thread(segmenter.warmup, frame_shape)
        if segmenter.device_resident:
            self._shorten_switch_interval()
        memory = physical_memory_bytes()
        self.prefault = await asyncio.to_thread(
            functools.partial(prefault_frame_memory, frame_shape, cfg.pipeline.prefault_frames,
                              limit_bytes=None if memory is None else memory // 2)
        )
        self.pipeline = Pipeline(
            segmenter,
            self.publisher,
            mode=cfg.acquisition.mode,
            queue_size=cfg.pipeline.queue_size,
            frame_every=cfg.publish.frame_every,
            pixel_size_um=self.pixel_size_um,
            pixel_size_known=self.pixel_size_known,
            stage_threads=cfg.pipeline.stage_threads,
            core_pixel_size_um=self.core_pixel_size_um,
        )
        self.pipeline.source = self.source
        self.pipeline.publish_event = self._event  # (recorded too)
        # where a grain tile of a camera ROI lies: from the camera's image at open
        shape = self.core_info.get("image_shape")
        self.pipeline.camera_shape = (int(shape[0]), int(shape[1])) if shape else None
        self.pipeline.pixel_to_stage = cfg.feedback.pixel_to_stage
        if cfg.tracking.enabled:
            from livemask.analysis.tracking import PositionTrackers

            self.pipeline.tracker = PositionTrackers.from_config(cfg.tracking)
        self.pipeline.start()
        self._start_feedback()
        self._start_recording()
        self.gc_policy.apply()  # everything long-lived exists by now
        self.gc_monitor.start()
        self._tasks.append(asyncio.create_task(self.control.serve(), name="livemask-control"))
        self.state = "idle"
        log.info(
            "livemask %s serving: pub %s, control %s, model %s (%s), %s stage thread(s)",
            __version__,
            self.publisher.bound_address,
            self.control.bound_address,
            segmenter.card.name,
            segmenter.backend.name,
            self.pipeline.stage_threads,
        )
        units = self.pipeline.report()["units"]
        self._event("service_started", {"units": units, "config": cfg.model_dump(mode="json")})
        if cfg.acquisition.autostart and self._stop is not None and self._stop.is_set():
            log.info("not starting the acquisition (acquisition.autostart): a stop was "
                     "requested during start-up")
        elif cfg.acquisition.autostart:
            self.start_acquisition(None)
        try:  # started (the heartbeat's next status may be a second away)
            self._publish_status()
        except Exception:  # as the heartbeat's: logged, the service runs
            log.exception("status after start-up failed")

    def _start_metrics(self) -> None:
        """Serve the Prometheus endpoint (metrics.enabled); ``status`` copes with no
        pipeline yet."""
        cfg = self.config.metrics
        if not cfg.enabled:
            return
        from livemask.service.metrics import MetricsServer

        self.metrics = MetricsServer(
            self.status, address=cfg.address, port=cfg.port, loop=self._loop
        ).start()

    def _limit_publish_queue(self, frame_shape: tuple[int, int]) -> None:
        """Lower the PUB high-water mark so that a subscriber that stops reading pins at most
        ``publish.max_queued_mb`` of frames this size (the frames' own arrays: 2 GB and more
        at 2048² with the default 200 messages); before the first frame, as the rebind
        makes subscribers connected by then reconnect."""
        cfg = self.config.publish
        hwm = queue_hwm(cfg.sndhwm, cfg.max_queued_mb, frame_shape)
        if self.publisher.limit_queue(hwm):
            log.info("publish: at most %d messages queued per subscriber at %d×%d "
                     "(publish.max_queued_mb %g; publish.sndhwm %d)", hwm, frame_shape[1],
                     frame_shape[0], cfg.max_queued_mb, cfg.sndhwm)
        elif hwm < self.publisher.sndhwm:
            log.warning("publish.max_queued_mb is not applied on %s (inproc:// and ipc://* "
                        "keep publish.sndhwm, %d messages)", cfg.pub_address, cfg.sndhwm)

    def _shorten_switch_interval(self) -> None:
        """On the GPU path the stage threads mostly launch kernels and wait for the device:
        with CPython's default 5 ms GIL switch interval, a thread that wakes from a wait can
        sit behind a busy one for 5 ms each time (measured: infer p50 6 → 48 ms at 2048²).
        0.5 ms keeps the hand-overs short; restored when the service closes."""
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, GPU_SWITCH_INTERVAL_S))

    def _frame_shape(self) -> tuple[int, int]:
        """The source's frame shape where it tells one, else the simulated sensor's."""
        try:
            shape = getattr(self.source, "frame_shape", None)
        except Exception as exc:  # e.g. no camera loaded: size the start-up work as configured
            log.warning("could not read the camera's image size (%s); using "
                        "simulation.sensor_shape_px", exc)
            shape = None
        if shape is None or min(shape) <= 0:
            return self.config.simulation.sensor_shape_px
        rows, cols = shape
        return (int(rows), int(cols))

    def _open_microscope(self) -> MicroscopeSource:
        from livemask.acquisition.core import describe_core, open_core

        hw, sim = self.config.hardware, self.config.simulation
        truth_lookup = None
        if uses_simulated_devices(hw.config_file):
            from livemask.acquisition.simulated.world import configure_world

            world = configure_world(
                sim.sample,
                seed=sim.seed,
                overrides=sim.sample_overrides(),
                sensor_shape=sim.sensor_shape_px,
                pixel_size_um=sim.pixel_size_um,
                steps_per_frame=sim.steps_per_frame,
            )
            self.simulated = True
            world.keep_truth = self.truth
            truth_lookup = world.truth_for if self.truth else None
        elif self.truth:
            log.warning("simulation.truth is on but %s is not simulated: no truth", hw.config_file)
            self.truth = False
        core = open_core(hw.config_file, core=hw.core)
        self.core_info = describe_core(core)
        core_px = float(core.getPixelSizeUm() or 0.0)
        if hw.pixel_size_um or core_px:
            self.pixel_size_um = hw.pixel_size_um or core_px
            # an override scales the core's calibration, so it still follows binning
            self.core_pixel_size_um = core_px if math.isfinite(core_px) and core_px > 0 else None
        elif self.simulated:  # the world's pixel size (open_core sets it on the preset)
            self.pixel_size_um = sim.pixel_size_um
            log.info("no pixel-size preset in %s: measuring at the simulated world's "
                     "simulation.pixel_size_um (%g µm/px)", hw.config_file, sim.pixel_size_um)
        else:
            self.pixel_size_um, self.pixel_size_known = 1.0, False
            log.warning(
                "no pixel size: %s has no active pixel-size preset and hardware.pixel_size_um "
                "is not set. Measurements stay in pixels (the *_um values are pixel values) "
                "and feedback actions that centre the stage are refused. Calibrate the pixel "
                "size in the .cfg (PixelSize_um) or set hardware.pixel_size_um",
                hw.config_file,
            )
        return MicroscopeSource(
            core,
            self._on_camera_frame,
            truth_lookup=truth_lookup,
            sync_timeout_s=self.config.acquisition.frame_timeout_s,
            on_missing=self._on_missing_frame,
            on_mismatch=self._on_mismatch,
        )

    def _start_recording(self) -> None:
        """Create the recorder (record.enabled) and make it a sink of every frame."""
        rec = self.config.record
        if not rec.enabled:
            return
        from livemask.recording import Recorder, new_run_dir

        self.recorder = Recorder(
            new_run_dir(rec.path or Path("recordings")),
            pixel_size_um=self.pixel_size_um,  # 1.0, a placeholder, where not calibrated
            pixel_size_calibrated=self.pixel_size_known,
            config=self.config.model_dump(mode="json"),
            units=self.pipeline.report()["units"],  # tracking fields too
            labels=rec.labels,
            measurements=rec.measurements,
            max_queue_mb=rec.max_queue_mb,
            on_error=lambda message: self._from_thread(self._recording_failed, message),
            on_resumed=lambda errors: self._from_thread(self._recording_resumed, errors),
        ).start()
        self.pipeline.sinks.append(self.recorder)
        log.info("recording to %s", self.recorder.path)

    async def _start_dashboard(self) -> None:
        """Serve the web dashboard (dashboard.enabled): a subscriber of our own PUB socket."""
        cfg = self.config.dashboard
        if not cfg.enabled:
            return
        from livemask.dashboard.server import DashboardServer, local_connect_address

        self.dashboard = DashboardServer(
            local_connect_address(self.publisher.bound_address),
            address=cfg.address,
            port=cfg.port,
            update_hz=cfg.update_hz,
            max_image_px=cfg.max_image_px,
        )
        await self.dashboard.start()

    def _start_feedback(self) -> None:
        """Create the rule engine and hook it to the pipeline and the MDA runner."""
        if not self.config.feedback.enabled:
            return
        self.rig_checks.check_rules(self.config.feedback.rules, "feedback.rules")
        mda = getattr(getattr(self.source, "core", None), "mda", None)
        self.feedback = FeedbackController(
            self.config.feedback,
            pixel_size_um=self.pixel_size_um if self.pixel_size_known else None,
            inject=self._inject_feedback,
            publish=self._event,
            set_mode=lambda mode: self._spawn(self.apply_settings(mode=mode)),  # type: ignore[arg-type]
            stop=lambda: self._spawn(self.stop_acquisition()),
            finish_with=getattr(self.source, "finish_with", None),
            loop=self._loop,
            check_events=self.rig_checks.check_feedback_events,
            cannot_acquire=getattr(self.source, "cannot_acquire", None),  # e.g. a replay
            # the one tracker of the settings in effect, which enqueue uses too: each puts
            # back the settings from before the other's added events, not theirs
            settings=self._settings,
        )
        self.pipeline.on_measurements = self.feedback.on_measurements
        if mda is not None:  # reaction clock: when an action's first event starts on the core
            mda.events.eventStarted.connect(self.feedback.on_event_started)

    def _inject_feedback(self, events: list[useq.MDAEvent]) -> int:
        """Queue a feedback action's events (their intervals count from its first frame)."""
        if self.source is None or not self._acquiring:
            raise AcquisitionError("no acquisition is running")
        return self.source.inject(events, timed_from_first=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_missing_frame(self, event: useq.MDAEvent) -> None:
        """Runner thread: an image event delivered no frame (pymmcore-plus only logs it)."""
        self._from_thread(self._frame_missing, plain_index(event.index))

    def _frame_missing(self, index: dict[str, int]) -> None:
        self.pipeline.counters.incr("missing")
        self._event("frame_missing", {
            "index": index,
            "detail": "the event delivered no frame: a failed snap (or a skipped event); "
                      "the log has pymmcore-plus' reason",
        })

    def _on_mismatch(self, kind: str, event: useq.MDAEvent, off: dict[str, Any]) -> None:
        """Runner thread: a frame was not taken as its event commanded (pymmcore-plus only
        logs a failed move or setting): ``stage_mismatch``, ``settings_mismatch`` or
        ``device_busy``; or its time point started late: ``behind_schedule`` (also
        logged: nothing else says it)."""
        name, detail = {
            "stage": (
                "stage_mismatch",
                "the stage was not at the commanded position when the frame was taken (a "
                "failed move; the log has pymmcore-plus' reason); the frame carries the "
                "read-back position",
            ),
            "settings": (
                "settings_mismatch",
                "the frame was taken with another exposure, channel or property than its event "
                "commanded (a setting that failed, whose reason pymmcore-plus logged, or a "
                "camera that rounds the exposure); the frame carries the read-back settings",
            ),
            "schedule": (
                "behind_schedule",
                "the acquisition runs behind its time plan: a time point took longer than the "
                "interval (exposures, stage moves, autofocus; in synchronized or pipelined "
                "mode also the model and analysis the camera waits for), and the next ones "
                "start as soon as they can; frames keep their real times (t.acquired). "
                "Lengthen time_plan.interval, shorten the exposure, or use free-run mode",
            ),
            "busy": (
                "device_busy",
                "a device was still busy after the core's time-out when the frame was taken; "
                "the frame was taken anyway and may show the device moving (the log names "
                "each such frame)",
            ),
        }[kind]
        if kind == "schedule":
            log.warning("time point %s started %.1f s after its planned time (%s s into the "
                        "run): %s", plain_index(event.index), off["late_s"],
                        off["planned_s"], detail.split(": ", 1)[1])
        self._from_thread(self._event, name,
                          {"index": plain_index(event.index), **off, "detail": detail})

    def _recording_failed(self, message: str) -> None:
        """The recorder could not write (the first error of a run of them): say so."""
        path = self.recorder.path if self.recorder is not None else "?"
        self._last_error = f"recording to {path}: {message}"
        self._event("error", {"detail": self._last_error, "source": "recording"})

    def _recording_resumed(self, errors_total: int) -> None:
        """The recorder writes again after a run of write errors (space was freed)."""
        path = self.recorder.path if self.recorder is not None else "?"
        self._event("recording_resumed", {"path": str(path), "errors_total": errors_total})

    def _on_camera_frame(self, raw: RawFrame) -> None:
        """Camera thread → event loop hand-off; never blocks the camera."""
        self._from_thread(self.pipeline.submit, raw)

    def _from_thread(self, callback: Any, *args: Any) -> None:
        """Schedule ``callback(*args)`` on the service's loop from another thread (dropped
        once the loop is closed)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback, *args)

    async def close(self, drain_timeout_s: float = 3.0, *, graceful: bool = True) -> None:
        """Stop acquiring, publish what is in flight, close sockets, model and hardware.

        ``graceful``: give subscribers up to ``CLOSE_LINGER_S`` to receive the last queued
        messages (the final status among them); False on an error path: discard them."""
        if self.state == "closed":
            return
        self.state = "stopping"
        with contextlib.suppress(Exception):
            await self.stop_acquisition()
        if self._acquiring:  # the runner is stuck in a device call: say so in the record
            self._event("error", {"detail": (
                "the acquisition did not end when the service stopped: the acquisition "
                "thread is stuck in a device call (e.g. a camera snap that never returns); "
                "its remaining events were not acquired")})
        mda = getattr(getattr(self.source, "core", None), "mda", None)
        if mda is not None:
            handlers = [self._on_event_started]
            if self.feedback is not None:
                handlers.append(self.feedback.on_event_started)
            for handler in handlers:
                with contextlib.suppress(Exception):
                    mda.events.eventStarted.disconnect(handler)
        if hasattr(self, "pipeline"):
            await self.pipeline.drain(drain_timeout_s)
            self._report_finished()  # what the drain got through is out: say it ended
            with contextlib.suppress(Exception):
                self._publish_status()
            await self.pipeline.close()  # hands frames the drain missed to the recorder
        if self.recorder is not None:  # after the pipeline: every frame is queued by now
            acquired = self.pipeline.counters.counts["acquired"]
            await asyncio.to_thread(self.recorder.close, frames_acquired=int(acquired))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)
        if self.dashboard is not None:  # before the publisher: its subscriber reads from it
            await self.dashboard.close()
        self.control.close()
        self.publisher.close(linger_s=CLOSE_LINGER_S if graceful else 0.0, wait=False)
        await asyncio.to_thread(self.publisher.wait_sent)  # the last status reaches subscribers
        if self._segmenter is not None:  # the model's (GPU) memory now, not when the GC runs
            try:
                await asyncio.to_thread(self._segmenter.backend.close)
            except Exception:  # releasing the model is best effort at shutdown
                log.exception("closing the model backend failed")
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
        self.gc_monitor.stop()
        self.gc_policy.restore()
        if self.source is not None:
            try:
                await call_hardware(self.source.close, what="closing the microscope",
                                    timeout_s=120.0)
            except Exception:  # releasing the hardware is best effort at shutdown
                log.exception("closing the frame source failed")
        self.state = "closed"
        log.info("livemask stopped")

    # ------------------------------------------------------------ acquisition
    @property
    def acquiring(self) -> bool:
        """Whether an acquisition is running."""
        return self._acquiring

    async def last_run_exited(self) -> None:
        """Let the thread of an acquisition that has ended finish exiting, off the event
        loop (pymmcore-plus may still be restoring settings; the source's own check before
        a start would otherwise block the loop for up to 2 s), and its last frames get
        through the pipeline, for up to :data:`FINISH_WAIT_S` (its acquisition_finished
        then goes out before the next acquisition_started)."""
        join = getattr(self.source, "join_ended", None)
        if join is not None and not self._acquiring:
            await asyncio.to_thread(join, 2.0)
        await self._until_finish_reported()

    async def _until_finish_reported(self) -> None:
        """Wait up to :data:`FINISH_WAIT_S` for the ended acquisition's last frames and its
        ``acquisition_finished`` (no wait while it runs, or once that is sent)."""
        task = self._finish_task
        if task is not None and not self._acquiring:
            await asyncio.wait({task}, timeout=FINISH_WAIT_S)

    def start_acquisition(self, sequence: useq.MDASequence | None) -> int:
        """Start ``sequence`` (default: the config's); returns the events it plans.

        Long time plans are iterated in chunks (:func:`iter_events`), so any number of
        time points starts at once and holds no list of them. Errors name a given
        ``sequence`` as ``sequence`` (the control argument), the config's by its path."""
        what = self.rig_checks.configured_sequence_name() if sequence is None else "sequence"
        seq = sequence or self.config.acquisition.mda_sequence()
        if isinstance(self.source, MicroscopeSource):
            # pymmcore-plus fills in a grid's field of view only for a sequence it runs
            # itself; ours reach it as events (useq's fallback is 1 µm)
            try:
                seq = with_field_of_view(seq, self.source.field_of_view())
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        self.rig_checks.check_sequence(seq, what)
        count = event_count(seq)
        if count > MAX_PLANNED_EVENTS:
            raise ConfigError(
                f"sequence: plans {count} events, more than 2**63 - 1; plan fewer (a time "
                "plan of 2**63 - 1 loops already runs for ever)")
        try:  # the size check again, now that the camera's field sizes the grids
            events = iter_events(seq)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        detail = {"sequence": seq.model_dump(mode="json")}
        exposures = {c.exposure for c in sequence_channels(seq) if c.exposure is not None}
        return self._start_events(
            events, detail, count, exposures, positions=range(len(seq.stage_positions)),
            coordinates={i: (p.x, p.y, p.z) for i, p in enumerate(seq.stage_positions)},
            channel_exposures={str(c.config): float(c.exposure) for c in sequence_channels(seq)
                               if c.exposure is not None})

    def check_rules_on_rig(self, specs: Sequence[RuleSpec], what: str) -> None:
        """ConfigError for rules the rig cannot carry out (:meth:`RigChecks.check_rules`)."""
        self.rig_checks.check_rules(specs, what)

    def _start_events(
        self, events: Any, detail: dict[str, Any], count: int,
        plan_exposures: set[float] | None = None, *, positions: Collection[int] | None = None,
        coordinates: Mapping[int, Sequence[float | None]] | None = None,
        channel_exposures: Mapping[str, float] | None = None,
    ) -> int:
        """Start an acquisition of ``events``; ``plan_exposures``: the exposures its channels
        set (a ``set exposure_ms`` while it runs replaces them, when there is one);
        ``positions``: the ``p`` indices it plans (for feedback ``skip``; None: unknown);
        ``coordinates``: their stage (x, y, z) µm (for feedback's dose ledger);
        ``channel_exposures``: the plan's exposure of each channel preset (for feedback
        actions naming another channel than their trigger's)."""
        if self.source is None:
            raise AcquisitionError("no frame source")
        if self.state in ("stopping", "closed"):
            raise AcquisitionError("the service is stopping")
        if self._acquiring or self.source.running:  # (checked before anything is reset)
            raise AcquisitionError("an acquisition is already running; stop it first")
        ready = getattr(self.source, "ready_to_start", None)
        if ready is not None:  # e.g. the last run's thread still exiting: change nothing
            ready()
        self._report_finished()  # the last run's, if its frames are still going through
        planned = self.exposure.begin_run(events, plan_exposures)
        if isinstance(self.source, MicroscopeSource):  # (a replay has no camera)
            self.source.follow_planned_exposure(planned.exposure_now)
        self._settings.reset(**self._camera_settings())
        events = planned  # before the feedback's ledger sees them
        if self.feedback is not None:
            self.feedback.acquisition_started()
            events = self.feedback.wrap_planned(events, positions, coordinates,
                                                channel_exposures)
        self.pipeline.begin_acquisition()  # before any of its frames can arrive
        self.source.start(
            iter(events),
            mode=self.pipeline.mode,
            on_done=self._on_acquisition_done,
        )
        self._stop_requested = False
        self._acquiring = True
        self.state = "running"
        self._begun({**detail, "events": count})
        return count

    def _begun(self, detail: dict[str, Any]) -> None:
        """The acquisition the pipeline has just begun counts from here: publish its
        ``acquisition_started`` (``detail`` first)."""
        counts = self.pipeline.counters.counts
        self._acquired_at_start, self._missing_at_start = counts["acquired"], counts["missing"]
        self._counts_at_start = dict(counts)
        self._stalled = None
        self._acquisition_started = time.time()
        self._event("acquisition_started", {
            **detail, "mode": self.pipeline.mode, "acquisition": self.pipeline.acquisition,
        })
        self._log_started(detail)

    def _log_started(self, detail: dict[str, Any]) -> None:
        """An INFO line for the acquisition just begun: its number, events and mode."""
        replayed = detail.get("replayed_acquisition")
        log.info("acquisition %s started: %s event(s) planned, %s mode%s",
                 self.pipeline.acquisition, detail.get("events"), self.pipeline.mode,
                 "" if replayed is None else f" (replaying recorded acquisition {replayed})")

    def _on_recorded_acquisition(self, number: int, frames: int) -> bool:
        """Replay thread: its next frame is the first of the recorded acquisition ``number``
        (``frames`` of it follow). Returns once the service has finished the running
        acquisition and begun the next (:meth:`_next_recorded_acquisition`): True; False at
        once when a stop is asked for meanwhile, or the service is gone (the replay ends).

        Scheduled after the frames handed over before it, so those count to the running
        acquisition (the pipeline numbers a frame as it arrives), and the next frame is
        handed over only once this returns."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        done = asyncio.run_coroutine_threadsafe(
            self._next_recorded_acquisition(number, frames), loop)
        while True:
            try:
                return bool(done.result(timeout=0.05))
            except TimeoutError:
                if self._stop_requested or loop.is_closed():  # (it then begins nothing)
                    return False
            except concurrent.futures.CancelledError:  # cancelled as the service closed
                return False
            except Exception:  # the replay goes on, as one acquisition from here
                log.exception("beginning the replay's next recorded acquisition failed")
                return True

    async def _next_recorded_acquisition(self, number: int, frames: int) -> bool:
        """A replay reached the recorded acquisition ``number``: once the running one's
        frames are through the pipeline, its ``acquisition_finished``, then the next begins
        (``acquisition_started`` with ``replayed_acquisition``; tracks and the cumulative
        grain statistics restart with its first frame), as in the recorded run; True. False,
        beginning nothing, once a stop was asked for: the replay ends, and its acquisition
        finishes as any does."""
        if not self._acquiring or self._stop_requested:
            return False
        stall_s = self.config.acquisition.frame_timeout_s
        if not await self.pipeline.settle(stall_s):
            log.warning("replay: no frame got through the pipeline for %g s: acquisition %s "
                        "finishes with %d frame(s) still in flight", stall_s,
                        self.pipeline.acquisition, self.pipeline.in_flight)
        if not self._acquiring or self._stop_requested:
            return False
        if self.feedback is not None:
            self.feedback.acquisition_finished()
        self._announce_finished(self._finish_report(None))
        self.pipeline.begin_acquisition()  # (the replay hands its next frame over after this)
        if self.feedback is not None:
            self.feedback.acquisition_started()
        self._begun({"replayed_acquisition": number, "events": frames})
        return True

    def _camera_settings(self) -> dict[str, Any]:
        """The exposure and channel in effect as an acquisition starts (the camera as
        opened, of the last frame, the last run's end or the last ``set``), None if not
        known: what ``enqueue`` puts back until the run's events give others."""
        return known_camera_settings(
            {**self.core_info, **getattr(self.source, "camera_now", {})})

    def _on_event_started(self, event: useq.MDAEvent) -> None:
        """``core.mda.events.eventStarted`` (runner thread): the settings in effect."""
        try:
            restore = self._settings.event_started(event)
        except Exception:  # bookkeeping must not stop the acquisition
            log.exception("tracking the settings of event %s failed",
                          plain_index(event.index))
            return
        if restore is not None:
            self._from_thread(self._settings.started, restore)

    def _on_acquisition_done(self, error: str | None) -> None:
        self._from_thread(self._acquisition_finished, error)

    def _acquisition_finished(self, error: str | None) -> None:
        """The runner has ended the acquisition: ``acquisition_finished`` (and the idle
        state) follow once its last frames are through the pipeline (:meth:`_report_finished`;
        at once where none got through for ``acquisition.frame_timeout_s``)."""
        self._acquiring = False
        self._stalled = None  # a stall that lasted to the end: no acquisition_resumed
        release_iteration_caches()  # useq's memo of the sequence (a stopped one's too)
        if self.feedback is not None:
            self.feedback.acquisition_finished()
        report = self._finish_report(error)
        self._report_finished()  # (an earlier one is reported by the start before this)
        self._pending_finish = report
        self._finish_task = asyncio.ensure_future(self._finish_when_through(report))

    def _finish_report(self, error: str | None) -> dict[str, Any]:
        """The ``acquisition_finished`` of the running acquisition, ended with ``error``."""
        missing = int(self.pipeline.counters.counts["missing"] - self._missing_at_start)
        return {
            "acquisition": self.pipeline.acquisition,
            "error": error or self._no_frame_error(missing),
            "frames_missing": missing,
            "events_not_run": int(getattr(self.source, "events_not_run", 0)),
            "duration_s": round(time.time() - self._acquisition_started, 3),
        }

    async def _finish_when_through(self, report: dict[str, Any]) -> None:
        """Report ``report`` once no frame is in flight (bounded: see settle)."""
        stall_s = self.config.acquisition.frame_timeout_s
        if not await self.pipeline.settle(stall_s):
            log.warning(
                "acquisition %s ended; no frame got through the pipeline for %g s: reporting "
                "its end with %d frame(s) still in flight", report["acquisition"], stall_s,
                self.pipeline.in_flight)
        self._report_finished(report)

    def _report_finished(self, report: dict[str, Any] | None = None) -> None:
        """Publish the pending ``acquisition_finished`` (only if it is ``report``, when
        given), with an ``error`` event before it if it failed; the state goes idle."""
        pending = self._pending_finish
        if pending is None or (report is not None and report is not pending):
            return
        self._pending_finish = None
        task, self._finish_task = self._finish_task, None
        if report is None and task is not None:
            task.cancel()  # reported early: a start, or the service closes
        if self.state == "running":
            self.state = "idle"
        self._announce_finished(pending)

    def _announce_finished(self, report: dict[str, Any]) -> None:
        """Count and publish ``acquisition_finished``, with an ``error`` event before it if
        the acquisition failed."""
        self.acquisitions_finished += 1
        if report["error"]:
            self._last_error = report["error"]
            self._event("error", {"detail": report["error"]})
        self._event("acquisition_finished", report)
        self._log_finished(report)

    def _log_finished(self, report: dict[str, Any]) -> None:
        """A line for the acquisition that ended: INFO, or WARNING with its error."""
        number = report["acquisition"]
        counts = self.pipeline.counters.counts

        def since_start(name: str) -> int:
            return int(counts[name] - self._counts_at_start.get(name, 0))

        summary = (f"{since_start('acquired')} frame(s) in {report['duration_s']:g} s "
                   f"({since_start('analysed')} analysed, {since_start('skipped')} skipped "
                   f"analysis, {since_start('failed')} failed), "
                   f"{report['frames_missing']} missing")
        if report["error"]:
            log.warning("acquisition %s ended with an error (%s): %s",
                        number, summary, report["error"])
        elif self._stop_requested:
            log.info("acquisition %s stopped: %s, %d enqueued event(s) not run",
                     number, summary, report["events_not_run"])
        else:
            log.info("acquisition %s finished: %s", number, summary)

    @property
    def last_error(self) -> str | None:
        """The last acquisition or recording error (``status.last_error``), or None."""
        return self._last_error

    def _no_frame_error(self, missing: int) -> str | None:
        """An error for an acquisition whose image events (some or all) gave no frame.

        pymmcore-plus logs a failed snap as a warning and goes on to the next event, so a
        camera that fails would otherwise end the acquisition "successfully"."""
        # optional for FrameSource implementations: without it, no check
        issued = int(getattr(self.source, "image_events_issued", 0))
        acquired = self.pipeline.counters.counts["acquired"] - self._acquired_at_start
        if issued and not acquired and not self._stop_requested:
            return (
                f"the acquisition ran {issued} imaging event(s) but the camera delivered no "
                "frame: check the camera in hardware.config_file (the log has pymmcore-plus' "
                "warnings)"
            )
        if missing:
            return (
                f"{missing} of {issued} imaging event(s) delivered no frame (failed snaps, "
                "each announced as a frame_missing event): check the camera (the log has "
                "pymmcore-plus' warnings)"
            )
        return None

    async def stop_acquisition(self) -> None:
        """Cancel the running acquisition and wait for the runner to end, and (for up to
        :data:`FINISH_WAIT_S`) for its last frames and ``acquisition_finished``."""
        self._stop_requested = True
        if self.source is not None and self._acquiring:
            try:
                await call_hardware(self.source.stop, what="stopping the acquisition",
                                    timeout_s=120.0, bounded=True)  # it bounds its own wait
            except HardwareTimeout as exc:  # the runner stays stuck; status says acquiring
                log.error("%s", exc)
            # the runner's on_done arrives via call_soon_threadsafe; let it run
            await asyncio.sleep(0)
            await self._until_finish_reported()

    async def enqueue(self, events: list[useq.MDAEvent]) -> dict[str, Any]:
        """Add events to the running acquisition, to run before its remaining planned
        events and followed by one that puts back the settings they change
        (:func:`~livemask.service.restore.restore_after`), or start a new one made of them
        (also when the running one has taken its last event and is ending: they would never
        run). Refused for a source that cannot acquire (a replay), idle too: it would play
        recorded frames."""
        if self.source is None:
            raise AcquisitionError("no frame source")
        if getattr(self.source, "cannot_acquire", None):
            raise AcquisitionError(
                "enqueue: a replay plays recorded frames and cannot acquire the events; "
                "enqueue them to a service that runs the microscope (livemask serve)")
        self.rig_checks.check_enqueued(events)
        if self._acquiring:
            try:
                restore = await restore_after(self.source, self._settings, events)
                self.source.inject([*events, *([restore] if restore is not None else [])])
                if restore is not None:
                    self._settings.queued(restore)
                return {"enqueued": len(events), "started": False}
            except AcquisitionEnding:
                await self._until_ended()
        await self.last_run_exited()
        # the enqueued events are the run's plan: a set exposure_ms replaces their exposures
        exposures = {e.exposure for e in events if e.exposure is not None}
        positions = {int(e.index["p"]) for e in events if "p" in e.index}
        self._start_events(events, {"enqueued": len(events)}, len(events), exposures,
                           positions=positions)
        return {"enqueued": len(events), "started": True,
                "acquisition": self.pipeline.acquisition}

    async def _until_ended(self, timeout_s: float = HARDWARE_TIMEOUT_S) -> None:
        """Wait for an ending acquisition to be reported finished (pymmcore-plus may be
        restoring the settings from before it); within the control client's timeout."""
        deadline = time.monotonic() + timeout_s
        while self._acquiring:
            if time.monotonic() > deadline:
                raise AcquisitionError("the acquisition is still ending (or its thread is "
                                       "stuck in a device call); the events were not added: "
                                       "retry")
            await asyncio.sleep(0.005)

    async def apply_settings(
        self, *, exposure_ms: float | None = None, mode: Mode | None = None
    ) -> dict[str, Any]:
        """Change exposure and/or mode now."""
        if mode is not None and mode not in get_args(Mode):
            raise ValueError(f"mode {mode!r}: give one of {', '.join(get_args(Mode))}")
        changed: dict[str, Any] = {}
        if exposure_ms is not None:
            await self.exposure.set(exposure_ms)
            changed["exposure_ms"] = exposure_ms
            self.exposure.hold(exposure_ms)
        if mode is not None:
            self.pipeline.mode = mode
            if self.source is not None:
                self.source.set_mode(mode)
            changed["mode"] = mode
        self._event("setting_changed", changed)
        return changed

    # ------------------------------------------------------------ reporting
    def _event(self, kind: str, detail: dict[str, Any]) -> None:
        """Publish (and record) one event; never raises: a detail field that cannot be
        encoded is sent as null and named in ``not_encoded``, so the event still goes out
        (where the header still cannot be, e.g. fields nesting too deeply together: its
        scalar fields and ``t``, every other field named in ``not_encoded``)."""
        header = {"kind": kind, "t": {"sent": time.time()}, **detail}
        try:
            header["seq"] = self.publisher.publish("event", header)
        except RuntimeError:
            log.debug("event %s not published: publisher closed", kind)
        except ProtocolError as exc:
            log.error("event %s: %s; sent without those fields", kind, exc)
            for scalars_only in (False, True):
                header = self._encodable(header, scalars_only=scalars_only)
                try:
                    header["seq"] = self.publisher.publish("event", header)
                    break
                except RuntimeError:
                    break
                except ProtocolError as again:  # (fields nesting too deeply together)
                    log.error("event %s: %s; %s", kind, again, "not published" if scalars_only
                              else "sending its scalar fields only")
        if self.recorder is not None:
            self.recorder.on_event(header)

    @staticmethod
    def _encodable(header: dict[str, Any], *, scalars_only: bool = False) -> dict[str, Any]:
        """``header`` with each field JSON cannot carry (tested as it sits in the header,
        one level down) set to None, named in not_encoded; ``scalars_only``: also each field
        but ``t`` that is not a number, string, boolean or null."""
        bad = list(header.get("not_encoded") or [])
        for key, value in header.items():
            if key == "not_encoded" or key in bad:
                continue
            if scalars_only and key != "t" and not isinstance(
                    value, str | int | float | bool | None):
                bad.append(key)
                continue
            try:
                dumps_json({key: value})
            except ProtocolError:
                bad.append(key)
        return {**{k: None if k in bad else v for k, v in header.items()}, "not_encoded": bad}

    def next_seq(self) -> dict[str, int]:
        """The seq the next message of each topic will get (0 for a topic not sent yet)."""
        sent = self.publisher.counters()["next_seq"]
        return {topic: int(sent.get(topic, 0)) for topic in TOPICS}

    def status(self) -> dict[str, Any]:
        """Everything a dashboard or a late joiner needs to know about the service."""
        pipe = getattr(self, "pipeline", None)
        return {
            "state": self.state,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self._started_monotonic, 3),
            "heartbeat_s": self.config.publish.heartbeat_s,
            "acquiring": self._acquiring,
            "pending_events": int(getattr(self.source, "pending_events", 0)),
            "mode": pipe.mode if pipe else self.config.acquisition.mode,
            "model": pipe.segmenter.card.name if pipe else self._configured_model_name(),
            "backend": pipe.segmenter.backend.name if pipe else None,
            "device": pipe.segmenter.backend.device if pipe else None,
            "simulated": self.simulated,
            "truth": self.truth,
            "pixel_size_um": pipe.frame_pixel_size_um if pipe else self.pixel_size_um,
            "pub_address": self.publisher.bound_address if self.state != "closed" else None,
            "core": {**self.core_info, **getattr(self.source, "camera_now", {})},
            "last_error": self._last_error,
            "stalled_s": self._stalled_s(),
            "last_frame_error": pipe.last_failure if pipe else None,
            "acquisitions_finished": self.acquisitions_finished,
            "acquisition": pipe.acquisition if pipe and pipe.acquisition else None,
            "metrics_url": self.metrics.url if self.metrics is not None else None,
            "dashboard_url": self.dashboard.url if self.dashboard is not None else None,
            "publisher": self.publisher.counters(),
            "gc": {**self.gc_monitor.report(), "frozen_objects": self.gc_policy.frozen_objects},
            **(pipe.report() if pipe else {}),
            "feedback": self.feedback.report() if self.feedback is not None else None,
            "recording": self.recorder.report() if self.recorder is not None else None,
        }

    def _configured_model_name(self) -> str | None:
        """The model's name before it is loaded: the shipped model's, or the ``name`` of the
        card at ``model.path`` (None while that cannot be read: the start says why)."""
        path = self.config.model.path
        if path is None:
            return self.config.model.name
        try:
            card = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
        name = card.get("name") if isinstance(card, dict) else None
        return name if isinstance(name, str) else None

    def _check_stall(self) -> None:
        """Heartbeat: report an imaging event that has taken longer than its limit (the
        runner stuck in a snap or device call, which nothing else reports) once, as
        ``acquisition_stalled``, and its end, as ``acquisition_resumed``, unless the
        acquisition ends (or a stop was asked for) first."""
        source = self.source
        in_progress = getattr(source, "event_in_progress", None)
        if in_progress is None or source is None or not self._acquiring:
            return
        current: tuple[EventWatch, float] | None = in_progress()
        now = time.monotonic()
        if self._stalled is not None:
            watch, limit = self._stalled
            if watch.ended is None and current is not None and current[0] is watch:
                return  # still stalled
            if self._stop_requested or not source.running:
                return  # ending: acquisition_finished follows
            self._stalled = None
            waited = (watch.ended or now) - watch.started
            log.warning("Acquisition resumed: imaging event %s ended after %.1f s",
                        json.dumps(plain_index(watch.event.index)), waited)
            self._event("acquisition_resumed", {
                "index": plain_index(watch.event.index), "waited_s": round(waited, 3),
                "stalled_s": round(max(waited - limit, 0.0), 3),
            })
        if current is None or current[0].ended is not None:
            return
        watch, limit = current
        waited = now - watch.started
        if waited <= limit:
            return
        self._stalled = current
        index = plain_index(watch.event.index)
        detail = (
            f"imaging event {json.dumps(index)} has not delivered its frame after "
            f"{waited:.1f} s (limit {limit:.1f} s): the camera or a device call has not "
            "returned. Check the camera and the devices (power, cables, driver; the log may "
            "have pymmcore-plus' warnings); `stop` ends the run (if the call never returns, "
            "only a restart of the service and the device will)"
        )
        log.warning("Acquisition stalled: %s", detail)
        self._last_error = f"acquisition stalled: {detail}"
        self._event("acquisition_stalled", {
            "index": index, "waited_s": round(waited, 3), "limit_s": round(limit, 3),
            "detail": detail,
        })

    def _stalled_s(self) -> float | None:
        """Seconds the stalled imaging event has waited beyond its limit (None if none)."""
        if self._stalled is None or self._stalled[0].ended is not None:
            return None
        watch, limit = self._stalled
        return round(max(time.monotonic() - watch.started - limit, 0.0), 3)

    def _publish_status(self) -> None:
        self.publisher.publish("status", {"t": {"sent": time.time()}, **self.status()})

    async def _heartbeat(self) -> None:
        while True:
            try:
                self._check_stall()
            except Exception:
                log.exception("stall check failed")
            try:
                self._publish_status()
            except Exception:
                log.exception("status heartbeat failed")
            await asyncio.sleep(self.config.publish.heartbeat_s)


async def serve(config: ServiceConfig, stop: asyncio.Event) -> None:
    """Run a service until ``stop`` is set."""
    async with Service(config):
        await stop.wait()
