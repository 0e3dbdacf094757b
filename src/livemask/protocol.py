"""The livemask wire format (protocol v1): pure encode/decode, no sockets.

Every published message is multipart ``[topic, header, *buffers]``:

- ``topic``: ASCII bytes, one of :data:`TOPICS`;
- ``header``: a UTF-8 JSON object with at least ``v``, ``topic`` and ``arrays`` (a list of
  ``{name, dtype, shape}`` describing the buffers that follow, in order);
- buffers: raw C-order array bytes (numpy ``dtype.str`` gives the byte order).

Control requests and replies are single JSON objects (see :func:`parse_request`,
:func:`ok_reply`, :func:`error_reply`). The full specification is ``docs/protocol.md``.
This module never imports zmq: it is shared by the service, the clients and the tests.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, compress, repeat
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from livemask.errors import CommandError, ProtocolError

__all__ = [
    "BAD_JSON",
    "BAD_REQUEST",
    "ERROR_CODES",
    "INTERNAL",
    "INVALID_ARGS",
    "INVALID_STATE",
    "MAX_ARGS",
    "MAX_NESTING",
    "PROTOCOL_VERSION",
    "TOPICS",
    "UNKNOWN_COMMAND",
    "ControlRequest",
    "Message",
    "decode",
    "dumps_json",
    "encode",
    "encode_request",
    "error_reply",
    "format_validation_error",
    "load_request",
    "nested_too_deeply",
    "ok_reply",
    "parse_reply",
    "parse_request",
    "peek_request_id",
    "plain_index",
    "plain_message",
    "request_id",
    "validate_request",
]

PROTOCOL_VERSION = 1
"""Version written into every header as ``v``; :func:`decode` rejects any other."""

TOPICS: tuple[str, ...] = ("frame", "labels", "measurements", "status", "event", "truth")
"""Topics a v1 publisher may send. No topic is a prefix of another."""

# Control error codes: the only place they are spelled out.
BAD_JSON = "bad_json"
"""The request is not valid UTF-8 JSON, or not a JSON object."""
BAD_REQUEST = "bad_request"
"""The request object does not match ``{"id", "cmd", "args"}``."""
UNKNOWN_COMMAND = "unknown_command"
"""``cmd`` names no command of this service."""
INVALID_ARGS = "invalid_args"
"""The command's ``args`` failed validation."""
INVALID_STATE = "invalid_state"
"""The command is not allowed now (e.g. ``start`` while running)."""
INTERNAL = "internal"
"""The service failed while handling the command; see its log."""
ERROR_CODES: tuple[str, ...] = (
    BAD_JSON,
    BAD_REQUEST,
    UNKNOWN_COMMAND,
    INVALID_ARGS,
    INVALID_STATE,
    INTERNAL,
)


@dataclass
class Message:
    """One decoded published message."""

    topic: str
    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


# --------------------------------------------------------------------------- JSON


