"""Prometheus metrics: families from a status snapshot, and a live service's /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from livemask.config import ServiceConfig
from livemask.errors import ConfigError
from livemask.service.app import Service
from livemask.service.metrics import (
    MetricsServer,
    ScrapeError,
    StatusCollector,
    metric_families,
)
from tests.conftest import make_config
from tests.test_service import collect_run

STATUS: dict[str, Any] = {
    "state": "running",
    "version": "0.1.0",
    "uptime_s": 12.5,
    "acquiring": True,
    "mode": "free-run",
    "model": "nuclei",
    "backend": "onnxruntime",
    "device": "cpu",
    "acquisitions_finished": 1,
    "publisher": {
        "sent": {"frame": 10, "measurements": 7},
        "next_seq": {"frame": 12, "measurements": 7},
    },
    "frames_acquired": 12,
    "frames_analysed": 7,
    "frames_skipped": 4,
    "frames_published": 11,
    "frames_failed": 1,
    "frames_publish_failed": 2,
    "queues": {"infer": 2, "analyse": 1, "publish": 0},
    "gc": {
        "collections": {"0": 5, "1": 1, "2": 0},
        "pause_ms": {"0": 1.5, "1": 2.0, "2": 0.0},
        "max_pause_ms": 2.0,
        "threshold": [10000, 10, 10],
        "frozen_objects": 900,
    },
    "latency_ms": {
        "infer": {"p50": 20.0, "p95": 30.0, "p99": 40.0},
        "end_to_end": {"p50": None, "p95": None, "p99": None},
    },
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def exposition(status: Callable[[], dict[str, Any]]) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    return generate_latest(registry).decode()


def test_metric_families_from_a_status_snapshot() -> None:
    got = samples(exposition(lambda: STATUS))
    for name, value in (
        ("acquired", 12),
        ("analysed", 7),
        ("skipped", 4),
        ("published", 11),
        ("failed", 1),
    ):
        assert got[(f"livemask_frames_{name}_total", ())] == value
    assert got[("livemask_messages_published_total", (("topic", "frame"),))] == 10
    assert got[("livemask_messages_published_total", (("topic", "measurements"),))] == 7
    assert got[("livemask_frames_publish_failed_total", ())] == 2
    assert got[("livemask_queue_depth", (("stage", "infer"),))] == 2
    assert got[("livemask_queue_depth", (("stage", "analyse"),))] == 1
    key = ("livemask_stage_latency_seconds", (("percentile", "99"), ("stage", "infer")))
    assert got[key] == pytest.approx(0.04)
    assert not any(
        k[0] == "livemask_stage_latency_seconds" and ("stage", "end_to_end") in k[1] for k in got
    )  # no samples before any frame
    assert got[("livemask_acquiring", ())] == 1
    assert got[("livemask_acquisitions_finished_total", ())] == 1
    assert got[("livemask_gc_collections_total", (("generation", "0"),))] == 5
    assert got[("livemask_gc_pause_seconds_total", (("generation", "1"),))] == pytest.approx(0.002)
    info = [k for k in got if k[0] == "livemask_info"]
    assert len(info) == 1
    assert ("model", "nuclei") in info[0][1]
    assert len(metric_families({})) >= 1  # an empty snapshot is fine too


def test_metric_types_follow_the_prometheus_conventions() -> None:
    """Before: a gauge with the ``quantile`` label (reserved for summaries, which also have
    _sum and _count) and an info whose state/mode labels changed at runtime (a new series
    each time; joins on it broke)."""
    families = {f.name: f for f in text_string_to_metric_families(exposition(lambda: STATUS))}
    latency = families["livemask_stage_latency_seconds"]
    assert latency.type == "gauge"
    assert all("quantile" not in s.labels for s in latency.samples)
    assert {s.labels["percentile"] for s in latency.samples} == {"50", "95", "99"}
    (info,) = families["livemask_info"].samples  # (an info reads back as a gauge)
    assert info.labels == {
        "version": "0.1.0", "model": "nuclei", "backend": "onnxruntime", "device": "cpu",
    }
    for name, current in (("state", "running"), ("mode", "free-run")):
        family = families[f"livemask_{name}"]
        assert family.type == "gauge"
        values = {s.labels[name]: s.value for s in family.samples}
        assert values[current] == 1 and sum(values.values()) == 1
    assert set(values) == {"free-run", "pipelined", "synchronized"}
    got = samples(exposition(lambda: {**STATUS, "state": "idle", "mode": "synchronized"}))
    assert got[("livemask_state", (("state", "idle"),))] == 1
    assert got[("livemask_state", (("state", "running"),))] == 0
    assert got[("livemask_mode", (("mode", "synchronized"),))] == 1


def test_a_failing_status_fails_the_scrape() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    with pytest.raises(ScrapeError, match=r"could not read the service status: RuntimeError"):
        exposition(broken)


async def test_collect_on_the_loop_thread_reads_status_directly() -> None:
    calls: list[int] = []

    def status() -> dict[str, Any]:
        calls.append(1)
        return STATUS

    collector = StatusCollector(status, loop=asyncio.get_running_loop())
    assert list(collector.collect())  # would deadlock if it waited for its own loop
    assert calls == [1]


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def test_metrics_server_port_errors_and_release() -> None:
    server = MetricsServer(lambda: STATUS, port=0).start()
    try:
        url = server.url
        assert url is not None and url.startswith("http://127.0.0.1:")
        assert "livemask_frames_acquired_total 12.0" in _scrape(url)
        with pytest.raises(ConfigError, match=r"metrics\.port"):
            MetricsServer(lambda: STATUS, port=_port_of(url)).start()
    finally:
        server.close()
    server.close()  # idempotent
    assert server.url is None
    again = MetricsServer(lambda: STATUS, port=_port_of(url)).start()  # the port was released
    again.close()


def test_a_scrape_restricted_to_some_names_gets_those() -> None:
    """``/metrics?name[]=...`` (a Prometheus client's filter): before, an empty 200."""
    with MetricsServer(lambda: STATUS, port=0) as server:
        url = server.url
        assert url is not None
        query = "?name[]=livemask_frames_acquired_total&name[]=livemask_state"
        got = samples(_scrape(url + query))
    assert got == {
        ("livemask_frames_acquired_total", ()): 12.0,
        **{("livemask_state", (("state", s),)): float(s == "running")
           for s in ("starting", "idle", "running", "stopping", "closed")},
    }


def test_only_the_metrics_path_serves_metrics() -> None:
    with MetricsServer(lambda: STATUS, port=0) as server:
        url = server.url
        assert url is not None
        root = url.removesuffix("/metrics")
        assert "livemask_frames_acquired_total" in _scrape(root + "/metrics/")
        assert "/metrics" in _scrape(root + "/")
        for path in ("/favicon.ico", "/metricsx", "/anything/metrics"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(root + path, timeout=5)
            assert err.value.code == 404
            assert b"/metrics" in err.value.read()


def test_metrics_are_off_by_default(service_config: ServiceConfig) -> None:
    assert service_config.metrics.enabled is False
    assert service_config.metrics.port == 9108 and service_config.metrics.address == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"metrics\.port"):
        make_config(metrics={"port": 70000})


@pytest.mark.timeout(90)
async def test_service_serves_metrics_that_match_its_status() -> None:
    cfg = make_config(metrics={"enabled": True, "port": 0}, acquisition={"mode": "free-run"})
    async with Service(cfg) as svc:
        url = svc.status()["metrics_url"]
        assert url is not None and svc.metrics is not None and url == svc.metrics.url
        await collect_run(svc, ("measurements", "event"))
        text = await asyncio.to_thread(_scrape, url)  # served on its thread, status on the loop
        status = svc.status()
        got = samples(text)
        for name in ("acquired", "analysed", "skipped", "published", "failed", "publish_failed"):
            assert got[(f"livemask_frames_{name}_total", ())] == status[f"frames_{name}"], name
        assert status["frames_acquired"] == 12
        # PUB drops silently: before, an always-empty "dropped" count claimed to report them
        assert set(status["publisher"]) == {"sent", "next_seq", "sndhwm"}
        assert "dropped" not in text
        assert got[("livemask_publish_queue_limit_messages", ())] \
            == status["publisher"]["sndhwm"]
        for topic in ("frame", "labels", "measurements", "truth"):
            assert (
                got[("livemask_messages_published_total", (("topic", topic),))]
                == status["publisher"]["sent"][topic]
            ), topic
        for stage in ("infer", "analyse", "publish"):
            assert ("livemask_queue_depth", (("stage", stage),)) in got
        for stage in ("infer", "analyse", "publish", "end_to_end"):
            for q in ("50", "95", "99"):
                key = ("livemask_stage_latency_seconds", (("percentile", q), ("stage", stage)))
                assert got[key] >= 0
        assert got[("livemask_state", (("state", status["state"]),))] == 1
        assert got[("livemask_mode", (("mode", "free-run"),))] == 1
        assert got[("livemask_acquisitions_finished_total", ())] == 1
        for generation in ("0", "1", "2"):
            assert (
                got[("livemask_gc_collections_total", (("generation", generation),))]
                == status["gc"]["collections"][generation]
            )
        port = _port_of(url)
    assert svc.status()["metrics_url"] is None
    with pytest.raises(urllib.error.URLError):
        _scrape(url)
    MetricsServer(lambda: STATUS, port=port).start().close()  # a restart can bind it again


@contextlib.contextmanager
def stuck_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running on a thread, busy (blocked) until the block ends."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running, release = threading.Event(), threading.Event()
    try:
        loop.call_soon_threadsafe(running.set)
        loop.call_soon_threadsafe(release.wait, 10.0)  # then the loop is busy
        assert running.wait(5.0)
        yield loop
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_a_stuck_service_loop_times_the_scrape_out() -> None:
    with stuck_loop() as loop:
        collector = StatusCollector(lambda: STATUS, loop=loop, timeout_s=0.2)
        with pytest.raises(ScrapeError, match=r"did not answer within 0\.2 s"):
            list(collector.collect())


def test_a_scrape_the_service_cannot_answer_is_a_503() -> None:
    """Before, HTTP 200 with an empty body: Prometheus' ``up`` stayed 1 while the service's
    event loop was stuck."""
    with stuck_loop() as loop, MetricsServer(
        lambda: STATUS, port=0, loop=loop, timeout_s=0.2
    ) as server:
        assert server.url is not None
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url, timeout=10)
        assert err.value.code == 503
        assert b"did not answer within 0.2 s" in err.value.read()


