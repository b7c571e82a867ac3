"""The 16-byte message header that starts every vfio-user message."""

from __future__ import annotations

import errno
import struct
from typing import NamedTuple

from .constants import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAGS_TYPE_MASK,
    HEADER_SIZE,
    Command,
    MsgType,
)
from .errors import ProtocolError

HEADER = struct.Struct("<HHIII")
assert HEADER.size == HEADER_SIZE


class Header(NamedTuple):
    """Immutable; a NamedTuple because it is built for every message and a tuple costs
    a quarter of a frozen dataclass to create (docs/performance.md)."""

    msg_id: int
    command: int
    size: int
    flags: int = 0
    error: int = 0

    @property
    def msg_type(self) -> int:
        return self.flags & FLAGS_TYPE_MASK

    @property
    def is_command(self) -> bool:
        return self.msg_type == MsgType.COMMAND

    @property
    def is_reply(self) -> bool:
        return self.msg_type == MsgType.REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    @property
    def payload_size(self) -> int:
        return self.size - HEADER_SIZE

    def command_name(self) -> str:
        try:
            return Command(self.command).name
        except ValueError:
            return f"UNKNOWN({self.command})"

    def pack(self) -> bytes:
        return HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        if len(data) < HEADER_SIZE:
            raise ProtocolError(errno.EINVAL, f"header needs {HEADER_SIZE} bytes, got {len(data)}")
        return cls._make(HEADER.unpack_from(data))


def pack_message(
    msg_id: int, command: int, payload: bytes = b"", flags: int = MsgType.COMMAND, error: int = 0
) -> bytes:
    """One whole message: header plus payload, with the size filled in."""
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags, error) + payload


def pack_reply(msg_id: int, command: int, payload: bytes = b"") -> bytes:
    return pack_message(msg_id, command, payload, MsgType.REPLY)


def pack_reply_header(msg_id: int, command: int, payload_size: int) -> bytes:
    """The header of a reply whose ``payload_size`` payload bytes are sent after it
    separately (gathered from several buffers)."""
    return HEADER.pack(msg_id, command, HEADER_SIZE + payload_size, MsgType.REPLY, 0)


#: Longest reason an ``error_detail`` error reply carries (bytes of UTF-8).
MAX_ERROR_DETAIL = 512


def pack_error_reply(msg_id: int, command: int, err: int, detail: str = "") -> bytes:
    """Error replies are header-only (spec; QEMU and libvfio-user both require it), except
    for a client that negotiated the ``error_detail`` extension: ``detail``, the reason as
    UTF-8 text (cut to MAX_ERROR_DETAIL bytes), follows the header."""
    text = detail.encode("utf-8", "replace")[:MAX_ERROR_DETAIL]
    flags = MsgType.REPLY | FLAG_ERROR
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(text), flags, err) + text