#: numpy arrays and scalars natively; integer and other non-string keys as JSON does.
_ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _json_default(obj: Any) -> Any:
    """``json.dumps`` hook: numpy scalars and arrays become plain Python values."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _sanitize(obj: Any) -> Any:
    """Return a JSON-safe copy: numpy values unwrapped, NaN/inf replaced by None."""
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Mapping):
        return {_sanitize_key(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_sanitize(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _sanitize(obj.tolist())
    if isinstance(obj, np.generic):
        return _sanitize(obj.item())
    return obj


def _sanitize_key(key: Any) -> Any:
    if isinstance(key, np.generic):
        return key.item()
    return key


def dumps_json(obj: Any) -> bytes:
    """Encode ``obj`` as compact UTF-8 JSON (with orjson: a frame's 2,000 objects in about
    0.4 ms instead of 6 ms with the standard library, time the event loop holds the GIL).

    numpy scalars and arrays are converted to Python numbers and lists; non-finite floats
    (NaN, inf) become ``null`` because JSON has no spelling for them. Raises
    :class:`ProtocolError` for anything else JSON cannot represent.
    """
    try:
        return orjson.dumps(obj, default=_json_default, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError: e.g. numpy dict keys; sanitise, retry once
        try:
            return orjson.dumps(_sanitize(obj), default=_json_default, option=_ORJSON_OPTIONS)
        except TypeError as exc:
            raise ProtocolError(f"value cannot be encoded as JSON: {exc}") from exc


# ------------------------------------------------------------------ encode/decode


def _check_dtype(name: str, dtype: np.dtype[Any]) -> None:
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biufc":
        raise ProtocolError(
            f"array {name!r} has dtype {dtype.str!r}; only plain bool, integer, float and "
            "complex dtypes can be sent"
        )


def encode(
    topic: str,
    header: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray] | None = None,
) -> list[bytes | memoryview]:
    """Encode one message as ``[topic, header JSON, *buffers]``.

    ``v``, ``topic`` and ``arrays`` (the buffer descriptors) are written into a copy of
    ``header``; the caller's mapping is not modified. Buffers are zero-copy memoryviews of
    C-contiguous arrays (non-contiguous arrays are copied once), so the arrays must not be
    modified until the message has been sent.
    """
    if topic not in TOPICS:
        raise ProtocolError(f"unknown topic {topic!r}; expected one of {', '.join(TOPICS)}")
    out_header = dict(header)
    descriptors: list[dict[str, Any]] = []
    buffers: list[bytes | memoryview] = []
    for name, value in (arrays or {}).items():
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"array names must be non-empty strings, got {name!r}")
        arr = np.asarray(value)
        _check_dtype(name, arr.dtype)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        descriptors.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape)})
        # A flat uint8 view: same memory, and a 1-D byte buffer that zmq and
        # np.frombuffer accept whatever the dtype or number of dimensions.
        buffers.append(arr.reshape(-1).view(np.uint8).data)
    out_header["v"] = PROTOCOL_VERSION
    out_header["topic"] = topic
    out_header["arrays"] = descriptors
    return [topic.encode("ascii"), dumps_json(out_header), *buffers]


def _as_buffer(part: Any) -> memoryview:
    """A memoryview over one received frame (bytes, memoryview or zmq.Frame)."""
    if isinstance(part, bytes | bytearray):
        return memoryview(part)
    if isinstance(part, memoryview):
        return part
    buffer = getattr(part, "buffer", None)  # zmq.Frame (recv with copy=False)
    if buffer is not None:
        return memoryview(buffer)
    data = getattr(part, "bytes", None)
    if isinstance(data, bytes):
        return memoryview(data)
    try:
        return memoryview(part)
    except TypeError as exc:
        raise ProtocolError(f"message part of type {type(part).__name__} is not a buffer") from exc


def _parse_descriptor(index: int, desc: Any) -> tuple[str, np.dtype[Any], tuple[int, ...]]:
    where = f"header.arrays[{index}]"
    if not isinstance(desc, dict):
        raise ProtocolError(f"{where} must be an object with name, dtype, shape")
    missing = [k for k in ("name", "dtype", "shape") if k not in desc]
    if missing:
        raise ProtocolError(f"{where} is missing {', '.join(missing)}")
    name, dtype_str, shape = desc["name"], desc["dtype"], desc["shape"]
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"{where}.name must be a non-empty string, got {name!r}")
    if not isinstance(dtype_str, str):
        raise ProtocolError(f"{where}.dtype must be a numpy dtype string, got {dtype_str!r}")
    try:
        dtype = np.dtype(dtype_str)
    except (TypeError, ValueError, SyntaxError) as exc:
        raise ProtocolError(f"{where}.dtype {dtype_str!r} is not a numpy dtype") from exc
    _check_dtype(name, dtype)
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ProtocolError(f"{where}.shape must be a list of non-negative integers, got {shape!r}")
    return name, dtype, tuple(shape)


def decode(parts: Sequence[Any]) -> Message:
    """Decode ``[topic, header, *buffers]`` into a :class:`Message`.

    Parts may be ``bytes``, ``memoryview`` or ``zmq.Frame`` objects (``recv_multipart(
    copy=False)``); arrays are views of the received buffers, not copies (writable where
    the buffer is, as a received ``zmq.Frame``'s: the message's own memory).
    Raises :class:`ProtocolError` naming the first problem found.
    """
    if len(parts) < 2:
        raise ProtocolError(f"a message has at least 2 parts (topic, header), got {len(parts)}")
    try:
        topic = _as_buffer(parts[0]).tobytes().decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError("topic frame is not ASCII") from exc
    try:
        header = orjson.loads(_as_buffer(parts[1]).tobytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"header of {topic!r} message is not UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"header of {topic!r} message is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError(
            f"header of {topic!r} message must be a JSON object, got {type(header).__name__}"
        )
    if "v" not in header:
        raise ProtocolError(f"header of {topic!r} message has no protocol version 'v'")
    if header["v"] != PROTOCOL_VERSION or isinstance(header["v"], bool):
        raise ProtocolError(
            f"unsupported protocol version v={header['v']!r}; this client speaks "
            f"v={PROTOCOL_VERSION} (upgrade livemask on the older side)"
        )
    if header.get("topic") != topic:
        raise ProtocolError(
            f"topic frame {topic!r} does not match header topic {header.get('topic')!r}"
        )
    descriptors = header.get("arrays", [])
    if not isinstance(descriptors, list):
        raise ProtocolError(f"header.arrays must be a list, got {type(descriptors).__name__}")
    buffers = parts[2:]
    if len(descriptors) != len(buffers):
        raise ProtocolError(
            f"{topic!r} header describes {len(descriptors)} array(s) but "
            f"{len(buffers)} buffer(s) follow"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, (desc, part) in enumerate(zip(descriptors, buffers, strict=True)):
        name, dtype, shape = _parse_descriptor(i, desc)
        if name in arrays:
            raise ProtocolError(f"duplicate array name {name!r} in {topic!r} message")
        buf = _as_buffer(part)
        expected = math.prod(shape) * dtype.itemsize
        if buf.nbytes != expected:
            raise ProtocolError(
                f"array {name!r} ({dtype.str}, shape {list(shape)}) needs {expected} bytes, "
                f"its buffer has {buf.nbytes}"
            )
        arrays[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return Message(topic=topic, header=header, arrays=arrays)


# ----------------------------------------------------------------------- control


#: Integers a request may carry: JSON numbers that fit 64 bits (what the service can echo).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def fits_64_bits(value: int) -> bool:
    """Whether ``value`` is a signed 64-bit integer."""
    return INT64_MIN <= value <= INT64_MAX


class ControlRequest(BaseModel):
    """A control request: ``{"id": ..., "cmd": "...", "args": {...}}``."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr | StrictInt | None = None
    cmd: StrictStr = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)


