"""ZeroMQ transport on the service side: the PUB publisher and the ROUTER control server.

This is the only place on the service side that owns sockets.
"""

from __future__ import annotations

from livemask.transport.control_server import DEFAULT_CONTROL_ADDRESS, ControlServer, Handler
from livemask.transport.publisher import (
    DEFAULT_PUB_ADDRESS,
    MemoryPublisher,
    Publisher,
    ZmqPublisher,
)

__all__ = [
    "DEFAULT_CONTROL_ADDRESS",
    "DEFAULT_PUB_ADDRESS",
    "ControlServer",
    "Handler",
    "MemoryPublisher",
    "Publisher",
    "ZmqPublisher",
]
