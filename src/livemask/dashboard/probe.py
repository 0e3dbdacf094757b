"""A client of the dashboard for benchmarks, in its own process.

``livemask bench --dashboard`` connects one to the service's dashboard so that the pipeline
is measured while the dashboard decimates and sends frames, as it does with a browser open.
By default it is a plain WebSocket client that reads everything the dashboard sends (JSON
texts and binary images) as fast as it comes. With ``LIVEMASK_BENCH_BROWSER`` set to a
Chromium executable it opens the page in that browser, headless, through Playwright instead:
the realistic client, whose drawing then also competes for the machine's CPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

__all__ = ["BROWSER_ENV", "CHROMIUM_ARGS", "DashboardProbe"]

#: Environment variable naming a Chromium executable: the probe then drives a real browser.
BROWSER_ENV = "LIVEMASK_BENCH_BROWSER"
#: Flags for a headless Chromium with no network side traffic (tests and benchmarks).
CHROMIUM_ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)


async def _consume(url: str, conn: Connection) -> dict[str, Any]:
    import aiohttp

    counts: dict[str, Any] = {"client": "websocket", "texts": 0, "images": 0, "bytes": 0}
    first = last = None
    async with aiohttp.ClientSession() as http, http.ws_connect(
        url.rstrip("/") + "/ws", autoclose=True, max_msg_size=0
    ) as ws:
        while True:
            if conn.poll():
                break  # the parent says stop (or is gone)
            with contextlib.suppress(TimeoutError):
                msg = await ws.receive(timeout=0.05)
                if msg.type == aiohttp.WSMsgType.TEXT:
                    if counts["texts"] == 0:
                        conn.send(("ready", None))
                    counts["texts"] += 1
                    counts["bytes"] += len(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    now = time.monotonic()
                    first = first if first is not None else now
                    last = now
                    counts["images"] += 1
                    counts["bytes"] += len(msg.data)
                elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                  aiohttp.WSMsgType.ERROR):
                    break
    if first is not None and last is not None and last > first and counts["images"] > 1:
        counts["images_per_s"] = round((counts["images"] - 1) / (last - first), 2)
    return counts


async def _browse(url: str, conn: Connection, exe: str) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=exe, args=list(CHROMIUM_ARGS))
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            await page.goto(url)
            await page.wait_for_function(
                "() => document.getElementById('conn').textContent === 'live'", timeout=30_000)
            conn.send(("ready", None))
            while not conn.poll():
                await asyncio.sleep(0.1)
            ds = await page.evaluate("() => window.livemaskStats")
        finally:
            await browser.close()
    images = int(ds.get("images") or 0)
    out: dict[str, Any] = {"client": "chromium", "images": images}
    span_ms = float(ds.get("lastImageAt") or 0) - float(ds.get("firstImageAt") or 0)
    if images > 1 and span_ms > 0:
        out["images_per_s"] = round((images - 1) / (span_ms / 1e3), 2)
    return out


def _main(url: str, conn: Connection) -> None:
    exe = os.environ.get(BROWSER_ENV)
    with contextlib.suppress(EOFError, OSError):
        result = asyncio.run(_browse(url, conn, exe) if exe else _consume(url, conn))
        conn.send(("done", result))
    conn.close()


class DashboardProbe:
    """One WebSocket client of the dashboard at ``url``, in a spawned process."""

    def __init__(self, url: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_main, args=(url, child), name="livemask-dash-probe",
                                 daemon=True)
        self._proc.start()
        child.close()

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Block until the dashboard greeted the client."""
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.05):
            if not self._proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the dashboard probe could not connect to the dashboard")
        self._conn.recv()

    def finish(self, timeout_s: float = 10) -> dict[str, Any]:
        """Stop reading; return ``{texts, images, bytes, images_per_s}``."""
        self._conn.send(("stop", None))
        if not self._conn.poll(timeout_s):
            raise RuntimeError("the dashboard probe did not report back")
        _, result = self._conn.recv()
        return cast(dict[str, Any], result)

    def close(self) -> None:
        """End the process (idempotent)."""
        self._conn.close()
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
