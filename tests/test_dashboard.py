"""The web dashboard: decimation, bookkeeping, HTTP routes, and the page in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from typer.testing import CliRunner

from livemask.analysis.grains import CumulativeGrainStats, grain_statistics
from livemask.cli import app as cli_app
from livemask.config import parse_config
from livemask.dashboard.preview import decode_preview, encode_preview, make_preview, outlines
from livemask.dashboard.probe import CHROMIUM_ARGS
from livemask.dashboard.server import DashboardServer, local_connect_address, parse_listen
from livemask.dashboard.state import DashboardState, event_summary, status_rates
from livemask.errors import ConfigError
from livemask.protocol import Message
from livemask.service.app import Service
from livemask.transport.publisher import ZmqPublisher
from tests.conftest import make_config

OUTLINE_RGB = (255, 204, 0)  # dashboard.js OUTLINE_RGBA
COUNT_RGB = (79, 195, 247)  # dashboard.js COLORS.count


# ---------------------------------------------------------------- decimation
def test_preview_downsamples_stretches_and_outlines() -> None:
    rng = np.random.default_rng(0)
    image = (rng.normal(1000, 50, (1000, 700)) + np.linspace(0, 3000, 700)).astype(np.uint16)
    labels = np.zeros(image.shape, np.int32)
    labels[100:300, 100:300] = 1
    pv = make_preview(image, labels, max_px=512)
    assert pv.step == 2 and pv.shape == (500, 350) and pv.grey.dtype == np.uint8
    assert pv.grey.min() == 0 and pv.grey.max() == 255  # 0.5/99.5 percentile stretch
    lo, hi = pv.stretch
    assert 800 < lo < hi < 4300
    assert pv.outline is not None and pv.outline.shape == pv.shape
    ys, xs = np.nonzero(pv.outline)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (49, 150, 49, 150)  # 2-px ring
    assert not pv.outline[100, 100] and not pv.outline[0, 0]
    # small frames are sent as they are; float frames with NaN are fine; flat frames too
    assert make_preview(image[:300, :200]).step == 1
    f = rng.random((64, 64)).astype(np.float32)
    f[0, 0] = np.nan
    assert make_preview(f).grey.max() == 255
    assert make_preview(np.full((32, 32), 7, np.uint16)).grey.max() == 0
    assert make_preview(image, labels[:10]).outline is None  # labels of another shape


def test_outlines_mark_both_sides_of_every_boundary() -> None:
    labels = np.zeros((7, 9), np.int32)
    labels[2:5, 2:5] = 1
    labels[2:5, 5:7] = 2  # touches object 1
    out = outlines(labels)
    assert out[2, 4] and out[2, 5]  # both sides of the 1|2 boundary
    assert out[1, 3] and out[2, 3]  # background and object side of the top edge
    assert not out[3, 3]  # inside
    assert not out[0, 0] and not out[6, 8]  # far background
    assert not outlines(np.zeros((4, 4), np.int32)).any()


def test_binary_frame_round_trip() -> None:
    labels = np.zeros((40, 50), np.int32)
    labels[10:20, 10:30] = 3
    pv = make_preview(np.arange(2000, dtype=np.uint16).reshape(40, 50), labels)
    data = encode_preview(pv, {"frame_id": 7, "skipped": False})
    assert data[:4] == b"LMD1"
    header, grey, outline = decode_preview(data)
    assert header["frame_id"] == 7 and header["width"] == 50 and header["height"] == 40
    assert np.array_equal(grey, pv.grey)
    assert outline is not None and np.array_equal(outline, pv.outline)
    no_outline = decode_preview(encode_preview(make_preview(np.ones((5, 5), np.uint8))))
    assert no_outline[2] is None
    with pytest.raises(ValueError, match="magic"):
        decode_preview(b"PNG" + data)


# ---------------------------------------------------------------- bookkeeping
def _msg(topic: str, **header: Any) -> Message:
    arrays = header.pop("arrays", {})
    return Message(topic, {"topic": topic, **header}, arrays)


def test_state_pairs_frames_with_labels_and_batches_points() -> None:
    state = DashboardState()
    img, lab = np.zeros((4, 4), np.uint16), np.zeros((4, 4), np.int32)
    for fid in (1, 2):
        state.add(_msg("frame", frame_id=fid, skipped=False, arrays={"image": img}))
        state.add(_msg("labels", frame_id=fid, arrays={"labels": lab}))
        state.add(_msg("measurements", frame_id=fid, t={"acquired": 100.0 + fid},
                       summary={"count": 10 + fid, "mean_area_um2": 5.0,
                                "mean_intensity": 300.0}))
    state.add(_msg("frame", frame_id=3, skipped=False, arrays={"image": img}))  # labels due
    picked = state.pick_frame()
    assert picked is not None and picked[0].header["frame_id"] == 2 and picked[1] is not None
    assert state.pick_frame() is None  # frame 3 waits for its labels
    state.add(_msg("labels", frame_id=3, arrays={"labels": lab}))
    picked = state.pick_frame()
    assert picked is not None and picked[0].header["frame_id"] == 3
    update = state.update()
    assert update is not None and update["type"] == "update"
    assert [p[0] for p in update["points"]] == [1, 2]
    assert update["points"][1] == [2, 102.0, 12, 5.0, 300.0, ""]
    assert state.update() is None  # nothing new
    hello = state.hello({"x": 1})
    assert hello["type"] == "hello" and len(hello["points"]) == 2
    state.add(_msg("measurements", frame_id=4, summary={"count": 1}))
    assert len(state.hello({})["points"]) == 2  # frame 4 comes with the next update, once
    assert [p[0] for p in state.update()["points"]] == [4]  # type: ignore[index]


def test_points_wait_for_a_browser_within_the_history() -> None:
    """With no browser, nothing takes the pending points: they were kept forever, and the
    first browser then got no history (a negative count) and every point in one update."""
    state = DashboardState(history=50)
    for fid in range(180):
        state.add(_msg("measurements", frame_id=fid, summary={"count": fid}))
    hello = state.hello({})
    update = state.update()
    assert update is not None
    sent = [p[0] for p in hello["points"]] + [p[0] for p in update["points"]]
    assert sent == list(range(130, 180))  # the history, each point once
    state.add(_msg("measurements", frame_id=180, summary={"count": 1}))
    assert [p[0] for p in state.hello({})["points"]] == list(range(131, 180))


def test_state_status_rates_events_and_grains() -> None:
    state = DashboardState()
    out = state.add(_msg("status", uptime_s=10.0, frames_acquired=100, frames_analysed=90,
                         frames_skipped=10, units={"a": "b"}))
    assert out is not None and out["type"] == "status" and "units" not in out["status"]
    out = state.add(_msg("status", uptime_s=12.0, frames_acquired=120, frames_analysed=105,
                         frames_skipped=15))
    assert out is not None
    assert out["rates"] == {"acquired_fps": 10.0, "analysed_fps": 7.5, "skipped_fps": 2.5}
    assert status_rates(None, {"uptime_s": 1}) == {
        "acquired_fps": None, "analysed_fps": None, "skipped_fps": None}
    state.add(_msg("measurements", frame_id=5, summary={"count": 3},
                   grains={"tile": {"count": 3}, "cumulative": {"count": 3, "tiles": 1}}))
    update = state.update()
    assert update is not None and update["grains"]["cumulative"]["tiles"] == 1
    ev = state.add(_msg("event", kind="acquisition_started", events=12, mode="free-run",
                        t={"sent": 5.0}))
    assert ev == {"type": "event", "event": {"kind": "acquisition_started", "t": 5.0,
                                             "text": "12 events, free-run", "level": "info"}}
    assert state.grains is None  # cumulative statistics restart with the acquisition
    refused = event_summary({"kind": "feedback_refused", "rule": "burst", "reason": "x" * 500})
    assert refused["level"] == "warn" and len(refused["text"]) == 200
    other = event_summary({"kind": "something_new", "detail": {"a": 1}, "config": {"big": 1}})
    assert other["text"] == 'detail={"a":1}'


def test_state_says_when_the_service_went_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed service kept showing as acquiring at its last rate (bug hunt)."""
    from livemask.dashboard import state as state_module

    now = [100.0]
    monkeypatch.setattr(state_module.time, "monotonic", lambda: now[0])
    state = DashboardState()
    assert state.silent_s() is None and state.stale_message() is None  # nothing yet
    for i in range(3):
        state.add(_msg("status", uptime_s=float(i), frames_acquired=10 * i, acquiring=True))
        now[0] += 1.0
    assert state.silent_s() is None and state.status_message()["rates"]["acquired_fps"] == 10
    now[0] += 1.5  # 2.5 s after the last: a late heartbeat, not yet a dead service
    assert state.stale_message() is None
    now[0] += 1.0
    stale = state.stale_message()
    assert stale is not None and stale["silent_s"] == pytest.approx(3.5)
    assert stale["rates"] is None  # no rate of a dead service (as documented: was a dict
    # of nulls); the page and /api/state and a late browser's hello say the same
    assert state.hello({})["rates"] is None and state.hello({})["silent_s"] is not None
    assert state.stale_message() is None  # told; again once a second, counting up
    now[0] += 1.0
    again = state.stale_message()
    assert again is not None and again["silent_s"] == pytest.approx(4.5)
    now[0] += 600.0  # an outage of ten minutes, then it is back
    state.add(_msg("status", uptime_s=9.0, frames_acquired=90, acquiring=True))
    assert state.silent_s() is None and state.status_message()["silent_s"] is None
    now[0] += 3.5  # silent again: the outage is not taken for its heartbeat interval
    assert state.silent_s() == pytest.approx(3.5)
    # a restarted service with a 5 s heartbeat: not "silent" between its heartbeats
    state.add(_msg("status", uptime_s=0.5, frames_acquired=0, acquiring=False))
    for i in range(3):
        now[0] += 5.0
        assert state.silent_s() is None
        state.add(_msg("status", uptime_s=5.5 + 5 * i, frames_acquired=0, acquiring=False))


