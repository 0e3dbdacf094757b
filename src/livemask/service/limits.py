"""Process limits the service raises when it starts."""

from __future__ import annotations

import logging

log = logging.getLogger("livemask")

#: The soft limit asked for when the hard limit is unlimited (Linux refuses "unlimited"
#: for open files; macOS caps it at OPEN_MAX).
UNLIMITED_NOFILE = 1 << 20


def raise_open_files_limit() -> int | None:
    """Raise the soft limit on open files (RLIMIT_NOFILE) to the hard limit; return the
    soft limit now in force, or None where the platform has none (Windows).

    Every dashboard, control or subscriber connection, recording file and model file takes
    a descriptor; with the usual soft limit of 1024, idle connections could use them all up
    and the recording then lost frames. Never fails: a limit that cannot be raised stays
    (logged)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_NOFILE if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.info("open files limit stays at %d (could not raise it to %d: %s)", soft, target,
                 exc)
        return soft
    log.debug("open files limit raised from %d to %d", soft, target)
    return target
