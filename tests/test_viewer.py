"""The terminal view: folding messages into state, pairing labels with truth."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from livemask.analysis.grains import CumulativeGrainStats, grain_statistics
from livemask.analysis.metrics import aggregate, match_instances
from livemask.protocol import Message
from livemask.viewer import FINISHED_HINT, ConsoleView, TruthScore, _Display


def _labels(topic: str, fid: int, arr: np.ndarray) -> Message:
    return Message(topic, {"frame_id": fid}, {"labels": arr})


def test_truth_score_pairs_by_frame_id_in_any_order() -> None:
    a = np.zeros((20, 20), np.int32)
    a[2:8, 2:8] = 1
    a[10:18, 10:18] = 2
    score = TruthScore()
    assert score.add(_labels("truth", 7, a)) is None
    assert score.add(_labels("labels", 6, a)) is None
    result = score.add(_labels("labels", 7, a))
    assert result is not None and result.f1 == 1.0
    missed = a.copy()
    missed[missed == 2] = 0
    score.add(_labels("labels", 8, missed))
    score.add(_labels("truth", 8, a))
    total = score.total()
    assert total is not None and total.tp == 3 and total.fn == 1
    # the running total is the micro-average of every frame, without keeping them all
    per_frame = [result, match_instances(a, missed)]
    assert total == aggregate(per_frame) and score.frames_scored == 2


def test_view_renders_measurements_status_and_events() -> None:
    view = ConsoleView()
    view.update(Message("status", {"state": "running", "mode": "free-run", "frames_acquired": 5,
                                   "latency_ms": {"end_to_end": {"p50": 40.0, "p99": 90.0}}}, {}))
    view.update(Message("measurements", {
        "frame_id": 4, "index": {"t": 4},
        "summary": {"count": 2, "mean_area_px": 100.0, "mean_area_um2": 42.25},
        "objects": [{"label": 1, "area_px": 120, "area_um2": 50.7, "centroid_yx": [3.0, 4.0],
                     "mean_intensity": 300.0}],
    }, {}))
    view.update(Message("event", {"kind": "setting_changed", "mode": "synchronized",
                                  "t": {"sent": 0.0}}, {}))
    console = Console(width=120, record=True)
    console.print(view.render())
    text = console.export_text()
    assert "running (free-run)" in text and "42.2" in text
    assert "p99 90.0 ms" in text
    assert "setting_changed: mode=synchronized" in text


def test_view_shows_grain_statistics_for_a_grains_model() -> None:
    """A grains frame shows inside and edge grains, the sizes of those inside and the ASTM G
    of the tile and of the scan, not a "nuclei" count with edge-cut grains in its mean."""
    labels = np.repeat(np.repeat(np.arange(1, 17, dtype=np.int32).reshape(4, 4), 10, 0), 10, 1)
    stats = CumulativeGrainStats()
    grains = {"tile": grain_statistics(labels, 0.5), "cumulative": stats.add(labels, 0.5)}
    view = ConsoleView()
    view.update(Message("measurements", {
        "frame_id": 3, "index": {"g": 0},
        "summary": {"count": 16, "mean_area_px": 100.0, "mean_area_um2": 25.0},
        "objects": [], "grains": grains,
    }, {}))
    console = Console(width=160, record=True)
    console.print(view.render())
    text = console.export_text()
    assert "nuclei" not in text
    assert "4 inside, 12 cut by the edge" in text  # the 2x2 middle of a 4x4 grid
    tile_g = grains["tile"]["astm_g_planimetric"]
    assert f"ASTM G {tile_g:.2f} planimetric" in text and "scan (1 tiles)" in text
    assert f"{grains['tile']['n_a_per_mm2']:.0f} grains/mm²" in text
    line = view.summary_line()
    assert "4 grains inside (+12 cut by the edge)" in line and "over 1 tiles" in line


def test_piped_view_prints_changes_only_and_the_end_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    view = ConsoleView()
    display = _Display(view, line_every_s=0.0)  # under pytest stdout is not a terminal
    assert display.live is None
    display.refresh()  # nothing to show before the first measurements
    status = {"state": "running", "acquiring": True, "frames_acquired": 1}
    view.update(Message("status", status, {}))
    view.update(Message("measurements", {"frame_id": 0, "summary": {"count": 3}}, {}))
    display.refresh()
    display.refresh()
    view.update(Message("status", {**status, "acquiring": False}, {}))
    display.refresh()
    display.refresh()
    with display:
        pass
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("frame 0: 3 objects")
    assert lines[1] == FINISHED_HINT


def test_view_says_when_the_heartbeat_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    import livemask.viewer as viewer

    now = [100.0]
    monkeypatch.setattr(viewer.time, "monotonic", lambda: now[0])
    view = ConsoleView()
    view.update(Message("status", {"state": "running", "mode": "free-run"}, {}))
    for i in range(5):
        now[0] += 0.1
        view.update(Message("measurements", {"frame_id": i, "summary": {"count": 1}}, {}))
    assert view.fps() is not None and view.silent_s() is None
    now[0] += 10.0  # the service was killed: no more heartbeats
    assert view.fps() is None and view.silent_s() == pytest.approx(10.5)
    assert "no status for 10 s" in view.summary_line()
    console = Console(width=160, record=True)
    console.print(view.render())
    assert "the service is gone or unreachable" in console.export_text()
    view.update(Message("status", {"state": "running", "mode": "free-run"}, {}))  # it is back
    assert view.silent_s() is None and "no status" not in view.summary_line()


def test_rate_is_not_shown_once_measurements_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The acquisition finished, heartbeats go on: the last rate was shown for ever."""
    import livemask.viewer as viewer

    now = [100.0]
    monkeypatch.setattr(viewer.time, "monotonic", lambda: now[0])
    view = ConsoleView()
    for i in range(10):
        now[0] += 0.1
        view.update(Message("measurements", {"frame_id": i, "summary": {"count": 1}}, {}))
    view.update(Message("status", {"state": "idle", "acquiring": False}, {}))
    assert view.fps() == pytest.approx(10.0)
    now[0] += 1.5  # within 2 s: still the rate
    assert view.fps() == pytest.approx(10.0)
    now[0] += 1.0
    view.update(Message("status", {"state": "idle", "acquiring": False}, {}))
    assert view.fps() is None and "- frames/s" in view.summary_line()