def test_rates_span_the_whole_window() -> None:
    """Heartbeats come slightly over 1 s apart: the base 2.004 s back was dropped for being
    older than the 2 s window, so rates were over one heartbeat, not two (bug hunt)."""
    state = DashboardState()
    for uptime, acquired in ((0.0, 0), (1.002, 10), (2.004, 30)):
        out = state.add(_msg("status", uptime_s=uptime, frames_acquired=acquired))
    assert out is not None
    assert out["rates"]["acquired_fps"] == pytest.approx(30 / 2.004, abs=0.01)
    out = state.add(_msg("status", uptime_s=3.006, frames_acquired=40))
    assert out is not None  # the newest status at least 2 s old: the one at 1.002 s
    assert out["rates"]["acquired_fps"] == pytest.approx(30 / 2.004, abs=0.01)


def test_restart_seen_from_uptime_forgets_the_old_runs_frames() -> None:
    """A standalone dashboard that missed service_started: the uptime going down told it
    of the restart, but it kept the old run's frames, showed the newest of them (frame
    100 of the old run) and then no image until the new run's ids passed 100 (bug hunt)."""
    state = DashboardState()
    img, lab = np.zeros((4, 4), np.uint16), np.zeros((4, 4), np.int32)
    state.add(_msg("status", uptime_s=50.0, frames_acquired=100))
    for fid in (99, 100):
        state.add(_msg("frame", frame_id=fid, skipped=False, arrays={"image": img}))
        state.add(_msg("labels", frame_id=fid, arrays={"labels": lab}))
    picked = state.pick_frame()
    assert picked is not None and picked[0].header["frame_id"] == 100
    state.add(_msg("status", uptime_s=0.5, frames_acquired=0))  # restarted
    for fid in (0, 1):
        state.add(_msg("frame", frame_id=fid, skipped=False, arrays={"image": img}))
        state.add(_msg("labels", frame_id=fid, arrays={"labels": lab}))
    picked = state.pick_frame()
    assert picked is not None and picked[0].header["frame_id"] == 1
    state.add(_msg("frame", frame_id=2, skipped=False, arrays={"image": img}))
    state.add(_msg("labels", frame_id=2, arrays={"labels": lab}))
    picked = state.pick_frame()
    assert picked is not None and picked[0].header["frame_id"] == 2


