"""The WebSocket protocol core: decoding, request validation, connection state, frame bytes."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from herald.errors import CloseCode, Forbidden, HeraldError, ProtocolError, Unauthorized
from herald.protocol import (
    Connect,
    ConnectionState,
    Encoding,
    Ping,
    Publish,
    Reply,
    Request,
    Subscribe,
    Unsubscribe,
    decode,
    encode,
    error_frame,
    parse_request,
    ws_frame,
)


def packed(value: object) -> bytes:
    """``value`` as a msgpack binary message, the way clients send it."""
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def parse_ws_frame(data: bytes) -> Frame:
    """Parse server frame bytes with websockets' own parser, requiring nothing left over."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    with pytest.raises(StopIteration) as done:
        next(parser)
    frame = done.value.value
    assert isinstance(frame, Frame)
    assert reader.at_eof()
    return frame


# decode / encode


def test_decode_json_text_frame() -> None:
    assert decode('{"op": "ping", "id": 7}', Encoding.JSON) == {"op": "ping", "id": 7}


def test_decode_msgpack_binary_frame() -> None:
    frame = {"op": "publish", "id": "a", "payload": b"\x00\xff"}
    assert decode(packed(frame), Encoding.MSGPACK) == frame


def test_decode_binary_frame_on_json_connection_is_protocol_error() -> None:
    with pytest.raises(ProtocolError) as error:
        decode(b'{"op": "ping"}', Encoding.JSON)
    assert error.value.detail == "herald.json expects text frames"
    assert error.value.code == "bad_frame"
    assert error.value.status == 400


def test_decode_text_frame_on_msgpack_connection_is_protocol_error() -> None:
    with pytest.raises(ProtocolError) as error:
        decode('{"op": "ping"}', Encoding.MSGPACK)
    assert error.value.detail == "herald.msgpack expects binary frames"


@pytest.mark.parametrize("text", ["[1, 2]", "1", '"op"', "null", "true"])
def test_decode_json_non_object_is_protocol_error(text: str) -> None:
    with pytest.raises(ProtocolError) as error:
        decode(text, Encoding.JSON)
    assert error.value.detail == "a frame must be an object"


@pytest.mark.parametrize("value", [[1, 2], 1, "op", None, b"bytes"])
def test_decode_msgpack_non_object_is_protocol_error(value: object) -> None:
    with pytest.raises(ProtocolError) as error:
        decode(packed(value), Encoding.MSGPACK)
    assert error.value.detail == "a frame must be an object"


@pytest.mark.parametrize("text", ["", "{", '{"op": }', "{'op': 'ping'}", '{"op": "ping"} x'])
def test_decode_json_garbage_is_protocol_error(text: str) -> None:
    with pytest.raises(ProtocolError) as error:
        decode(text, Encoding.JSON)
    assert error.value.detail.startswith("JSON parse error")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # the one byte msgpack never uses
        packed({"op": "ping"})[:-1],
        packed({"op": "ping"}) + b"\x00",
        packed({1: "integer keys"}),
    ],
    ids=["empty", "never-used-byte", "truncated", "trailing-data", "int-key"],
)
def test_decode_msgpack_garbage_is_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError) as error:
        decode(data, Encoding.MSGPACK)
    assert error.value.detail.startswith("MessagePack parse error")


def test_encode_json_is_compact_utf8() -> None:
    assert encode({"op": "pong", "id": 1, "text": "é"}, Encoding.JSON) == (
        b'{"op":"pong","id":1,"text":"\xc3\xa9"}'
    )


def test_encode_msgpack_keeps_bytes_as_bin() -> None:
    frame = {"op": "message", "payload": b"\x00\x01", "text": "é"}
    data = encode(frame, Encoding.MSGPACK)
    assert data == packed(frame)
    assert msgpack.unpackb(data, raw=False) == frame


@pytest.mark.parametrize("encoding", list(Encoding), ids=lambda e: e.name.lower())
def test_encode_then_decode_round_trips(encoding: Encoding) -> None:
    frame = {"op": "message", "id": "1-0", "payload": {"n": [1, 2.5, None, True]}}
    data = encode(frame, encoding)
    assert decode(data.decode() if encoding is Encoding.JSON else data, encoding) == frame


