"""Logging: pymmcore-plus' hardware warnings reach our log, once per message per window."""

from __future__ import annotations

import logging

import pytest

from livemask.log import HardwareLogFilter, route_hardware_log


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("pymmcore-plus", logging.WARNING, "_engine.py", 1, msg, args, None)


def test_filter_drops_the_missing_installation_error_and_repeats() -> None:
    filt = HardwareLogFilter(every_s=3600.0)
    assert not filt.filter(_record("Could not find a compatible Micro-Manager installation ..."))
    assert filt.filter(_record("Failed to snap image. %s", "camera not responding"))
    assert not filt.filter(_record("Failed to snap image. %s", "camera not responding"))
    assert filt.filter(_record("Failed to set channel. %s", "no such preset"))


def test_filter_shows_a_repeat_again_after_its_window_with_the_count() -> None:
    filt = HardwareLogFilter(every_s=0.0)
    first, again = _record("Failed to snap image."), _record("Failed to snap image.")
    assert filt.filter(first) and filt.filter(again)
    filt.every_s = 3600.0
    for _ in range(3):
        assert not filt.filter(_record("Failed to snap image."))
    filt.every_s = 0.0
    shown = _record("Failed to snap image.")
    assert filt.filter(shown)
    assert "and 3 more times" in shown.getMessage()


def test_hardware_warnings_go_through_our_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    import livemask.acquisition.core  # noqa: F401  (imports pymmcore_plus)

    ours = logging.getLogger("livemask")
    mm = logging.getLogger("pymmcore-plus")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    monkeypatch.setattr(ours, "handlers", [handler])
    monkeypatch.setattr(mm, "handlers", [])
    monkeypatch.setattr(mm, "filters", [])
    monkeypatch.setattr(mm, "propagate", True)
    monkeypatch.delenv("LIVEMASK_MM_LOG_LEVEL", raising=False)
    level = mm.level
    try:
        route_hardware_log()
        mm.info("event started")  # below the default WARNING
        mm.warning("Failed to set channel. Preset %r does not exist", "NOPE")
        mm.warning("Failed to set channel. Preset %r does not exist", "NOPE")
    finally:
        mm.setLevel(level)
    assert [r.getMessage() for r in records] == [
        "Failed to set channel. Preset 'NOPE' does not exist"]


def test_power_of_ten_back_off() -> None:
    from livemask.log import is_power_of_ten

    assert [n for n in range(1, 2001) if is_power_of_ten(n)] == [1, 10, 100, 1000]
    assert not is_power_of_ten(0) and not is_power_of_ten(20) and is_power_of_ten(10**7)