#: Validation errors listed in one message; the rest are counted ("and N more").
MAX_LISTED_ERRORS = 10
#: Longest error message a reply carries; longer ones are cut, saying how much was left out.
MAX_ERROR_MESSAGE_CHARS = 2000


_ENUM_REPR = re.compile(r"<\w+\.\w+: ('[^']*'|-?\d+)>")


def plain_message(msg: str) -> str:
    """A pydantic error message as a sentence for people: without the ``Value error, `` a
    validator's own text gets, and with enum members as their values (useq's axis order
    error lists ``<Axis.TIME: 't'>``)."""
    return _ENUM_REPR.sub(r"\1", msg.removeprefix("Value error, "))


def format_validation_error(
    exc: ValidationError, *, empty: str | None = "(request)", prefix: str = "",
    with_input: bool = False,
) -> str:
    """``field.path: message`` per pydantic error (``prefix`` before each path, ``empty``
    for an empty one, None: the message alone, where the caller named the value already;
    ``with_input``: the value given after it), joined by ``; ``: the first
    :data:`MAX_LISTED_ERRORS`, then ``and N more`` (a request with 800,000 unknown keys made
    a 33 MB reply)."""
    errors = exc.errors(include_url=False, include_context=False, include_input=with_input)
    lines = []
    for err in errors[:MAX_LISTED_ERRORS]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        got = f" (got {err.get('input')!r:.60})" if with_input else ""
        path = prefix + loc if loc else empty
        head = "" if path is None else f"{path}: "
        lines.append(f"{head}{plain_message(err.get('msg', 'invalid'))}{got}")
    if len(errors) > MAX_LISTED_ERRORS:
        lines.append(f"and {len(errors) - MAX_LISTED_ERRORS} more")
    return "; ".join(lines)


