"""The livemask exception hierarchy.

::

    LivemaskError
    ├── ConfigError (ValueError)          bad YAML/config values; names the field to change
    ├── ProtocolError (ValueError)        a malformed wire message
    ├── ControlError                      the service answered a control request with ok=false
    │   └── ControlTimeout (TimeoutError) no reply after all retries
    ├── CommandError                      raised by command handlers; becomes an error reply
    ├── AcquisitionError (RuntimeError)   microscope/core faults
    │   ├── AcquisitionEnding             events added after the last one was taken
    │   ├── FrameTimeout (TimeoutError)   no frame within the configured timeout
    │   └── HardwareTimeout (TimeoutError) a device call did not return in time
    ├── ModelError (ValueError)           missing/invalid model file or card
    ├── BackendUnavailable (RuntimeError) an inference backend cannot run here
    ├── RecordingError (OSError)          the recording folder cannot be written
    └── ReplayError (ValueError)          a file given to replay cannot be played
"""

from __future__ import annotations


class LivemaskError(Exception):
    """Base class of every error raised by livemask."""


class ConfigError(LivemaskError, ValueError):
    """The configuration is invalid; the message names the field to change."""


class ProtocolError(LivemaskError, ValueError):
    """A wire message does not follow the livemask protocol."""


class ControlError(LivemaskError):
    """The service rejected a control request."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


class ControlTimeout(ControlError, TimeoutError):
    """The service did not answer a control request in time."""

    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


class CommandError(LivemaskError):
    """Raised inside a command handler; turned into an error reply with this code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AcquisitionError(LivemaskError, RuntimeError):
    """The microscope or its Micro-Manager core failed."""


class AcquisitionEnding(AcquisitionError):
    """The acquisition has taken its last event: events can no longer be added to it."""


class FrameTimeout(AcquisitionError, TimeoutError):
    """No frame arrived within the configured timeout."""


class HardwareTimeout(AcquisitionError, TimeoutError):
    """A device call did not return in time (the device is busy or hung)."""


class ModelError(LivemaskError, ValueError):
    """A model file or model card is missing or invalid."""


class BackendUnavailable(LivemaskError, RuntimeError):
    """The requested inference backend cannot run on this machine."""


class RecordingError(LivemaskError, OSError):
    """A recording cannot be written (folder exists, not writable, frame does not fit)."""


class ReplayError(LivemaskError, ValueError):
    """A file given to ``livemask replay`` cannot be played; the message says what to change."""
