"""The event feed that the MDA runner consumes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import useq

from livemask.acquisition.feed import EventFeed, PlannedExposure
from livemask.acquisition.mode import Mode


def _events(n: int) -> list[useq.MDAEvent]:
    return [useq.MDAEvent(index={"t": i}) for i in range(n)]


def _assert_next_waits(feed: EventFeed, report: Callable[[], None], hold_s: float) -> None:
    """``next(feed)`` in a thread is held for ``hold_s``, then released by ``report()``."""
    released = threading.Event()
    worker = threading.Thread(target=lambda: (next(feed), released.set()))
    worker.start()
    assert not released.wait(hold_s), "next event released before the report"
    report()
    assert released.wait(2.0)
    worker.join()


def test_planned_events_in_order_then_stop() -> None:
    feed = EventFeed(_events(3))
    assert [e.index["t"] for e in feed] == [0, 1, 2]
    assert feed.issued == 3


def test_injected_events_run_before_remaining_planned() -> None:
    feed = EventFeed(_events(3))
    assert next(feed).index["t"] == 0
    feed.inject([useq.MDAEvent(x_pos=5.0)])
    assert next(feed).x_pos == 5.0
    assert [e.index["t"] for e in feed] == [1, 2]


def test_close_ends_iteration() -> None:
    feed = EventFeed(_events(10))
    next(feed)
    feed.close()
    assert list(feed) == []


def test_synchronized_waits_for_frame_done() -> None:
    feed = EventFeed(_events(2), mode="synchronized", sync_timeout_s=5.0)
    next(feed)
    feed.frame_delivered()
    _assert_next_waits(feed, feed.frame_done, 0.2)


def test_synchronized_times_out_instead_of_hanging() -> None:
    feed = EventFeed(_events(2), mode="synchronized", sync_timeout_s=0.1)
    next(feed)
    feed.frame_delivered()
    start = time.monotonic()
    assert next(feed).index["t"] == 1
    assert time.monotonic() - start < 5.0
    assert feed.sync_timeouts == 1


@pytest.mark.parametrize("mode", ["pipelined", "synchronized"])
def test_switching_to_free_run_releases_a_waiting_runner(mode: Mode) -> None:
    feed = EventFeed(_events(2), mode=mode, sync_timeout_s=30.0)
    next(feed)
    feed.frame_delivered()
    got: list[useq.MDAEvent] = []
    worker = threading.Thread(target=lambda: got.append(next(feed)))
    worker.start()
    feed.set_mode("free-run")
    worker.join(2.0)
    assert got and got[0].index["t"] == 1


def test_synchronized_does_not_wait_for_an_event_that_gave_no_frame() -> None:
    # a failed snap (pymmcore-plus logs it and goes on) delivers nothing: before, the next
    # event waited sync_timeout_s for a frame that would never come
    feed = EventFeed(_events(3), mode="synchronized", sync_timeout_s=30.0)
    start = time.monotonic()
    assert [e.index["t"] for e in feed] == [0, 1, 2]
    assert time.monotonic() - start < 5.0 and feed.sync_timeouts == 0


@pytest.mark.parametrize(
    ("mode", "report"), [("synchronized", "frame_done"), ("pipelined", "frame_started")]
)
def test_a_report_after_its_timeout_does_not_release_a_later_frame_early(
    mode: Mode, report: str
) -> None:
    feed = EventFeed(_events(3), mode=mode, sync_timeout_s=0.1)
    next(feed)
    feed.frame_delivered()
    assert next(feed).index["t"] == 1  # frame 0 given up on after the timeout
    assert feed.sync_timeouts == 1
    feed.sync_timeout_s = 30.0
    feed.frame_delivered()  # frame 1
    getattr(feed, report)()  # frame 0's late report must not count for frame 1
    _assert_next_waits(feed, getattr(feed, report), 0.05)


def test_pipelined_waits_until_the_model_takes_the_waiting_frame() -> None:
    feed = EventFeed(_events(4), mode="pipelined", sync_timeout_s=30.0)
    next(feed)
    feed.frame_delivered()
    _assert_next_waits(feed, feed.frame_started, 0.2)  # frame 0 still waiting for the model
    feed.frame_delivered()
    feed.frame_started()  # frame 1 taken while frame 0 is still being analysed
    assert feed.done == 0
    start = time.monotonic()
    assert next(feed).index["t"] == 2  # the camera acquires during inference, at once
    assert time.monotonic() - start < 1.0 and feed.sync_timeouts == 0


def test_only_imaging_events_count_as_asking_for_a_frame() -> None:
    feed = EventFeed([useq.MDAEvent(), useq.MDAEvent(action={"type": "custom", "name": "m"})])
    assert len(list(feed)) == 2
    assert feed.issued == 2 and feed.image_events_issued == 1


def test_a_report_for_no_delivered_frame_is_ignored() -> None:
    # e.g. the last frame of the previous acquisition, published after this one started
    feed = EventFeed(_events(2), mode="synchronized", sync_timeout_s=30.0)
    next(feed)
    feed.frame_done()
    feed.frame_delivered()
    assert feed.done == 0 and feed.delivered == 1


def test_a_source_ignores_reports_for_frames_of_an_earlier_feed() -> None:
    from livemask.acquisition.source import FeedThreadSource

    source = FeedThreadSource()
    old, new = EventFeed(_events(1)), EventFeed(_events(2), mode="synchronized")
    source._feed = new
    next(new)
    new.frame_delivered()
    source.frame_started(old)  # the previous acquisition's frames, taken and published late
    source.frame_done(old)
    assert new.started == new.done == 0
    source.frame_started(new)
    source.frame_done(new)
    assert new.started == new.done == 1


def test_the_timeout_is_wall_time_although_reports_wake_the_runner() -> None:
    feed = EventFeed(_events(3), mode="pipelined", sync_timeout_s=0.3)
    next(feed)
    feed.frame_delivered()
    feed.frame_delivered()  # two delivered, neither taken by the model
    stop = threading.Event()

    def report_done_often() -> None:  # frame_done of other frames wakes the runner early
        while not stop.wait(0.005):
            feed.frame_done()

    waker = threading.Thread(target=report_done_often)
    waker.start()
    start = time.monotonic()
    try:
        next(feed)
    finally:
        stop.set()
        waker.join()
    assert time.monotonic() - start >= 0.3 and feed.sync_timeouts == 1


def test_an_image_event_that_delivered_no_frame_is_reported_missing() -> None:
    missing: list[useq.MDAEvent] = []
    planned = [*_events(4), useq.MDAEvent(index={"t": 4}, action={"type": "custom"})]
    feed = EventFeed(planned, on_missing=missing.append)
    delivered = {0: 1, 1: 0, 2: 2, 3: 0}  # frames each image event delivered (1 and 3: none)
    for event in feed:
        for _ in range(delivered.get(event.index["t"], 0)):
            feed.frame_delivered()
    # event 3's failure is noticed when the runner asks for event 4; event 4 takes no image
    assert [e.index["t"] for e in missing] == [1, 3]
    assert feed.missing == 2


def test_the_last_event_of_a_stopped_acquisition_is_not_reported_missing() -> None:
    missing: list[useq.MDAEvent] = []
    feed = EventFeed(_events(3), on_missing=missing.append)
    next(feed)  # its snap is cut short by the stop: no frame
    feed.close()
    with pytest.raises(StopIteration):
        next(feed)
    assert missing == [] and feed.missing == 0



def test_events_enqueued_once_the_last_was_taken_are_refused_not_lost() -> None:
    """Before, events injected after the runner had taken the last event went into a feed
    nobody read again: accepted, never run, never reported."""
    from livemask.errors import AcquisitionEnding

    feed = EventFeed(_events(1))
    assert [e.index["t"] for e in feed] == [0]  # the runner took the last event
    with pytest.raises(AcquisitionEnding, match="taken its last event"):
        feed.inject([useq.MDAEvent(x_pos=5.0)])
    closed = EventFeed(_events(3))
    closed.close()
    with pytest.raises(AcquisitionEnding):
        closed.inject([useq.MDAEvent(x_pos=5.0)])


def test_the_enqueue_backlog_is_bounded_and_dropped_when_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, 500,000 enqueued events took 770 MB, unseen in status, kept after stop."""
    from livemask.acquisition import feed as feed_module
    from livemask.errors import AcquisitionError

    monkeypatch.setattr(feed_module, "MAX_PENDING_EVENTS", 5)
    feed = EventFeed(_events(2))
    assert feed.inject(_events(4)) == 4 and feed.pending == 4
    with pytest.raises(AcquisitionError, match="4 enqueued events wait to run and at most 5"):
        feed.inject(_events(2))
    assert feed.pending == 4  # all or nothing
    next(feed)
    assert feed.inject(_events(2)) == 2 and feed.pending == 5
    feed.close()
    assert feed.pending == 0 and feed.not_run == 5


