"""Dashboard fixes (bug hunt s25): a frozen server or link shown as live forever, a
dashboard that never hears its service, a plot series per grid tile, the levels and text of
stall / missing-frame / finish events, and "silent" between a slow heartbeat's first two."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest

from livemask.dashboard import state as state_module
from livemask.dashboard.server import DashboardServer
from livemask.dashboard.state import DashboardState, event_summary, stream_label, summary_point
from livemask.transport.publisher import ZmqPublisher
from tests.test_dashboard import _msg, browser, dashboard, publisher

__all__ = ["browser", "dashboard", "publisher"]  # (fixtures of test_dashboard, used here)

# a standalone dashboard in a child process, so that it can be frozen (SIGSTOP)
_CHILD = """
import asyncio, sys
from livemask.dashboard.server import DashboardServer
async def main():
    async with DashboardServer(sys.argv[1], port=0, update_hz=5) as server:
        print(server.url, flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""

_PAGE_JS = """() => ({state: document.getElementById('state').textContent,
  conn: document.getElementById('conn').textContent,
  fps: document.getElementById('fps').textContent,
  stale: document.body.classList.contains('stale')})"""


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(state_module.time, "monotonic", lambda: now[0])
    return now


# ---------------------------------------------------------------- 1: a frozen server
@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
async def test_page_says_stale_when_the_dashboard_freezes(
    browser: Any, publisher: ZmqPublisher
) -> None:
    """SIGSTOP of the service with the embedded dashboard (or a hung loop, a dropped
    tunnel) left the page at "live / acquiring / N fps" forever: the WebSocket stays open,
    and the page turned stale only when it closed (bug hunt s25)."""
    child = subprocess.Popen([sys.executable, "-c", _CHILD, publisher.bound_address],
                             stdout=subprocess.PIPE, text=True)
    stop = asyncio.Event()

    async def heartbeat() -> None:
        up = 0.0
        while not stop.is_set():
            publisher.publish("status", {"uptime_s": up, "state": "running", "acquiring": True,
                                         "frames_acquired": int(up * 10),
                                         "frames_analysed": int(up * 10)})
            up += 0.25
            await asyncio.sleep(0.25)

    beats = asyncio.create_task(heartbeat())
    try:
        assert child.stdout is not None
        url = (await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 20)).strip()
        assert url.startswith("http://127.0.0.1:"), url
        page = await browser.new_page()
        await page.goto(url)
        await page.wait_for_function(
            "() => document.getElementById('state').textContent === 'acquiring'"
            " && document.getElementById('fps').textContent !== '–'", timeout=10000)
        await asyncio.sleep(3.5)  # healthy: never stale
        shown = await page.evaluate(_PAGE_JS)
        assert not shown["stale"] and shown["state"] == "acquiring", shown
        os.kill(child.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        await page.wait_for_function("() => document.body.classList.contains('stale')",
                                     timeout=8000)
        shown = await page.evaluate(_PAGE_JS)
        assert time.monotonic() - t0 < 7
        assert shown["state"].startswith("no data from the dashboard for"), shown
        assert shown["fps"] == "–" and shown["conn"] != "live", shown
        os.kill(child.pid, signal.SIGCONT)  # it comes back: live again
        await page.wait_for_function(
            "() => !document.body.classList.contains('stale')"
            " && document.getElementById('state').textContent === 'acquiring'", timeout=8000)
    finally:
        stop.set()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGCONT)
        child.terminate()
        child.wait(10)
        await beats


async def test_an_idle_healthy_dashboard_sends_a_keep_alive(
    dashboard: DashboardServer, publisher: ZmqPublisher
) -> None:
    """Nothing went to a page while the service was idle between heartbeats (5 s with
    ``publish.heartbeat_s: 5``): the page could not tell that from a frozen server."""
    assert (await _hello(dashboard))["config"]["keepalive_s"] <= 1.0
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{dashboard.url}ws") as ws:
        assert (await ws.receive_json(timeout=2))["type"] == "hello"
        kinds = []
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                kinds.append((await ws.receive_json(timeout=0.2))["type"])
        assert kinds.count("alive") >= 2, kinds


async def _hello(server: DashboardServer) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{server.url}ws") as ws:
        return dict(await ws.receive_json(timeout=2))


# ---------------------------------------------------------------- 2: never heard
def test_state_says_it_is_waiting_for_a_first_status(clock: list[float]) -> None:
    """``livemask dashboard --connect`` at a wrong address showed a green "live" and no
    word: ``silent_s`` is None until a first status came."""
    state = DashboardState()
    assert state.waiting_s() is None and state.stale_message() is None
    clock[0] += 2.0
    assert state.waiting_s() is None  # (a service may take a moment)
    clock[0] += 2.0
    assert state.waiting_s() == pytest.approx(4.0)
    told = state.stale_message()
    assert told is not None and told["waiting_s"] == pytest.approx(4.0)
    assert told["status"] is None and told["silent_s"] is None
    assert state.hello({})["waiting_s"] == pytest.approx(4.0)
    clock[0] += 1.0
    again = state.stale_message()
    assert again is not None and again["waiting_s"] == pytest.approx(5.0)
    state.add(_msg("status", uptime_s=1.0, state="idle"))
    assert state.waiting_s() is None and state.status_message()["waiting_s"] is None


