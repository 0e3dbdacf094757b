"""The livemask web dashboard: live frame with outlines, plots, grain statistics, status and
events in a browser, served by the service (``dashboard.enabled``) or on its own
(``livemask dashboard --connect``). See ``docs/dashboard.md``.

aiohttp is imported only by :mod:`livemask.dashboard.server`; the decimation
(:mod:`~livemask.dashboard.preview`) and the bookkeeping (:mod:`~livemask.dashboard.state`)
are pure and cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from livemask.dashboard.preview import Preview, decode_preview, encode_preview, make_preview
from livemask.dashboard.state import DashboardState

if TYPE_CHECKING:
    from livemask.dashboard.server import DashboardServer

__all__ = [
    "DashboardServer",
    "DashboardState",
    "Preview",
    "decode_preview",
    "encode_preview",
    "make_preview",
]


def __getattr__(name: str) -> Any:
    if name == "DashboardServer":
        from livemask.dashboard.server import DashboardServer

        return DashboardServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