def test_csp_takes_only_a_plain_host() -> None:
    """The Host header went into the Content-Security-Policy as it came."""
    from livemask.dashboard.server import _csp

    assert "connect-src 'self' ws://127.0.0.1:8080 wss://127.0.0.1:8080;" in _csp(
        "127.0.0.1:8080")
    assert "ws://[::1]:80 " in _csp("[::1]:80")
    for bad in ("evil; script-src *", "a b:80", "x'y", "host\r\nX: 1"):
        csp = _csp(bad)
        assert "connect-src 'self'; " in csp and "evil" not in csp and "script-src 'self';" in csp


def test_listen_and_connect_addresses_and_config() -> None:
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("9000") == ("127.0.0.1", 9000)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_listen("localhost:http")
    assert local_connect_address("tcp://0.0.0.0:5555") == "tcp://127.0.0.1:5555"
    assert local_connect_address("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
    cfg = parse_config({"dashboard": {"enabled": True, "port": 0}})
    assert cfg.dashboard.address == "127.0.0.1" and cfg.dashboard.update_hz == 5.0
    with pytest.raises(ConfigError, match=r"dashboard\.port"):
        parse_config({"dashboard": {"port": 70000}})
    result = CliRunner().invoke(cli_app, ["dashboard", "--help"])
    assert result.exit_code == 0 and "--connect" in result.output


# ---------------------------------------------------------------- HTTP and WebSocket
@pytest.fixture
async def publisher() -> AsyncIterator[ZmqPublisher]:
    pub = ZmqPublisher("tcp://127.0.0.1:*")
    pub.start()
    try:
        yield pub
    finally:
        pub.close()


@pytest.fixture
async def dashboard(publisher: ZmqPublisher) -> AsyncIterator[DashboardServer]:
    async with DashboardServer(publisher.bound_address, port=0, update_hz=20) as server:
        yield server


async def test_http_routes_and_guards(dashboard: DashboardServer) -> None:
    url = dashboard.url
    assert url is not None and url.startswith("http://127.0.0.1:")
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as r:
            page = await r.text()
            assert r.status == 200 and r.content_type == "text/html"
            assert "/assets/dashboard.js" in page and 'id="frame"' in page
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        for name, ctype in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            async with http.get(url + "assets/" + name) as r:
                assert r.status == 200 and r.content_type == ctype and len(await r.read()) > 500
        for bad in ("assets/nope.js", "assets/..%2Fserver.py", "nothing"):
            async with http.get(url + bad) as r:
                assert r.status == 404, bad
        async with http.get(url + "api/state") as r:
            state = await r.json()
            assert state["config"]["max_image_px"] == 512 and state["dashboard"]["browsers"] == 0
        # a loopback dashboard refuses other host names (DNS rebinding) and foreign origins
        async with http.get(url, headers={"Host": "evil.example:80"}) as r:
            assert r.status == 403
        async with http.get(url, headers={"Host": "[::1"}) as r:  # was a 500 and a traceback
            assert r.status == 400 and "bad Host header" in await r.text()
        assert state["silent_s"] is None  # no status yet: not "gone"
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(url + "ws", headers={"Origin": "http://evil.example"})


async def test_websocket_streams_json_and_decimated_frames(
    dashboard: DashboardServer, publisher: ZmqPublisher
) -> None:
    image = np.random.default_rng(1).integers(100, 4000, (1024, 600)).astype(np.uint16)
    labels = np.zeros(image.shape, np.int32)
    labels[200:400, 100:300] = 1
    got: dict[str, Any] = {"json": [], "image": None}
    async with aiohttp.ClientSession() as http, http.ws_connect(
        dashboard.url + "ws", headers={"Origin": dashboard.url.rstrip("/")}
    ) as ws:
        hello = await ws.receive_json(timeout=2)
        assert hello["type"] == "hello" and hello["config"]["update_hz"] == 20
        deadline = time.monotonic() + 10
        fid = 0
        while got["image"] is None or not {"update", "status"} <= {
            m["type"] for m in got["json"]
        }:
            assert time.monotonic() < deadline, f"no data over the WebSocket: {got['json']}"
            base = {"frame_id": fid, "t": {"acquired": time.time()}, "index": {"t": fid}}
            publisher.publish("frame", {**base, "skipped": False}, {"image": image})
            publisher.publish("labels", base, {"labels": labels})
            publisher.publish("measurements", {**base, "summary": {"count": 1}, "objects": []})
            publisher.publish("status", {"uptime_s": fid * 0.05, "frames_analysed": fid})
            fid += 1
            with contextlib.suppress(TimeoutError):
                msg = await ws.receive(timeout=0.05)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    got["image"] = msg.data
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    got["json"].append(msg.json())
        assert dashboard.report()["browsers"] == 1
        await ws.send_json({"type": "view", "images": False})  # tab hidden: no sampling
        for _ in range(100):
            if not dashboard._watched.is_set():
                break
            await asyncio.sleep(0.02)
        assert not dashboard._watched.is_set() and dashboard.report()["browsers"] == 1
        await ws.send_str("not json")  # ignored
        await ws.send_str("[" * 60_000)  # nested past Python's parser: ignored (it used to
        # end this connection with a RecursionError)
        await ws.send_json({"type": "view", "images": True})
        for _ in range(100):
            if dashboard._watched.is_set():
                break
            await asyncio.sleep(0.02)
        assert dashboard._watched.is_set()
    header, grey, outline = decode_preview(got["image"])
    assert grey.shape == (512, 300) and header["step"] == 2
    assert header["source_shape"] == [1024, 600]
    assert outline is not None and outline[100:200, 50:150].any()
    for _ in range(100):  # the server sees the close
        if not dashboard.report()["browsers"]:
            break
        await asyncio.sleep(0.02)
    report = dashboard.report()
    assert report["browsers"] == 0 and report["samples"] >= 1 and report["images_encoded"] >= 1
    assert not dashboard._watched.is_set()  # no browser: frames and labels are not sampled


async def _until(check: Any, timeout_s: float = 2.0) -> bool:
    """Wait until ``check()`` is true (True) or ``timeout_s`` passed (False)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_view_message_takes_only_booleans(dashboard: DashboardServer) -> None:
    """``{"images": "false"}`` was read as true: bool("false")."""
    async with aiohttp.ClientSession() as http, http.ws_connect(dashboard.url + "ws") as ws:
        await ws.receive_json(timeout=2)  # hello
        assert await _until(dashboard._watched.is_set)
        await ws.send_json({"type": "view", "images": False})
        assert await _until(lambda: not dashboard._watched.is_set())
        for wrong in ("false", "true", 1, None, [True]):
            await ws.send_json({"type": "view", "images": wrong})  # ignored
        await ws.send_json({"type": "view"})  # no "images": the default, true
        assert await _until(dashboard._watched.is_set)
        await ws.send_json({"type": "view", "images": False})
        await ws.send_json({"type": "view", "images": "true"})
        await asyncio.sleep(0.3)
        assert not dashboard._watched.is_set()


async def test_the_last_frame_of_a_run_is_shown(publisher: ZmqPublisher) -> None:
    """The image subscriber subscribed only for a moment now and then: a run's last frame,
    published just after such a moment, was never shown (the grain scan's last tile)."""
    image = np.random.default_rng(2).integers(0, 4000, (64, 64)).astype(np.uint16)
    labels = np.zeros(image.shape, np.int32)
    labels[10:30, 10:30] = 1

    def publish(fid: int) -> None:
        base = {"frame_id": fid, "t": {"acquired": time.time()}}
        publisher.publish("frame", {**base, "skipped": False}, {"image": image})
        publisher.publish("labels", base, {"labels": labels})
        publisher.publish("measurements", {**base, "summary": {"count": 1}, "objects": []})

    async with DashboardServer(publisher.bound_address, port=0) as dashboard, \
            aiohttp.ClientSession() as http, http.ws_connect(dashboard.url + "ws") as ws:
        await ws.receive_json(timeout=2)  # hello (update_hz 5: ~0.2 s between images)
        fid, shown = 0, None
        deadline = time.monotonic() + 10
        while shown is None:  # frames until one is shown: the old sampler just closed
            assert time.monotonic() < deadline, "no image"
            publish(fid)
            fid += 1
            with contextlib.suppress(TimeoutError):
                msg = await ws.receive(timeout=0.03)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    shown = decode_preview(msg.data)[0]["frame_id"]
        publish(fid)  # the run's last frame
        last, updated = shown, None
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and (last != fid or updated != fid):
            with contextlib.suppress(TimeoutError):
                msg = await ws.receive(timeout=0.1)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    last = decode_preview(msg.data)[0]["frame_id"]
                elif msg.type == aiohttp.WSMsgType.TEXT and msg.json()["type"] == "update":
                    updated = msg.json()["frame_id"]
    assert updated == fid  # its measurements came
    assert last == fid, f"the last image shown is of frame {last}, the run ended with {fid}"


# ---------------------------------------------------------------- in a real browser
def _chromium() -> str | None:
    for candidate in (os.environ.get("LIVEMASK_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[dev]'")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium: apt-get install chromium (or set LIVEMASK_CHROMIUM)")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=exe, args=list(CHROMIUM_ARGS))
        try:
            yield b
        finally:
            await b.close()


_PIXELS_JS = """
([rgbOutline, rgbLine]) => {
  const near = (d, i, rgb) => Math.abs(d[i] - rgb[0]) < 40 && Math.abs(d[i + 1] - rgb[1]) < 40
    && Math.abs(d[i + 2] - rgb[2]) < 40;
  const stats = (id, rgb) => {
    const c = document.getElementById(id);
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    const seen = new Set(); let hits = 0;
    for (let i = 0; i < d.length; i += 4) {
      seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
      if (near(d, i, rgb)) hits++;
    }
    return {width: c.width, height: c.height, distinct: seen.size, hits};
  };
  return {frame: stats("frame", rgbOutline), count: stats("plot-count", rgbLine)};
}
"""

_SCREENSHOT_JS = """
async ([b64, boxes]) => {
  const img = new Image();
  img.src = "data:image/png;base64," + b64;
  await img.decode();
  const c = document.createElement("canvas");
  c.width = img.width; c.height = img.height;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const out = {};
  for (const [name, b] of Object.entries(boxes)) {
    const d = ctx.getImageData(Math.round(b.x), Math.round(b.y), Math.round(b.width),
                               Math.round(b.height)).data;
    let s = 0, s2 = 0, n = 0; const seen = new Set();
    for (let i = 0; i < d.length; i += 4) {
      const v = (d[i] + d[i + 1] + d[i + 2]) / 3;
      s += v; s2 += v * v; n++; seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
    }
    out[name] = {std: Math.sqrt(Math.max(0, s2 / n - (s / n) ** 2)), distinct: seen.size};
  }
  return out;
}
"""


async def _screenshot_stats(page: Any, ids: tuple[str, ...], path: Path) -> dict[str, Any]:
    """Screenshot the page, then measure the pixels of each element's box in it."""
    png = await page.screenshot(path=str(path))
    boxes = {i: await page.locator(f"#{i}").bounding_box() for i in ids}
    return dict(await page.evaluate(_SCREENSHOT_JS, [base64.b64encode(png).decode(), boxes]))


async def test_dashboard_in_the_service_shows_live_data_in_a_browser(
    browser: Any, tmp_path: Path
) -> None:
    cfg = make_config(
        dashboard={"enabled": True, "port": 0},
        simulation={"truth": False},
        acquisition={"mode": "free-run",
                     "sequence": {"time_plan": {"interval": 0.1, "loops": 80}}},
    )
    async with Service(cfg) as svc:
        url = svc.status()["dashboard_url"]
        assert url is not None and svc.dashboard is not None and url == svc.dashboard.url
        for _ in range(100):  # its subscriber is connected (slow joiner): no event is missed
            if svc.dashboard.state.status is not None:
                break
            await asyncio.sleep(0.02)
        svc.start_acquisition(None)
        await asyncio.sleep(0.5)  # frames flowing before the page opens
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(url)
        # (generous time-outs: headless Chromium on a loaded machine; the history a late
        # page gets at once is test_points_wait_for_a_browser_within_the_history's)
        await page.wait_for_function(
            """() => /^[0-9]+$/.test(document.getElementById("frame-id").textContent)
                  && Number(document.getElementById("count").textContent) > 0""",
            timeout=15000,
        )
        first = int(await page.text_content("#frame-id") or -1)
        await page.wait_for_function(
            f"() => Number(document.getElementById('frame-id').textContent) > {first}",
            timeout=15000,
        )  # it keeps updating
        await page.wait_for_function(
            "() => document.querySelectorAll('#latency td').length >= 16"
            " && document.getElementById('events').textContent.includes('acquisition_started')",
            timeout=15000,
        )
        await asyncio.sleep(0.5)  # a few more points on the plots
        pixels = await page.evaluate(_PIXELS_JS, [OUTLINE_RGB, COUNT_RGB])
        shot = await _screenshot_stats(page, ("frame", "plot-count", "plot-area"),
                                       tmp_path / "dashboard.png")
        await page.locator("#frame").screenshot(path=str(tmp_path / "frame.png"))
        assert await page.text_content("#conn") == "live"
        assert await page.evaluate("() => window.livemaskStats.images") >= 3
        report = svc.dashboard.report()
        await page.uncheck("#show-image")  # paused: the service stops sampling frames
        for _ in range(100):
            if not svc.dashboard._watched.is_set():
                break
            await asyncio.sleep(0.02)
        assert not svc.dashboard._watched.is_set()
        await page.close()
    assert not errors, errors
    frame = pixels["frame"]
    assert (frame["width"], frame["height"]) == (512, 512)
    assert frame["distinct"] > 100, frame  # a real grey image, not a flat canvas
    assert frame["hits"] > 2000, frame  # object outlines drawn over it
    assert pixels["count"]["hits"] > 30, pixels  # the object-count line was drawn
    assert shot["frame"]["std"] > 20 and shot["frame"]["distinct"] > 100, shot
    assert shot["plot-count"]["distinct"] > 20 and shot["plot-area"]["std"] > 5, shot
    assert (tmp_path / "frame.png").stat().st_size > 50_000  # a flat image compresses to ~1 kB
    assert report["images_encoded"] >= 3 and report["gaps"].get("measurements", 0) == 0


def _voronoi_tile(seed: int, shape: tuple[int, int] = (256, 256)) -> tuple[Any, Any]:
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    points = rng.random((120, 2)) * shape
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    _, nearest = cKDTree(points).query(np.c_[yy.ravel(), xx.ravel()])
    labels = (nearest.reshape(shape) + 1).astype(np.int32)
    image = (1000 + 40 * (labels % 17) + rng.normal(0, 20, shape)).astype(np.uint16)
    return image, labels


async def test_standalone_dashboard_shows_grain_statistics(
    browser: Any, publisher: ZmqPublisher, tmp_path: Path
) -> None:
    tiles = [_voronoi_tile(s) for s in range(3)]
    cumulative = CumulativeGrainStats()
    grains = []
    for _, labels in tiles:
        grains.append({"tile": grain_statistics(labels, 0.65),
                       "cumulative": cumulative.add(labels, 0.65)})

    async def feed() -> None:
        fid = 0
        while True:
            image, labels = tiles[fid % 3]
            base = {"frame_id": fid, "t": {"acquired": time.time()}, "index": {"g": fid}}
            publisher.publish("frame", {**base, "skipped": False}, {"image": image})
            publisher.publish("labels", base, {"labels": labels})
            publisher.publish("measurements", {**base, "grains": grains[fid % 3],
                                               "summary": {"count": int(labels.max())}})
            fid += 1
            await asyncio.sleep(0.05)

    async with DashboardServer(publisher.bound_address, port=0, title="grains <test>") as server:
        feeder = asyncio.create_task(feed())
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            await page.goto(server.url)
            assert await page.title() == "grains <test> dashboard"  # escaped, not markup
            await page.wait_for_function(
                "() => !document.getElementById('grains-panel').hidden"
                " && document.getElementById('astm').textContent.includes('ASTM G')",
                timeout=3000,
            )
            astm = await page.text_content("#astm") or ""
            expected = grains[-1]["cumulative"]["astm_g_planimetric"]
            assert f"{expected:.2f}" in astm or any(
                f"{g['cumulative']['astm_g_planimetric']:.2f}" in astm for g in grains)
            shot = await _screenshot_stats(page, ("plot-hist", "frame"), tmp_path / "grains.png")
            await page.close()
        finally:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
    assert shot["plot-hist"]["distinct"] > 10 and shot["plot-hist"]["std"] > 5, shot
    assert shot["frame"]["std"] > 10, shot


async def test_page_greys_out_when_the_server_is_gone(
    browser: Any, publisher: ZmqPublisher
) -> None:
    """The dashboard server went with the service, and the page went on saying "acquiring"
    at the last frame rate (only its small "disconnected" badge changed). The header also
    showed the image's frame id next to the object count of a newer frame, unlabelled."""
    image = np.random.default_rng(3).integers(0, 4000, (64, 64)).astype(np.uint16)
    labels = np.zeros(image.shape, np.int32)
    labels[10:30, 10:30] = 1

    async def feed() -> None:
        fid = 0
        while True:
            base = {"frame_id": fid, "t": {"acquired": time.time()}}
            publisher.publish("frame", {**base, "skipped": False}, {"image": image})
            publisher.publish("labels", base, {"labels": labels})
            publisher.publish("measurements", {**base, "summary": {"count": 7}, "objects": []})
            publisher.publish("status", {"uptime_s": fid * 0.1, "frames_analysed": fid,
                                         "frames_acquired": fid, "acquiring": True,
                                         "state": "running"})
            fid += 1
            await asyncio.sleep(0.1)

    server = await DashboardServer(publisher.bound_address, port=0).start()
    feeder = asyncio.create_task(feed())
    try:
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(server.url or "")
        await page.wait_for_function(
            """() => document.getElementById("state").textContent === "acquiring"
                  && document.getElementById("fps").textContent !== "–"
                  && /^objects in frame [0-9]+$/.test(
                       document.getElementById("count-label").textContent)
                  && /^[0-9]+$/.test(document.getElementById("frame-id").textContent)""",
            timeout=5000,
        )
        assert not await page.evaluate("() => document.body.classList.contains('stale')")
        await server.close()
        await page.wait_for_function(
            """() => document.getElementById("state").textContent === "service unreachable"
                  && document.getElementById("fps").textContent === "–"
                  && document.body.classList.contains("stale")""",
            timeout=3000,
        )
        assert "10.0" not in (await page.text_content("#status") or "")  # no rate left
        server = await DashboardServer(publisher.bound_address, port=server.port).start()
        await page.wait_for_function(  # the page reconnects: hello makes it live again
            """() => document.getElementById("state").textContent === "acquiring"
                  && !document.body.classList.contains("stale")""",
            timeout=8000,
        )
        await page.close()
        assert not errors, errors
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder
        await server.close()


# ---------------------------------------------------------------- checked settings
@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--max-image-px", "0", "greater than or equal to 64"),
    ("--max-image-px", "-5", "greater than or equal to 64"),
    ("--max-image-px", "100000", "less than or equal to 4096"),
    ("--update-hz", "nan", "finite number"),
    ("--update-hz", "1000", "less than or equal to 30"),
    ("--update-hz", "0", "greater than 0"),
])
def test_standalone_dashboard_flags_have_the_config_bounds(
    flag: str, value: str, message: str
) -> None:
    """Before, they were taken as given (``--max-image-px 0`` then logged a traceback for
    every frame). The address cannot be served, so a flag that passes fails later."""
    result = CliRunner().invoke(cli_app, ["dashboard", flag, value, "--listen", "999.1.1.1:0"])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2, text
    assert f"Invalid value for '{flag}'" in text and message in text


@pytest.mark.parametrize("update_hz", [float("nan"), float("inf"), 0.0])
def test_dashboard_server_refuses_an_update_rate_that_is_not_finite(update_hz: float) -> None:
    with pytest.raises(ConfigError, match=r"dashboard\.update_hz must be a finite number > 0"):
        DashboardServer("tcp://127.0.0.1:5555", port=0, update_hz=update_hz)


@pytest.mark.parametrize("address", ["999.1.1.1", "192.0.2.1"])  # no such name; not ours
async def test_a_bad_dashboard_address_is_named_not_the_port(address: str) -> None:
    """Before, "Choose another dashboard.port" also when the address was wrong."""
    server = DashboardServer("tcp://127.0.0.1:5555", address=address, port=0)
    with pytest.raises(ConfigError, match=r"Choose another dashboard\.address") as info:
        await server.start()
    assert "dashboard.port" not in str(info.value)


async def test_a_dashboard_port_in_use_is_named() -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        server = DashboardServer("tcp://127.0.0.1:5555", port=port)
        with pytest.raises(ConfigError, match=r"Choose another dashboard\.port"):
            await server.start()


def test_each_stream_is_a_series_of_its_own() -> None:
    """The plots drew every frame on one line: two channels at other exposures (or several
    positions) made a zigzag (hunt). Each point now says its stream: its index but t."""
    from livemask.dashboard.state import stream_label, summary_point

    assert stream_label({"t": 3}) == "" and stream_label(None) == ""
    assert stream_label({"t": 3, "p": 1, "c": 0}) == "c0 p1"
    assert stream_label({"t": 0, "p": 0, "fb": 2}) == "fb p0"  # one series for every action
    points = [summary_point({"frame_id": i, "t": {"acquired": float(i)},
                             "index": {"t": i // 2, "c": i % 2},
                             "summary": {"count": 10, "mean_intensity": 200.0 + 20 * (i % 2)}})
              for i in range(4)]
    assert [p[5] for p in points] == ["c0", "c1", "c0", "c1"]


async def test_the_plots_draw_a_series_per_channel_in_a_browser(browser: Any) -> None:
    """Two channels at other exposures were one zigzag line in each plot; now the page
    draws a series for each (``window.livemaskStats.series``), with no page error."""
    cfg = make_config(
        dashboard={"enabled": True, "port": 0},
        simulation={"truth": False},
        acquisition={"mode": "free-run", "sequence": {
            "time_plan": {"interval": 0.1, "loops": 60},
            "channels": [{"config": "DAPI", "exposure": 5}, {"config": "GFP", "exposure": 20}],
        }},
    )
    async with Service(cfg) as svc:
        url = svc.status()["dashboard_url"]
        assert url is not None and svc.dashboard is not None
        for _ in range(100):  # its subscriber is connected (slow joiner)
            if svc.dashboard.state.status is not None:
                break
            await asyncio.sleep(0.02)
        svc.start_acquisition(None)
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(url)
        await page.wait_for_function("() => window.livemaskStats.series === 2", timeout=20000)
        await page.close()
    assert not errors, errors
