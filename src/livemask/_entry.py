"""The ``livemask`` console script and ``python -m livemask``: signal setup, then the command
line. Only this entry changes signal handlers before a command runs; importing
:mod:`livemask.cli` (tests, notebooks, multiprocessing children) leaves them alone."""

from __future__ import annotations

import signal
import sys

#: Exit code after Ctrl-C (or SIGTERM, SIGHUP) ended the start-up (as livemask.cli's).
INTERRUPTED_EXIT = 130


def stop_signals_interrupt() -> None:
    """SIGTERM and SIGHUP raise ``KeyboardInterrupt`` as SIGINT does, where they still have
    their default action (which ends the process without a word: 143, 129), until a
    command's own handlers replace them; an ignored one (``nohup``) stays ignored."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, signal.default_int_handler)
        except ValueError:  # outside the main thread: no handlers there
            return


def main() -> None:
    """Install the stop signals' start-up handling, import the command line (a second or
    more) and run it; interrupted while importing: one line, exit 130."""
    stop_signals_interrupt()
    try:
        from livemask import cli
    except KeyboardInterrupt:
        if "--ready-fd" not in sys.argv:  # (serve --view's view: serve says it)
            print("livemask: interrupted", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT)
    cli.main()
