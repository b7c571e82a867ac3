"""Fuzz invariants: parse or raise our protocol error, nothing else.

Every parser of the protocol package gets arbitrary bytes; the only exception allowed out of
any of them is :class:`ProtocolError`. The framer additionally only ever raises *fatal*
errors, the connection never raises at all (it turns problems into events), and neither
loses or duplicates an fd.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.connection import (
    CommandReceived,
    ConnState,
    Fatal,
    Negotiated,
    Rejected,
    ReplyReceived,
    ServerConnection,
)
from protocol.constants import Command
from protocol.errors import ProtocolError
from protocol.framer import Message, MessageFramer, Oversized
from protocol.header import Header, pack_message
from protocol.messages import (
    DeviceFeatureMsg,
    DeviceInfo,
    DmaData,
    DmaMap,
    DmaRw,
    DmaUnmap,
    IrqInfo,
    IrqSet,
    MigData,
    MigDataRead,
    RegionAccess,
    RegionData,
    RegionInfo,
    RegionIoFds,
    RegionWriteMulti,
    VersionPayload,
    check_dma_write_reply,
    unpack_dma_read_reply,
    unpack_region_caps,
)
from protocol.migration_v1 import DirtyPages
from protocol.version import ServerCapabilities, negotiate, parse_client_version

#: ``make fuzz`` raises the count with FUZZ_EXAMPLES.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "0") or 0) or 250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

UNPACKERS: list[tuple[str, Callable[[Any], Any]]] = [
    ("VersionPayload", VersionPayload.unpack),
    ("DmaMap", DmaMap.unpack),
    ("DmaUnmap", DmaUnmap.unpack),
    ("DeviceInfo", DeviceInfo.unpack),
    ("RegionInfo", RegionInfo.unpack),
    ("RegionIoFds", RegionIoFds.unpack),
    ("RegionIoFds.reply", RegionIoFds.unpack_reply),
    ("IrqInfo", IrqInfo.unpack),
    ("IrqSet", IrqSet.unpack),
    ("RegionAccess", RegionAccess.unpack),
    ("RegionData", RegionData.unpack),
    ("DmaRw", DmaRw.unpack),
    ("DmaData", DmaData.unpack),
    ("RegionWriteMulti", RegionWriteMulti.unpack),
    ("DeviceFeatureMsg", DeviceFeatureMsg.unpack),
    ("MigDataRead", MigDataRead.unpack),
    ("MigData", MigData.unpack),
    ("DirtyPages", DirtyPages.unpack),
]

# Words that steer parsers past their first checks: sizes, flag values, boundary numbers.
_INTERESTING = [0, 1, 2, 3, 4, 7, 8, 9, 16, 20, 24, 31, 32, 33, 40, 48, 0x24, 0x3F, 0x40]
_INTERESTING += [0x10000, 0x20000, 0x40000, 0x7FFFFFFF, 0xFFFFFFFF]
words = st.one_of(st.sampled_from(_INTERESTING), st.integers(0, 0xFFFFFFFF))
structured = st.tuples(st.lists(words, max_size=16), st.binary(max_size=40)).map(
    lambda t: b"".join(struct.pack("<I", w) for w in t[0]) + t[1]
)
payloads = st.one_of(st.binary(max_size=300), structured)


def only_protocol_error(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ProtocolError as exc:
        assert isinstance(exc.errno, int) and exc.errno > 0
        return None


@pytest.mark.parametrize("unpack", [pytest.param(fn, id=name) for name, fn in UNPACKERS])
@FUZZ
@given(payload=payloads)
def test_unpack_only_raises_protocol_error(unpack: Callable[[Any], Any], payload: bytes) -> None:
    result = only_protocol_error(lambda: unpack(payload))
    again = only_protocol_error(lambda: unpack(memoryview(payload)))
    assert result == again
    if result is not None and hasattr(result, "pack") and unpack.__name__ == "unpack":
        # Whatever parses packs again, and the packed form parses to the same value.
        assert unpack(result.pack()) == result


@FUZZ
@given(payload=payloads, cap_offset=st.one_of(st.integers(0, 320), st.integers(0, 0xFFFFFFFF)))
def test_region_caps_only_raise_protocol_error(payload: bytes, cap_offset: int) -> None:
    only_protocol_error(lambda: unpack_region_caps(payload, cap_offset))
    only_protocol_error(lambda: unpack_region_caps(b"\0" * 32 + payload, cap_offset))


@FUZZ
@given(payload=payloads, address=st.integers(0, (1 << 64) - 1), count=st.integers(0, 400))
def test_dma_replies_only_raise_protocol_error(payload: bytes, address: int, count: int) -> None:
    data = only_protocol_error(lambda: unpack_dma_read_reply(payload, address, count))
    if data is not None:
        assert len(data) == count
    only_protocol_error(lambda: check_dma_write_reply(payload, address, count))


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
)
_KEYS = [
    "capabilities",
    "max_msg_fds",
    "max_data_xfer_size",
    "max_dma_maps",
    "pgsizes",
    "write_multiple",
    "twin_socket",
    "supported",
    "fd_index",
    "migration",
    "pgsize",
    "data_fd",
    "max_bitmap_size",
]
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=5), inner, max_size=5),
    ),
    max_leaves=20,
)


@FUZZ
@given(major=st.sampled_from([0, 0, 0, 1]), minor=st.integers(0, 0xFFFF), doc=json_values)
def test_version_json_only_raises_protocol_error(major: int, minor: int, doc: Any) -> None:
    text = json.dumps({"capabilities": doc} if isinstance(doc, dict) else doc)
    payload = VersionPayload(major, minor, text).pack()
    version = VersionPayload.unpack(payload)
    assert version.json_text == text
    only_protocol_error(lambda: parse_client_version(version))
    only_protocol_error(lambda: negotiate(version, ServerCapabilities()))


@FUZZ
@given(payload=payloads)
def test_version_bytes_only_raise_protocol_error(payload: bytes) -> None:
    for candidate in (payload, b"\0\0\0\0" + payload, b"\0\0\0\0" + payload + b"\0"):
        version = only_protocol_error(functools.partial(VersionPayload.unpack, candidate))
        if version is not None:
            only_protocol_error(functools.partial(parse_client_version, version))
            only_protocol_error(functools.partial(negotiate, version, ServerCapabilities()))


# --------------------------------------------------------------------------------------------
# byte streams: framer and connection


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A message-like blob: usually a consistent header, sometimes a lying one or junk."""
    kind = draw(st.sampled_from(["good", "good", "good", "lying", "junk"]))
    if kind == "junk":
        return draw(st.binary(min_size=1, max_size=40))
    command = draw(st.one_of(st.integers(0, 20), st.integers(0, 0xFFFF)))
    flags = draw(st.sampled_from([0, 0, 1, 0x10, 0x21, 0x11, 2, 0xF, 0x40]))
    payload = draw(st.binary(max_size=80))
    if command == Command.VERSION and draw(st.booleans()):
        payload = VersionPayload(0, draw(st.integers(0, 3)), "{}").pack()
    msg_id = draw(st.integers(0, 0xFFFF))
    if kind == "good":
        return pack_message(msg_id, command, payload, flags)
    size = draw(st.one_of(st.integers(0, 200), st.integers(0, 0xFFFFFFFF)))
    return Header(msg_id, command, size, flags).pack() + payload