# parse_request: valid frames


def test_parse_subscribe_minimal() -> None:
    request = parse_request({"op": "subscribe", "id": "s1", "channel": "news"})
    assert request == Subscribe("s1", "news", None, None, None, False)


def test_parse_subscribe_every_field() -> None:
    request = parse_request(
        {
            "op": "subscribe",
            "id": 2,
            "channel": "chat.rooms:1",
            "room": "lobby",
            "since": "1700000000000-3",
            "subscriber_key": "sk",
            "persist": True,
            "epoch": "e1",
        }
    )
    assert request == Subscribe(2, "chat.rooms:1", "lobby", "1700000000000-3", "sk", True, "e1")


def test_parse_empty_room_means_no_room() -> None:
    request = parse_request({"op": "unsubscribe", "id": 1, "channel": "news", "room": ""})
    assert request == Unsubscribe(1, "news", None)


def test_parse_unsubscribe() -> None:
    request = parse_request({"op": "unsubscribe", "id": 3, "channel": "news", "room": "r"})
    assert request == Unsubscribe(3, "news", "r")


def test_parse_publish() -> None:
    request = parse_request(
        {
            "op": "publish",
            "id": 4,
            "channel": "news",
            "payload": {"text": "hi"},
            "metadata": {"k": "v"},
        }
    )
    assert request == Publish(4, "news", None, {"text": "hi"}, {"k": "v"})


def test_parse_publish_accepts_null_payload() -> None:
    request = parse_request({"op": "publish", "id": 4, "channel": "news", "payload": None})
    assert request == Publish(4, "news", None, None, None)


def test_parse_ping_with_and_without_id() -> None:
    assert parse_request({"op": "ping", "id": "p"}) == Ping("p")
    assert parse_request({"op": "ping"}) == Ping(None)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("key", Connect(1, "secret", None, None, "cli/1")),
        ("token", Connect(1, None, "secret", None, "cli/1")),
        ("connection_key", Connect(1, None, None, "secret", "cli/1")),
    ],
)
def test_parse_connect_with_one_credential(field: str, expected: Connect) -> None:
    frame = {"op": "connect", "id": 1, field: "secret", "client": "cli/1"}
    assert parse_request(frame) == expected


def test_parse_connect_without_id() -> None:
    assert parse_request({"op": "connect", "key": "k"}) == Connect(None, "k", None, None, None)


def test_parse_reply() -> None:
    assert parse_request({"op": "reply", "command_id": "c1", "payload": [1]}) == Reply("c1", [1])
    assert parse_request({"op": "reply", "command_id": "c1"}) == Reply("c1", None)


@pytest.mark.parametrize("value", ["x" * 64, -(2**53) + 1, 2**53 - 1, 0, ""])
def test_parse_accepts_ids_at_the_limits(value: object) -> None:
    assert parse_request({"op": "ping", "id": value}) == Ping(value)


# parse_request: invalid frames


