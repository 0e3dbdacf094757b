"""The service's garbage-collector policy and monitor (livemask.service.gc_policy)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from livemask.config import parse_config
from livemask.errors import ConfigError
from livemask.service.app import Service
from livemask.service.gc_policy import GcMonitor, GcPolicy
from tests.conftest import make_config


@pytest.fixture
def clean_gc() -> Iterator[None]:
    """Leave the collector as the test found it (threshold, frozen heap)."""
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    yield
    gc.set_threshold(*threshold)
    if frozen == 0:
        gc.unfreeze()


def _build_measurements(n: int) -> list[dict[str, Any]]:
    """What analysis builds per frame: a dict and two lists per object."""
    return [{"label": i, "centroid_yx": [1.0, 2.0], "bbox": [0, 0, 4, 4]} for i in range(n)]


def test_monitor_counts_collections_and_their_time(clean_gc: None) -> None:
    monitor = GcMonitor()
    monitor.start()
    monitor.start()  # idempotent: one callback
    try:
        gc.collect(2)
        gc.collect(0)
    finally:
        monitor.stop()
    report = monitor.report()
    assert report["collections"]["2"] >= 1 and report["collections"]["0"] >= 1
    assert report["pause_ms"]["2"] > 0
    assert 0 < report["max_pause_ms"] <= sum(report["pause_ms"].values())
    assert report["threshold"] == list(gc.get_threshold())
    gc.collect(2)  # stopped: no longer counted
    assert monitor.report()["collections"] == report["collections"]
    assert monitor._on_gc not in gc.callbacks


def test_policy_lets_one_frame_of_measurements_die_young(clean_gc: None) -> None:
    """Python's default threshold (700) collects several times while ~6,000 containers are
    built; the policy's (10,000) lets them be built and freed without a collection."""
    gc.set_threshold(700, 10, 10)
    default = GcMonitor()
    gc.collect()
    default.start()
    try:
        _build_measurements(2000)
    finally:
        default.stop()
    assert default.report()["collections"]["0"] >= 5

    policy = GcPolicy(freeze=True, threshold=10_000)
    was_frozen = gc.get_freeze_count()
    policy.apply()
    assert gc.get_threshold() == (10_000, 10, 10)
    # the startup heap is out of the collector's view
    assert policy.frozen_objects == gc.get_freeze_count() > was_frozen
    tuned = GcMonitor()
    tuned.start()
    try:
        _build_measurements(2000)
    finally:
        tuned.stop()
        policy.restore()
    assert tuned.report()["collections"] == {"0": 0, "1": 0, "2": 0}
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == was_frozen  # unfrozen again only if it froze it
    assert policy.frozen_objects == 0


def test_policy_does_not_unfreeze_a_heap_someone_else_froze(clean_gc: None) -> None:
    gc.freeze()
    frozen = gc.get_freeze_count()
    policy = GcPolicy(freeze=True, threshold=None)
    before = gc.get_threshold()
    policy.apply()
    policy.restore()
    assert gc.get_threshold() == before  # threshold None: left alone
    assert gc.get_freeze_count() >= frozen


def test_gc_threshold_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"pipeline\.gc_threshold"):
        parse_config({"pipeline": {"gc_threshold": 5}})
    cfg = parse_config({"pipeline": {"gc_threshold": None, "gc_freeze": False}})
    assert cfg.pipeline.gc_threshold is None and not cfg.pipeline.gc_freeze
    assert parse_config({}).pipeline.gc_threshold == 10_000


async def test_service_applies_the_policy_and_restores_it_on_close(clean_gc: None) -> None:
    gc.set_threshold(700, 10, 10)
    frozen = gc.get_freeze_count()
    async with Service(make_config(pipeline={"gc_threshold": 5000})) as svc:
        report = svc.status()["gc"]
        assert report["threshold"] == [5000, 10, 10]
        assert report["frozen_objects"] > frozen
        assert set(report["collections"]) == {"0", "1", "2"}
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == frozen
