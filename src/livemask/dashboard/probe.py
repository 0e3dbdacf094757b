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
import os
import time
from typing import TYPE_CHECKING, Any

from livemask.child_process import PipedProcess

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


class DashboardProbe(PipedProcess):
    """One WebSocket client of the dashboard at ``url``, in a spawned process.

    ``wait_ready()`` blocks until the dashboard greeted it; ``finish()`` stops reading and
    returns ``{texts, images, bytes, images_per_s}``.
    """

    what = "the dashboard probe"

    def __init__(self, url: str) -> None:
        super().__init__(_main, (url,), "livemask-dash-probe")