@st.composite
def chunked_streams(draw: st.DrawFn) -> list[tuple[bytes, list[int]]]:
    """A stream cut into random chunks, some carrying (unique, fake) fds."""
    stream = b"".join(draw(st.lists(messages(), max_size=8)))
    chunks: list[tuple[bytes, list[int]]] = []
    at = 0
    next_fd = 100
    while at < len(stream):
        size = draw(st.integers(1, max(1, min(64, len(stream) - at))))
        nfds = draw(st.sampled_from([0, 0, 0, 1, 2]))
        fds = list(range(next_fd, next_fd + nfds))
        next_fd += nfds
        chunks.append((stream[at : at + size], fds))
        at += size
    return chunks


@FUZZ
@given(chunks=chunked_streams(), limit=st.sampled_from([16, 40, 64, 200, 4096]))
def test_framer_only_raises_fatal_protocol_error(
    chunks: list[tuple[bytes, list[int]]], limit: int
) -> None:
    framer = MessageFramer(limit)
    fed_fds: list[int] = []
    got_fds: list[int] = []
    dead = False
    for data, fds in chunks:
        framer.feed(data, fds)
        fed_fds += fds
        while not dead:
            try:
                item = framer.next_message()
            except ProtocolError as exc:
                assert exc.fatal
                dead = True
                break
            if item is None:
                break
            got_fds += item.fds
            if isinstance(item, Message):
                assert 16 <= item.header.size <= limit
                assert len(item.payload) == item.header.size - 16
            else:
                assert isinstance(item, Oversized)
                assert item.header.size > limit
        got_fds += framer.take_orphan_fds()
        if dead:
            break
    got_fds += framer.take_all_fds()
    assert sorted(got_fds) == sorted(fed_fds)
    assert framer.take_all_fds() == []


