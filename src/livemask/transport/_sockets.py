"""Socket helpers shared by the publisher and the control server."""

from __future__ import annotations

from typing import Any

import zmq

from livemask.errors import ConfigError


def bind_or_explain(sock: zmq.Socket[Any], address: str, what: str, hint: str) -> None:
    """Bind ``sock``; on failure close it and raise a ConfigError saying what to change."""
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        if exc.errno == zmq.EADDRINUSE:
            why = "Is another `livemask serve` running? Choose another address"
        else:  # EINVAL, EPROTONOSUPPORT, an unknown interface, ...
            why = "Give a valid address, tcp://HOST:PORT,"
        raise ConfigError(
            f"cannot bind the {what} to {address!r}: {exc}. {why} with {hint} (e.g. "
            "tcp://127.0.0.1:5566; port * picks a free one)."
        ) from exc


def bound_endpoint(sock: zmq.Socket[Any] | None, what: str) -> str:
    """The actual endpoint of a bound socket (resolves ``tcp://127.0.0.1:*``)."""
    if sock is None:
        raise RuntimeError(f"{what} is not started; call start() first")
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)