@pytest.mark.parametrize(
    ("frame", "path"),
    [
        ({"channel": "news"}, "op"),
        ({"op": "nope", "id": 1}, "op"),
        ({"op": "subscribe", "channel": "news"}, "id"),
        ({"op": "unsubscribe", "channel": "news"}, "id"),
        ({"op": "publish", "channel": "news", "payload": 1}, "id"),
        ({"op": "subscribe", "id": True, "channel": "news"}, "id"),
        ({"op": "subscribe", "id": 1.5, "channel": "news"}, "id"),
        ({"op": "subscribe", "id": ["a"], "channel": "news"}, "id"),
        ({"op": "subscribe", "id": "x" * 65, "channel": "news"}, "id"),
        ({"op": "subscribe", "id": 2**53, "channel": "news"}, "id"),
        ({"op": "subscribe", "id": -(2**53), "channel": "news"}, "id"),
        ({"op": "ping", "id": False}, "id"),
        ({"op": "subscribe", "id": 1}, "channel"),
        ({"op": "subscribe", "id": 1, "channel": ""}, "channel"),
        ({"op": "subscribe", "id": 1, "channel": "a b"}, "channel"),
        ({"op": "subscribe", "id": 1, "channel": "a/b"}, "channel"),
        ({"op": "subscribe", "id": 1, "channel": "x" * 129}, "channel"),
        ({"op": "subscribe", "id": 1, "channel": 5}, "channel"),
        ({"op": "unsubscribe", "id": 1, "channel": "news", "room": "r 1"}, "room"),
        ({"op": "publish", "id": 1, "channel": "news", "room": 7, "payload": 1}, "room"),
        ({"op": "subscribe", "id": 1, "channel": "news", "room": "x" * 129}, "room"),
        ({"op": "subscribe", "id": 1, "channel": "news", "since": "yesterday"}, "since"),
        ({"op": "subscribe", "id": 1, "channel": "news", "since": "1-"}, "since"),
        ({"op": "subscribe", "id": 1, "channel": "news", "since": 17}, "since"),
        ({"op": "subscribe", "id": 1, "channel": "news", "persist": "yes"}, "persist"),
        ({"op": "subscribe", "id": 1, "channel": "news", "subscriber_key": ""}, "subscriber_key"),
        ({"op": "subscribe", "id": 1, "channel": "news", "epoch": 5}, "epoch"),
        ({"op": "publish", "id": 1, "channel": "news"}, "payload"),
        ({"op": "publish", "id": 1, "channel": "news", "payload": 1, "metadata": []}, "metadata"),
        ({"op": "connect", "id": 1, "key": "k", "client": ""}, "client"),
        ({"op": "reply", "payload": 1}, "command_id"),
        ({"op": "reply", "command_id": 9}, "command_id"),
    ],
)
def test_parse_invalid_field_names_its_path(frame: dict[str, Any], path: str) -> None:
    with pytest.raises(ProtocolError) as error:
        parse_request(frame)
    assert error.value.path == path


def test_parse_unknown_op_says_which() -> None:
    with pytest.raises(ProtocolError) as error:
        parse_request({"op": "nope", "id": 1})
    assert error.value.detail == "unknown op 'nope'"


def test_parse_bad_channel_detail_is_the_name_rule() -> None:
    with pytest.raises(ProtocolError) as error:
        parse_request({"op": "subscribe", "id": 1, "channel": "a b"})
    assert error.value.detail == (
        "channel must be 1-128 characters of A-Z, a-z, 0-9, '_', '.', ':', '-'"
    )


@pytest.mark.parametrize(
    "credentials",
    [{}, {"key": "k", "token": "t"}, {"token": "t", "connection_key": "c"}],
    ids=["none", "key-and-token", "token-and-connection-key"],
)
def test_parse_connect_needs_exactly_one_credential(credentials: dict[str, str]) -> None:
    with pytest.raises(Unauthorized) as error:
        parse_request({"op": "connect", "id": 1, **credentials})
    assert error.value.detail == "connect needs exactly one of key, token, connection_key"
    assert error.value.close_code is CloseCode.UNAUTHORIZED


@pytest.mark.parametrize(
    ("credentials", "path"),
    [({"key": ""}, "key"), ({"token": 5}, "token"), ({"connection_key": ["c"]}, "connection_key")],
)
def test_parse_connect_malformed_credential_is_unauthorized(
    credentials: dict[str, object], path: str
) -> None:
    # A wrong credential closes 4001 at once; it must not count as a bad frame instead.
    with pytest.raises(Unauthorized) as error:
        parse_request({"op": "connect", "id": 1, **credentials})
    assert error.value.path == path
    assert error.value.detail == f"{path} must be a non-empty string"


# ConnectionState


def connected_state(encoding: Encoding = Encoding.JSON) -> ConnectionState:
    """A state past its ``connect``, as the transport leaves it once credentials check out."""
    state = ConnectionState(encoding)
    assert isinstance(state.receive('{"op": "connect", "id": 0, "key": "k"}'), Connect)
    state.authenticated = True
    return state


