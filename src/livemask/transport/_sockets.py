"""Socket helpers shared by the publisher and the control server."""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

import zmq

from livemask.errors import ConfigError


def allow_ipv6(sock: zmq.Socket[Any], address: str) -> None:
    """Turn on ZMQ_IPV6 for an IPv6 literal (``tcp://[::1]:5555``), which libzmq refuses
    otherwise; only then, since with it IPv4 endpoints read back as ``[::ffff:a.b.c.d]``."""
    if address.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)


#: How long the check for a live ipc socket (:func:`_ipc_listener_alive`) waits to connect.
IPC_PROBE_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class IpcFile:
    """The socket file an ``ipc://PATH`` bind made: its absolute path and its identity
    (device, inode) as bound, so that only that file is removed (:meth:`remove`)."""

    path: str
    dev: int
    ino: int

    def remove(self) -> None:
        """Unlink the file if it is still this socket (not one another process bound since:
        libzmq replaces the file on bind); libzmq leaves it behind on close."""
        try:
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (self.dev, self.ino):
                os.unlink(self.path)
        except OSError:  # gone already, or not ours to remove
            pass


def bind_or_explain(
    sock: zmq.Socket[Any], address: str, what: str, hint: str
) -> IpcFile | None:
    """Bind ``sock``; on failure close it and raise a ConfigError saying what to change.

    An ``ipc://PATH`` another process listens on is refused as a TCP port in use is
    (libzmq would unlink its file and take the path over without a word); a stale file is
    replaced. Returns the socket file an ``ipc://PATH`` bind made (None for other
    transports and ``ipc://*``, whose file libzmq removes itself), to remove on close."""
    allow_ipv6(sock, address)
    path = ipc_path(address)
    if path is not None and _ipc_listener_alive(path):
        sock.close(linger=0)
        raise ConfigError(_bind_message(
            address, what, hint, f"Address already in use (a process listens on {path}; "
            "binding would take the path over from it)", in_use=True))
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise ConfigError(_bind_message(
            address, what, hint, str(exc), in_use=exc.errno == zmq.EADDRINUSE)) from exc
    return bound_ipc_file(path)


def _bind_message(address: str, what: str, hint: str, error: str, *, in_use: bool) -> str:
    """The ConfigError text for a failed bind of ``address``."""
    if in_use:
        why = "Is another `livemask serve` running? Choose another address"
    else:  # EINVAL, EPROTONOSUPPORT, an unknown interface, ...
        why = "Give a valid address, tcp://HOST:PORT,"
    return (f"cannot bind the {what} to {address!r}: {error}. {why} with {hint} (e.g. "
            "tcp://127.0.0.1:5566; port * picks a free one).")


def ipc_path(address: str) -> str | None:
    """The absolute file path of an ``ipc://PATH`` endpoint; None for other transports,
    ``ipc://*`` (a new file each bind) and Linux abstract names (``ipc://@NAME``, no file:
    libzmq refuses a second bind of those itself)."""
    if not address.startswith("ipc://"):
        return None
    path = address.removeprefix("ipc://")
    if path in ("", "*") or path.startswith("@"):
        return None
    return os.path.abspath(path)


def _ipc_listener_alive(path: str) -> bool:
    """Whether a process listens on the unix socket file ``path`` (it accepts a connection,
    or its backlog is full); False for no file, not a socket, or a stale one."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(IPC_PROBE_TIMEOUT_S)
        try:
            probe.connect(path)
        except (TimeoutError, BlockingIOError):  # a listener with a full backlog
            return True
        except OSError as exc:  # ECONNREFUSED: stale; EACCES, too long, ...: libzmq says
            return exc.errno == errno.EAGAIN
    return True


def bound_ipc_file(path: str | None) -> IpcFile | None:
    """The :class:`IpcFile` just bound at ``path`` (None: not an ipc file, or gone)."""
    if path is None:
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return IpcFile(path, st.st_dev, st.st_ino)


def bound_endpoint(sock: zmq.Socket[Any] | None, what: str) -> str:
    """The actual endpoint of a bound socket (resolves ``tcp://127.0.0.1:*``; an
    ``ipc://`` file's path made absolute, so that clients in other folders can use it)."""
    if sock is None:
        raise RuntimeError(f"{what} is not started; call start() first")
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    text = endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)
    path = ipc_path(text)
    return text if path is None else f"ipc://{path}"


def local_connect_address(bound: str) -> str:
    """The address to connect to a PUB socket bound at ``bound`` from this machine
    (``tcp://0.0.0.0:5555`` → ``tcp://127.0.0.1:5555``)."""
    for wildcard, local in (("//0.0.0.0:", "//127.0.0.1:"), ("//*:", "//127.0.0.1:"),
                            ("//[::]:", "//[::1]:")):
        if wildcard in bound:
            return bound.replace(wildcard, local, 1)
    return bound
