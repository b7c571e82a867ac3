"""The 16-byte message header (facts 1.2)."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.constants import FLAG_ERROR, FLAG_NO_REPLY, HEADER_SIZE, Command, MsgType
from protocol.errors import ProtocolError, invalid, require
from protocol.header import Header, pack_error_reply, pack_message, pack_reply

FAST = settings(max_examples=300, deadline=None)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
headers = st.builds(Header, msg_id=u16, command=u16, size=u32, flags=u32, error=u32)


@FAST
@given(headers)
def test_pack_unpack_round_trip(header: Header) -> None:
    raw = header.pack()
    assert len(raw) == HEADER_SIZE
    assert Header.unpack(raw) == header
    assert Header.unpack(bytearray(raw)) == header
    assert Header.unpack(memoryview(raw)) == header


@FAST
@given(headers, st.binary(max_size=64))
def test_unpack_ignores_bytes_after_the_header(header: Header, tail: bytes) -> None:
    assert Header.unpack(header.pack() + tail) == header


@FAST
@given(headers)
def test_field_order_is_id_cmd_size_flags_error_little_endian(header: Header) -> None:
    raw = header.pack()
    assert struct.unpack("<H", raw[0:2])[0] == header.msg_id
    assert struct.unpack("<H", raw[2:4])[0] == header.command
    assert struct.unpack("<I", raw[4:8])[0] == header.size
    assert struct.unpack("<I", raw[8:12])[0] == header.flags
    assert struct.unpack("<I", raw[12:16])[0] == header.error


def test_known_bytes_qemu_version_request_header() -> None:
    # qemu-gpio.jsonl seq 1: msg_id 0, VERSION, 214 bytes, command.
    raw = bytes.fromhex("00000100d60000000000000000000000")
    header = Header.unpack(raw)
    assert header == Header(0, Command.VERSION, 214, 0, 0)
    assert header.payload_size == 198
    assert header.is_command and not header.is_reply
    assert header.command_name() == "VERSION"


def test_known_bytes_error_reply() -> None:
    # lvu-client-server: REGION_READ of region 0xdeadbeef answered EINVAL (22), flags 0x21.
    raw = Header(3, Command.REGION_READ, 16, 0x21, errno.EINVAL).pack()
    assert raw == bytes.fromhex("03000900100000002100000016000000")


@FAST
@given(u32)
def test_flag_properties(flags: int) -> None:
    header = Header(1, 2, 16, flags)
    assert header.msg_type == flags & 0xF
    assert header.is_command == ((flags & 0xF) == 0)
    assert header.is_reply == ((flags & 0xF) == 1)
    assert header.no_reply == bool(flags & 0x10)
    assert header.is_error == bool(flags & 0x20)
    assert not (header.is_command and header.is_reply)


@pytest.mark.parametrize(
    ("flags", "command", "reply", "no_reply", "error"),
    [
        (0x00, True, False, False, False),
        (0x01, False, True, False, False),
        (0x10, True, False, True, False),
        (0x21, False, True, False, True),
        (0x31, False, True, True, True),
        (0x02, False, False, False, False),
        (0x0F, False, False, False, False),
        (0x40, True, False, False, False),  # unknown high bits do not change the type
    ],
)
def test_flag_examples(flags: int, command: bool, reply: bool, no_reply: bool, error: bool) -> None:
    header = Header(0, 1, 16, flags)
    assert (header.is_command, header.is_reply, header.no_reply, header.is_error) == (
        command,
        reply,
        no_reply,
        error,
    )


@FAST
@given(st.integers(16, 0xFFFFFFFF))
def test_payload_size(size: int) -> None:
    assert Header(0, 0, size).payload_size == size - 16


def test_command_name() -> None:
    assert Header(0, 15, 16).command_name() == "REGION_WRITE_MULTI"
    assert Header(0, 18, 16).command_name() == "MIG_DATA_WRITE"
    assert Header(0, 0, 16).command_name() == "UNKNOWN(0)"
    assert Header(0, 19, 16).command_name() == "MIG_GET_PRECOPY_INFO"
    assert Header(0, 20, 16).command_name() == "UNKNOWN(20)"


@FAST
@given(u16, u16, st.binary(max_size=300))
def test_pack_message_fills_in_the_size(msg_id: int, command: int, payload: bytes) -> None:
    raw = pack_message(msg_id, command, payload)
    assert len(raw) == 16 + len(payload)
    header = Header.unpack(raw)
    assert header == Header(msg_id, command, 16 + len(payload), MsgType.COMMAND, 0)
    assert raw[16:] == payload


@FAST
@given(u16, u16, st.binary(max_size=300))
def test_pack_reply(msg_id: int, command: int, payload: bytes) -> None:
    raw = pack_reply(msg_id, command, payload)
    header = Header.unpack(raw)
    assert header == Header(msg_id, command, 16 + len(payload), MsgType.REPLY, 0)
    assert header.is_reply and not header.is_error and not header.no_reply
    assert raw[16:] == payload


def test_pack_message_with_flags() -> None:
    raw = pack_message(7, Command.REGION_WRITE, b"abc", flags=FLAG_NO_REPLY)
    assert Header.unpack(raw) == Header(7, Command.REGION_WRITE, 19, 0x10, 0)


@FAST
@given(u16, u16, st.integers(1, 4095))
def test_pack_error_reply_is_header_only(msg_id: int, command: int, err: int) -> None:
    raw = pack_error_reply(msg_id, command, err)
    assert len(raw) == HEADER_SIZE
    header = Header.unpack(raw)
    assert header.msg_id == msg_id
    assert header.command == command
    assert header.size == HEADER_SIZE
    assert header.flags == MsgType.REPLY | FLAG_ERROR == 0x21
    assert header.error == err
    assert header.is_reply and header.is_error and not header.no_reply


@pytest.mark.parametrize("length", range(HEADER_SIZE))
def test_short_input_raises_protocol_error(length: int) -> None:
    with pytest.raises(ProtocolError) as info:
        Header.unpack(b"\xff" * length)
    assert info.value.errno == errno.EINVAL
    assert not info.value.fatal
    with pytest.raises(ProtocolError):
        Header.unpack(memoryview(bytearray(length)))


def test_protocol_error_helpers() -> None:
    err = ProtocolError(errno.E2BIG, "too big", fatal=True)
    assert err.errno == errno.E2BIG and err.fatal and err.message == "too big"
    assert str(err) == "E2BIG: too big"
    assert str(ProtocolError(99999, "odd")) == "99999: odd"
    inv = invalid("nope")
    assert inv.errno == errno.EINVAL and not inv.fatal
    require(True, "not raised")
    with pytest.raises(ProtocolError) as info:
        require(False, "raised", errno.ENOENT)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(ProtocolError) as info:
        require(False, "raised")
    assert info.value.errno == errno.EINVAL
