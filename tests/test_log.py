"""Logging: pymmcore-plus' hardware warnings reach our log, once per message per window."""

from __future__ import annotations

import logging
from pathlib import Path

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


@pytest.mark.parametrize(("variable", "value"), [
    ("LIVEMASK_LOG_LEVEL", "verbose"), ("LIVEMASK_MM_LOG_LEVEL", "loud"),
    ("LIVEMASK_LOG_LEVEL", "-5"), ("LIVEMASK_LOG_FILE", "/nonexistent/dir/log.txt"),
])
def test_a_bad_log_variable_is_an_error_naming_it(
    fresh_logging: None, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """Before, a traceback (ValueError: Unknown level, FileNotFoundError) in every command."""
    from livemask.errors import ConfigError
    from livemask.log import setup_logging

    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=rf"^{variable}='{value}'"):
        setup_logging()
    assert logging.getLogger("livemask").handlers == []  # nothing half set up


def test_log_levels_are_names_in_any_case_or_numbers(
    fresh_logging: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from livemask.log import setup_logging

    monkeypatch.setenv("LIVEMASK_LOG_LEVEL", "debug")
    monkeypatch.setenv("LIVEMASK_MM_LOG_LEVEL", "15")
    monkeypatch.setenv("LIVEMASK_LOG_FILE", str(tmp_path / "log.txt"))
    logger = setup_logging()
    try:
        assert logger.level == logging.DEBUG
        assert logging.getLogger("pymmcore-plus").level == 15
        logger.debug("written")
    finally:
        for handler in logger.handlers:
            handler.close()
    assert "DEBUG livemask: written" in (tmp_path / "log.txt").read_text()


def test_the_mda_canceled_warning_comes_as_info() -> None:
    filt = HardwareLogFilter(every_s=0.0)
    mm = logging.getLogger("pymmcore-plus")
    level = mm.level
    try:
        mm.setLevel(logging.WARNING)
        assert not filt.filter(_record("MDA Canceled: %s", "MDASequence(...)"))
        mm.setLevel(logging.INFO)
        record = _record("MDA Canceled: %s", "MDASequence(...)")
        assert filt.filter(record)
    finally:
        mm.setLevel(level)
    assert (record.levelno, record.levelname) == (logging.INFO, "INFO")
    other = _record("Failed to snap image.")
    assert filt.filter(other) and other.levelno == logging.WARNING


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mm_level", ["WARNING", "INFO"])
async def test_stopping_an_acquisition_logs_no_warning(
    fresh_logging: None, monkeypatch: pytest.MonkeyPatch, mm_level: str
) -> None:
    """Before, every routine stop (``stop``, Ctrl-C, SIGTERM) logged ``WARNING pymmcore-plus:
    MDA Canceled: ...``: a false alarm for whoever alerts on warnings."""
    import asyncio

    from livemask.service.app import Service
    from tests.conftest import make_config

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    monkeypatch.setattr(logging.getLogger("livemask"), "handlers", [Keep()])
    monkeypatch.setenv("LIVEMASK_MM_LOG_LEVEL", mm_level)
    route_hardware_log()
    cfg = make_config(acquisition={"autostart": True, "mode": "free-run",
                                   "sequence": {"time_plan": {"interval": 0.05, "loops": 1000}}})
    async with Service(cfg) as svc:
        for _ in range(200):
            if svc.pipeline.counters.counts["acquired"] >= 2:
                break
            await asyncio.sleep(0.05)
        assert svc.acquiring
    canceled = [r for r in records if r.getMessage().startswith("MDA Canceled")]
    assert [r.levelname for r in canceled] == ([] if mm_level == "WARNING" else ["INFO"])


@pytest.mark.parametrize("text", ["0", "NOTSET", "notset"])
def test_log_level_0_logs_everything(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """Review: 0 and NOTSET were accepted but gave WARNING (0 means "as the parent" to
    logging): DEBUG and INFO lines were dropped."""
    from livemask.log import env_level

    monkeypatch.setenv("LIVEMASK_LOG_LEVEL", text)
    level = env_level("LIVEMASK_LOG_LEVEL", "INFO")
    logger = logging.getLogger("livemask-test-level-0")
    logger.setLevel(level)
    assert logger.getEffectiveLevel() < logging.DEBUG
