"""Logging setup: one named logger ``livemask``, configured from the environment.

``LIVEMASK_LOG_LEVEL`` (default INFO) and ``LIVEMASK_LOG_FILE`` (default: stderr).
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "livemask"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (it may be replaced, e.g. by test runners)."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def setup_logging(*, quiet: bool = False) -> logging.Logger:
    """Configure the ``livemask`` logger once; ``quiet`` raises the default level to WARNING."""
    logger = logging.getLogger(LOGGER_NAME)
    level = os.environ.get("LIVEMASK_LOG_LEVEL", "WARNING" if quiet else "INFO").upper()
    logger.setLevel(level)
    if not logger.handlers:
        path = os.environ.get("LIVEMASK_LOG_FILE")
        handler: logging.Handler = logging.FileHandler(path) if path else _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    # pymmcore-plus logs an ERROR when no Micro-Manager installation is found; Python
    # devices do not need one, so keep its logger quiet unless asked.
    logging.getLogger("pymmcore-plus").setLevel(os.environ.get("LIVEMASK_MM_LOG_LEVEL", "CRITICAL"))
    return logger
