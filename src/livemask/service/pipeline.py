"""The asyncio pipeline: acquire → infer → analyse → publish.

Frames arrive from the camera thread through :meth:`Pipeline.submit` (scheduled on the loop
with ``call_soon_threadsafe``). Inference and analysis run off the event loop, which stays
free for publishing and control, in one of two layouts (``pipeline.stage_threads``):

- ``two`` (default): each stage has its own single-thread executor, so analysis of one frame
  overlaps inference of the next (the heavy libraries release the GIL): the most frames per
  second.
- ``one``: one worker infers and then analyses each frame: lower latency (no hand-over
  between stages, and the model runs undisturbed), a few per cent fewer frames per second
  on a 2-core CPU (``docs/performance.md``).

In free-run mode the inference queue keeps the newest
frames: when it is full the oldest waiting frame skips analysis (counted, and still
published on ``frame`` with ``skipped: true``), and while that happens (the camera is ahead)
inference takes the newest waiting frame. In the other modes no frame skips: the frame
source releases the next event once the model has taken the waiting frame
(:meth:`FrameSource.frame_started`, pipelined mode) or once it is published
(:meth:`FrameSource.frame_done`, synchronized mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from livemask.acquisition.mode import Mode
from livemask.acquisition.source import FrameSource, RawFrame
from livemask.analysis.grains import (
    BIG_REGION_FRACTION,
    CumulativeGrainStats,
    GrainTable,
    grain_field,
    grain_statistics,
    largest_region_fraction,
    roi_centre_offset,
    tile_footprint,
)
from livemask.analysis.measure import UNITS, saturation_level, units_in_pixels
from livemask.analysis.tracking import (
    PIXEL_SIZE_TOLERANCE,
    TRACK_UNITS,
    PixelToStage,
    PositionTrackers,
    camera_roi_offset,
    frame_geometry,
    pixel_to_stage_at,
)
from livemask.config import StageThreads
from livemask.inference.segmenter import Segmenter
from livemask.log import RepeatedErrors, is_power_of_ten
from livemask.protocol import plain_index
from livemask.service.frames import Frame
from livemask.service.pacing import RecentDurations, hold_before_inference
from livemask.service.stats import LatencyWindow, PipelineCounters
from livemask.transport.publisher import Publisher

log = logging.getLogger("livemask")

#: The MDA index axis that does not tell a frame's stream: ``publish.frame_every`` keeps
#: every Nth frame of each stream, the frames whose index differs only in it (one position,
#: grid tile, channel and plane; the frames of a feedback action, ``fb``, or of enqueued
#: events with a key of the client's own, e.g. ``ext``, are streams of their own).
TIME_AXIS = "t"
#: Streams whose frame counts ``publish.frame_every`` keeps (the least recently seen go
#: first: such a stream starts counting again, its next frame published), as tracking's.
MAX_STREAMS = 4096


def _to_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """``fn(*args)`` on the event loop, from a stage thread; nothing once the loop has
    closed (a frame still in a stage thread when the service stopped: close() gave it to
    the sinks)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


def _log_thread_fault(future: Future[None]) -> None:
    """Log what escaped a stage thread's job (its future is not read otherwise)."""
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.error("the analysis thread failed: %s: %s", type(exc).__name__, exc, exc_info=exc)


def _stage_xy(position: dict[str, Any] | None) -> tuple[float, float] | None:
    """The frame's stage (x, y) in µm, or None where unknown."""
    x, y = (position or {}).get("x_um"), (position or {}).get("y_um")
    if not isinstance(x, int | float) or not isinstance(y, int | float):
        return None
    return (float(x), float(y)) if math.isfinite(x + y) else None


class FrameSink(Protocol):
    """Receives every frame once it is handled (analysed, skipped or failed), on the loop.

    ``on_frame`` must return at once (e.g. enqueue for a writer thread) and must not modify
    the frame. The recorder is a sink (``livemask.recording.Recorder``).
    """

    def on_frame(self, frame: Frame) -> None:
        """Take one frame."""


