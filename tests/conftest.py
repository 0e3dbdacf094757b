"""Shared fixtures: service configs on random loopback ports."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from livemask.acquisition.simulated import SIMULATED_CFG
from livemask.config import ServiceConfig, parse_config

ROOT = Path(__file__).resolve().parent.parent


def free_tcp_address() -> str:
    """A loopback address with a port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def make_config(**sections: Any) -> ServiceConfig:
    """A test config: simulated hardware, random ports, a short sequence, truth on."""
    data: dict[str, Any] = {
        "hardware": {"config_file": str(SIMULATED_CFG)},
        "simulation": {"truth": True, "seed": 3},
        "acquisition": {
            "autostart": False,
            "mode": "synchronized",  # deterministic frame counts; free-run tests switch
            "sequence": {"time_plan": {"interval": 0.0, "loops": 12}},
            "frame_timeout_s": 5.0,
        },
        "publish": {
            "pub_address": "tcp://127.0.0.1:*",
            "control_address": "tcp://127.0.0.1:*",
            "heartbeat_s": 0.2,
        },
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data)


@pytest.fixture
def service_config() -> ServiceConfig:
    """The default test config."""
    return make_config()


#: Most time points a test lets useq walk in one time plan (see ``short_time_walks``).
TIME_WALK_LIMIT = 100_000


@pytest.fixture
def short_time_walks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make walking more than ``TIME_WALK_LIMIT`` time points of a useq time plan an error,
    so a test of a practically endless time-lapse fails at once, not by eating the memory."""
    import useq

    walk = useq.TIntervalLoops.deltas

    def limited(plan: Any) -> Any:
        for i, delta in enumerate(walk(plan)):
            if i >= TIME_WALK_LIMIT:
                raise AssertionError(f"walked more than {TIME_WALK_LIMIT} time points")
            yield delta

    monkeypatch.setattr(useq.TIntervalLoops, "deltas", limited)


@pytest.fixture
def livemask_log() -> Iterator[list[logging.LogRecord]]:
    """The records of the ``livemask`` logger (which need not propagate to the root)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("livemask")
    handler, level = Keep(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def raw_socket() -> Iterator[Any]:
    """``make(kind, address)``: a pyzmq asyncio socket of ``kind`` connected to ``address``
    (no linger), closed after the test."""
    import zmq
    import zmq.asyncio

    socks: list[zmq.asyncio.Socket] = []

    def make(kind: int, address: str) -> zmq.asyncio.Socket:
        sock = zmq.asyncio.Context.instance().socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        socks.append(sock)
        return sock

    yield make
    for s in socks:
        s.close(linger=0)


@pytest.fixture
def fresh_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our logger and pymmcore-plus' as if :func:`setup_logging` had never run (restored after;
    propagating, so that pytest does not attach its capture handlers to them)."""
    ours, mm = logging.getLogger("livemask"), logging.getLogger("pymmcore-plus")
    for logger in (ours, mm):
        monkeypatch.setattr(logger, "handlers", [])
        monkeypatch.setattr(logger, "level", logger.level)
        monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(mm, "filters", list(mm.filters))
    for name in ("LIVEMASK_LOG_LEVEL", "LIVEMASK_MM_LOG_LEVEL", "LIVEMASK_LOG_FILE"):
        monkeypatch.delenv(name, raising=False)
