"""Dashboard fixes: images in flight over a slow link, the page and the state across a
service restart, the image a late page gets, and float intensities (bug hunt s21)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import numpy as np
import pytest
from rich.console import Console

from livemask.dashboard import server as server_module
from livemask.dashboard.preview import decode_preview, encode_preview, make_preview
from livemask.dashboard.server import DashboardServer
from livemask.dashboard.state import DashboardState, summary_point
from livemask.protocol import Message
from livemask.transport.publisher import ZmqPublisher
from livemask.viewer import ConsoleView
from tests.test_dashboard import _msg, _until, browser, dashboard, publisher

__all__ = ["browser", "dashboard", "publisher"]  # (fixtures of test_dashboard, used here)

IMAGE = np.random.default_rng(5).integers(0, 4000, (64, 64)).astype(np.uint16)
LABELS = np.zeros(IMAGE.shape, np.int32)
LABELS[10:30, 10:30] = 1


def _publish_frame(publisher: ZmqPublisher, fid: int, count: int = 7) -> None:
    base = {"frame_id": fid, "t": {"acquired": time.time()}}
    publisher.publish("frame", {**base, "skipped": False}, {"image": IMAGE})
    publisher.publish("labels", base, {"labels": LABELS})
    publisher.publish("measurements", {**base, "summary": {"count": count}, "objects": []})


async def _first_image(
    ws: aiohttp.ClientWebSocketResponse, publish: Callable[[], None], timeout_s: float = 10.0
) -> dict[str, Any]:
    """Publish until ``ws`` gets an image; its header."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline, "no image"
        publish()
        with contextlib.suppress(TimeoutError):
            msg = await ws.receive(timeout=0.05)
            if msg.type == aiohttp.WSMsgType.BINARY:
                return decode_preview(msg.data)[0]


async def _next_json(ws: aiohttp.ClientWebSocketResponse, kind: str,
                     timeout_s: float = 5.0) -> dict[str, Any]:
    """The next JSON message of type ``kind`` on ``ws`` (others are skipped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {kind} message"
        with contextlib.suppress(TimeoutError):
            msg = await ws.receive(timeout=left)
            if msg.type == aiohttp.WSMsgType.TEXT and msg.json()["type"] == kind:
                return dict(msg.json())


@contextlib.asynccontextmanager
async def _connect(server: DashboardServer) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{server.url}ws") as ws:
        assert (await ws.receive_json(timeout=2))["type"] == "hello"
        yield ws


# ---------------------------------------------------------------- images in flight
async def test_an_acknowledging_page_has_one_image_in_flight(
    dashboard: DashboardServer, publisher: ZmqPublisher
) -> None:
    """Over a slow link (~250 KB/s) the images shown were 24 s old: one counted as taken
    once the kernel had it, and the socket's send buffer held a dozen (bug hunt)."""
    async with _connect(dashboard) as ws:
        await ws.send_json({"type": "view", "images": True, "ack": True})
        assert await _until(lambda: any(b.acks for b in dashboard.browsers))
        (browser,) = dashboard.browsers
        fid = 0
        deadline = time.monotonic() + 10
        while dashboard.images_encoded < 6:  # images offered, none acknowledged
            assert time.monotonic() < deadline, "no images encoded"
            _publish_frame(publisher, fid)
            fid += 1
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # (the old pump had sent them all by now)
        assert browser.images_sent == 1 and browser.images_replaced >= 4
        first = await _first_image(ws, lambda: None)
        await ws.send_json({"type": "ack"})  # the page has it: the newest goes next
        second = await _first_image(ws, lambda: None)
        assert second["frame_id"] > first["frame_id"] + 3 and browser.images_sent == 2


