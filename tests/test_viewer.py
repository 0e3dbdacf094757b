"""The terminal view: folding messages into state, pairing labels with truth."""

from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console

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