@contextlib.contextmanager
def _publishing(parts_of: Callable[[int], list[list[bytes]]]) -> Iterator[str]:
    """A PUB on a free loopback port sending ``parts_of(seq)`` every 50 ms; its address."""
    import threading

    import zmq

    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def publish() -> None:
        seq = 0
        while not stop.wait(0.05):
            for parts in parts_of(seq):
                pub.send_multipart(parts)
            seq += 1

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        stop.set()
        thread.join()
        pub.close()


def test_watch_leaves_out_malformed_messages_and_goes_on() -> None:
    """One message that is not livemask's protocol ended ``watch`` with a traceback."""
    from livemask.protocol import encode
    from livemask.viewer import watch

    with _publishing(lambda seq: [
        [b"status", b"{not json"],
        encode("measurements", {"frame_id": seq, "seq": seq, "summary": {"count": 7}}),
    ]) as address:
        view = watch(address, duration_s=1.5)
    assert view.bad_messages >= 1 and view.messages >= 1
    assert view.measurements is not None and view.measurements["summary"]["count"] == 7


def test_piped_watch_says_what_to_check_when_nothing_comes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import livemask.viewer as viewer

    now = [100.0]
    monkeypatch.setattr(viewer.time, "monotonic", lambda: now[0])
    view = ConsoleView("tcp://127.0.0.1:5555")
    display = _Display(view, line_every_s=0.0)
    display.refresh()
    now[0] += 6.0
    display.refresh()
    display.refresh()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "no messages from tcp://127.0.0.1:5555 after 6 s" in out[0]
    assert "livemask serve" in out[0]


