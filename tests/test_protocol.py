"""Tests of the wire format (livemask.protocol): pure, no sockets."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import BaseModel, ConfigDict, ValidationError

from livemask import protocol
from livemask.errors import CommandError, ProtocolError
from livemask.protocol import (
    PROTOCOL_VERSION,
    TOPICS,
    ControlRequest,
    Message,
    decode,
    encode,
    error_reply,
    ok_reply,
    parse_reply,
    parse_request,
)


def roundtrip(
    topic: str, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None
) -> Message:
    """encode, copy every part to bytes as a socket would, decode."""
    return decode([bytes(p) for p in encode(topic, header, arrays)])


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        ("<u2", (512, 512)),
        ("<i4", (64, 48)),
        ("|u1", (3, 4, 5)),
        ("<f4", (7,)),
        ("<f8", ()),
        (">u2", (5, 3)),
        ("|b1", (2, 2)),
        ("<c8", (3,)),
        ("<u2", (0,)),
        ("<i4", (0, 16)),
    ],
)
def test_array_roundtrip(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.random(shape) * 1000).astype(dtype)
    msg = roundtrip("frame", {"frame_id": 1}, {"image": arr})
    out = msg.arrays["image"]
    assert out.dtype == np.dtype(dtype)
    assert out.shape == shape
    assert out.tobytes() == arr.tobytes()
    assert msg.header["arrays"] == [
        {"name": "image", "dtype": np.dtype(dtype).str, "shape": list(shape)}
    ]


def test_frame_and_labels_roundtrip_in_one_message() -> None:
    image = np.arange(12, dtype=np.uint16).reshape(3, 4)
    labels = np.array([[0, 1, 1, 0], [0, 2, 2, 0], [0, 0, 0, 3]], dtype=np.int32)
    msg = roundtrip("labels", {"frame_id": 7}, {"image": image, "labels": labels})
    assert list(msg.arrays) == ["image", "labels"]
    np.testing.assert_array_equal(msg.arrays["image"], image)
    np.testing.assert_array_equal(msg.arrays["labels"], labels)
    assert msg.arrays["labels"].dtype == np.dtype("<i4")


def test_header_fields_written_and_kept() -> None:
    header = {
        "frame_id": 3,
        "seq": 12,
        "t": {"acquired": 1.5, "inferred": 1.6},
        "index": {"t": 3, "p": 0},
        "position": None,
        "v": 99,  # overwritten
        "topic": "nonsense",  # overwritten
    }
    msg = roundtrip("measurements", header)
    assert msg.topic == "measurements"
    assert msg.header["v"] == PROTOCOL_VERSION
    assert msg.header["topic"] == "measurements"
    assert msg.header["arrays"] == []
    assert msg.header["frame_id"] == 3
    assert msg.header["seq"] == 12
    assert msg.header["t"] == {"acquired": 1.5, "inferred": 1.6}
    assert msg.header["index"] == {"t": 3, "p": 0}
    assert msg.header["position"] is None
    assert msg.arrays == {}
    assert header["v"] == 99  # the caller's header is not modified


def test_encode_layout_and_zero_copy() -> None:
    arr = np.arange(6, dtype=np.uint16).reshape(2, 3)
    parts = encode("frame", {}, {"image": arr})
    assert parts[0] == b"frame"
    assert isinstance(parts[1], bytes)
    assert json.loads(parts[1])["topic"] == "frame"
    buf = parts[2]
    assert isinstance(buf, memoryview)
    assert np.shares_memory(np.frombuffer(buf, dtype=np.uint16), arr)


def test_non_contiguous_arrays_are_made_contiguous() -> None:
    base = np.arange(40, dtype=np.int32).reshape(5, 8)
    for arr in (base[:, ::2], base.T, np.asfortranarray(base)):
        msg = roundtrip("labels", {}, {"labels": arr})
        np.testing.assert_array_equal(msg.arrays["labels"], arr)


def test_numpy_values_in_header_become_json() -> None:
    header = {
        "count": np.int64(5),
        "mean": np.float32(2.5),
        "flag": np.bool_(True),
        "centroid": np.array([1.5, 2.0]),
        "objects": [{"label": np.int32(1), "area": np.uint16(20)}],
        "tuple": (1, 2),
        "by_label": {np.int64(3): 1.0},
    }
    msg = roundtrip("measurements", header)
    assert msg.header["count"] == 5
    assert msg.header["mean"] == 2.5
    assert msg.header["flag"] is True
    assert msg.header["centroid"] == [1.5, 2.0]
    assert msg.header["objects"] == [{"label": 1, "area": 20}]
    assert msg.header["tuple"] == [1, 2]
    assert msg.header["by_label"] == {"3": 1.0}


def test_non_finite_floats_become_null() -> None:
    header = {
        "nan": float("nan"),
        "inf": np.float64("inf"),
        "nested": [{"ecc": np.float32("nan")}, -float("inf"), 1.0],
        "arr": np.array([1.0, np.nan]),
    }
    parts = encode("measurements", header)
    text = bytes(parts[1]).decode()
    assert "NaN" not in text and "Infinity" not in text
    msg = decode(parts)
    assert msg.header["nan"] is None
    assert msg.header["inf"] is None
    assert msg.header["nested"] == [{"ecc": None}, None, 1.0]
    assert msg.header["arr"] == [1.0, None]


def test_decode_accepts_memoryviews_and_frame_like_objects() -> None:
    class FakeFrame:  # what zmq.Frame offers with recv_multipart(copy=False)
        def __init__(self, data: bytes) -> None:
            self.buffer = memoryview(data)
            self.bytes = data

    arr = np.arange(10, dtype=np.uint16)
    parts = [bytes(p) for p in encode("frame", {"frame_id": 0}, {"image": arr})]
    for converted in ([memoryview(p) for p in parts], [FakeFrame(p) for p in parts]):
        msg = decode(converted)
        np.testing.assert_array_equal(msg.arrays["image"], arr)


def test_decode_accepts_unknown_topics_for_forward_compatibility() -> None:
    parts = encode("status", {})
    header = json.loads(bytes(parts[1]))
    header["topic"] = "future_topic"
    msg = decode([b"future_topic", json.dumps(header).encode()])
    assert msg == Message("future_topic", header, {})


# ------------------------------------------------------------------ encode errors


def test_encode_rejects_unknown_topic() -> None:
    with pytest.raises(ProtocolError, match="unknown topic 'frames'"):
        encode("frames", {})


def test_encode_rejects_object_and_structured_arrays() -> None:
    with pytest.raises(ProtocolError, match=r"'bad'.*dtype"):
        encode("frame", {}, {"bad": np.array([object()], dtype=object)})
    with pytest.raises(ProtocolError, match="dtype"):
        encode("frame", {}, {"rec": np.zeros(2, dtype=[("a", "<i4"), ("b", "<f4")])})


def test_encode_rejects_unserialisable_header() -> None:
    with pytest.raises(ProtocolError, match="JSON"):
        encode("event", {"detail": object()})


# ------------------------------------------------------------------ decode errors


def good_parts() -> list[bytes]:
    return [bytes(p) for p in encode("frame", {"frame_id": 1}, {"image": np.zeros((2, 3), "<u2")})]


def with_header(**changes: Any) -> list[bytes]:
    parts = good_parts()
    header = json.loads(parts[1])
    for key, value in changes.items():
        if value is ...:
            del header[key]
        else:
            header[key] = value
    parts[1] = json.dumps(header).encode()
    return parts


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ([b"frame"], "at least 2 parts"),
        ([], "at least 2 parts"),
        ([b"fr\xffame", b"{}"], "not ASCII"),
        ([b"frame", b"\xff\xfe"], "not UTF-8"),
        ([b"frame", b"{not json"], "not JSON"),
        ([b"frame", b"[1, 2]"], "must be a JSON object"),
        (with_header(v=...), "no protocol version"),
        (with_header(v=2), "unsupported protocol version v=2"),
        (with_header(v=True), "unsupported protocol version"),
        (with_header(topic="labels"), "does not match header topic 'labels'"),
        (with_header(arrays={"name": "image"}), "header.arrays must be a list"),
        (good_parts()[:2], "describes 1 array.*0 buffer"),
        ([*good_parts(), b"extra"], "describes 1 array.*2 buffer"),
        ([*good_parts()[:2], b"\x00" * 11], r"needs 12 bytes, its buffer has 11"),
        (with_header(arrays=["image"]), r"header.arrays\[0\] must be an object"),
        (with_header(arrays=[{"name": "image", "shape": [2, 3]}]), "missing dtype"),
        (with_header(arrays=[{"name": "", "dtype": "<u2", "shape": [2, 3]}]), "name must be"),
        (with_header(arrays=[{"name": "i", "dtype": "nope", "shape": [2, 3]}]), "not a numpy"),
        (with_header(arrays=[{"name": "i", "dtype": "|O", "shape": [2, 3]}]), "dtype"),
        (with_header(arrays=[{"name": "i", "dtype": "<u2", "shape": [-2, 3]}]), "non-negative"),
        (with_header(arrays=[{"name": "i", "dtype": "<u2", "shape": "2x3"}]), "non-negative"),
    ],
)
def test_decode_rejects_malformed_messages(parts: list[bytes], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(parts)


def test_decode_rejects_duplicate_array_names() -> None:
    desc = {"name": "image", "dtype": "|u1", "shape": [1]}
    parts = with_header(arrays=[desc, desc])
    with pytest.raises(ProtocolError, match="duplicate array name 'image'"):
        decode([parts[0], parts[1], b"\x00", b"\x01"])


def test_protocol_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        decode([b"frame"])


# ------------------------------------------------------------------ property test

_DTYPES = st.sampled_from(["<u2", "<i4", "|u1", "<f4", "<f8", ">i2", "|b1", "<i8"])
_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def arrays_dicts(draw: st.DrawFn) -> dict[str, np.ndarray]:
    names = draw(st.lists(st.text("abcdefgh_", min_size=1, max_size=6), max_size=3, unique=True))
    out = {}
    for name in names:
        dtype = draw(_DTYPES)
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
        out[name] = draw(hnp.arrays(dtype, shape))
    return out


@settings(max_examples=150, deadline=None)
@given(
    topic=st.sampled_from(TOPICS),
    header=st.dictionaries(
        st.text(max_size=10).filter(lambda k: k not in ("v", "topic", "arrays")),
        _JSON,
        max_size=6,
    ),
    arrays=arrays_dicts(),
)
def test_encode_decode_roundtrip_property(
    topic: str, header: dict[str, Any], arrays: dict[str, np.ndarray]
) -> None:
    msg = roundtrip(topic, header, arrays)
    assert msg.topic == topic
    assert {k: v for k, v in msg.header.items() if k not in ("v", "topic", "arrays")} == header
    assert list(msg.arrays) == list(arrays)
    for name, arr in arrays.items():
        out = msg.arrays[name]
        assert out.dtype == arr.dtype
        assert out.shape == arr.shape
        assert out.tobytes() == arr.tobytes()


# ------------------------------------------------------------------ control messages


def test_parse_request_ok() -> None:
    req = parse_request(b'{"id": 3, "cmd": "set", "args": {"exposure_ms": 20}}')
    assert req == ControlRequest(id=3, cmd="set", args={"exposure_ms": 20})
    req = parse_request(b'{"cmd": "status"}')
    assert req.id is None and req.args == {}
    assert parse_request(b'{"id": "abc", "cmd": "stop"}').id == "abc"


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"\xff\xfe", b"[1, 2]", b'"status"', b"", b"null",
     # nesting past Python's recursion limit, an integer past its 4300-digit limit, and the
     # NaN / Infinity that Python's json accepts although JSON has no such numbers
     b'{"cmd": "status", "args": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
     b'{"id": ' + b"1" * 5000 + b', "cmd": "status"}',
     b'{"cmd": "set", "args": {"exposure_ms": NaN}}',
     b'{"cmd": "enqueue", "args": {"events": [{"x_pos": -Infinity}]}}',
     # valid JSON numbers no float holds: before, inf reached the command ("must be <= 60000")
     b'{"cmd": "set", "args": {"exposure_ms": 1e400}}',
     b'{"cmd": "set", "args": {"exposure_ms": -2.5E+999}}'],
)
def test_parse_request_bad_json(raw: bytes) -> None:
    with pytest.raises(CommandError) as info:
        parse_request(raw)
    assert info.value.code == protocol.BAD_JSON
    if b"e+999" in raw.lower() or b"1e400" in raw:
        assert "is out of range" in info.value.message


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"id": 1}', "cmd"),
        (b'{"id": 1, "cmd": 5}', "cmd"),
        (b'{"id": 1, "cmd": ""}', "cmd"),
        (b'{"id": 1, "cmd": "set", "args": [1]}', "args"),
        (b'{"id": 1.5, "cmd": "set"}', "id"),
        (b'{"id": true, "cmd": "set"}', "id"),
        (b'{"id": 1, "cmd": "set", "arg": {}}', "arg"),
        # no reply could echo it: before, the error reply itself raised and none was sent
        (b'{"id": 18446744073709551616, "cmd": "status"}', "id: 18446744073709551616 does"),
        (b'{"id": -9223372036854775809, "cmd": "x", "bogus": 1}', "id: -92233720368"),
    ],
)
def test_parse_request_bad_request_names_field(raw: bytes, field: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_request(raw)
    assert info.value.code == protocol.BAD_REQUEST
    assert info.value.message.startswith(field)


def test_peek_request_id() -> None:
    assert protocol.peek_request_id(b'{"id": 7, "cmd": 5}') == 7
    assert protocol.peek_request_id(b'{"id": "x"}') == "x"
    assert protocol.peek_request_id(b'{"id": true}') is None
    assert protocol.peek_request_id(b"{oops") is None
    assert protocol.peek_request_id(b'{"id": 9223372036854775807}') == 2**63 - 1
    assert protocol.peek_request_id(b'{"id": 9223372036854775808}') is None  # beyond 64 bits


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b'{"id": 1, "cmd": "status", "cmd": "stop"}', "cmd"),
        (b'{"cmd": "set", "args": {"exposure_ms": 10, "exposure_ms": 5000}}', "exposure_ms"),
        (b'{"cmd": "enqueue", "args": {"events": [{"x_pos": 1, "y_pos": 2, "x_pos": 900}]}}',
         "x_pos"),
    ],
)
def test_a_repeated_key_at_any_depth_is_bad_json(raw: bytes, key: str) -> None:
    """Before, the last one won: ``{"cmd": "status", "cmd": "stop"}`` stopped the run."""
    with pytest.raises(CommandError) as info:
        parse_request(raw)
    assert info.value.code == protocol.BAD_JSON
    assert f"repeats the key {key!r}" in info.value.message
    assert protocol.peek_request_id(raw) is None
    with pytest.raises(ProtocolError, match=r"repeats the key 'ok'"):
        parse_reply(b'{"id": 1, "ok": false, "ok": true, "result": 1}')


def test_an_id_with_a_lone_surrogate_is_refused_before_anything_runs() -> None:
    """Valid JSON, but no reply can carry it: before, the command ran, then the reply
    failed (``internal``, id null)."""
    raw = b'{"id": "ab\\ud800", "cmd": "stop"}'
    with pytest.raises(CommandError) as info:
        parse_request(raw)
    assert info.value.code == protocol.BAD_REQUEST
    assert info.value.message.startswith("id: 'ab\\ud800' holds a lone UTF-16 surrogate")
    assert protocol.peek_request_id(raw) is None
    json.loads(error_reply(None, info.value.code, info.value.message))  # the reply encodes
    pair = parse_request(b'{"id": "\\ud83d\\ude00", "cmd": "stop"}')  # a whole emoji
    assert pair.id == "\U0001f600"


def test_many_unknown_fields_or_arguments_get_one_short_bad_request() -> None:
    """800,000 unknown keys held the event loop for seconds while pydantic reported each one,
    in a 33 MB reply."""
    n = 100_000
    keys = b",".join(b'"k%d": 1' % i for i in range(n))
    for raw, start in (
        (b'{"id": 1, "cmd": "status", "args": {' + keys + b"}}", "args: 100000 arguments"),
        (b'{"id": 1, "cmd": "status", ' + keys + b"}", "k0: not a request field"),
    ):
        with pytest.raises(CommandError) as info:
            parse_request(raw)
        assert info.value.code == protocol.BAD_REQUEST
        assert info.value.message.startswith(start)
        assert len(info.value.message) < 300
    assert "and 99990 more" in info.value.message
    args = {f"a{i}": i for i in range(protocol.MAX_ARGS)}
    assert parse_request(protocol.encode_request(1, "x", args)).args == args


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def test_a_validation_error_lists_ten_problems_and_counts_the_rest() -> None:
    with pytest.raises(ValidationError) as info:
        _Strict.model_validate({f"k{i}": 1 for i in range(5000)})
    text = protocol.format_validation_error(info.value)
    assert text.startswith("k0: Extra inputs are not permitted; k1: ")
    assert text.count("Extra inputs") == protocol.MAX_LISTED_ERRORS
    assert text.endswith("; and 4990 more")


def test_an_error_reply_cuts_a_long_message() -> None:
    err = json.loads(error_reply(3, protocol.INVALID_ARGS, "x" * 10_000))
    message = err["error"]["message"]
    assert message == "x" * protocol.MAX_ERROR_MESSAGE_CHARS + "... (8000 more characters)"
    assert json.loads(error_reply(3, "internal", "short"))["error"]["message"] == "short"


def test_an_error_reply_is_always_encodable() -> None:
    """Before, an id beyond 64 bits made error_reply raise: no reply at all."""
    err = json.loads(error_reply(2**64, protocol.BAD_REQUEST, "id: too large"))
    assert err["id"] is None and err["error"]["code"] == "bad_request"


def test_replies() -> None:
    ok = json.loads(ok_reply(4, {"count": np.int64(3), "mean": np.float32(float("nan"))}))
    assert ok == {"id": 4, "ok": True, "result": {"count": 3, "mean": None}}
    err = json.loads(error_reply("a", protocol.INVALID_STATE, "already running"))
    assert err == {
        "id": "a",
        "ok": False,
        "error": {"code": "invalid_state", "message": "already running"},
    }
    assert parse_reply(ok_reply(1, None))["ok"] is True
    assert parse_reply(error_reply(1, "internal", "boom"))["error"]["code"] == "internal"


def test_error_codes_in_one_place() -> None:
    assert protocol.ERROR_CODES == (
        "bad_json",
        "bad_request",
        "unknown_command",
        "invalid_args",
        "invalid_state",
        "internal",
    )


@pytest.mark.parametrize(
    "raw",
    [b"nope", b"[]", b'{"id": 1}', b'{"id": 1, "ok": false}', b'{"ok": false, "error": {}}'],
)
def test_parse_reply_rejects_malformed(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_reply(raw)