def test_state_accepts_connect_first() -> None:
    state = ConnectionState(Encoding.MSGPACK)
    request = state.receive(packed({"op": "connect", "id": 1, "token": "jwt"}))
    assert request == Connect(1, None, "jwt", None, None)


def test_state_requires_connect_first_and_closes_4001() -> None:
    state = ConnectionState(Encoding.JSON)
    with pytest.raises(Unauthorized) as error:
        state.receive('{"op": "subscribe", "id": 1, "channel": "news"}')
    assert error.value.detail == "the first frame must be connect"
    assert state.close_code_for(error.value) is CloseCode.UNAUTHORIZED
    assert state.close_code_for(error.value) == 4001


def test_state_connect_without_credentials_closes_4001() -> None:
    state = ConnectionState(Encoding.JSON)
    with pytest.raises(Unauthorized) as error:
        state.receive('{"op": "connect", "id": 1}')
    assert state.close_code_for(error.value) is CloseCode.UNAUTHORIZED


def test_state_unauthorized_after_connect_does_not_close() -> None:
    state = connected_state()
    assert state.close_code_for(Unauthorized("token expired")) is None
    assert state.close_code_for(Forbidden("not a reader")) is None


def test_state_second_connect_is_protocol_error() -> None:
    state = connected_state()
    with pytest.raises(ProtocolError) as error:
        state.receive('{"op": "connect", "id": 2, "key": "k"}')
    assert error.value.detail == "already connected"
    assert error.value.path == "op"


def test_state_passes_requests_once_connected() -> None:
    state = connected_state()
    request = state.receive('{"op": "subscribe", "id": 5, "channel": "news"}')
    assert request == Subscribe(5, "news", None, None, None, False)


def test_state_third_bad_frame_in_a_row_closes_4000() -> None:
    state = connected_state()
    codes: list[CloseCode | None] = []
    for data in ("not json", '{"op": "nope"}', "[]"):
        with pytest.raises(ProtocolError) as error:
            state.receive(data)
        codes.append(state.close_code_for(error.value))
    assert codes == [None, None, CloseCode.BAD_FRAME]
    assert codes[-1] == 4000


def test_state_good_frame_resets_bad_frame_streak() -> None:
    state = connected_state()
    codes: list[CloseCode | None] = []

    def bad() -> None:
        with pytest.raises(ProtocolError) as error:
            state.receive("{")
        codes.append(state.close_code_for(error.value))

    bad()
    bad()
    assert state.receive('{"op": "ping", "id": 1}') == Ping(1)
    assert state.bad_frames == 0
    bad()
    bad()
    assert codes == [None, None, None, None]
    bad()
    assert codes[-1] is CloseCode.BAD_FRAME


def test_state_max_bad_frames_is_configurable() -> None:
    state = ConnectionState(Encoding.JSON, max_bad_frames=1)
    state.authenticated = True
    with pytest.raises(ProtocolError) as error:
        state.receive("garbage")
    assert state.close_code_for(error.value) is CloseCode.BAD_FRAME


@pytest.mark.parametrize(
    "data", ["garbage", "[]", '{"op": "nope"}', '{"op": "connect", "id": 1.5, "key": "k"}']
)
def test_state_bad_first_frame_closes_4001_at_once(data: str) -> None:
    # The first frame must be a valid connect: a bad one is not, and is not one of three.
    state = ConnectionState(Encoding.JSON)
    with pytest.raises(ProtocolError) as error:
        state.receive(data)
    assert state.close_code_for(error.value) is CloseCode.UNAUTHORIZED


def test_state_remembers_request_id_of_an_invalid_frame() -> None:
    state = connected_state()
    with pytest.raises(ProtocolError) as error:
        state.receive('{"op": "subscribe", "id": "r1", "channel": "bad name"}')
    assert state.request_id == "r1"
    assert error_frame(error.value, state.request_id) == {
        "op": "error",
        "id": "r1",
        "code": "bad_frame",
        "detail": "channel must be 1-128 characters of A-Z, a-z, 0-9, '_', '.', ':', '-'",
        "path": "channel",
    }