def test_piped_view_ends_with_the_last_state_and_says_the_service_stopped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before, a piped view left out what came after its last line (one every 2 s): stopped
    with the service, a 50-frame run left an empty log, a 120-frame one ended at frame 106."""
    from livemask.viewer import STOPPED_LINE

    view = ConsoleView()
    with _Display(view, line_every_s=3600.0) as display:  # no line during the run
        view.update(Message("status", {"state": "running", "acquiring": True}, {}))
        for i in range(50):
            view.update(Message("measurements", {"frame_id": i, "summary": {"count": 3}}, {}))
            display.refresh()
        view.update(Message("status", {"state": "stopping", "acquiring": False,
                                       "frames_acquired": 50, "frames_analysed": 50}, {}))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("frame 49: 3 objects")
    assert "acquired 50 / analysed 50 / skipped 0" in lines[0]
    assert lines[1] == STOPPED_LINE  # not "acquisition finished: Ctrl-C stops the service"


def test_watch_interrupted_still_shows_what_was_sent_to_it() -> None:
    """Before, Ctrl-C (or ``serve --view`` stopping it) ended ``watch`` at once: messages
    already on their way, the run's last ones, were never shown."""
    import signal
    import threading

    import zmq

    from livemask.protocol import encode
    from livemask.viewer import watch

    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)  # XPUB: it sees the subscriptions arrive
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    ready, done = threading.Event(), threading.Event()
    main = threading.get_ident()

    def publish() -> None:  # once watch reads and its subscriptions arrived
        wanted = {b"\x01measurements", b"\x01status", b"\x01event"}
        while (wanted or not ready.is_set()) and not done.is_set():
            if pub.poll(50):
                wanted.discard(pub.recv())
        if done.is_set():
            return
        for i in range(30):
            pub.send_multipart(encode("measurements", {"frame_id": i, "seq": i,
                                                       "summary": {"count": 4}}))
        pub.send_multipart(encode("status", {"seq": 0, "state": "stopping",
                                             "acquiring": False, "frames_acquired": 30}))
        signal.pthread_kill(main, signal.SIGINT)

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        view = watch(f"tcp://127.0.0.1:{port}", on_ready=ready.set, duration_s=60)
    except KeyboardInterrupt:
        pytest.fail("watch did not take the interrupt as the end of the view")
    finally:
        done.set()
        thread.join()
        pub.close()
    assert view.messages == 31 and view.measurements is not None
    assert view.measurements["frame_id"] == 29 and view.status["state"] == "stopping"


