"""A helper process on the other end of a pipe (benchmark subscribers and dashboard probes).

The child is started with ``spawn`` and its end of a :func:`multiprocessing.Pipe`; it sends
one message when it is ready, and ``("done", result)`` after it was sent ``("stop", value)``.
Closing the pipe tells it to stop.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any, ClassVar, cast


class PipedProcess:
    """The parent's handle on one such child process."""

    #: Exception raised when the child dies, is silent or does not report back.
    error: ClassVar[type[Exception]] = RuntimeError
    #: How messages name the child.
    what: ClassVar[str] = "the helper process"

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...], name: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=target, args=(*args, child), name=name, daemon=True)
        self._proc.start()
        child.close()

    def wait_ready(self, hello: Callable[[], object] | None = None, timeout_s: float = 60) -> None:
        """Block until the child says it is ready; ``hello()`` is called meanwhile."""
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.05):
            if not self._proc.is_alive():
                raise self.error(f"{self.what} died while starting")
            if time.monotonic() > deadline:
                raise self.error(f"{self.what} got nothing within {timeout_s} s")
            if hello is not None:
                hello()
        self._conn.recv()

    def finish(self, value: Any = None, timeout_s: float = 60) -> dict[str, Any]:
        """Send ``("stop", value)``; return the result the child reports."""
        self._conn.send(("stop", value))
        if not self._conn.poll(timeout_s):
            raise self.error(f"{self.what} did not report back")
        _, result = self._conn.recv()
        return cast(dict[str, Any], result)

    def close(self) -> None:
        """End the process (idempotent); closing the pipe tells it to stop."""
        self._conn.close()
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