def plain_index(index: Mapping[Any, Any]) -> dict[str, int]:
    """An MDA event's ``index`` with plain ``str`` keys and ``int`` values: the keys of a
    sequence's events are useq ``Axis`` members, which logs print as ``<Axis.TIME: 't'>``."""
    return {str(key): int(value) for key, value in index.items()}


#: Most levels of JSON objects and arrays one request argument may nest: its value is echoed
#: in events (``acquisition_started`` carries the sequence), whose encoders stop at about 255
#: levels (orjson) and 254 (pydantic's dump): a sequence 254-493 levels deep made ``start``
#: fail with ``internal``, one 252 levels deep an ``acquisition_started`` never sent.
MAX_NESTING = 200


def nesting_depth(value: Any, stop_at: int) -> int:
    """How many objects/arrays (dicts, lists, tuples) nest in ``value`` (a scalar: 0,
    ``[1]``: 1, ``{"a": [1]}``: 2), counted up to ``stop_at``; one level at a time, at C
    speed, with no recursion (any depth; 0.1 s for 100,000 stage positions)."""
    depth = 0
    level: list[Any] = [value]
    while depth < stop_at:
        kinds = set(map(type, level))
        parts: list[Iterable[Any]] = []
        for kind in (dict, list, tuple):
            if any(issubclass(k, kind) for k in kinds):
                found: Iterable[Any] = compress(level, map(isinstance, level, repeat(kind)))
                parts.append(chain.from_iterable(
                    map(dict.values, found) if kind is dict else found))
        if not parts:
            break
        depth += 1
        level = list(chain.from_iterable(parts))
    return depth


def nested_too_deeply(args: Mapping[str, Any], where: str = "args") -> str | None:
    """An error line naming the first argument in ``args`` that nests more than
    :data:`MAX_NESTING` levels deep, or None."""
    for key, value in args.items():
        if nesting_depth(value, MAX_NESTING + 1) > MAX_NESTING:
            return (f"{where}.{key} nests objects and arrays more than {MAX_NESTING} levels "
                    f"deep; give it at most {MAX_NESTING} levels")
    return None


def _shorten(message: str) -> str:
    """``message`` cut to :data:`MAX_ERROR_MESSAGE_CHARS`, saying how much was left out."""
    if len(message) <= MAX_ERROR_MESSAGE_CHARS:
        return message
    left_out = len(message) - MAX_ERROR_MESSAGE_CHARS
    return f"{message[:MAX_ERROR_MESSAGE_CHARS]}... ({left_out} more characters)"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: valid JSON, but no number a float can hold
        raise ValueError(f"the number {text[:40]} is out of range (at most about 1.8e308)")
    return value


class RepeatedKeyError(ValueError):
    """A JSON object names the same key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: the object as a dict; raises :class:`RepeatedKeyError` for a
    repeated key (Python keeps the last, other parsers the first: which one counts is
    undefined)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise RepeatedKeyError(key)
            seen.add(key)
    return obj


def _loads(raw: bytes | bytearray | memoryview) -> Any:
    """Strict JSON: no NaN/Infinity, no number beyond a float's range, no key repeated in an
    object; depth and integer size limited by Python's parser."""
    return json.loads(bytes(raw).decode("utf-8"), parse_constant=_no_constant,
                      parse_float=_finite_float, object_pairs_hook=_unique_keys)