def test_piped_view_says_the_service_stopped_after_the_frames_it_still_sends(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before, the first "stopping" status printed the stopped line at once, while the
    service still drained: frames analysed after it came below it (".../ the service
    stopped / frame 11: ... acquired 12 / analysed 12")."""
    from livemask.viewer import STOPPED_LINE

    view = ConsoleView()
    stopping = {"state": "stopping", "acquiring": False, "frames_acquired": 12}
    with _Display(view, line_every_s=0.0) as display:
        view.update(Message("status", {"state": "running", "acquiring": True}, {}))
        view.update(Message("measurements", {"frame_id": 10, "summary": {"count": 3}}, {}))
        view.update(Message("status", {**stopping, "frames_analysed": 11}, {}))
        display.refresh()  # a heartbeat while the service drains its last frames
        view.update(Message("measurements", {"frame_id": 11, "summary": {"count": 3}}, {}))
        view.update(Message("status", {**stopping, "frames_analysed": 12}, {}))
        display.refresh()
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == STOPPED_LINE and lines.count(STOPPED_LINE) == 1, lines
    assert lines[-2].startswith("frame 11: ") and "acquired 12 / analysed 12" in lines[-2]


def test_piped_view_says_a_stopping_service_stopped_once_it_went_quiet(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ``livemask watch`` left running still says so once the service is gone (and says
    nothing after it: not "gone or unreachable", it said it stops)."""
    import livemask.viewer as viewer

    view = ConsoleView()
    clock = [time.monotonic()]
    monkeypatch.setattr(viewer.time, "monotonic", lambda: clock[0])
    with _Display(view, line_every_s=0.0) as display:
        view.update(Message("measurements", {"frame_id": 4, "summary": {"count": 3}}, {}))
        view.update(Message("status", {"state": "stopping", "acquiring": False}, {}))
        display.refresh()
        assert capsys.readouterr().out.splitlines() == [view.summary_line()]
        for quiet_s in (viewer.STALE_S + 1, viewer.STALE_S + 9):  # e.g. devices unloading
            clock[0] += quiet_s
            display.refresh()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [viewer.STOPPED_LINE]


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_while_a_message_is_shown_loses_nothing(
    signum: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, Ctrl-C or SIGTERM (which ``livemask watch`` and ``serve --view`` stop the view
    with) raised KeyboardInterrupt wherever the view was: a message taken but not yet shown
    was lost. Here the signal arrives while message 5 of 8 is being shown."""
    import signal
    import threading

    import zmq

    import livemask.viewer as viewer
    from livemask.protocol import encode

    sig = getattr(signal, signum)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as cli.watch
    real_receive = viewer.ConsoleView.receive

    def receive(self: viewer.ConsoleView, msg: Any) -> None:
        if msg is not None and msg.header.get("frame_id") == 5:
            signal.raise_signal(sig)  # handled in this (the main) thread, right here
        real_receive(self, msg)

    monkeypatch.setattr(viewer.ConsoleView, "receive", receive)
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    ready, done = threading.Event(), threading.Event()

    def publish() -> None:
        wanted = {b"\x01measurements"}
        while (wanted or not ready.is_set()) and not done.is_set():
            if pub.poll(50):
                wanted.discard(pub.recv())
        for i in range(8):
            pub.send_multipart(encode("measurements", {"frame_id": i, "seq": i,
                                                       "summary": {"count": 1}}))

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        view = viewer.watch(f"tcp://127.0.0.1:{port}", on_ready=ready.set, duration_s=30)
    except KeyboardInterrupt:
        pytest.fail(f"{signum} raised out of watch")
    finally:
        done.set()
        thread.join()
        pub.close()
        signal.signal(signal.SIGTERM, previous)
    assert view.messages == 8 and view.measurements is not None
    assert view.measurements["frame_id"] == 7


def test_view_says_the_service_is_starting_not_that_its_acquisition_finished() -> None:
    """Status heartbeats now come during start-up (``starting``, ``acquiring`` false): the
    view said "acquisition finished: Ctrl-C stops the service" through a whole warm-up
    (review)."""
    from livemask.viewer import STARTING_LINE

    view = ConsoleView()
    view.update(Message("status", {"state": "starting", "acquiring": False}, {}))
    assert view.end_line() == STARTING_LINE
    view.update(Message("status", {"state": "idle", "acquiring": False}, {}))
    assert view.end_line() == FINISHED_HINT


def test_watch_truth_says_when_the_service_publishes_none() -> None:
    """watch --truth on a service started without --truth showed no score and no word why
    (newcomer hunt): the README shows the two --truth as independent options."""
    from livemask.protocol import encode
    from livemask.viewer import NO_TRUTH, watch

    with _publishing(lambda seq: [
        encode("status", {"seq": seq, "state": "running", "truth": False}),
        encode("measurements", {"frame_id": seq, "seq": seq, "summary": {"count": 7}}),
    ]) as address:
        view = watch(address, truth=True, duration_s=1.0)
    assert view.truth_unavailable
    assert f"vs truth: {NO_TRUTH}" in view.summary_line()
    console = Console(record=True, width=200)
    console.print(view.render())
    assert "livemask serve --truth" in console.export_text()
