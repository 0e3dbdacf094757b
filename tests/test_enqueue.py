"""``enqueue``: strict event fields and index keys; what enqueued events change is put back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import useq

from livemask.errors import ControlError
from livemask.service.app import Service
from tests.conftest import make_config
from tests.test_acquisition_end import control

#: A time-lapse without positions, channels or exposures: its frames run with what is set.
PLAIN = {"sequence": {"time_plan": {"interval": 0.15, "loops": 8}}}


def rig_per_frame(svc: Service) -> list[dict[str, Any]]:
    """What the rig was at as each frame came (read on the runner thread, from the core)."""
    core = svc.source.core  # type: ignore[union-attr]
    seen: list[dict[str, Any]] = []

    def on_frame(image: Any, event: Any, meta: Any = None) -> None:
        x, y = core.getXYPosition()
        seen.append({
            "event_x": event.x_pos, "x": round(x, 1), "y": round(y, 1),
            "z": round(core.getPosition(), 1), "exposure": core.getExposure(),
            "channel": core.getCurrentConfig("Channel"),
        })

    core.mda.events.frameReady.connect(on_frame)
    return seen


async def run_with(svc: Service, events: list[dict[str, Any]], **set_args: Any) -> None:
    """Start PLAIN, enqueue ``events`` once its first frame came (then ``set``), and wait
    for the run to end."""
    assert (await control(svc, "start"))["started"] is True
    deadline = time.monotonic() + 20
    while svc.pipeline.counters.counts["acquired"] < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    reply = await control(svc, "enqueue", events=events)
    assert reply == {"enqueued": len(events), "started": False}
    if set_args:
        await control(svc, "set", **set_args)
    while svc.acquiring:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_enqueued_positions_and_settings_are_put_back_after_them() -> None:
    """README's "acquire here next": before, the enqueued stage position, z, channel and
    exposure stayed in effect for every later frame of a plan that gives none."""
    async with Service(make_config(acquisition=PLAIN)) as svc:
        seen = rig_per_frame(svc)
        await run_with(svc, [{"x_pos": 100.0, "y_pos": 50.0, "z_pos": 3.0,
                              "exposure": 25.0, "channel": "GFP"}])
    here = [i for i, f in enumerate(seen) if f["event_x"] == 100.0]
    assert len(here) == 1 and 0 < here[0] < len(seen) - 1, seen
    enqueued = seen[here[0]]
    assert (enqueued["x"], enqueued["y"], enqueued["z"]) == (100.0, 50.0, 3.0)
    assert (enqueued["exposure"], enqueued["channel"]) == (25.0, "GFP")
    before = {k: v for k, v in seen[0].items() if k != "event_x"}
    assert before["channel"] != "GFP" and before["exposure"] != 25.0
    for frame in seen[here[0] + 1:]:
        assert {k: v for k, v in frame.items() if k != "event_x"} == before


async def test_an_exposure_set_after_an_enqueue_holds_after_its_events() -> None:
    """A restore event still queued would put the exposure from before the enqueue back:
    the exposure set meanwhile follows it."""
    async with Service(make_config(acquisition=PLAIN)) as svc:
        seen = rig_per_frame(svc)
        # min_start_time holds the enqueued event (and all behind it) to 1.5 s into the run
        await run_with(svc, [{"x_pos": 100.0, "exposure": 25.0, "min_start_time": 1.5}],
                       exposure_ms=15.0)
    here = next(i for i, f in enumerate(seen) if f["event_x"] == 100.0)
    assert seen[here]["exposure"] == 25.0
    assert seen[here + 1:] and all(f["exposure"] == 15.0 for f in seen[here + 1:]), seen


async def test_an_enqueued_roi_is_put_back_to_the_camera_roi_of_before() -> None:
    """Before, the restore event put back exposure, channel and stage only: every later
    planned frame was cropped to the enqueued roi (pymmcore-plus keeps an event's ROI)."""
    async with Service(make_config(acquisition=PLAIN)) as svc:
        core = svc.source.core  # type: ignore[union-attr]
        core.setROI(0, 0, 256, 200)  # the run's ROI: not the full frame
        shapes: list[tuple[dict[str, int], tuple[int, ...]]] = []
        core.mda.events.frameReady.connect(
            lambda image, event, meta=None: shapes.append((dict(event.index), image.shape)))
        await run_with(svc, [{"index": {"t": 0, "ext": 1}, "roi": [8, 4, 128, 96]},
                             {"index": {"t": 1, "ext": 1}}])
    ext = [i for i, (index, _) in enumerate(shapes) if "ext" in index]
    assert len(ext) == 2 and ext[0] > 0 and ext[1] < len(shapes) - 1, shapes
    assert [shapes[i][1] for i in ext] == [(96, 128)] * 2  # the roi holds for the batch
    assert all(shape == (200, 256) for index, shape in shapes if "ext" not in index), shapes


async def test_pending_events_and_events_not_run_count_only_the_enqueued_events() -> None:
    """Before, the hidden event that puts back the settings was counted: enqueuing one event
    showed pending_events 2 (and the limit and events_not_run counted them too)."""
    plan = {"sequence": {"time_plan": {"interval": 0.2, "loops": 50}}}
    async with Service(make_config(acquisition=plan)) as svc:
        assert (await control(svc, "start"))["started"] is True
        deadline = time.monotonic() + 20
        while svc.pipeline.counters.counts["acquired"] < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        # the runner takes this one next and holds it (and all behind it) until stopped
        await control(svc, "enqueue", events=[{"min_start_time": 1000}])
        while svc.status()["pending_events"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await control(svc, "enqueue", events=[{"exposure": 12.0, "x_pos": 5.0}])
        assert svc.status()["pending_events"] == 1
        await control(svc, "stop")
        assert svc.source.events_not_run == 1  # type: ignore[union-attr]


def test_the_pending_limit_counts_no_service_event() -> None:
    """Before, the events that put back settings counted towards MAX_PENDING_EVENTS: a full
    batch was refused while fewer enqueued events than the limit waited."""
    from livemask.acquisition.feed import MAX_PENDING_EVENTS, EventFeed
    from livemask.errors import AcquisitionError
    from livemask.service.app import RESTORE_ACTION

    feed = EventFeed(iter([useq.MDAEvent()]))
    mine = useq.MDAEvent(exposure=12.0)
    back = useq.MDAEvent(exposure=10.0, action=useq.CustomAction(name=RESTORE_ACTION))
    for _ in range(2):
        feed.inject([*[mine] * (MAX_PENDING_EVENTS // 2), back])
    assert feed.pending == MAX_PENDING_EVENTS
    with pytest.raises(AcquisitionError, match=r"^100000 enqueued events wait to run"):
        feed.inject([mine])
    assert next(feed) is mine and feed.pending == MAX_PENDING_EVENTS - 1
    feed.inject([mine, back])
    feed.close()
    assert feed.not_run == MAX_PENDING_EVENTS


@pytest.mark.parametrize(("event", "field"), [
    ({"exposure": True}, "exposure"),
    ({"exposure": "10"}, "exposure"),
    ({"x_pos": "5"}, "x_pos"),
    ({"min_start_time": False}, "min_start_time"),
    ({"index": {"t": 1.0}}, r"index\.t"),
    ({"reset_event_timer": 1}, "reset_event_timer"),
    ({"keep_shutter_open": "yes"}, "keep_shutter_open"),
    ({"index": {"fb": 5}}, r"index\.fb: reserved for the frames of feedback actions"),
    ({"index": {"p": 0, "ext": -2}}, r"index\.ext: -2 is negative"),
    ({"index": {"t": -1}}, r"index\.t: -1 is negative"),
    # the service's own events' names: not counted against the 100,000 pending events
    ({"action": {"type": "custom", "name": "livemask-x"}},
     r"action\.name: 'livemask-x': names starting with 'livemask-' are reserved"),
])
async def test_enqueue_refuses_wrong_types_and_index_keys(
    event: dict[str, Any], field: str
) -> None:
    """Before, `true` ran at 1 ms, strings were read as numbers, and `fb` (feedback frames'
    key) and negative indices were taken as given."""
    async with Service(make_config()) as svc:
        with pytest.raises(ControlError, match=rf"events\[1\]\.{field}") as info:
            await control(svc, "enqueue", events=[{}, event])
        assert info.value.code == "invalid_args"
        assert not svc.acquiring and svc.pipeline.acquisition == 0
        # the right types run, and a key of the client's own tags its frames
        assert (await control(svc, "enqueue", events=[{"index": {"t": 0, "ext": 1},
                                                       "exposure": 10, "x_pos": 5}]))["started"]


def test_invalid_args_list_ten_problems_and_count_the_rest() -> None:
    """Before, every pydantic error became a line of the reply: 100,000 wrong values in one
    request made a reply of megabytes, built on the event loop."""
    from pydantic import BaseModel

    from livemask.errors import CommandError
    from livemask.service.commands import _parse

    class Numbers(BaseModel):
        xs: list[int]

    with pytest.raises(CommandError) as info:
        _parse(Numbers, {"xs": ["a"] * 1000}, "args", "start: ")
    msg = str(info.value)
    assert info.value.code == "invalid_args"
    assert msg.count("xs.") == 10 and "xs.9: " in msg and "xs.10: " not in msg
    assert msg.endswith("and 990 more")


async def test_a_replay_refuses_enqueue_also_while_idle(tmp_path: Path) -> None:
    """docs/recording.md: a replay refuses ``enqueue``. While idle it was accepted and
    started an acquisition that played recorded frames, one per event, ignoring them."""
    import numpy as np
    import tifffile

    from livemask.acquisition.replay import ReplaySource, open_stack

    images = np.random.default_rng(3).integers(0, 4000, (3, 64, 64)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", images, imagej=True, metadata={"axes": "TYX"})
    source = ReplaySource(open_stack(tmp_path / "stack.tif"), interval_s=0.5)
    async with Service(make_config(), source=source) as svc:
        events = [{"exposure": 3.0, "x_pos": 100.0}, {"exposure": 5.0}]
        with pytest.raises(ControlError, match=r"enqueue: a replay .* cannot acquire") as info:
            await control(svc, "enqueue", events=events)
        assert info.value.code == "invalid_state"
        assert not svc.acquiring and svc.pipeline.counters.counts["acquired"] == 0
        assert (await control(svc, "start"))["started"] is True  # while it plays: the same
        with pytest.raises(ControlError, match=r"enqueue: a replay .* cannot acquire"):
            await control(svc, "enqueue", events=events)
