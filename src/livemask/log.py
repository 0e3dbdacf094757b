"""Logging setup: one named logger ``livemask``, configured from the environment.

``LIVEMASK_LOG_LEVEL`` (default INFO) and ``LIVEMASK_LOG_FILE`` (default: stderr).
pymmcore-plus' own loggers go to the same place at ``LIVEMASK_MM_LOG_LEVEL`` (default
WARNING: it reports hardware faults such as a failed snap or channel change only there).
A bad value of any of them is a :class:`~livemask.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time

from livemask.errors import ConfigError

LOGGER_NAME = "livemask"
#: The level names the variables take (any case), besides a number.
LEVEL_NAMES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (it may be replaced, e.g. by test runners)."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def env_level(variable: str, default: str) -> int:
    """The log level in environment ``variable`` (a level name in any case, or a number),
    else ``default``; ``ConfigError`` naming the variable for anything else. 0 (``NOTSET``)
    logs everything, as it reads (to :mod:`logging` it means "as the parent": WARNING)."""
    text = os.environ.get(variable, "").strip() or default
    if text.isdigit():
        return max(1, int(text))
    level = logging.getLevelNamesMapping().get(text.upper())
    if level is None:
        raise ConfigError(
            f"{variable}={text!r} is not a log level; use one of {', '.join(LEVEL_NAMES)} "
            "(any case) or a number, e.g. 20 for INFO"
        )
    return max(1, level)


def _log_handler() -> logging.Handler:
    """A handler writing to ``LIVEMASK_LOG_FILE`` (appended; reopened when the file is moved
    or removed, as logrotate does), else to stderr."""
    path = os.environ.get("LIVEMASK_LOG_FILE")
    if not path:
        return _StderrHandler()
    try:
        return logging.handlers.WatchedFileHandler(path)
    except OSError as exc:
        raise ConfigError(
            f"LIVEMASK_LOG_FILE={path!r} cannot be opened for writing ({exc.strerror or exc}); "
            "give a file in an existing, writable folder, or unset it to log to stderr"
        ) from None


def logs_to_stderr() -> bool:
    """Whether the ``livemask`` log reaches stderr (no ``LIVEMASK_LOG_FILE``, or logging not
    set up: Python's last-resort handler): what a command prints there as well need not be
    logged twice."""
    handlers = logging.getLogger(LOGGER_NAME).handlers
    return not handlers or any(
        isinstance(h, _StderrHandler)
        or (isinstance(h, logging.StreamHandler) and h.stream in (sys.stderr, sys.__stderr__))
        for h in handlers
    )


def setup_logging(*, quiet: bool = False) -> logging.Logger:
    """Configure the ``livemask`` logger once; ``quiet`` raises the default level to WARNING.
    ``ConfigError`` (before anything is changed) for a bad ``LIVEMASK_*`` variable."""
    logger = logging.getLogger(LOGGER_NAME)
    level = env_level("LIVEMASK_LOG_LEVEL", "WARNING" if quiet else "INFO")
    env_level("LIVEMASK_MM_LOG_LEVEL", "WARNING")  # checked now, used by route_hardware_log
    handler = None if logger.handlers else _log_handler()
    logger.setLevel(level)
    if handler is not None:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    route_hardware_log()
    return logger


class RepeatedErrors:
    """Log a per-frame error with its traceback the first time each kind occurs, then one
    line every ``every`` errors: a fault that hits every frame (a model that fails at 50
    frames/s) would otherwise write gigabytes of tracebacks a day."""

    def __init__(self, logger: logging.Logger, every: int = 100, max_kinds: int = 1000) -> None:
        self.logger = logger
        self.every = every
        self.max_kinds = max_kinds
        self.total = 0
        self._kinds: set[str] = set()

    def error(self, where: str, what: str, exc: BaseException) -> None:
        """Log ``what: ExcType: exc``; the traceback once per ``where`` and exception type."""
        kind = f"{where}:{type(exc).__name__}"
        message = f"{what}: {type(exc).__name__}: {exc}"
        self.total += 1
        if kind not in self._kinds:
            if len(self._kinds) >= self.max_kinds:
                self._kinds.clear()
            self._kinds.add(kind)
            self.logger.error("%s", message, exc_info=exc)
        elif self.total % self.every == 0:
            self.logger.error("%s (%d such errors so far; the traceback was logged once)",
                              message, self.total)


class DropMissingInstallation(logging.Filter):
    """Leaves out pymmcore-plus' "no compatible Micro-Manager installation" error: Python
    devices need none, and a real rig that does fails to load with a message saying so."""

    @staticmethod
    def filter(record: logging.LogRecord) -> bool:
        return "compatible Micro-Manager installation" not in record.getMessage()


#: How pymmcore-plus' runner warns that an acquisition was cancelled: each routine stop.
MDA_CANCELED = "MDA Canceled:"


class _EveryPeriod(logging.Filter):
    """A filter's rate limit: each key through at most once per ``every_s`` seconds, the
    others counted (:meth:`admit`)."""

    def __init__(self, every_s: float) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}  # key -> (last shown, left out since)

    def admit(self, key: str) -> tuple[int, float] | None:
        """None: ``key`` was let through less than ``every_s`` ago (counted); else how many
        were left out since it last was, and how many seconds ago that was."""
        now = time.monotonic()
        shown, left_out = self._last.get(key, (-float("inf"), 0))
        if now - shown < self.every_s:
            self._last[key] = (shown, left_out + 1)
            return None
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = (now, 0)
        return left_out, now - shown


class HardwareLogFilter(_EveryPeriod):
    """pymmcore-plus' records, less its "no Micro-Manager installation" error (Python devices
    need none, and a real rig that does fails to load with a message saying so), each
    message at most once per ``every_s`` seconds (a failing device warns on every event).
    Its "MDA Canceled" warning, which every stop (``stop``, SIGINT, SIGTERM) causes, comes as
    INFO: it is no alarm."""

    def __init__(self, every_s: float = 10.0) -> None:
        super().__init__(every_s)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not DropMissingInstallation.filter(record):
            return False
        if message.startswith(MDA_CANCELED) and record.levelno > logging.INFO:
            if not logging.getLogger(record.name).isEnabledFor(logging.INFO):
                return False
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        admitted = self.admit(message)
        if admitted is None:
            return False
        repeats, since_s = admitted
        if repeats:
            record.msg = f"{message} (and {repeats} more times in the last {since_s:.0f} s)"
            record.args = None
        return True


#: The logger the dashboard's HTTP server (aiohttp) writes to, under ``livemask``.
HTTP_LOGGER_NAME = "livemask.http"


class HttpLogFilter(_EveryPeriod):
    """The dashboard's HTTP server log: an error of a ``client_errors`` type (a malformed
    request) is one WARNING line (its exception's type and message, no traceback), each kind
    at most once per ``every_s`` seconds with a count of those left out; anything else (a
    handler's own failure: a bug) passes whole.
    aiohttp wrote a traceback of ≈ 40 times the bytes of each malformed request (≈ 1 GB an
    hour from one client)."""

    def __init__(
        self, client_errors: tuple[type[BaseException], ...] = (), every_s: float = 60.0
    ) -> None:
        super().__init__(every_s)
        self.client_errors = client_errors

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, self.client_errors):  # a handler's own failure (a 500): a bug,
            return True  # logged whole, each time
        admitted = self.admit(f"{record.msg}:{type(exc).__name__}")
        if admitted is None:
            return False
        left_out, since_s = admitted
        message = f"{record.getMessage()}: {type(exc).__name__}: "
        message += " ".join(str(exc).split())[:300]
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        if left_out:
            message += f" (and {left_out} more in the last {since_s:.0f} s)"
        record.msg, record.args, record.exc_info, record.exc_text = message, None, None, None
        return True


def http_logger(client_errors: tuple[type[BaseException], ...] = ()) -> logging.Logger:
    """The logger for the dashboard's HTTP server: under ``livemask`` (same handlers and
    level), through one :class:`HttpLogFilter`."""
    logger = logging.getLogger(HTTP_LOGGER_NAME)
    if not any(isinstance(f, HttpLogFilter) for f in logger.filters):
        logger.addFilter(HttpLogFilter(client_errors))
    return logger


#: pymmcore-plus' loggers: its own, and its modules' (``logging.getLogger(__name__)``, e.g.
#: UniMMCore's device manager, which logs a Python device's failed ``initialize`` there).
HARDWARE_LOGGER_NAMES = ("pymmcore-plus", "pymmcore_plus")


def route_hardware_log() -> None:
    """Route pymmcore-plus' log through ours, once :func:`setup_logging` has run.

    pymmcore-plus replaces its logger's handlers when it is imported, so the module that
    imports it (``livemask.acquisition.core``) calls this again afterwards."""
    handlers = logging.getLogger(LOGGER_NAME).handlers
    if not handlers:
        return
    level = env_level("LIVEMASK_MM_LOG_LEVEL", "WARNING")
    for name in HARDWARE_LOGGER_NAMES:
        _route(logging.getLogger(name), handlers, level)


def _route(mm: logging.Logger, handlers: list[logging.Handler], level: int) -> None:
    """Send ``mm``'s records (``level`` and above) to ``handlers`` only, filtered by a
    :class:`HardwareLogFilter`."""
    mm.setLevel(level)
    for handler in list(mm.handlers):
        if handler not in handlers:
            mm.removeHandler(handler)
    for handler in handlers:
        if handler not in mm.handlers:
            mm.addHandler(handler)
    if not any(isinstance(f, HardwareLogFilter) for f in mm.filters):
        mm.addFilter(HardwareLogFilter())
    mm.propagate = False


def is_power_of_ten(n: int) -> bool:
    """1, 10, 100, ...: when a message repeated ``n`` times is shown again (a log-scale
    back-off for what can recur on every frame of a week-long run)."""
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1
