"""Socket helpers shared by the publisher and the control server."""

from __future__ import annotations

from typing import Any

import zmq

from livemask.errors import ConfigError


def allow_ipv6(sock: zmq.Socket[Any], address: str) -> None:
    """Turn on ZMQ_IPV6 for an IPv6 literal (``tcp://[::1]:5555``), which libzmq refuses
    otherwise; only then, since with it IPv4 endpoints read back as ``[::ffff:a.b.c.d]``."""
    if address.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)


def bind_or_explain(sock: zmq.Socket[Any], address: str, what: str, hint: str) -> None:
    """Bind ``sock``; on failure close it and raise a ConfigError saying what to change."""
    allow_ipv6(sock, address)
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


def local_connect_address(bound: str) -> str:
    """The address to connect to a PUB socket bound at ``bound`` from this machine
    (``tcp://0.0.0.0:5555`` → ``tcp://127.0.0.1:5555``)."""
    for wildcard, local in (("//0.0.0.0:", "//127.0.0.1:"), ("//*:", "//127.0.0.1:"),
                            ("//[::]:", "//[::1]:")):
        if wildcard in bound:
            return bound.replace(wildcard, local, 1)
    return bound