def _loads_object(raw: bytes | bytearray | memoryview, what: str) -> dict[str, Any]:
    try:
        obj = _loads(raw)
    except UnicodeDecodeError as exc:
        raise CommandError(BAD_JSON, f"{what} is not UTF-8: {exc}") from exc
    except RecursionError as exc:
        raise CommandError(BAD_JSON, f"{what} nests too deeply to parse") from exc
    except RepeatedKeyError as exc:
        raise CommandError(
            BAD_JSON,
            f"{what} repeats the key {_quote(exc.args[0])} in one object; send each key once",
        ) from exc
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers over 4300 digits
        raise CommandError(BAD_JSON, f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise CommandError(BAD_JSON, f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


#: Fields of a request object.
REQUEST_FIELDS = ("id", "cmd", "args")
#: Most arguments one request's ``args`` may hold (no command takes more than a few): 100,000
#: unknown ones held the event loop for seconds while each was reported.
MAX_ARGS = 64


def _quote(text: str, limit: int = 40) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters (lone surrogates escaped)."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _encodable(text: str) -> bool:
    """Whether ``text`` can be sent as UTF-8 (a lone surrogate, ``"\\ud800"``, cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_request(raw: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The JSON object of one control request, parsed once; raises :class:`CommandError`
    with code :data:`BAD_JSON` (not UTF-8 JSON, not an object, a repeated key)."""
    return _loads_object(raw, "request")


def request_id(obj: Mapping[str, Any]) -> str | int | None:
    """The ``id`` of a parsed request that a reply can echo (None for any other)."""
    rid = obj.get("id")
    if isinstance(rid, str) and _encodable(rid):
        return rid
    if isinstance(rid, int) and not isinstance(rid, bool) and fits_64_bits(rid):
        return rid
    return None


def _check_id(rid: Any) -> None:
    if isinstance(rid, int) and not isinstance(rid, bool) and not fits_64_bits(rid):
        raise CommandError(
            BAD_REQUEST,
            f"id: {rid} does not fit 64 bits; use a string or a whole number from -2**63 to "
            "2**63 - 1",
        )
    if isinstance(rid, str) and not _encodable(rid):
        raise CommandError(
            BAD_REQUEST,
            f"id: {_quote(rid)} holds a lone UTF-16 surrogate, which no reply can carry; use "
            "a string of whole characters or a number",
        )


def _check_size(obj: Mapping[str, Any]) -> None:
    """Refuse unknown fields and oversized ``args`` before pydantic lists each of them."""
    extra = [key for key in obj if key not in REQUEST_FIELDS]
    if extra:
        names = ", ".join(_quote(k) for k in extra[:MAX_LISTED_ERRORS])
        left = len(extra) - MAX_LISTED_ERRORS
        more = f" and {left} more" if left > 0 else ""
        raise CommandError(
            BAD_REQUEST,
            f"{extra[0]}: not a request field ({names}{more}); a request has only "
            '"id", "cmd" and "args"',
        )
    args = obj.get("args")
    if isinstance(args, dict) and len(args) > MAX_ARGS:
        raise CommandError(
            BAD_REQUEST,
            f"args: {len(args)} arguments; a command takes at most {MAX_ARGS} (see "
            "docs/protocol.md, Commands)",
        )


def validate_request(obj: Mapping[str, Any]) -> ControlRequest:
    """Validate a parsed request (:func:`load_request`).

    Raises :class:`CommandError` with code :data:`BAD_REQUEST`: wrong or unknown fields,
    more than :data:`MAX_ARGS` arguments, or an ``id`` no reply could echo (an integer
    beyond 64 bits, a string with a lone surrogate); the message names them.
    """
    _check_id(obj.get("id"))
    _check_size(obj)
    try:
        return ControlRequest.model_validate(obj)
    except ValidationError as exc:
        raise CommandError(
            BAD_REQUEST,
            f'{format_validation_error(exc)} (expected {{"id", "cmd", "args"}})',
        ) from exc


def parse_request(raw: bytes | bytearray | memoryview) -> ControlRequest:
    """Parse and validate one control request (:func:`load_request`, then
    :func:`validate_request`); raises :class:`CommandError` (``bad_json`` or
    ``bad_request``)."""
    return validate_request(load_request(raw))


def peek_request_id(raw: bytes | bytearray | memoryview) -> str | int | None:
    """Best-effort ``id`` of a request that may be invalid (for its error reply)."""
    try:
        obj = _loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return request_id(obj) if isinstance(obj, dict) else None


def encode_request(id: str | int, cmd: str, args: Mapping[str, Any]) -> bytes:
    """A control request as UTF-8 JSON bytes. Raises ``ValueError`` naming an argument that
    is not a finite number: :func:`dumps_json` would send NaN or infinity as ``null``, which
    the service reads as "not given" (a stage position NaN would image where the stage is)."""
    where = _non_finite("args", args)
    if where is not None:
        raise ValueError(
            f"{cmd}: {where} is not a finite number (NaN or infinite); JSON cannot carry it, "
            "give a number or leave the argument out")
    return dumps_json({"id": id, "cmd": cmd, "args": args})


def _non_finite(where: str, value: Any) -> str | None:
    """The path of the first non-finite float inside ``value``, or None."""
    if isinstance(value, float | np.floating):
        return None if math.isfinite(value) else where
    if isinstance(value, np.ndarray):
        return where if value.dtype.kind in "fc" and not np.isfinite(value).all() else None
    if isinstance(value, Mapping):
        items: Any = ((f"{where}.{k}", v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for path, item in items:
        if (found := _non_finite(path, item)) is not None:
            return found
    return None


def ok_reply(id: str | int | None, result: Any) -> bytes:
    """``{"id", "ok": true, "result"}`` as UTF-8 JSON bytes; raises :class:`ProtocolError`
    when ``result`` cannot be encoded (e.g. an integer beyond 64 bits)."""
    return dumps_json({"id": id, "ok": True, "result": result})


def error_reply(id: str | int | None, code: str, message: str) -> bytes:
    """``{"id", "ok": false, "error": {"code", "message"}}`` as UTF-8 JSON bytes; never
    raises: a message that cannot be encoded (e.g. it quotes a key with a lone surrogate)
    has such characters escaped (``\\ud800``), an ``id`` that cannot be is sent as null; a
    message longer than :data:`MAX_ERROR_MESSAGE_CHARS` is cut, saying how much was left out."""
    message = _shorten(message)
    reply = {"id": id, "ok": False, "error": {"code": code, "message": message}}
    try:
        return dumps_json(reply)
    except ProtocolError:
        pass
    escaped = message.encode("utf-8", "backslashreplace").decode("utf-8")
    reply["error"] = {"code": code, "message": escaped}
    try:
        return dumps_json(reply)
    except ProtocolError:
        return dumps_json({**reply, "id": None})


def parse_reply(raw: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse and check the shape of a control reply; raises :class:`ProtocolError`."""
    try:
        obj = _loads_object(raw, "reply")
    except CommandError as exc:
        raise ProtocolError(exc.message) from exc
    if not isinstance(obj.get("ok"), bool):
        raise ProtocolError(f"reply has no boolean 'ok': {obj!r:.200}")
    if not obj["ok"]:
        err = obj.get("error")
        if not (
            isinstance(err, dict)
            and isinstance(err.get("code"), str)
            and isinstance(err.get("message"), str)
        ):
            raise ProtocolError(f"error reply has no error.code/error.message: {obj!r:.200}")
    return obj