EVENT_TYPES = (Negotiated, CommandReceived, ReplyReceived, Rejected, Fatal)


@FUZZ
@given(
    chunks=chunked_streams(),
    limit=st.sampled_from([32, 64, 200, 4096]),
    negotiate_first=st.booleans(),
    eof=st.booleans(),
    pending=st.lists(st.sampled_from([Command.DMA_READ, Command.DMA_WRITE]), max_size=3),
)
def test_connection_never_raises(
    chunks: list[tuple[bytes, list[int]]],
    limit: int,
    negotiate_first: bool,
    eof: bool,
    pending: list[Command],
) -> None:
    conn = ServerConnection(ServerCapabilities(), limit)
    if negotiate_first:
        conn.receive_data(pack_message(0, Command.VERSION, VersionPayload(0, 0, "{}").pack()))
        first = conn.next_event()
        assert isinstance(first, Negotiated)
    for command in pending:
        conn.request(command, struct.pack("<QQ", 0, 8))
    fed_fds: list[int] = []
    got_fds: list[int] = []

    def drain() -> None:
        for _ in range(10_000):
            event = conn.next_event()
            if event is None:
                return
            assert isinstance(event, EVENT_TYPES)
            if not isinstance(event, Negotiated):
                got_fds.extend(event.fds)
            if isinstance(event, Rejected) and event.reply is not None:
                header = Header.unpack(event.reply)
                assert len(event.reply) == header.size == 16
                assert header.is_reply and header.is_error
                assert header.error == event.error.errno > 0
                assert header.msg_id == event.header.msg_id
                assert not event.header.no_reply and event.header.is_command
            if isinstance(event, Negotiated):
                assert Header.unpack(event.reply).is_reply
            got_fds.extend(conn.take_orphan_fds())
        raise AssertionError("next_event keeps producing events")

    for data, fds in chunks:
        conn.receive_data(data, fds)
        fed_fds += fds
        drain()
    if eof:
        conn.receive_eof()
        drain()
        assert conn.state is ConnState.CLOSED
    got_fds += conn.take_all_fds()
    assert sorted(got_fds) == sorted(fed_fds)


multi_entries = st.lists(
    st.tuples(
        st.integers(0, (1 << 64) - 1),
        st.integers(0, 0xFFFFFFFF),
        st.sampled_from([0, 1, 2, 4, 8, 9]),  # 0 and 9 are invalid counts
        st.binary(min_size=8, max_size=8),
    ),
    min_size=0,
    max_size=6,
)


@FUZZ
@given(entries=multi_entries, tail=st.binary(max_size=3), payload=payloads)
def test_write_multi_fast_unpack_agrees_with_the_codec(
    entries: list[tuple[int, int, int, bytes]], tail: bytes, payload: bytes
) -> None:
    """RegionWriteMulti.unpack_writes (the session's hot path) accepts and refuses exactly
    what unpack does, with the same entries."""
    built = struct.pack("<Q", len(entries)) + b"".join(
        struct.pack("<QII8s", off, region, count, data) for off, region, count, data in entries
    )
    for raw in (built, built + tail, payload):
        expected = only_protocol_error(functools.partial(RegionWriteMulti.unpack, raw))
        fast = only_protocol_error(functools.partial(RegionWriteMulti.unpack_writes, raw))
        if expected is None:
            assert fast is None
        else:
            assert fast == [(e.offset, e.region, e.data) for e in expected.entries]