async def test_api_state_says_it_is_waiting(dashboard: DashboardServer,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashboard.state, "started_at", time.monotonic() - 10)
    async with aiohttp.ClientSession() as http, http.get(f"{dashboard.url}api/state") as r:
        body = await r.json()
    assert body["status"] is None and body["waiting_s"] >= 10


# ---------------------------------------------------------------- 3: grid tiles
def test_tiles_of_a_grid_scan_are_one_series() -> None:
    """A 4x4 grain scan was "16 series": the grid key ``g`` made each tile a stream."""
    labels = {stream_label({"t": 0, "g": g}) for g in range(16)}
    assert labels == {""}
    assert stream_label({"t": 0, "g": 3, "p": 1, "c": 0}) == "c0 p1"
    point = summary_point({"frame_id": 1, "t": {"acquired": 1.0}, "summary": {"count": 2},
                           "index": {"t": 0, "g": 5}})
    assert point[5] == ""
    assert stream_label({"t": 2, "p": 1, "fb": 7}) == "fb p1"  # as docs/dashboard.md says


# ---------------------------------------------------------------- 4: event levels
def test_stall_and_missing_frame_events_are_not_info() -> None:
    t = {"t": {"sent": 1.0e9}}
    stalled = event_summary({**t, "kind": "acquisition_stalled", "index": {"t": 5},
                             "waited_s": 12.0, "limit_s": 10.0, "detail": "no return"})
    missing = event_summary({**t, "kind": "frame_missing", "index": {"t": 7},
                             "detail": "the event delivered no frame"})
    assert stalled["level"] == "error" and missing["level"] == "warn"
    stopped = event_summary({**t, "kind": "acquisition_finished", "acquisition": 1,
                             "error": None, "frames_missing": 2, "events_not_run": 120,
                             "duration_s": 4.2})
    assert stopped["text"] == "after 4.2 s, 2 frames missing, 120 events not run"
    clean = event_summary({**t, "kind": "acquisition_finished", "acquisition": 1,
                           "error": None, "frames_missing": 0, "events_not_run": 0,
                           "duration_s": 4.2})
    assert clean["text"] == "after 4.2 s" and clean["level"] == "info"


# ---------------------------------------------------------------- 5: slow heartbeat
def test_a_slow_heartbeat_is_not_silence_after_the_first_status(clock: list[float]) -> None:
    """With ``publish.heartbeat_s: 5`` a just-started service was "silent" 3 s after its
    first status: a 1 s heartbeat was assumed until a second status came."""
    state = DashboardState()
    state.add(_msg("status", uptime_s=0.1, state="starting"))  # no heartbeat_s (older)
    clock[0] += 4.9
    assert state.silent_s() is None
    state.add(_msg("status", uptime_s=5.1, state="idle"))
    clock[0] += 14.0
    assert state.silent_s() is None  # measured: 4.9 s
    clock[0] += 1.0
    assert state.silent_s() == pytest.approx(15.0)  # more than 3 of them
    # a status that says its interval: silent after 3 of those, from the first one
    other = DashboardState()
    other.add(_msg("status", uptime_s=0.1, state="idle", heartbeat_s=5.0))
    clock[0] += 14.0
    assert other.silent_s() is None
    clock[0] += 1.5
    assert other.silent_s() == pytest.approx(15.5)
    fast = DashboardState()
    fast.add(_msg("status", uptime_s=0.1, state="idle", heartbeat_s=0.5))
    clock[0] += 3.5
    assert fast.silent_s() == pytest.approx(3.5)


async def test_service_status_says_its_heartbeat() -> None:
    from livemask.service.app import Service
    from tests.conftest import make_config

    async with Service(make_config(publish={"heartbeat_s": 2.5})) as service:
        assert service.status()["heartbeat_s"] == 2.5


async def test_each_image_is_announced_with_its_size(
    dashboard: DashboardServer, publisher: ZmqPublisher
) -> None:
    """Over a slow link nothing else reaches the page while an image arrives: a page that
    knew of no image coming called a healthy dashboard stale after 3 s, and dropped it after
    30 s, before a 300 KB image at 8 kB/s had ever arrived (review)."""
    from tests.test_dashboard_fixes_s21 import _connect, _publish_frame

    async with _connect(dashboard) as ws:
        await ws.send_json({"type": "view", "images": True, "ack": True})
        announced: int | None = None
        fid = 0
        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, "no image"
            _publish_frame(publisher, fid)
            fid += 1
            with contextlib.suppress(TimeoutError):
                msg = await ws.receive(timeout=0.1)
                if msg.type == aiohttp.WSMsgType.TEXT and msg.json()["type"] == "image":
                    announced = msg.json()["bytes"]
                    image = await ws.receive(timeout=5)  # the very next message
                    assert image.type == aiohttp.WSMsgType.BINARY
                    assert len(image.data) == announced
                    break
                assert msg.type == aiohttp.WSMsgType.TEXT, "an image came unannounced"