def test_planned_exposure_replaces_the_events_own_from_when_it_is_set() -> None:
    events = [useq.MDAEvent(exposure=10.0), useq.MDAEvent(), useq.MDAEvent(exposure=10.0),
              useq.MDAEvent(exposure=10.0)]
    planned = PlannedExposure(events)
    assert next(planned).exposure == 10.0
    assert planned.set(30.0) is None
    assert [next(planned).exposure for _ in range(2)] == [None, 30.0]  # none: the camera's
    assert planned.set(None) == 30.0  # undone (the camera refused the value)
    assert next(planned).exposure == 10.0


def _burst(n: int, interval_s: float) -> list[useq.MDAEvent]:
    """A feedback burst's events: offsets from its first frame from the second on."""
    return [useq.MDAEvent(index={"fb": 1, "t": i},
                          min_start_time=i * interval_s if i else None) for i in range(n)]


def test_a_batch_timed_from_first_is_timed_from_when_its_first_event_is_taken() -> None:
    """Two bursts decided at once: the second waits behind the first, and its intervals
    count from its own first frame. Before, both were timed from when they were decided,
    so the second's times had passed when it ran, and its frames came back to back."""
    now = [100.0]
    feed = EventFeed(_events(1), clock=lambda: now[0])
    feed.inject(_burst(3, 0.5), timed_from_first=True)
    feed.inject(_burst(3, 0.5), timed_from_first=True)
    feed.inject([useq.MDAEvent(min_start_time=7.0)])  # an enqueue's: on the runner's clock
    times = []
    for _ in range(7):
        times.append(next(feed).min_start_time)
        now[0] += 0.6  # each frame takes a little longer than the interval
    assert times[:3] == [None, 100.5, 101.0]
    assert times[3:6] == [None, pytest.approx(102.3), pytest.approx(102.8)]
    assert times[6] == 7.0


def test_offsets_are_dropped_without_a_clock() -> None:
    feed = EventFeed([])
    feed.inject(_burst(2, 0.5), timed_from_first=True)
    assert [e.min_start_time for e in feed] == [None, None]


def test_a_set_undone_after_the_runner_took_an_event_gives_it_its_own_back() -> None:
    """The camera refused the set (or it timed out) and the plan went back to the events'
    own: an event taken meanwhile carries the refused value, and is set up with its own
    (review: it kept the refused 20 ms, and the frame read as a settings mismatch)."""
    plan = PlannedExposure([useq.MDAEvent(index={"t": t}, exposure=10.0) for t in range(3)])
    first = next(plan)
    assert plan.exposure_now(first) == 10.0
    plan.set(20.0)
    taken = next(plan)  # taken while the set is on its way
    assert taken.exposure == 20.0 and plan.exposure_now(taken) == 20.0
    plan.set(None)  # undone: the camera refused 20 ms
    assert plan.exposure_now(taken) == 10.0
    assert plan.exposure_now(useq.MDAEvent(exposure=50.0)) is None  # not the plan's
