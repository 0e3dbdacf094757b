"""``livemask bench``: model, naive loop and full service, measured in one run.

Three throughput figures on the simulated microscope, same model, backend and frames:

- ``inference_fps``: :meth:`Segmenter.infer` alone, in a loop over the frames: half of
  them first, the other half after the pipeline run, so that a drift of the machine's speed
  during the run weighs on this figure as on the others.
- ``naive_fps``: what a user writes in a ``frameReady`` callback, as one sequential loop in
  one thread: ``core.snapImage()``/``getImage()`` through the real UniMMCore simulated
  devices, predict, labels, :func:`measure_objects`, and publish ``frame``, ``labels`` and
  ``measurements`` on a real :class:`ZmqPublisher` to a real subscriber on loopback.
- ``pipeline_fps``: the full :class:`~livemask.service.app.Service` (MDA runner on its own
  thread, stages overlapped) publishing to a real subscriber on loopback: frames analysed
  and received by the subscriber / time from the first frame acquired to the last one
  published. By default in ``pipelined`` mode: every frame is analysed, like in the naive
  loop, and the camera waits only while a frame waits for the model, so the figure is the
  service's maximum sustained rate. In ``free-run`` mode (``mode``) a camera running as
  fast as its exposure allows outruns analysis, and the frames that skip analysis are
  counted (``frames_skipped``). With ``interval_s=0`` the acquisition goes on until
  ``frames`` frames have been analysed (at most ``FREE_RUN_EVENTS_PER_FRAME`` times as many
  events), so that all three figures cover as many analysed frames. ``camera_fps`` paces
  the camera instead, for ``frames`` events, to measure latency at a sustained rate.

``latency_ms`` (per stage and ``end_to_end``, p50/p95/p99) comes from the stage timestamps
in the ``measurements`` headers the subscriber received during the pipeline run and the time
it received each (``deliver``; ``end_to_end`` runs from ``acquired`` to it), leaving out
the frames acquired in its first ``latency_warmup_s`` (start-up: first touch of frame-sized
memory, and the queue that builds meanwhile); ``latency_ms_with_warmup`` keeps every frame.

The frames are rendered once from the simulator before anything is timed; the simulated
camera then replays them (:class:`ReplaySample`), so that the simulator's rendering cost,
which a real camera does not have, is not measured (``live_render=True`` renders live).
With ``exposure_ms > 0`` every snap lasts at least its exposure, as on a real camera, in
both the naive loop and the pipeline. The subscriber runs in its own process, like a
viewer or a recorder would.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import logging
import math
import os
import platform
import re
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from livemask.acquisition.mode import Mode
from livemask.acquisition.simulated import SIMULATED_CFG
from livemask.child_process import PipedProcess
from livemask.cpu_usage import CpuSnapshot, cpu_report
from livemask.errors import ConfigError, LivemaskError
from livemask.service.gc_policy import GcMonitor, GcPolicy
from livemask.service.prefault import Prefault

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from livemask.acquisition.simulated.nuclei import RenderResult
    from livemask.acquisition.simulated.world import SimulatedWorld
    from livemask.config import ServiceConfig
    from livemask.inference.segmenter import Segmenter

__all__ = [
    "BenchError",
    "BenchSettings",
    "ReplaySample",
    "format_report",
    "machine_info",
    "measure_inference",
    "memory_mb",
    "prerender",
    "run_bench",
    "run_naive",
    "run_pipeline",
]

log = logging.getLogger("livemask")

#: Stage spans reported in ``latency_ms`` (name, from-stamp, to-stamp): the status topic's,
#: but delivery and ``end_to_end`` end when the benchmark's subscriber process has received
#: and decoded the measurements message (``received``), not at the service's hand-off to the
#: PUB socket (``published``, stamped before the frame, labels and measurements are sent).
SPANS = (
    ("infer", "acquired", "inferred"),
    ("analyse", "inferred", "analysed"),
    ("publish", "analysed", "published"),
    ("deliver", "published", "received"),
    ("end_to_end", "acquired", "received"),
)
#: Relative difference of the two model-alone passes above which the bench warns.
PASS_SPREAD_WARN = 0.10
#: Topics the benchmark subscriber takes: everything the service publishes for a frame.
SUB_TOPICS = ("frame", "labels", "measurements", "event", "status")
#: Free-running camera: events planned per frame to analyse (the run stops once ``frames``
#: frames are analysed; a pipeline this much slower than the camera ends with fewer).
FREE_RUN_EVENTS_PER_FRAME = 50
#: Seconds between CPU snapshots while the pipeline run acquires (the last one is reported).
CPU_SNAPSHOT_S = 0.5
#: A camera-paced run whose camera ran below this fraction of the rate asked for did not
#: hold it (``pipeline.camera_rate_held``): the camera waited for the model.
CAMERA_RATE_HELD = 0.98
#: The pipeline run's time-outs (the service's frame time-out, its drain, the run's per-frame
#: budget) are at least this many times one frame's model and analysis time (the naive
#: loop's), and the drain at least ``DRAIN_S``.
SLOW_FRAME_FACTOR = 10.0
DRAIN_S = 30.0
#: Distinct pre-rendered frames at most, and their memory budget (images only).
POOL_MAX = 32
POOL_BYTES = 128 * 2**20


class BenchError(LivemaskError, RuntimeError):
    """The benchmark could not complete (a stage timed out or received nothing)."""


@dataclass
class BenchSettings:
    """What ``livemask bench`` measures (see the module docstring)."""

    model: str = "nuclei"
    backend: str = "auto"
    size: int = 512
    frames: int = 200
    interval_s: float = 0.0
    camera_fps: float | None = None
    exposure_ms: float = 10.0
    threads: int = 2
    stage_threads: str = "two"  # pipeline.stage_threads of the pipeline run
    mode: Mode = "pipelined"  # acquisition.mode of the pipeline run
    seed: int = 0
    queue_size: int = 2
    live_render: bool = False
    warmup: int = 3
    hardware_cfg: Path | None = None
    timeout_s: float | None = None
    dashboard: bool = False  # serve the web dashboard, with one WebSocket client reading it
    gc_freeze: bool = True  # pipeline.gc_freeze of the pipeline run
    gc_threshold: int = 10_000  # pipeline.gc_threshold of the pipeline run (Python: 700)
    latency_warmup_s: float = 1.0  # pipeline latencies leave out frames acquired this early
    prefault_frames: int = 8  # pipeline.prefault_frames of the pipeline run

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 16384 or self.frames < 2:
            raise ConfigError(f"bench needs --size 16 to 16384 and --frames >= 2 (got "
                              f"{self.size}, {self.frames})")
        if self.interval_s < 0 or self.exposure_ms < 0:
            raise ConfigError("--interval and --exposure-ms must be >= 0")
        if self.camera_fps is not None:
            if self.camera_fps <= 0:
                raise ConfigError("--camera-fps must be > 0")
            if self.interval_s:
                raise ConfigError("give --camera-fps or --interval, not both")
        self._check_interval()
        if 0 < self.event_interval_s < self.exposure_ms / 1000:
            flag = (f"--camera-fps {self.camera_fps:g}" if self.camera_fps
                    else f"--interval {self.interval_s:g}")
            raise ConfigError(
                f"{flag} asks for a frame every {1000 * self.event_interval_s:.3g} ms, but "
                f"each frame is exposed for {self.exposure_ms:g} ms (--exposure-ms): no camera "
                "takes frames faster than its exposure; lower one of them")
        if self.latency_warmup_s < 0:
            raise ConfigError(f"--latency-warmup-s must be >= 0 (got {self.latency_warmup_s})")
        if self.gc_threshold < 100:
            raise ConfigError(f"--gc-threshold must be >= 100 (got {self.gc_threshold})")
        if not 0 <= self.prefault_frames <= 64:
            raise ConfigError(f"--prefault-frames must be 0..64 (got {self.prefault_frames})")
        if self.stage_threads not in ("one", "two"):
            raise ConfigError(f"--stage-threads must be one or two (got {self.stage_threads!r})")
        if self.queue_size < 1:
            raise ConfigError(f"--queue-size must be >= 1 (got {self.queue_size})")

    def _check_interval(self) -> None:
        """The pipeline run's interval must fit a time plan (checked before any stage runs)."""
        from livemask.config import MAX_INTERVAL_S

        if self.event_interval_s <= MAX_INTERVAL_S:
            return
        if self.camera_fps:
            raise ConfigError(f"--camera-fps must be at least one frame in 999,999,999 days "
                              f"(1/{MAX_INTERVAL_S:.0f}), got {self.camera_fps:g}")
        raise ConfigError(f"--interval must be at most {MAX_INTERVAL_S:.0f} s (999,999,999 "
                          f"days), got {self.interval_s:g}")

    @property
    def event_interval_s(self) -> float:
        """Time-lapse interval of the pipeline run (0 = as fast as the camera goes)."""
        return 1.0 / self.camera_fps if self.camera_fps else self.interval_s

    @property
    def shape(self) -> tuple[int, int]:
        """Sensor (rows, columns)."""
        return (self.size, self.size)

    def config_file(self) -> Path:
        """The simulated microscope's Micro-Manager config (the packaged one by default)."""
        path = self.hardware_cfg or SIMULATED_CFG
        if path.is_file():
            return path.resolve()
        fix = ("set BenchSettings.hardware_cfg to an existing .cfg, or to None for the packaged "
               "simulated rig") if self.hardware_cfg else "reinstall livemask"
        raise ConfigError(f"simulated microscope config {str(path)!r} not found; {fix}")


