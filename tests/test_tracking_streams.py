"""Tracking streams: which frames share tracks (every MDA index key but ``t``)."""

from __future__ import annotations

import time

import numpy as np
import useq

from livemask.acquisition.source import RawFrame
from livemask.analysis.tracking import PositionTrackers
from livemask.inference.models import ModelCard
from livemask.inference.segmenter import Segmenter
from livemask.service.pipeline import Pipeline
from livemask.transport.publisher import MemoryPublisher
from tests.test_pipeline import RecordingSource, ThresholdBackend


def _raw(index: dict[str, int], squares: list[tuple[int, int]], x_um: float) -> RawFrame:
    image = np.full((64, 64), 100, np.uint16)
    for y, x in squares:
        image[y : y + 8, x : x + 8] = 1000
    event = useq.MDAEvent.model_validate({"index": index})
    return RawFrame(image, event, time.time(), {"x_um": x_um}, None)


def _tracking_pipeline() -> tuple[Pipeline, MemoryPublisher]:
    """A started synchronized pipeline with tracking (threshold "model") and its publisher."""
    pipe = Pipeline(Segmenter(ModelCard(name="fake", file="none.onnx"), ThresholdBackend()),
                    pub := MemoryPublisher(), mode="synchronized")
    pipe.source = RecordingSource()
    pipe.tracker = PositionTrackers()
    pipe.start()
    return pipe, pub


async def test_frames_with_a_client_index_key_are_a_stream_of_their_own() -> None:
    """Bug hunt: a client's burst enqueued with index {t, p, ext} (as
    examples/mitosis_controller.py does) at another field was linked into position p's
    tracks. Now, as for publish.frame_every, every index key but t tells the stream."""
    pipe, pub = _tracking_pipeline()
    try:
        for t in range(4):
            pipe.submit(_raw({"t": t, "p": 0}, [(10, 10), (40, 30)], 0.0))
            assert await pipe.drain(5.0)
            if t == 1:  # the burst: another field, nuclei a few px from the planned ones
                for _ in range(2):
                    pipe.submit(_raw({"t": 1, "p": 0, "ext": 1}, [(16, 14), (34, 36)], 40.0))
                    assert await pipe.drain(5.0)
    finally:
        await pipe.close()
    meas = [m.header for m in pub.by_topic("measurements")]
    ids = {m["frame_id"]: sorted(o["track_id"] for o in m["objects"]) for m in meas}
    planned = [ids[m["frame_id"]] for m in meas if "ext" not in m["index"]]
    burst = [ids[m["frame_id"]] for m in meas if "ext" in m["index"]]
    assert len(planned) == 4 and len(burst) == 2
    assert all(p == planned[0] for p in planned)  # the planned tracks go on
    assert burst[0] == burst[1] and set(burst[0]).isdisjoint(planned[0])


def test_the_stream_key_holds_every_index_key_but_t() -> None:
    trackers = PositionTrackers()
    base = trackers.key({"t": 0, "p": 1, "c": 0}, {})
    assert base == trackers.key({"t": 7, "c": 0, "p": 1}, {"x_um": 5.0})  # order, t: same
    assert base != trackers.key({"t": 0, "p": 1, "c": 0, "ext": 3}, {})
    assert trackers.key({"t": 0, "p": 1, "ext": 3}, {}) != trackers.key(
        {"t": 0, "p": 1, "ext": 4}, {})
    assert trackers.key({"t": 0, "p": 1, "fb": 2}, {}) != trackers.key({"t": 0, "p": 1}, {})


async def test_a_split_after_an_exposure_halving_is_no_division() -> None:
    """Bug hunt: a nucleus the segmentation splits in two right after ``set exposure_ms``
    halves the exposure read as a division (the halves' signal is half the parent's); the
    pipeline now gives the tracker each frame's exposure, so the signal per ms compares."""
    pipe, pub = _tracking_pipeline()
    try:
        for t in range(4):
            image = np.full((64, 64), 100, np.uint16)
            if t < 3:  # one nucleus, 900 ADU above the background at 10 ms
                image[20:36, 20:36], exposure = 1000, 10.0
            else:  # over-segmented in two halves at 5 ms: 450 ADU above it
                image[20:36, 20:27] = image[20:36, 29:36] = 550
                exposure = 5.0
            event = useq.MDAEvent.model_validate({"index": {"t": t, "p": 0}})
            pipe.submit(RawFrame(image, event, time.time(), {"x_um": 0.0}, None,
                                 settings={"exposure_ms": exposure}))
            assert await pipe.drain(5.0)
    finally:
        await pipe.close()
    meas = [m.header for m in pub.by_topic("measurements")]
    assert [m["summary"]["count"] for m in meas] == [1, 1, 1, 2]
    assert all(m["summary"]["divisions"] == [] for m in meas)