class Pipeline:
    """Stages, queues and counters of one running service."""

    def __init__(
        self,
        segmenter: Segmenter,
        publisher: Publisher,
        *,
        mode: Mode = "free-run",
        queue_size: int = 2,
        frame_every: int = 1,
        pixel_size_um: float = 1.0,
        pixel_size_known: bool = True,
        stage_threads: StageThreads = "two",
        core_pixel_size_um: float | None = None,
    ) -> None:
        """``pixel_size_um``: each frame's, unless ``core_pixel_size_um`` (the core's when
        the rig was opened) is given: then a frame's is ``pixel_size_um`` × the core's for
        it (:attr:`RawFrame.pixel_size_um`, which follows binning and objective) / that,
        and ``pixel_size_um`` where the core has none for the frame."""
        self.segmenter = segmenter
        self.stage_threads: StageThreads = stage_threads
        self.publisher = publisher
        self.mode: Mode = mode
        self.frame_every = frame_every
        self.pixel_size_um = pixel_size_um
        #: Whether pixel_size_um is a calibration (else 1.0: grain tiles are then pooled
        #: without the overlap check, which needs each tile's size in µm)
        self.pixel_size_known = pixel_size_known
        self.core_pixel_size_um = core_pixel_size_um
        #: The pixel size of the last frame that arrived (µm), for status
        self.frame_pixel_size_um = pixel_size_um
        #: The pixel size the last ``pixel_size_changed`` event announced (or the one at open)
        self._announced_pixel_size_um = pixel_size_um
        self._core_pixel_missing = False  # the last frame had no pixel size from the core
        #: Publishes a service event (kind, fields): the service sets its own, which also
        #: records it; by default straight to the publisher
        self.publish_event: Callable[[str, dict[str, Any]], None] = self._publish_event
        self.source: FrameSource | None = None
        self.counters = PipelineCounters()
        self.latency = LatencyWindow()
        self.latest: dict[str, dict[str, Any]] = {}
        self._errors = RepeatedErrors(log)  # per-frame faults: a traceback once per kind
        #: The last frame's failure ("<stage> failed: Type: message"), for status.
        self.last_failure: str | None = None
        self.last_analysed: Frame | None = None
        self._queue_size = queue_size
        self._waiting: deque[Frame] = deque()
        self._skipped_since_take = 0  # frames skipped at intake since inference took one
        self._have_frame = asyncio.Event()
        # one inferred frame waiting at most: when analysis is the slower stage (GPU at 2048²)
        # a longer queue only adds latency; frames are skipped at intake instead, and the
        # next frame is taken for inference only once analysis has taken the waiting one.
        # The inference thread hands each frame straight to the analysis thread's queue (no
        # round trip through the event loop between the stages, nor between two analyses).
        # Under the lock, changed together by the stage threads: frames handed over and not
        # yet taken by analysis; whether analysis has a frame, and since when (monotonic).
        # The loop reads them there; its events only wake it.
        self._for_analysis = 0
        self._analysing = False
        self._analysis_started = 0.0
        self._handover_lock = threading.Lock()
        self._closing = False  # close() has begun: no more hand-overs, outcomes not counted
        self._analysis_took = asyncio.Event()  # set each time analysis takes a frame
        self._analysis_idle = asyncio.Event()  # set each time analysis finishes one
        self._infer_times = RecentDurations()
        self._analyse_times = RecentDurations()
        self._to_publish: asyncio.Queue[Frame] = asyncio.Queue()
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="livemask-infer")
        self._analyse_pool = ThreadPoolExecutor(1, thread_name_prefix="livemask-analyse")
        self._tasks: list[asyncio.Task[None]] = []
        self._next_id = 0
        self.grains = (CumulativeGrainStats(pixel_size_known=pixel_size_known)
                       if segmenter.card.task == "grains" else None)
        #: grain tiles that skipped analysis (free-run), per acquisition (set on the loop)
        self._tiles_skipped: dict[int, int] = {}
        #: Where a grain tile lies on the stage (set by the service): the camera's full
        #: image (rows, cols) when the rig was opened, whose centre the stage position is
        #: and from which a camera ROI's offset counts (None: not known; a tile of a camera
        #: ROI then has no place), and ``feedback.pixel_to_stage`` for ``pixel_size_um``
        #: (None: that pixel size, image axes along the stage's)
        self.camera_shape: tuple[int, int] | None = None
        self.pixel_to_stage: PixelToStage | None = None
        self._unplaced_said = False  # a grain tile of a camera ROI had no place (warned once)
        self._big_regions = 0  # grain tiles with one region over BIG_REGION_FRACTION, ...
        self._big_regions_of = 0  # ... in this acquisition
        # object tracking (set by the Service when tracking.enabled); analysing thread only
        self.tracker: PositionTrackers | None = None
        # acquisitions begun (begin_acquisition); each frame carries the number it arrived in
        self.acquisition = 0
        self._accumulating = 0  # the acquisition the grain statistics and tracks belong to
        # feedback hook: called with (frame, measurements message) after they are published,
        # on the event loop, before frame_done releases the next event in synchronized mode
        self.on_measurements: Callable[[Frame, dict[str, Any]], None] | None = None
        # frame sinks (the recorder): every frame, analysed, skipped or failed, at publish
        self.sinks: list[FrameSink] = []
        self._unpublished: dict[int, Frame] = {}  # submitted, not yet through _publish
        # frames seen per stream (index but t) in the acquisition _streams_of, for frame_every
        self._stream_frames: dict[frozenset[tuple[str, int]], int] = {}
        self._streams_of = 0
        self._saturation_said = 0  # the acquisition whose saturated objects were reported

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the stage tasks on the running loop."""
        self._tasks = [
            asyncio.create_task(self._infer_loop(), name="livemask-infer"),
            asyncio.create_task(self._publish_loop(), name="livemask-publish"),
        ]

    async def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait until every submitted frame is published; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.in_flight == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    async def close(self) -> None:
        """Cancel the stages and shut the executors down."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._infer_pool.shutdown(wait=True, cancel_futures=True)
        self._analyse_pool.shutdown(wait=True, cancel_futures=True)
        # frames the drain did not get through (drain timeout): the sinks still get them
        for frame in sorted(self._unpublished.values(), key=lambda f: f.frame_id):
            if not frame.skipped and frame.error is None and frame.labels is None:
                frame.error = "not analysed: the service stopped before this frame's turn"
            self._to_sinks(frame)
        self._unpublished.clear()

    @property
    def in_flight(self) -> int:
        """Frames acquired but not yet through the publish stage (published or failed to)."""
        c = self.counters.counts
        return int(c["acquired"] - c["published"] - c["publish_failed"])

    async def settle(self, stall_s: float) -> bool:
        """Wait until no frame is in flight, however long that takes while frames keep
        getting through; False when none did for ``stall_s`` (a stuck stage)."""
        c = self.counters.counts
        done = c["published"] + c["publish_failed"]
        last_progress = time.monotonic()
        while self.in_flight > 0:
            now_done = c["published"] + c["publish_failed"]
            if now_done != done:
                done, last_progress = now_done, time.monotonic()
            elif time.monotonic() - last_progress > stall_s:
                return False
            await asyncio.sleep(0.01)
        return True

    def queue_depths(self) -> dict[str, int]:
        """Frames waiting in front of each stage."""
        return {
            "infer": len(self._waiting),
            "analyse": self._for_analysis,
            "publish": self._to_publish.qsize(),
        }

    # ------------------------------------------------------------ intake
    def submit(self, raw: RawFrame) -> None:
        """Accept a frame from the camera (call on the loop thread; never blocks)."""
        frame = Frame(
            frame_id=self._next_id,
            image=raw.image,
            index=plain_index(raw.event.index),
            position=raw.position,
            settings=raw.settings,
            t={"acquired": raw.acquired, "received": time.time()},
            truth=raw.truth,
            origin=raw.origin,
            acquisition=self.acquisition,
            pixel_size_um=self._pixel_size(raw),
            replayed_from=raw.replayed_from,
        )
        self._next_id += 1
        # (at intake, in frame order: decided when publishing, a skipped frame, published at
        # once, took the turn of an earlier frame still in the model)
        frame.image_due = self._image_due(frame)
        self.frame_pixel_size_um = frame.pixel_size_um
        if not math.isclose(frame.pixel_size_um, self._announced_pixel_size_um,
                            rel_tol=PIXEL_SIZE_TOLERANCE):
            self._pixel_size_changed(frame)
        self.counters.incr("acquired")
        if self.sinks:
            self._unpublished[frame.frame_id] = frame
        self._waiting.append(frame)
        if self.mode == "free-run":
            while len(self._waiting) > self._queue_size:
                self._skip(self._waiting.popleft())
                self._skipped_since_take += 1
        self._have_frame.set()

    def _pixel_size(self, raw: RawFrame) -> float:
        """The frame's pixel size (µm): the core's for it, scaled (see ``__init__``)."""
        reference = self.core_pixel_size_um
        if reference is None:
            return self.pixel_size_um
        core_px = raw.pixel_size_um
        if core_px is None:
            if not self._core_pixel_missing:
                log.warning(
                    "the core gives no pixel size for a frame (no pixel-size preset matches "
                    "the rig's state, e.g. after a binning or objective change): measuring "
                    "with %.4g um, the pixel size when the rig was opened, until it does",
                    self.pixel_size_um)
            self._core_pixel_missing = True
            return self.pixel_size_um
        self._core_pixel_missing = False
        return self.pixel_size_um * (core_px / reference)

    def _pixel_size_changed(self, frame: Frame) -> None:
        """Say once per change that a frame's pixel size differs from the one announced last
        by more than :data:`PIXEL_SIZE_TOLERANCE` (a zoom's reading that wobbles in its last
        digits, or drifts by less, is no change: each frame is measured with its own
        anyway)."""
        before, self._announced_pixel_size_um = (self._announced_pixel_size_um,
                                                 frame.pixel_size_um)
        log.warning(
            "frame %d (%s): the pixel size changed from %.4g to %.4g um (the camera's "
            "binning, the objective or a zoom changed); each frame's measurements use its "
            "own", frame.frame_id, frame.index, before, frame.pixel_size_um)
        try:
            self.publish_event("pixel_size_changed", {
                "from": before, "to": frame.pixel_size_um, "frame_id": frame.frame_id,
                "index": dict(frame.index), "acquisition": frame.acquisition,
                "detail": "this frame's pixel size differs by more than 1 % from the one "
                          "announced last ('from': the camera's binning, the objective or "
                          "a zoom changed); each frame's µm values use its own",
            })
        except Exception as exc:  # reporting must not lose the frame
            self._errors.error("event", "publishing pixel_size_changed failed", exc)

    def _publish_event(self, kind: str, detail: dict[str, Any]) -> None:
        self.publisher.publish("event", {"kind": kind, "t": {"sent": time.time()}, **detail})

    def _skip(self, frame: Frame) -> None:
        """The frame skips analysis: counted, and published (``skipped: true``) at once."""
        self._started(frame)
        frame.skipped = True
        self.counters.incr("skipped")
        if self.grains is not None:
            self._grain_tile_skipped(frame)
        self._to_publish.put_nowait(frame)

    def _grain_tile_skipped(self, frame: Frame) -> None:
        """Count a grain tile left out of its acquisition's statistics; warn at the first."""
        n = self._tiles_skipped.get(frame.acquisition, 0) + 1
        self._tiles_skipped[frame.acquisition] = n
        if n == 1:
            xy = _stage_xy(frame.position)
            at = f"stage ({xy[0]:.1f}, {xy[1]:.1f}) um" if xy is not None else frame.index
            log.warning(
                "grains: frame %d at %s skipped analysis (free-run mode: the camera is ahead "
                "of the pipeline), so this tile is left out of the scan's grain statistics "
                "(counted in grains.cumulative.tiles_skipped; further skips are only "
                "counted; in a time-lapse at one position, with its stage position and pixel "
                "size known, it is a repeat view of a field pooled already, and nothing is "
                "lost). For a scan, set acquisition.mode: "
                "pipelined (or synchronized): every tile is then analysed", frame.frame_id, at)

    # ------------------------------------------------------------ stages
    async def _next_waiting(self) -> Frame:
        """The oldest waiting frame; the newest while the camera is ahead of the pipeline.

        Frames skipped at intake since the last take mean the camera outruns analysis:
        then the older waiting frames skip too and the newest is analysed (the freshest
        result). Otherwise the queue absorbs the camera's jitter and no frame is lost."""
        while not self._waiting:
            self._have_frame.clear()
            await self._have_frame.wait()
        if self._skipped_since_take and self.mode == "free-run":
            while len(self._waiting) > 1:
                self._skip(self._waiting.popleft())
        self._skipped_since_take = 0
        frame = self._waiting.popleft()
        # every frame that skips analysis is older than every frame still waiting (both
        # leave from the left): the count now is of the frames before this one, for good
        frame.skipped_before = self._tiles_skipped.get(frame.acquisition, 0)
        self._started(frame)
        return frame

    def _started(self, frame: Frame) -> None:
        """The frame left the inference queue: the source may release the next event."""
        if self.source is not None:
            self.source.frame_started(frame.origin)

    async def _infer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._until_analysis_can_take()
            frame = await self._next_waiting()
            if self.stage_threads == "one":
                failure = await loop.run_in_executor(
                    self._infer_pool, self._infer_then_analyse, frame
                )
                self._analysis_done(frame, failure)
                continue
            took = time.monotonic()
            error = await loop.run_in_executor(
                self._infer_pool, self._infer_and_hand_over, frame, loop
            )
            if error is None:
                self._infer_times.add(time.monotonic() - took)
                continue
            self._fail(frame, "inference", error)  # a model fault fails this frame only
            self._hand_over(frame, loop)  # (through analysis' queue: frames stay in order)

    def _infer_and_hand_over(
        self, frame: Frame, loop: asyncio.AbstractEventLoop
    ) -> BaseException | None:
        """Inference thread: infer, then queue the frame for the analysis thread at once;
        a failure is returned instead (the loop counts it, then hands the frame over).
        A BaseException too: a custom one raised out of the job ended the loop's inference
        task (every later frame waited forever), and a model's ``sys.exit`` ended the
        service; as in any Python thread, it ends this job only (the frame fails)."""
        try:
            frame.probabilities = self.segmenter.infer(frame.image)
        except BaseException as exc:
            return exc
        finally:
            frame.stamp("inferred")
        self._hand_over(frame, loop)
        return None

    def _hand_over(self, frame: Frame, loop: asyncio.AbstractEventLoop) -> None:
        """Queue ``frame`` for the analysis thread (from either thread); not once the
        pipeline is closing (close() gives the sinks the frame, not analysed)."""
        if self._closing:
            return
        with self._handover_lock:
            self._for_analysis += 1
        try:
            future = self._analyse_pool.submit(self._analyse_in_thread, frame, loop)
        except RuntimeError:  # the executor has shut down (closing): as above
            with self._handover_lock:
                self._for_analysis -= 1
            return
        future.add_done_callback(_log_thread_fault)

    def _analyse_in_thread(self, frame: Frame, loop: asyncio.AbstractEventLoop) -> None:
        """Analysis thread: analyse (unless inference failed) and hand the outcome to the
        loop; the thread then takes the next queued frame without waiting for the loop."""
        started = time.monotonic()
        with self._handover_lock:
            self._for_analysis -= 1
            self._analysing, self._analysis_started = True, started
        _to_loop(loop, self._analysis_began)
        failure: tuple[str, BaseException] | None = None
        seconds: float | None = None
        try:
            if frame.error is None:
                self._analyse(frame)
                seconds = time.monotonic() - started
        except BaseException as exc:  # (a BaseException too: its frame fails, named by it)
            failure = ("analysis", exc)
        finally:
            with self._handover_lock:
                self._analysing = False
            _to_loop(loop, self._analysis_finished, frame, failure, seconds)

    def _analysis_began(self) -> None:
        """(Loop) analysis took a frame: wake the inference stage's wait."""
        self._analysis_took.set()

    def _analysis_finished(
        self, frame: Frame, failure: tuple[str, BaseException] | None, seconds: float | None
    ) -> None:
        """(Loop) analysis finished ``frame`` (in ``seconds``, None if it did not run);
        ignored once the pipeline is closing: the frame is not published then."""
        if self._closing:
            return
        if seconds is not None:
            self._analyse_times.add(seconds)
        self._analysis_idle.set()  # (a wake-up: the waiter reads the state under the lock)
        self._analysis_done(frame, failure)

    def _analysis_state(self) -> tuple[int, bool, float]:
        """(frames handed over, not yet taken; analysis has a frame; since when)."""
        with self._handover_lock:
            return self._for_analysis, self._analysing, self._analysis_started

    async def _until_analysis_can_take(self) -> None:
        """Wait until a frame inferred now would find analysis (about) free.

        First while an inferred frame already waits for a busy analysis stage: inferring the
        next frame now would only make it wait too, holding an older frame than the camera
        will have by then. Then, when analysis is the slower stage, until one model time
        before analysis is predicted to be free (``livemask.service.pacing``): the frame
        comes out of the model as analysis takes it, so it waits for neither."""
        while True:
            self._analysis_took.clear()  # (before reading: a take after it sets it again)
            waiting, busy, started = self._analysis_state()
            if waiting == 0:
                break
            await self._analysis_took.wait()  # (analysis may not have woken to take it yet)
        if not busy:
            return
        hold = hold_before_inference(
            time.monotonic(), started, self._infer_times, self._analyse_times
        )
        if hold <= 0:
            return
        # released early if analysis finishes sooner than predicted
        deadline = time.monotonic() + hold
        while (left := deadline - time.monotonic()) > 0:
            self._analysis_idle.clear()
            if not self._analysis_state()[1]:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._analysis_idle.wait(), left)

    def _infer_then_analyse(self, frame: Frame) -> tuple[str, BaseException] | None:
        """Both stages in the calling (worker) thread; the failed stage and its error (a
        BaseException too: raised out of the job, it ended the inference task)."""
        try:
            frame.probabilities = self.segmenter.infer(frame.image)
        except BaseException as exc:  # a model fault fails this frame, not the service
            return "inference", exc
        finally:
            frame.stamp("inferred")
        try:
            self._analyse(frame)
        except BaseException as exc:
            return "analysis", exc
        return None

    def begin_acquisition(self) -> None:
        """A new acquisition starts (call before its first frame arrives).

        Its frames start the cumulative grain statistics and the tracks afresh, and only its
        frames reach the feedback hook. Frames of the earlier acquisition still in flight
        (a stop followed at once by a start) finish with the earlier statistics and tracks,
        and their measurements are published but do not drive feedback: actions decided on
        them would land in the new acquisition."""
        self.acquisition += 1
        for old in [a for a in self._tiles_skipped if a < self.acquisition - 1]:
            del self._tiles_skipped[old]  # (the one before may still have frames in flight)

    def _check_one_big_region(self, frame: Frame, table: GrainTable, pixels: int) -> None:
        """Warn (the 1st, 10th, 100th, ... time) when one region covers more than
        :data:`BIG_REGION_FRACTION` of a grain tile: an empty or off-specimen field, or an
        SEM data bar, segments as one huge "grain" that the statistics count with its area
        (a blank tile pooled with one real one moved ASTM G by a whole unit). ``table``: the
        tile's :func:`grain_table`; ``pixels``: its size."""
        largest = largest_region_fraction(table, pixels)  # (label 0 is no region)
        if largest <= BIG_REGION_FRACTION:
            return
        if frame.acquisition != self._big_regions_of:  # counted per acquisition
            self._big_regions_of, self._big_regions = frame.acquisition, 0
        self._big_regions += 1
        if is_power_of_ten(self._big_regions):
            log.warning(
                "grains: frame %d: one region covers %.0f %% of the tile, and counts as one "
                "grain in its statistics (and the cumulative ones, where pooled): an empty "
                "or off-specimen "
                "field, a data bar (SEM), or grains too large for this magnification (ASTM "
                "sizing wants at least ~50 grains a field). Image within the specimen, crop "
                "data bars, or lower the magnification (%d such tile(s) so far)",
                frame.frame_id, 100 * largest, self._big_regions)

    def _warn_overlap(self, frame: Frame) -> None:
        """Say that a grain tile was left out of the cumulative statistics (overlap)."""
        n = self.grains.tiles_overlapping if self.grains is not None else 0
        if is_power_of_ten(n):  # the same field again and again: 1, 10, 100, ... times
            log.warning(
                "grains: frame %d at %s overlaps a tile already pooled by more than %.0f %% "
                "of the smaller one's area; it is left out of the cumulative statistics (%d "
                "tile(s) so far), which would count its grains twice. The same field imaged "
                "again (a time-lapse, channels or z-planes at one position) pools once, and so "
                "does a camera ROI within a field; for a scan, use a grid_plan with overlap "
                "0 and check that the pixel size matches the stage (hardware.pixel_size_um)",
                frame.frame_id, frame.position, 100 * CumulativeGrainStats.MAX_OVERLAP, n,
            )

    def _grain_footprint(
        self, frame: Frame, shape: tuple[int, ...]
    ) -> tuple[float, float, float, float] | None:
        """Where the frame's grain tile lies (u0, v0, u1, v1 µm, the camera's axes:
        :func:`~livemask.analysis.grains.tile_footprint`), None where
        not known (no stage position or pixel-size calibration, or a camera ROI that cannot
        be placed: pooled without the overlap check). The stage position is the centre of
        the camera's full image (:attr:`camera_shape`); a camera ROI's tile is moved from
        there by its offset, through the pixel-to-stage mapping feedback centring uses
        (:func:`~livemask.analysis.tracking.pixel_to_stage_at`)."""
        xy = _stage_xy(frame.position)
        if xy is None or not self.pixel_size_known:
            return None
        px = frame.pixel_size_um
        matrix = pixel_to_stage_at(self.pixel_to_stage, self.pixel_size_um, px)
        if matrix is None:
            matrix = ((px, 0.0), (0.0, px))
        rows, cols = int(shape[0]), int(shape[1])
        offset = (0.0, 0.0)  # a frame of the camera's image at open: centred on the stage
        if "roi" in frame.settings:
            offset_or_none = self._roi_centre_offset(frame, (rows, cols))
            if offset_or_none is None:
                if not self._unplaced_said:
                    self._unplaced_said = True
                    log.warning(
                        "grains: frame %d was taken with a camera ROI (%s) that cannot be "
                        "placed on the stage (the camera's image at open is not known, the "
                        "ROI is not, or the pixel size changed since the rig was opened), so "
                        "its tile is pooled without the overlap check (said once)",
                        frame.frame_id, frame.settings.get("roi"))
                return None
            offset = offset_or_none
        return tile_footprint(xy, (rows, cols), matrix, offset)

    def _roi_centre_offset(
        self, frame: Frame, shape: tuple[int, int]
    ) -> tuple[float, float] | None:
        """How far (rows, cols) the centre of the frame's camera ROI lies from the centre of
        the camera's full image; None where not known."""
        roi = camera_roi_offset(frame.settings)
        full = self.camera_shape
        if roi is None or full is None:
            return None
        if math.isclose(frame.pixel_size_um, self.pixel_size_um, rel_tol=PIXEL_SIZE_TOLERANCE):
            return roi_centre_offset(roi, shape, (int(full[0]), int(full[1])))
        # another pixel size than at open: the whole image at another binning is centred;
        # an ROI's offset is in pixels of a full image of a size not known here (a binning
        # scales it, an objective change does not)
        ratio = self.pixel_size_um / frame.pixel_size_um
        if roi == (0, 0) and all(abs(n - f * ratio) <= 1 for n, f in zip(shape, full,
                                                                        strict=True)):
            return (0.0, 0.0)
        return None

    def _analyse(self, frame: Frame) -> None:
        assert frame.probabilities is not None
        labels, frame.objects, frame.summary = self.segmenter.analyse(
            frame.probabilities, frame.image, pixel_size_um=frame.pixel_size_um
        )
        if frame.acquisition != self._accumulating:  # the first frame of a new acquisition
            # (frames are analysed in arrival order, by one analysing thread in either layout)
            self._accumulating = frame.acquisition
            if self.grains is not None:
                self.grains.reset()
            if self.tracker is not None:
                self.tracker.reset()
        if self.grains is not None:
            overlapping = self.grains.tiles_overlapping
            # the tiles of this acquisition that skipped analysis before this one (counted
            # when inference took it: later skips are of later frames)
            self.grains.tiles_skipped = frame.skipped_before
            self.grains.pixel_size_known = self.pixel_size_known  # (no G without it)
            field = grain_field(labels, frame.pixel_size_um)  # (measured once, for all three)
            frame.grains = {
                "tile": grain_statistics(labels, frame.pixel_size_um, field=field,
                                         pixel_size_known=self.pixel_size_known),
                "cumulative": self.grains.add(
                    labels, frame.pixel_size_um, field=field,
                    footprint_um=self._grain_footprint(frame, labels.shape)),
            }
            if self.grains.tiles_overlapping > overlapping:
                self._warn_overlap(frame)
            self._check_one_big_region(frame, field.table, labels.size)
        if self.tracker is not None and frame.objects is not None:
            self.tracker.apply(
                frame.objects, frame.summary if frame.summary is not None else {},
                index=frame.index, position=frame.position, frame_id=frame.frame_id,
                exposure_ms=frame.settings.get("exposure_ms"), geometry=frame_geometry(
                    frame.pixel_size_um, camera_roi_offset(frame.settings),
                    frame.image.shape),
            )
        frame.labels = labels

    def _analysis_done(
        self, frame: Frame, failure: tuple[str, BaseException] | None
    ) -> None:
        """Count the frame's outcome and queue it for publishing (on the loop)."""
        if failure is not None:
            self._fail(frame, *failure)
        elif frame.error is None:
            self.counters.incr("analysed")
        frame.probabilities = None
        frame.stamp("analysed")
        self._to_publish.put_nowait(frame)

    def _fail(self, frame: Frame, stage: str, exc: BaseException) -> None:
        frame.error = f"{stage} failed: {type(exc).__name__}: {exc}"
        self.last_failure = f"frame {frame.frame_id}: {frame.error}"
        self.counters.incr("failed")
        self._errors.error(stage, f"frame {frame.frame_id}: {stage} failed", exc)

    async def _publish_loop(self) -> None:
        while True:
            frame = await self._to_publish.get()
            outcome = "publish_failed"
            try:
                self._publish(frame)
                outcome = "published"
            except Exception as exc:  # e.g. a header JSON cannot carry: counted, not published
                self.last_failure = (
                    f"frame {frame.frame_id}: publish failed: {type(exc).__name__}: {exc}")
                self._errors.error("publish", f"publishing frame {frame.frame_id} failed", exc)
            finally:
                self.counters.incr(outcome)
                if self.source is not None:
                    self.source.frame_done(frame.origin)

    def _to_sinks(self, frame: Frame) -> None:
        self._unpublished.pop(frame.frame_id, None)
        for sink in self.sinks:
            try:
                sink.on_frame(frame)
            except Exception as exc:  # a sink fault must not stop publishing
                self._errors.error(
                    f"sink:{type(sink).__name__}",
                    f"frame sink {sink!r} failed on frame {frame.frame_id}",
                    exc,
                )

    def _image_due(self, frame: Frame) -> bool:
        """Whether ``publish.frame_every`` publishes this frame's image: the 1st, (N+1)th,
        ... frame of its stream (the same index but ``t``, every other key included, e.g.
        ``fb`` or ``ext``) in its acquisition, so each channel and plane is published every N
        of its frames (counting frames across all streams would, with N channels and
        frame_every N, publish one channel only) and frames that feedback actions or
        ``enqueue`` add do not shift which planned frames are published."""
        if frame.acquisition != self._streams_of:
            self._streams_of = frame.acquisition
            self._stream_frames.clear()
        key = frozenset(item for item in frame.index.items() if item[0] != TIME_AXIS)
        seen = self._stream_frames.pop(key, 0)  # (re-inserted last: most recently seen)
        self._stream_frames[key] = seen + 1
        if len(self._stream_frames) > MAX_STREAMS:  # e.g. one per feedback action: bounded
            del self._stream_frames[next(iter(self._stream_frames))]
        return bool(self.frame_every) and seen % self.frame_every == 0

    def _publish(self, frame: Frame) -> None:
        """Send the frame's messages. An analysed frame's ``measurements`` go first: on one
        connection a subscriber receives in order, so a feedback client or dashboard then
        has them without waiting behind the image and labels buffers (at 2048² uint16 with
        int32 labels, 24 MB: 12-14 ms on loopback). ``frame``, ``truth`` and ``labels``
        follow; clients pair the topics by ``frame_id``. Where a message cannot be sent
        the others still go, and the frame counts as a failed publish (the error raised);
        once its measurements are out, feedback and ``latest`` take them as sent."""
        frame.stamp("published")
        base = frame.header()
        self._to_sinks(frame)
        pub = self.publisher
        if frame.skipped or frame.error is not None:
            failed = self._send_arrays(frame, base)
            if frame.error is not None:
                pub.publish("event", {**base, "kind": "frame_failed", "detail": frame.error})
            if failed is not None:
                raise failed
            return
        measurements: dict[str, Any] = {
            **base,
            "pixel_size_um": frame.pixel_size_um,
            "image_shape": [int(n) for n in frame.image.shape[:2]],
            "summary": frame.summary,
            "objects": frame.objects,
        }
        if frame.grains is not None:
            measurements["grains"] = frame.grains
        try:
            pub.publish("measurements", measurements)
        except Exception:
            self._send_arrays(frame, base)  # the image and labels still go out
            raise
        failed = self._send_arrays(frame, base)
        self._check_saturation(frame)
        self.latest["measurements"] = measurements
        self.last_analysed = frame
        self.latency.add(frame)
        if self.on_measurements is not None and frame.acquisition == self.acquisition:
            try:
                self.on_measurements(frame, measurements)
            except Exception as exc:  # feedback faults must not stop publishing
                self._errors.error("feedback", f"feedback on frame {frame.frame_id} failed", exc)
        if failed is not None:
            raise failed

    def _send_arrays(self, frame: Frame, base: dict[str, Any]) -> Exception | None:
        """The frame's ``frame`` (when due, or skipped), ``truth`` and ``labels`` (when
        analysed) messages, each sent even if one before it failed; the first error."""
        pub = self.publisher
        failed: Exception | None = None
        sends: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        if frame.image_due or frame.skipped:
            head = {**base, "skipped": frame.skipped}
            sends.append(("frame", head, {"image": frame.image}))
        if frame.truth is not None:
            sends.append(("truth", dict(base), {"labels": frame.truth}))
        if frame.labels is not None and frame.error is None and not frame.skipped:
            sends.append(("labels", dict(base), {"labels": frame.labels}))
        for topic, header, arrays in sends:
            try:
                pub.publish(topic, header, arrays)
            except Exception as exc:
                failed = failed or exc
                continue
            if topic in ("frame", "labels"):
                self.latest[topic] = header
        return failed

    def _check_saturation(self, frame: Frame) -> None:
        """Say once per acquisition that objects have pixels at the camera's saturation
        level: their intensities are too low (log warning and a ``saturated`` event)."""
        n = (frame.summary or {}).get("saturated_objects")
        if not n or frame.acquisition == self._saturation_said:
            return
        self._saturation_said = frame.acquisition
        level: float | int | None = saturation_level(frame.image.dtype)
        if np.issubdtype(frame.image.dtype, np.integer):  # 65535, not 65535.0 (uint64 too)
            level = int(np.iinfo(frame.image.dtype).max)
        log.warning(
            "frame %d (%s): %d object(s) have pixels at the camera's saturation level (%g): "
            "their intensities are too low; shorten the exposure (exposure_ms) or the "
            "illumination. Said once per acquisition; saturated_px counts each object's",
            frame.frame_id, frame.index, n, level)
        try:
            self.publish_event("saturated", {
                "frame_id": frame.frame_id, "index": dict(frame.index),
                "acquisition": frame.acquisition, "objects": n, "level": level,
                "detail": "objects of this frame have pixels at the camera's saturation "
                          "level: their intensities are too low (sent once per acquisition; "
                          "each object's saturated_px counts them)",
            })
        except Exception as exc:  # reporting must not lose the frame
            self._errors.error("event", "publishing saturated failed", exc)

    def units(self) -> dict[str, str]:
        """The unit of each per-object field (tracking's too, when on); in px where the pixel
        size is not calibrated (µm values are then pixel values)."""
        units = {**UNITS, **TRACK_UNITS} if self.tracker is not None else dict(UNITS)
        return units if self.pixel_size_known else units_in_pixels(units)

    def report(self) -> dict[str, Any]:
        """Counters, queue depths and latency percentiles for the status topic."""
        return {
            **self.counters.snapshot(),
            # frames the publish stage could not send (not counted in frames_published)
            "frames_publish_failed": int(self.counters.counts["publish_failed"]),
            "stage_threads": self.stage_threads,
            "queues": self.queue_depths(),
            "latency_ms": self.latency.percentiles(),
            "units": self.units(),
        }