# ---------------------------------------------------------------- machine and memory
def machine_info() -> dict[str, Any]:
    """CPU count, platform and Python of this machine."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    cpu_model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "hostname": platform.node(),
    }


def memory_mb() -> dict[str, float]:
    """Resident memory of this process now (``rss``) and at its peak (``peak``), MiB."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss" if key == "VmRSS" else "peak"] = round(int(value.split()[0]) / 1024, 1)
    if "peak" not in out:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 2**20 if platform.system() == "Darwin" else 2**10
        out["peak"] = round(maxrss / scale, 1)
        out.setdefault("rss", out["peak"])
    return out


# ---------------------------------------------------------------- frames
def prerender(settings: BenchSettings, sample: str = "nuclei") -> list[RenderResult]:
    """Render the frames the simulated camera would produce first (at most ``POOL_MAX``)."""
    from livemask.acquisition.simulated.world import configure_world

    h, w = settings.shape
    n = max(1, min(settings.frames, POOL_MAX, POOL_BYTES // (h * w * 2)))
    world = configure_world(sample, seed=settings.seed, sensor_shape=settings.shape)
    exposure = settings.exposure_ms or 10.0
    return [world.expose(exposure).result for _ in range(n)]


class ReplaySample:
    """A stand-in for the simulator's sample that serves pre-rendered frames in a cycle.

    Installed into a :class:`SimulatedWorld` (``world.sample = ReplaySample(...)``), it makes
    the simulated camera a nearly free frame source, as a real camera is for the host. Frames
    come back in order from the first, whatever the stage, focus or exposure; ground-truth
    labels are not replayed (all background), so run it with ``simulation.truth`` off.
    """

    def __init__(self, frames: Sequence[RenderResult], params: Any) -> None:
        if not frames:
            raise ValueError("ReplaySample needs at least one frame")
        self.params = params  # the world reads params.world_shape_px
        self.step_count = 0
        self.rendered = 0
        self._frames = list(frames)
        self._no_truth = np.zeros(frames[0].image.shape, np.int32)
        self._result = type(frames[0])

    def step(self) -> None:
        """Advance sample time (frames are replayed regardless)."""
        self.step_count += 1

    def render(
        self, origin_yx_px: tuple[float, float], shape: tuple[int, int], **_: Any
    ) -> RenderResult:
        """The next pre-rendered frame."""
        src = self._frames[self.rendered % len(self._frames)]
        if tuple(shape) != src.image.shape:
            raise ValueError(f"replay frames are {src.image.shape}, the camera asks for {shape}")
        self.rendered += 1
        return self._result(src.image, self._no_truth, self.step_count, origin_yx_px)


def install_replay(
    world: SimulatedWorld, frames: Sequence[RenderResult], *, exposure_ms: float
) -> ReplaySample:
    """Make ``world``'s camera replay ``frames``; snaps last ``exposure_ms`` when > 0."""
    replay = ReplaySample(frames, world.sample.params)
    world.sample = cast(Any, replay)
    world.realtime = exposure_ms > 0
    return replay


# ---------------------------------------------------------------- statistics
def percentiles(values_ms: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 of ``values_ms`` (None for no values), rounded to 0.01 ms."""
    if not len(values_ms):
        return {"p50": None, "p95": None, "p99": None}
    p = np.percentile(np.asarray(values_ms, float), [50, 95, 99])
    return {"p50": round(float(p[0]), 2), "p95": round(float(p[1]), 2),
            "p99": round(float(p[2]), 2)}


def span_latencies(stamps: Sequence[dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Per-span latency percentiles (ms) from frame timestamp dicts."""
    return {
        name: percentiles([(t[b] - t[a]) * 1e3 for t in stamps if a in t and b in t])
        for name, a, b in SPANS
    }


def _fps(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 and n > 0 else 0.0


# ---------------------------------------------------------------- subscriber process
def _subscriber_main(address: str, topics: Sequence[str], conn: Connection) -> None:
    """Body of the subscriber process: record the headers of what arrives."""
    with contextlib.suppress(EOFError, OSError):  # the parent is gone: just end
        result = _subscribe(address, conn, topics)
        if result is not None:
            conn.send(("done", result))
    conn.close()


def _subscribe(address: str, conn: Connection, topics: Sequence[str]) -> dict[str, Any] | None:
    from livemask.client import Subscriber

    records: list[tuple[str, int, dict[str, float], bool]] = []
    with Subscriber(address, topics, rcvhwm=100_000) as sub:
        ready = False
        expected: int | None = None
        quiet_s, hard_stop = 1.0, math.inf
        started = last_data = time.monotonic()
        measured = n = 0
        while True:
            msg = sub.recv(timeout_s=0.02)
            now = time.monotonic()
            if not ready and now - started > 120:
                return None  # nothing ever arrived; the parent has given up
            if msg is not None:
                if not ready:
                    conn.send(("ready", None))
                    ready = True
                h = msg.header
                if msg.topic in ("frame", "measurements"):  # when this process had it
                    records.append((msg.topic, int(h["frame_id"]),
                                    {**h["t"], "received": time.time()},
                                    bool(h.get("skipped", False))))
                    last_data = now
                    measured += msg.topic == "measurements"
                n += 1
            if expected is None and (msg is None or n % 64 == 0) and conn.poll():
                _, expected = conn.recv()  # EOFError when the parent closed the pipe
                hard_stop = now + 30.0
                last_data = max(last_data, now)
            if expected is not None and (
                measured >= expected or now - last_data > quiet_s or now > hard_stop
            ):
                break
        return {"records": records, "received": dict(sub.received), "gaps": dict(sub.gaps)}


class SubscriberProcess(PipedProcess):
    """A real SUB client on loopback in its own process, recording frame timestamps."""

    error = BenchError
    what = "the benchmark subscriber"

    def __init__(self, address: str, topics: Sequence[str] = SUB_TOPICS) -> None:
        super().__init__(_subscriber_main, (address, tuple(topics)), "livemask-bench-sub")
        # finish(n): n is how many ``measurements`` to expect; returns what it recorded


@contextlib.contextmanager
def _subscriber(address: str) -> Iterator[SubscriberProcess]:
    sub = SubscriberProcess(address)
    try:
        yield sub
    finally:
        sub.close()


# ---------------------------------------------------------------- the three runs
def service_config(
    settings: BenchSettings, sample: str = "nuclei", frame_timeout_s: float | None = None
) -> ServiceConfig:
    """The service configuration of the pipeline run (also used to build the model); an
    error names the bench flag to change. ``frame_timeout_s``: the acquisition's (default:
    the service's)."""
    from livemask.config import parse_config

    model_key = "path" if Path(settings.model).suffix.lower() in (".yaml", ".yml") else "name"
    data = {
        "hardware": {"config_file": str(settings.config_file())},
        "simulation": {"sample": sample, "seed": settings.seed,
                       "sensor_shape_px": list(settings.shape), "truth": False},
        "acquisition": {"mode": settings.mode, "autostart": False,
                        **({} if frame_timeout_s is None
                           else {"frame_timeout_s": frame_timeout_s})},
        "model": {model_key: settings.model, "backend": settings.backend,
                  "threads": settings.threads},
        # the subscriber takes every message (its own queue holds 100,000): the service's
        # queue as the naive loop's (200), not lowered to a memory budget (30 at 2048²)
        "publish": {"pub_address": "tcp://127.0.0.1:*",
                    "control_address": "tcp://127.0.0.1:*", "heartbeat_s": 0.5,
                    "max_queued_mb": 0},
        "pipeline": {"queue_size": settings.queue_size,
                     "stage_threads": settings.stage_threads,
                     "gc_freeze": settings.gc_freeze, "gc_threshold": settings.gc_threshold,
                     "prefault_frames": settings.prefault_frames},
        "dashboard": {"enabled": settings.dashboard, "port": 0},
    }
    try:
        return parse_config(data, source="bench settings")
    except ConfigError as exc:
        raise ConfigError(_as_flags(str(exc))) from None


#: The config keys :func:`service_config` sets from ``livemask bench`` flags, as the flags.
_FLAG_OF_KEY = {
    "simulation.sensor_shape_px": "--size", "model.backend": "--backend",
    "model.threads": "--threads", "model.path": "--model", "model.name": "--model",
    "acquisition.mode": "--mode", "pipeline.queue_size": "--queue-size",
    "pipeline.stage_threads": "--stage-threads", "pipeline.gc_threshold": "--gc-threshold",
    "pipeline.prefault_frames": "--prefault-frames",
}
#: One of those keys in an error, with the index of a tuple's item (``sensor_shape_px.0``).
_KEY_IN_ERROR = re.compile("(" + "|".join(map(re.escape, _FLAG_OF_KEY)) + r")(?:\.\d+)?")


def _as_flags(message: str) -> str:
    """``message`` with the config keys bench sets from its flags replaced by the flags."""
    return _KEY_IN_ERROR.sub(lambda m: _FLAG_OF_KEY[m[1]], message)


def measure_inference(
    segmenter: Segmenter, images: Sequence[np.ndarray], frames: int, *, warmup: int = 3
) -> dict[str, Any]:
    """``Segmenter.infer`` alone over ``frames`` frames (cycling ``images``): normalisation
    and the model, from the camera's array to probabilities (on a GPU: to probabilities on
    the device, synchronised)."""
    for i in range(warmup):
        segmenter.infer(images[i % len(images)])
    times: list[float] = []
    t0 = time.perf_counter()
    for i in range(frames):
        t = time.perf_counter()
        segmenter.infer(images[i % len(images)])
        times.append((time.perf_counter() - t) * 1e3)
    wall = time.perf_counter() - t0
    return {"fps": _fps(frames, wall), "frames": frames, "wall_s": round(wall, 3),
            "ms": percentiles(times), "times_ms": times, "_wall_exact_s": wall}


def combine_passes(passes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One model-alone figure from passes made at different times of the run: all frames
    over all wall time, per-frame percentiles over all frames (the passes are kept too)."""
    frames = sum(int(p["frames"]) for p in passes)
    # the exact walls: a short pass rounds to 0.000 s at the 3 decimals it reports
    wall = sum(float(p.pop("_wall_exact_s", p["wall_s"])) for p in passes)
    times = [t for p in passes for t in p.pop("times_ms")]
    rates = [float(p["fps"]) for p in passes if p.get("fps")]
    # how far the machine's speed moved between the passes (it weighs on every ratio)
    spread = (max(rates) - min(rates)) / (sum(rates) / len(rates)) if len(rates) > 1 else 0.0
    if spread > PASS_SPREAD_WARN:
        log.warning("bench: the model-alone passes differ by %.0f %% (%s frames/s): the "
                    "machine's speed changed during the run; compare ratios with care",
                    100 * spread, " / ".join(f"{r:.1f}" for r in rates))
    return {"fps": _fps(frames, wall), "frames": frames, "wall_s": round(wall, 3),
            "ms": percentiles(times), "pass_spread": round(spread, 3), "passes": passes}


def run_naive(
    segmenter: Segmenter,
    settings: BenchSettings,
    frames: Sequence[RenderResult],
    sample: str = "nuclei",
) -> dict[str, Any]:
    """The sequential snap → predict → label → measure → publish loop, in this thread."""
    from livemask.acquisition.core import close_core, open_core
    from livemask.acquisition.simulated.world import configure_world
    from livemask.transport.publisher import ZmqPublisher

    world = configure_world(sample, seed=settings.seed, sensor_shape=settings.shape)
    if not settings.live_render:
        install_replay(world, frames, exposure_ms=settings.exposure_ms)
    else:
        world.realtime = settings.exposure_ms > 0
    core = open_core(settings.config_file())
    try:
        core.setExposure(settings.exposure_ms)
        px = float(core.getPixelSizeUm() or world.pixel_size_um)
        with ZmqPublisher("tcp://127.0.0.1:*", sndhwm=200) as pub, \
                _subscriber(pub.bound_address) as sub:
            sub.wait_ready(lambda: pub.publish("status", {"hello": True}))
            n = settings.frames
            t0 = time.time()
            for i in range(n):
                core.snapImage()
                image = core.getImage()
                t = {"acquired": time.time()}
                probabilities = segmenter.infer(image)
                t["inferred"] = time.time()
                labels, objects, summary = segmenter.analyse(probabilities, image,
                                                             pixel_size_um=px)
                t["analysed"] = time.time()
                base = {"frame_id": i, "t": t, "index": {"t": i},
                        "position": {"x_um": None, "y_um": None, "z_um": None}}
                # in the service's order: measurements first, then the image and labels
                pub.publish("measurements", {**base, "pixel_size_um": px,
                                             "image_shape": list(image.shape[:2]),
                                             "summary": summary, "objects": objects})
                pub.publish("frame", {**base, "skipped": False}, {"image": image})
                pub.publish("labels", base, {"labels": labels})
            wall = time.time() - t0
            got = sub.finish(n)
    finally:
        close_core(core)
    stamps = [t for topic, _, t, _ in got["records"] if topic == "measurements"]
    return {
        "fps": _fps(n, wall),
        "frames": n,
        "wall_s": round(wall, 3),
        "measurements_received": len(stamps),
        "subscriber_gaps": got["gaps"],
        "latency_ms": span_latencies(stamps),
    }


async def _run_pipeline(
    settings: BenchSettings, frames: Sequence[RenderResult], sample: str,
    frame_s: float | None = None,
) -> dict[str, Any]:
    """See :func:`run_pipeline`."""
    import useq

    from livemask.acquisition.simulated.world import get_world
    from livemask.service.app import Service

    # a model slower than the service's 10 s frame time-out (a large --size on a CPU) made
    # pipelined mode stop waiting for it, and the run fail after its other passes
    slow = SLOW_FRAME_FACTOR * (frame_s or 0.0)
    drain_s = max(DRAIN_S, slow)
    cfg = service_config(settings, sample, frame_timeout_s=max(10.0, slow))
    async with Service(cfg) as svc:
        if not settings.live_render:
            install_replay(get_world(), frames, exposure_ms=settings.exposure_ms)
        else:
            get_world().realtime = settings.exposure_ms > 0
        if settings.exposure_ms > 0:
            channel: dict[str, Any] = {"config": "DAPI", "exposure": settings.exposure_ms}
        else:
            await svc.apply_settings(exposure_ms=0.0)
            channel = {"config": "DAPI"}
        free_camera = settings.event_interval_s == 0
        events = settings.frames * (FREE_RUN_EVENTS_PER_FRAME if free_camera else 1)
        seq = useq.MDASequence.model_validate({
            "time_plan": {"interval": settings.event_interval_s, "loops": events},
            "channels": [channel],
        })
        with _subscriber(svc.publisher.bound_address) as sub, _dashboard_probe(svc) as web:
            await asyncio.to_thread(sub.wait_ready)  # heartbeats reach it meanwhile
            if web is not None:
                await asyncio.to_thread(web.wait_ready)
            timeout = settings.timeout_s or 60 + settings.frames * (
                settings.event_interval_s + max(2.0, slow))
            deadline = time.monotonic() + timeout
            counts = svc.pipeline.counters.counts
            cpu_start = cpu_last = CpuSnapshot.take()
            analysed_start = analysed_last = counts["analysed"]
            collector = GcMonitor()
            collector.start()
            try:
                svc.start_acquisition(seq)
                while svc.acquiring or not svc.acquisitions_finished:
                    if time.monotonic() > deadline:
                        raise BenchError(f"the pipeline run did not finish within {timeout:.0f} s")
                    if svc.acquiring and time.monotonic() - cpu_last.t > CPU_SNAPSHOT_S:
                        cpu_last, analysed_last = CpuSnapshot.take(), counts["analysed"]
                    if free_camera and svc.acquiring and counts["analysed"] >= settings.frames:
                        cpu_last, analysed_last = CpuSnapshot.take(), counts["analysed"]
                        await svc.stop_acquisition()
                    await asyncio.sleep(0.01)
            finally:
                collector.stop()
            collected = {  # while the service's GC settings are in force
                **collector.report(), "frozen_objects": svc.gc_policy.frozen_objects}
            cpu = cpu_report(cpu_start, cpu_last, analysed_last - analysed_start)
            if not await svc.pipeline.drain(drain_s):
                raise BenchError(f"the pipeline did not drain within {drain_s:.0f} s")
            status = svc.status()
            memory = memory_mb()
            got = await asyncio.to_thread(sub.finish, int(status["frames_analysed"]))
            dashboard = await asyncio.to_thread(web.finish) if web is not None else None
            if dashboard is not None and svc.dashboard is not None:
                dashboard["server"] = svc.dashboard.report()
    records = got["records"]
    stamps = [t for topic, _, t, _ in records if topic == "measurements"]
    acquired = sorted({fid: t["acquired"] for _, fid, t, _ in records}.values())
    if not stamps or not acquired:
        raise BenchError("the subscriber received no measurements from the pipeline run")
    first, last = acquired[0], max(t["published"] for t in stamps)
    wall = last - first
    if len(stamps) < int(status["frames_analysed"]) or any(got["gaps"].values()):
        log.warning("bench: the subscriber received %d measurements of %d frames analysed "
                    "(gaps %s): the missing frames are not in pipeline_fps or latency_ms",
                    len(stamps), status["frames_analysed"], got["gaps"])
    # the first frames pay for the process's first touch of frame-sized memory and the queue
    # that builds meanwhile (43 ms per 16 MiB array at 2048² here): steady-state latencies
    # leave them out, and latency_ms_with_warmup keeps every frame
    steady = [t for t in stamps if t["acquired"] >= first + settings.latency_warmup_s]
    latency_stamps = steady or stamps
    camera_fps = _fps(len(acquired) - 1, acquired[-1] - first)
    requested = 1.0 / settings.event_interval_s if settings.event_interval_s else None
    held = None if requested is None else camera_fps >= CAMERA_RATE_HELD * requested
    if held is False:
        why = ("the simulated camera could not go faster (its rendering and read-out)"
               if settings.mode == "free-run" else
               f"in {settings.mode} mode the camera waits for the model, so no frame skips: "
               "the pipeline is slower than that")
        log.warning("bench: the camera ran at %.1f frames/s, not the %.4g asked for: the "
                    "pipeline run's figures are at %.1f frames/s (%s)",
                    camera_fps, requested, camera_fps, why)
    return {
        # frames published over the time from the first frame acquired to the last
        # published: one frame interval fewer than frames, so a paced run never reads
        # above its camera (the first frame's latency is in the span)
        "fps": _fps(len(stamps) - 1, wall),
        "wall_s": round(wall, 3),
        "camera_fps": camera_fps,
        "camera_fps_requested": None if requested is None else round(requested, 4),
        "camera_rate_held": held,
        "interval_s": settings.event_interval_s,
        "mode": settings.mode,
        "stage_threads": status["stage_threads"],
        "frames_acquired": status["frames_acquired"],
        "frames_analysed": status["frames_analysed"],
        "frames_skipped": status["frames_skipped"],
        "frames_published": status["frames_published"],
        "frames_failed": status["frames_failed"],
        "measurements_received": len(stamps),
        "subscriber_received": got["received"],
        "subscriber_gaps": got["gaps"],
        "latency_ms": span_latencies(latency_stamps),
        "latency_ms_with_warmup": span_latencies(stamps),
        "latency_frames": len(latency_stamps),
        "latency_warmup_s": settings.latency_warmup_s if steady else 0.0,
        "memory_mb": memory,
        "cpu": cpu,
        "gc": collected,
        "prefault": _prefault_report(svc.prefault),
        "dashboard": dashboard,
    }


def _prefault_report(done: Prefault | None) -> dict[str, Any] | None:
    """The frame-sized memory the service touched at start (pipeline.prefault_frames)."""
    if done is None:
        return None
    return {"frames": done.frames, "mib": round(done.bytes / 2**20, 1),
            "ms": round(done.seconds * 1e3, 1)}


@contextlib.contextmanager
def _dashboard_probe(svc: Any) -> Iterator[Any]:
    """A WebSocket client of the service's dashboard in its own process (dashboard on)."""
    if svc.dashboard is None or svc.dashboard.url is None:
        yield None
        return
    from livemask.dashboard.probe import DashboardProbe

    probe = DashboardProbe(svc.dashboard.url)
    try:
        yield probe
    finally:
        probe.close()


def run_pipeline(
    settings: BenchSettings, frames: Sequence[RenderResult], sample: str = "nuclei",
    frame_s: float | None = None,
) -> dict[str, Any]:
    """The full service on the simulated camera, to a subscriber process (own event loop);
    ``frame_s``: about how long one frame takes the model and analysis (the naive loop's),
    which scales the run's time-outs."""
    return asyncio.run(_run_pipeline(settings, frames, sample, frame_s))


def run_bench(
    settings: BenchSettings, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run all three measurements and return the benchmark record (JSON-ready)."""
    from livemask.inference.models import load_model_card
    from livemask.service.app import build_segmenter

    say = progress or (lambda _msg: None)
    card = load_model_card(settings.model)
    sample = "grains" if card.task == "grains" else "nuclei"
    cfg = service_config(settings, sample)  # validates model, backend and paths first
    say(f"rendering {settings.size}x{settings.size} frames")
    frames = prerender(settings, sample)
    images = [f.image for f in frames]
    say(f"loading {card.name} ({settings.backend})")
    first_half = settings.frames // 2
    segmenter = build_segmenter(cfg, settings.shape)
    backend, device = segmenter.backend.name, segmenter.backend.device
    try:
        segmenter.warmup(settings.shape)
        say(f"inference alone: {first_half} frames")
        passes = [measure_inference(segmenter, images, first_half, warmup=settings.warmup)]
        say(f"naive loop: {settings.frames} frames")
        # the service's GC settings, as the pipeline run has them (audit: the loop ran with
        # Python's defaults, which collect more often)
        gc_policy = GcPolicy(freeze=settings.gc_freeze, threshold=settings.gc_threshold)
        gc_policy.apply()
        try:
            naive = run_naive(segmenter, settings, frames, sample)
        finally:
            gc_policy.restore()
        naive["gc"] = {"freeze": settings.gc_freeze, "threshold": settings.gc_threshold}
    finally:
        segmenter.backend.close()
    del segmenter  # the service loads its own
    if settings.event_interval_s:
        say(f"pipeline: {settings.frames} events, interval {settings.event_interval_s:g} s")
    else:
        say(f"pipeline: camera free, until {settings.frames} frames are analysed")
    pipeline = run_pipeline(settings, frames, sample,
                            frame_s=naive["wall_s"] / naive["frames"] or None)
    memory = pipeline.pop("memory_mb")
    segmenter = build_segmenter(cfg, settings.shape)
    try:
        segmenter.warmup(settings.shape)
        say(f"inference alone: {settings.frames - first_half} more frames")
        passes.append(measure_inference(segmenter, images, settings.frames - first_half,
                                        warmup=settings.warmup))
    finally:
        segmenter.backend.close()
    inference = combine_passes(passes)
    return {
        "benchmark": "livemask bench",
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "model": card.name,
        "backend": backend,
        "device": device,
        "threads": settings.threads,
        "frame_shape": list(settings.shape),
        "frames": settings.frames,
        "distinct_frames": len(frames),
        "exposure_ms": settings.exposure_ms,
        "camera": "live render" if settings.live_render else "replay of pre-rendered frames",
        "inference_fps": inference["fps"],
        "pipeline_fps": pipeline["fps"],
        "naive_fps": naive["fps"],
        "pipeline_vs_inference": round(pipeline["fps"] / inference["fps"], 3)
        if inference["fps"] else None,
        "pipeline_vs_naive": round(pipeline["fps"] / naive["fps"], 3) if naive["fps"] else None,
        "frames_skipped": pipeline["frames_skipped"],
        "stage_threads": pipeline["stage_threads"],
        "mode": pipeline["mode"],
        "latency_ms": pipeline["latency_ms"],
        "rss_mb": memory["rss"],
        "peak_rss_mb": memory["peak"],
        "inference": inference,
        "naive": naive,
        "pipeline": pipeline,
        "settings": {k: (str(v) if isinstance(v, Path) else v)
                     for k, v in asdict(settings).items()},
    }


# ---------------------------------------------------------------- report
def format_report(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(quantity, value) rows of a readable summary of a :func:`run_bench` record."""
    m, p = result["machine"], result["pipeline"]

    def lat(name: str, src: dict[str, Any]) -> str:
        v = src["latency_ms"][name]
        if v["p50"] is None:
            return "-"
        return f"{v['p50']:.1f} / {v['p95']:.1f} / {v['p99']:.1f}"

    rows = [
        ("machine", f"{m['cpus_usable']} of {m['cpu_count']} CPUs, {m['cpu_model']}"),
        ("model / backend / device",
         f"{result['model']} / {result['backend']} / {result['device']}"),
        ("frames", f"{result['frames']} x {result['frame_shape'][0]}x{result['frame_shape'][1]}"
                   f" ({result['distinct_frames']} distinct, {result['camera']}, "
                   f"exposure {result['exposure_ms']:g} ms)"),
        ("inference_fps (model alone)", f"{result['inference_fps']:.1f}"),
        ("naive_fps (sequential loop)", f"{result['naive_fps']:.1f}"),
        ("pipeline_fps (service)", f"{result['pipeline_fps']:.1f}"),
        ("pipeline_fps / inference_fps", f"{result['pipeline_vs_inference']}"),
        ("pipeline_fps / naive_fps", f"{result['pipeline_vs_naive']}"),
        ("camera fps (pipeline run)", f"{p['camera_fps']:.1f}" + (
            " (camera free)" if not p["interval_s"] else
            f" (interval {p['interval_s']:g} s" + (
                ": NOT the rate asked for)"
                if p.get("camera_rate_held") is False else ")"))),
        ("acquisition mode (pipeline run)", str(p["mode"])),
        ("pipeline stage threads", str(result["stage_threads"])),
        ("frames acquired / analysed / skipped / failed",
         f"{p['frames_acquired']} / {p['frames_analysed']} / {p['frames_skipped']} / "
         f"{p['frames_failed']}"),
    ]
    after = f" (after {p['latency_warmup_s']:g} s)" if p.get("latency_warmup_s") else ""
    rows += [(f"latency {name} p50 / p95 / p99 ms{after}", lat(name, result))
             for name, _, _ in SPANS]
    if "latency_ms_with_warmup" in p:
        rows.append(("latency end_to_end p50 / p95 / p99 ms, every frame",
                     lat("end_to_end", {"latency_ms": p["latency_ms_with_warmup"]})))
    rows += [
        ("naive end_to_end p50 / p95 / p99 ms", lat("end_to_end", result["naive"])),
        ("resident memory (now, peak)", f"{result['rss_mb']:.0f} MiB, "
                                        f"{result['peak_rss_mb']:.0f} MiB"),
    ]
    cpu = p.get("cpu")
    if cpu:
        busy = cpu["machine_busy_cores"]
        rows.append(("CPU in the pipeline run (cores: process, machine)",
                     f"{cpu['process_cores']}, {busy if busy is not None else '-'}"))
        rows.append(("CPU ms per analysed frame, by thread", ", ".join(
            f"{name} {ms:g}" for name, ms in list(cpu["cpu_ms_per_frame"].items())[:6])))
    collected = p.get("gc")
    if collected:
        rows.append(("GC in the pipeline run: collections gen 0/1/2, pause ms total, max",
                     " / ".join(str(n) for n in collected["collections"].values())
                     + f", {sum(collected['pause_ms'].values()):.1f}, "
                     f"{collected['max_pause_ms']:.1f} (threshold "
                     f"{collected['threshold'][0]}, {collected['frozen_objects']} frozen)"))
    web = p.get("dashboard")
    if web:
        rows.append(("dashboard (pipeline run)", f"{web['images']} images "
                     f"({web.get('images_per_s', 0)}/s) to 1 {web.get('client', 'client')}"))
    return rows