def test_an_idle_client_is_dropped_and_does_not_hold_up_close() -> None:
    """A connection that sent nothing held its thread for ever (300 idle connections: 316
    threads), and ``close()`` waited for it."""
    with (
        MetricsServer(lambda: STATUS, port=0, client_timeout_s=0.3) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as idle,
    ):
        assert idle.recv(1) == b""  # the service closed it
    server = MetricsServer(lambda: STATUS, port=0, client_timeout_s=60).start()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10):
        _scrape(str(server.url))  # the idle connection is being served
        closing = threading.Thread(target=server.close)
        closing.start()
        closing.join(10)
        assert not closing.is_alive()


def test_connections_beyond_the_limit_are_closed_unanswered() -> None:
    with MetricsServer(lambda: STATUS, port=0, max_connections=2) as server:
        url, port = str(server.url), server.port
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as extra,
            contextlib.suppress(ConnectionResetError, BrokenPipeError),  # closed: fine too
        ):
            extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert extra.recv(1) == b""  # closed unanswered (not a timeout)
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 10  # their threads see the close, then free the slots
        while True:
            try:
                assert "livemask_frames_acquired_total" in _scrape(url)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline


@pytest.mark.parametrize("address", ["not an address", "192.0.2.1"])
def test_a_wrong_metrics_address_is_named_not_the_port(address: str) -> None:
    """Before, every bind error said "Choose another metrics.port"."""
    with pytest.raises(ConfigError, match=r"Choose another metrics\.address") as err:
        MetricsServer(lambda: STATUS, address=address, port=0).start()
    assert "metrics.port" not in str(err.value)
