"""Clients of a livemask service: stream subscribers and the control client."""

from __future__ import annotations

from livemask.client.control import DEFAULT_CONTROL_ADDRESS, ControlClient
from livemask.client.subscriber import (
    DEFAULT_SUB_ADDRESS,
    DEFAULT_TOPICS,
    AsyncSubscriber,
    Subscriber,
)
from livemask.errors import ControlError, ControlTimeout, ProtocolError
from livemask.protocol import Message

__all__ = [
    "DEFAULT_CONTROL_ADDRESS",
    "DEFAULT_SUB_ADDRESS",
    "DEFAULT_TOPICS",
    "AsyncSubscriber",
    "ControlClient",
    "ControlError",
    "ControlTimeout",
    "Message",
    "ProtocolError",
    "Subscriber",
]