def test_state_remembers_request_id_of_a_valid_frame() -> None:
    state = connected_state()
    state.receive('{"op": "ping", "id": 42}')
    assert state.request_id == 42


@pytest.mark.parametrize("data", ['{"op": "ping", "id": true}', '{"op": "ping", "id": 1.5}', "{"])
def test_state_forgets_previous_request_id_when_frame_has_no_usable_one(data: str) -> None:
    state = connected_state()
    state.receive('{"op": "ping", "id": "old"}')
    with pytest.raises(ProtocolError):
        state.receive(data)
    assert state.request_id is None


def test_error_frame_without_id_or_path() -> None:
    assert error_frame(Unauthorized("invalid credentials")) == {
        "op": "error",
        "code": "unauthorized",
        "detail": "invalid credentials",
    }


# ws_frame


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x00"),
        (125, b"\x7d"),
        (126, b"\x7e\x00\x7e"),
        (65535, b"\x7e\xff\xff"),
        (65536, b"\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
@pytest.mark.parametrize(
    ("binary", "first", "opcode"),
    [(False, 0x81, Opcode.TEXT), (True, 0x82, Opcode.BINARY)],
    ids=["text", "binary"],
)
def test_ws_frame_layout(
    length: int, header: bytes, binary: bool, first: int, opcode: Opcode
) -> None:
    # Text frames must be valid UTF-8 for the parser; binary ones may be anything.
    payload = bytes(i % 251 for i in range(length)) if binary else b"a" * length
    data = ws_frame(payload, binary=binary)
    assert data == bytes((first,)) + header + payload
    frame = parse_ws_frame(data)
    assert frame.opcode is opcode
    assert frame.fin is True
    assert frame.data == payload


def test_ws_frame_long_length_is_64_bit_big_endian() -> None:
    data = ws_frame(b"x" * 70000, binary=True)
    assert struct.unpack("!BBQ", data[:10]) == (0x82, 127, 70000)


# Properties

_REQUEST_TYPES = (Connect, Subscribe, Unsubscribe, Publish, Reply, Ping)
_OPS = ("connect", "subscribe", "unsubscribe", "publish", "reply", "ping", "pong", "")
_FIELDS = (
    "op",
    "id",
    "channel",
    "room",
    "since",
    "payload",
    "metadata",
    "persist",
    "subscriber_key",
    "key",
    "token",
    "connection_key",
    "client",
    "command_id",
    "epoch",
)
# Scalars both encoders can carry (64-bit integers, no NaN), biased toward near-valid values.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=140)
    | st.sampled_from(["news", "r1", "0-0", "1700000000000-1", "a b", "", "x" * 129])
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
_frames = st.dictionaries(st.sampled_from(_FIELDS), _values, max_size=7).flatmap(
    lambda frame: st.sampled_from(_OPS).map(lambda op: {**frame, "op": op}) | st.just(frame)
)


def _receive_never_escapes(state: ConnectionState, data: bytes | str) -> None:
    try:
        request: Request = state.receive(data)
    except HeraldError:
        return
    assert isinstance(request, _REQUEST_TYPES)


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary() | st.text(),
    encoding=st.sampled_from(Encoding),
    authenticated=st.booleans(),
)
def test_receive_arbitrary_data_returns_request_or_herald_error(
    data: bytes | str, encoding: Encoding, authenticated: bool
) -> None:
    state = ConnectionState(encoding)
    state.authenticated = authenticated
    _receive_never_escapes(state, data)


@settings(max_examples=300, deadline=None)
@given(frame=_frames, encoding=st.sampled_from(Encoding), authenticated=st.booleans())
def test_receive_arbitrary_frame_objects_return_request_or_herald_error(
    frame: dict[str, Any], encoding: Encoding, authenticated: bool
) -> None:
    state = ConnectionState(encoding)
    state.authenticated = authenticated
    data: bytes | str = orjson.dumps(frame).decode() if encoding is Encoding.JSON else packed(frame)
    _receive_never_escapes(state, data)