async def test_a_page_that_stops_acknowledging_still_gets_images(
    dashboard: DashboardServer, publisher: ZmqPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No stall for ever: without its acknowledgement the next image goes after a while."""
    monkeypatch.setattr(server_module, "ACK_TIMEOUT_S", 0.2)
    async with _connect(dashboard) as ws:
        await ws.send_json({"type": "view", "images": True, "ack": True})
        assert await _until(lambda: any(b.acks for b in dashboard.browsers))
        fids = iter(range(10_000))
        for _ in range(3):
            await _first_image(ws, lambda: _publish_frame(publisher, next(fids)))


# ---------------------------------------------------------------- service restarts
def test_a_restart_forgets_the_old_runs_plots_summary_and_grains() -> None:
    """A standalone dashboard kept the old run's points (µm²) and drew them under the new
    run's px² title, and its updates carried the old frame id and count (bug hunt)."""
    for restart in (_msg("event", kind="service_started", t={"sent": 1.0}),
                    _msg("status", uptime_s=0.5, frames_acquired=0)):
        state = DashboardState()
        state.add(_msg("status", uptime_s=50.0, frames_acquired=10))
        for fid in range(5):
            state.add(_msg("measurements", frame_id=fid, t={"acquired": 10.0 + fid},
                           summary={"count": 3, "mean_area_um2": 42.0},
                           grains={"cumulative": {"tiles": fid + 1}}))
        state.update()
        state.add(_msg("measurements", frame_id=5, summary={"count": 3}))  # pending
        state.add(restart)
        hello = state.hello({})
        assert hello["points"] == [] and hello["summary"] is None
        assert hello["frame_id"] is None and hello["grains"] is None
        assert state.update() is None  # no old point, frame id or count to send
        assert state.take_restart() and not state.take_restart()  # told once
        state.add(_msg("measurements", frame_id=0, summary={"count": 1}))
        state.add(_msg("status", uptime_s=0.9, frames_acquired=1))  # the new run's
        assert not state.take_restart()  # (after service_started: not one more restart)
        update = state.update()
        assert update is not None and [p[0] for p in update["points"]] == [0]


async def test_a_restart_sends_every_page_a_fresh_hello(
    dashboard: DashboardServer, publisher: ZmqPublisher
) -> None:
    async with _connect(dashboard) as ws:
        fids = iter(range(10_000))
        deadline = time.monotonic() + 20
        while True:  # until the dashboard's subscription is through (slow joiner)
            assert time.monotonic() < deadline, "no update message"
            _publish_frame(publisher, next(fids), count=128)
            with contextlib.suppress(AssertionError):
                update = await _next_json(ws, "update", timeout_s=0.3)
                break
        assert update["summary"]["count"] == 128
        publisher.publish("event", {"kind": "service_started", "t": {"sent": time.time()}})
        hello = await _next_json(ws, "hello")
        assert hello["points"] == [] and hello["summary"] is None and hello["frame_id"] is None
        assert hello["events"][-1]["kind"] == "service_started"


async def test_a_page_opened_after_a_restart_gets_no_image_of_the_old_run(
    dashboard: DashboardServer, publisher: ZmqPublisher
) -> None:
    """A page opened after the service restarted got the previous run's last image."""
    fids = iter(range(100, 10_000))
    async with _connect(dashboard) as ws:
        old = await _first_image(ws, lambda: _publish_frame(publisher, next(fids)))
        assert old["frame_id"] >= 100
        publisher.publish("event", {"kind": "service_started", "t": {"sent": time.time()}})
        assert await _until(lambda: any(e["kind"] == "service_started"
                                        for e in dashboard.state.events))
        async with _connect(dashboard) as late:
            first = await _first_image(late, lambda: _publish_frame(publisher, 0))
    assert first["frame_id"] == 0  # the new run's, not frame 1xx of the old one


async def test_a_page_opened_late_gets_no_image_older_than_unread_frames(
    dashboard: DashboardServer, publisher: ZmqPublisher
) -> None:
    """While no page watched, frames were not read, yet a page opened later got the last
    image from before (an earlier acquisition's) as the newest."""
    fids = iter(range(10_000))
    async with _connect(dashboard) as ws:
        old = await _first_image(ws, lambda: _publish_frame(publisher, next(fids)))
        await ws.send_json({"type": "view", "images": False})  # hidden: frames not read
        assert await _until(lambda: not dashboard._watched.is_set())
        newer = next(fids) + 10
        publisher.publish("event", {"kind": "acquisition_started", "acquisition": 2,
                                    "t": {"sent": time.time()}})
        assert await _until(lambda: dashboard._last_image is None)
        for fid in range(old["frame_id"] + 1, newer):  # the next acquisition, unread
            _publish_frame(publisher, fid)
        async with _connect(dashboard) as late:
            first = await _first_image(late, lambda: _publish_frame(publisher, newer))
    assert first["frame_id"] > old["frame_id"]  # one of the new acquisition's


async def test_a_page_that_reconnects_while_nothing_runs_gets_the_last_image(
    dashboard: DashboardServer, publisher: ZmqPublisher
) -> None:
    """Review F: dropping the last image whenever no page watched left a page that
    reloaded (or whose connection blipped) after a run with no image until the next run."""
    fids = iter(range(10_000))
    async with _connect(dashboard) as ws:
        old = await _first_image(ws, lambda: _publish_frame(publisher, next(fids)))
    assert await _until(lambda: not dashboard._watched.is_set())
    async with _connect(dashboard) as again:
        deadline = time.monotonic() + 10
        header = None
        while header is None and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                msg = await again.receive(timeout=0.2)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    header = decode_preview(msg.data)[0]
    assert header is not None and header["frame_id"] == old["frame_id"]


# ---------------------------------------------------------------- in a real browser
_HEADER_JS = """() => ({
  frame: document.getElementById("frame-id").textContent,
  count: document.getElementById("count").textContent,
  label: document.getElementById("count-label").textContent,
  meta: document.getElementById("frame-meta").textContent,
  images: window.livemaskStats.images,
  painted: (() => {
    const c = document.getElementById("frame");
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    for (let i = 3; i < d.length; i += 4) if (d[i] !== 0) return true;
    return false;
  })(),
})"""
_SHOWS_A_FRAME = """() => /^[0-9]+$/.test(document.getElementById("frame-id").textContent)
                       && document.getElementById("count").textContent === "128"
                       && window.livemaskStats.images >= 3"""
_SHOWS_NOTHING_OLD = """() => document.getElementById("frame-id").textContent === "–"
                            && document.getElementById("count").textContent === "–" """


async def test_the_page_acknowledges_images_and_forgets_them_at_a_restart(
    browser: Any, publisher: ZmqPublisher
) -> None:
    """After the service restarted, an open page went on showing the old run's image,
    frame id and object count (128) as live while the new service was idle (bug hunt)."""
    feeding = asyncio.Event()

    async def feed() -> None:
        fid = 0
        while True:
            await feeding.wait()
            _publish_frame(publisher, fid, count=128)
            publisher.publish("status", {"uptime_s": 100 + fid * 0.1, "state": "running",
                                         "acquiring": True})
            fid += 1
            await asyncio.sleep(0.1)

    server = await DashboardServer(publisher.bound_address, port=0, update_hz=10).start()
    feeder = asyncio.create_task(feed())
    try:
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(server.url or "")
        feeding.set()
        await page.wait_for_function(_SHOWS_A_FRAME, timeout=8000)
        # the shipped page acknowledges: it keeps getting images one at a time
        assert any(b.acks for b in server.browsers)
        feeding.clear()
        publisher.publish("event", {"kind": "service_started", "t": {"sent": time.time()}})
        publisher.publish("status", {"uptime_s": 0.5, "state": "idle", "acquiring": False})
        await page.wait_for_function(_SHOWS_NOTHING_OLD, timeout=5000)  # standalone restart
        header = await page.evaluate(_HEADER_JS)
        assert header["meta"] == "waiting for a frame…" and not header["painted"], header
        assert header["label"] == "objects", header
        feeding.set()
        await page.wait_for_function(_SHOWS_A_FRAME, timeout=8000)
        feeding.clear()
        await server.close()  # embedded: the server goes with the service; a new one comes
        server = await DashboardServer(publisher.bound_address, port=server.port).start()
        await page.wait_for_function(_SHOWS_NOTHING_OLD, timeout=8000)
        header = await page.evaluate(_HEADER_JS)
        assert header["meta"] == "waiting for a frame…" and not header["painted"], header
        await page.close()
        assert not errors, errors
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder
        await server.close()


# ---------------------------------------------------------------- float intensities
def test_float_intensities_keep_their_significant_digits() -> None:
    """Float frames (0..1 or smaller): mean intensity 0.0040574 was plotted as 0.004, the
    stretch sent as [0.0, 0.004], the console showed 0.0 and its mean area in "px"."""
    point = summary_point({"frame_id": 1, "t": {"acquired": 5.0},
                           "summary": {"count": 2, "mean_area_px": 12.5,
                                       "mean_intensity": 0.0040574}})
    assert point == [1, 5.0, 2, 12.5, 0.0040574, ""]
    assert summary_point({"summary": {"mean_intensity": 1234.5678}})[4] == 1234.57
    image = np.linspace(0.0039, 0.0042, 64 * 64, dtype=np.float32).reshape(64, 64)
    pv = make_preview(image)
    header = decode_preview(encode_preview(pv))[0]
    assert header["stretch"] == pytest.approx(list(pv.stretch), rel=1e-5)
    assert header["stretch"][0] > 0.0039
    view = ConsoleView()
    view.update(Message("measurements", {
        "frame_id": 4, "summary": {"count": 2, "mean_area_px": 100.0,
                                   "mean_intensity": 0.0040574},
        "objects": [{"label": 1, "area_px": 120, "area_um2": 50.7, "centroid_yx": [3.0, 4.0],
                     "mean_intensity": 0.0040995}],
    }, {}))
    console = Console(width=120, record=True)
    console.print(view.render())
    text = console.export_text()
    assert "0.004057" in text and "0.004099" in text
    assert "100.0 px²" in text


async def test_a_run_started_while_watched_then_hidden_leaves_no_old_image(
    dashboard: DashboardServer, publisher: ZmqPublisher
) -> None:
    """Review H: acquisition 2 started while a page watched, and the page hid before any of
    its frames was read: the last image (acquisition 1's) was kept, and a page opened
    while acquisition 2 ran got it as the newest."""
    fids = iter(range(10_000))
    async with _connect(dashboard) as ws:
        old = await _first_image(ws, lambda: _publish_frame(publisher, next(fids)))
        publisher.publish("event", {"kind": "acquisition_started", "acquisition": 2,
                                    "t": {"sent": time.time()}})
        assert await _until(lambda: dashboard._last_image is None)
        await ws.send_json({"type": "view", "images": False})
        assert await _until(lambda: not dashboard._watched.is_set())
    async with _connect(dashboard) as late:
        first = await _first_image(late, lambda: _publish_frame(publisher, next(fids) + 50))
    assert first["frame_id"] > old["frame_id"]


def test_a_restart_seen_in_the_uptime_keeps_the_new_runs_first_points() -> None:
    """Review F: where ``service_started`` was missed, the uptime going down tells the
    restart, but the new run's measurements that came before its first status were wiped
    with the old run's (0 of 8 kept, no summary)."""
    from livemask.dashboard.state import DashboardState
    from livemask.protocol import Message

    def message(topic: str, **header: Any) -> Message:
        return Message(topic, {"topic": topic, **header}, {})

    now = time.time()
    state = DashboardState()
    state.add(message("measurements", frame_id=40, t={"acquired": now - 30},
                      summary={"count": 3}))  # the old run's
    state.add(message("status", uptime_s=500.0, frames_acquired=1000, t={"sent": now - 29}))
    for fid in range(8):  # the new run's, before its first status
        state.add(message("measurements", frame_id=fid, t={"acquired": now - 1 + fid / 10},
                          summary={"count": 5}))
    state.add(message("status", uptime_s=1.5, frames_acquired=8, t={"sent": now}))
    assert state.take_restart()
    assert [p[0] for p in state.series] == list(range(8))  # (hello + the next update)
    assert state.hello({})["summary"] == {"count": 5}
