"""emulator.client.core (and emulator.client.info) against a scripted peer on a real UNIX socket.

The peer is written here with the protocol codecs; each test scripts what the "server" does
and checks the exact bytes the client sends. Expected request payloads are spelled out with
``struct`` from the facts sheet rather than with the codecs, so a codec bug cannot hide.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from emulator.client.core import (
    Client,
    ClientError,
    ConnectionLost,
    GuestMemory,
    InvalidReply,
)
from emulator.client.info import describe
from emulator.transport import close_fds, receive_chunk, send_message
from protocol.constants import FLAG_ERROR, FLAG_NO_REPLY, Command, MsgType
from protocol.framer import Message, MessageFramer
from protocol.header import Header, pack_error_reply, pack_message, pack_reply
from protocol.messages import (
    DeviceInfo,
    IoFdEntry,
    IrqInfo,
    RegionInfo,
    SparseMmapCap,
    TypeCap,
    VersionPayload,
    pack_region_caps,
)

SERVER_JSON = '{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}'

Script = Callable[["Peer"], Awaitable[None]]


class Peer:
    """The scripted server end of the socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.framer = MessageFramer(1 << 24)

    async def recv(self) -> Message:
        while True:
            item = self.framer.next_message()
            if item is not None:
                assert isinstance(item, Message)
                return item
            data, fds = await receive_chunk(self.sock, 1 << 16, 16)
            if not data:
                raise EOFError("client hung up")
            self.framer.feed(data, fds)

    async def expect(
        self, command: int, *, flags: int = MsgType.COMMAND, error: int = 0
    ) -> Message:
        msg = await self.recv()
        assert msg.header.command == command, msg.header
        assert msg.header.flags == flags, msg.header
        assert msg.header.error == error, msg.header
        assert msg.header.size == 16 + len(msg.payload)
        return msg

    async def expect_eof(self) -> None:
        data, fds = await receive_chunk(self.sock, 1 << 16, 16)
        close_fds(fds)
        assert data == b"", f"unexpected bytes from the client: {data!r}"

    async def send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        await send_message(self.sock, data, fds)

    async def reply(self, msg: Message, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        await self.send(pack_reply(msg.header.msg_id, msg.header.command, payload), fds)

    async def error(self, msg: Message, err: int) -> None:
        await self.send(pack_error_reply(msg.header.msg_id, msg.header.command, err))

    async def handshake(self, reply_json: str = SERVER_JSON, minor: int = 2) -> Message:
        msg = await self.expect(Command.VERSION)
        await self.reply(msg, VersionPayload(0, minor, reply_json).pack())
        return msg


@asynccontextmanager
async def connected(
    nursery: trio.Nursery,
    script: Script,
    *,
    peer_handshake: bool = True,
    **client_kw: Any,
) -> AsyncIterator[Client]:
    """A Client talking to ``script`` over a socketpair; the peer's errors fail the test."""
    csock, psock = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer = Peer(psock)

    async def run() -> None:
        with psock:
            if peer_handshake:
                await peer.handshake()
            await script(peer)

    nursery.start_soon(run)
    with trio.fail_after(5):
        async with Client.from_socket(csock, **client_kw) as client:
            yield client


def pipe_with_peer_copy() -> tuple[int, int]:
    """A pipe; the read end stays here, the write end is the one to pass."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    return r, w


def assert_no_writer_left(r: int) -> None:
    """Every copy of the pipe's write end is closed (the client did not leak its copy)."""
    assert os.read(r, 1) == b""
    os.close(r)


# --------------------------------------------------------------------------------------------
# VERSION


async def test_version_handshake(nursery):
    seen: list[Message] = []

    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.VERSION)
        seen.append(msg)
        reply = '{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":4096,"pgsizes":4096}}'
        await peer.reply(msg, VersionPayload(0, 1, reply).pack())
        await peer.expect_eof()

    async with connected(nursery, script, peer_handshake=False) as client:
        assert client.major == 0 and client.minor == 1
        assert client.server_caps == {
            "max_msg_fds": 8,
            "max_data_xfer_size": 4096,
            "pgsizes": 4096,
        }
        assert client.server_max_msg_fds == 8
        assert client.server_max_data_xfer_size == 4096
    payload = seen[0].payload
    assert struct.unpack_from("<HH", payload) == (0, 2)
    assert payload.endswith(b"\0") and payload[4:].count(b"\0") == 1
    assert json.loads(payload[4:-1]) == {
        "capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1048576, "error_detail": True}
    }
    assert seen[0].fds == []


async def test_version_custom_capabilities_and_minor(nursery):
    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.VERSION)
        assert struct.unpack_from("<HH", msg.payload) == (0, 0)
        assert json.loads(msg.payload[4:-1]) == {"capabilities": {"max_msg_fds": 1}}
        await peer.reply(msg, VersionPayload(0, 0, "{}").pack())
        await peer.expect_eof()

    async with connected(
        nursery, script, peer_handshake=False, capabilities={"max_msg_fds": 1}, minor=0
    ) as client:
        assert client.minor == 0 and client.server_caps == {}


VERSION_FAILURES = {
    "major-1": struct.pack("<HH", 1, 2) + SERVER_JSON.encode() + b"\0",
    "minor-above-ours": struct.pack("<HH", 0, 3) + SERVER_JSON.encode() + b"\0",
    "json-without-nul": struct.pack("<HH", 0, 2) + SERVER_JSON.encode(),
    "no-json": struct.pack("<HH", 0, 2),
    "not-json": struct.pack("<HH", 0, 2) + b"{nope\0",
    "json-not-object": struct.pack("<HH", 0, 2) + b"[1]\0",
    "caps-not-object": struct.pack("<HH", 0, 2) + b'{"capabilities":3}\0',
    "max-msg-fds-string": struct.pack("<HH", 0, 2) + b'{"capabilities":{"max_msg_fds":"8"}}\0',
    "twin-socket": struct.pack("<HH", 0, 2)
    + b'{"capabilities":{"twin_socket":{"supported":true,"fd_index":0}}}\0',
    "short": b"\0\0",
}


@pytest.mark.parametrize("payload", VERSION_FAILURES.values(), ids=VERSION_FAILURES.keys())
async def test_version_reply_rejected(nursery, payload):
    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.VERSION)
        await peer.reply(msg, payload)
        await peer.expect_eof()

    with pytest.raises(InvalidReply) as info:
        async with connected(nursery, script, peer_handshake=False):
            pytest.fail("negotiation should have failed")
    assert info.value.command == Command.VERSION
    assert info.value.errno == errno.EPROTO


async def test_version_error_reply(nursery):
    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.VERSION)
        await peer.error(msg, errno.EINVAL)
        await peer.expect_eof()

    with pytest.raises(ClientError) as info:
        async with connected(nursery, script, peer_handshake=False):
            pass
    assert type(info.value) is ClientError
    assert info.value.errno == errno.EINVAL and info.value.command == Command.VERSION


async def test_version_reply_with_fd_is_rejected_and_fd_closed(nursery):
    r, w = pipe_with_peer_copy()

    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.VERSION)
        await peer.reply(msg, VersionPayload(0, 2, SERVER_JSON).pack(), fds=(w,))
        os.close(w)
        await peer.expect_eof()

    with pytest.raises(InvalidReply):
        async with connected(nursery, script, peer_handshake=False):
            pass
    assert_no_writer_left(r)


async def test_connect_by_path(tmp_path):
    path = tmp_path / "dev.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(os.fspath(path))
    listener.listen(1)

    async def server() -> None:
        conn, _ = await listener.accept()
        with conn:
            peer = Peer(conn)
            await peer.handshake()
            msg = await peer.expect(Command.DEVICE_GET_INFO)
            await peer.reply(msg, DeviceInfo(16, 3, 9, 5).pack())
            await peer.expect_eof()

    with listener, trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            async with Client.connect(path) as client:
                assert await client.get_info() == DeviceInfo(16, 3, 9, 5)


# --------------------------------------------------------------------------------------------
# request bytes and reply validation, command by command

# (call, command, expected request payload, reply payload, expected result)
CASES: dict[str, tuple[Callable[[Client], Awaitable[Any]], int, bytes, bytes, Any]] = {
    "get_info": (
        lambda c: c.get_info(),
        Command.DEVICE_GET_INFO,
        struct.pack("<IIII", 16, 0, 0, 0),
        struct.pack("<IIII", 16, 3, 9, 5),
        DeviceInfo(16, 3, 9, 5),
    ),
    "get_irq_info": (
        lambda c: c.get_irq_info(2),
        Command.DEVICE_GET_IRQ_INFO,
        struct.pack("<IIII", 16, 0, 2, 0),
        struct.pack("<IIII", 16, 1, 2, 8),
        IrqInfo(16, 1, 2, 8),
    ),
    "region_read": (
        lambda c: c.region_read(7, 0x10, 4),
        Command.REGION_READ,
        struct.pack("<QII", 0x10, 7, 4),
        struct.pack("<QII", 0x10, 7, 4) + b"abcd",
        b"abcd",
    ),
    "region_read_zero_header_only": (
        lambda c: c.region_read(0, 0, 0),
        Command.REGION_READ,
        struct.pack("<QII", 0, 0, 0),
        b"",
        b"",
    ),
    "region_write": (
        lambda c: c.region_write(1, 8, b"\x01\x02"),
        Command.REGION_WRITE,
        struct.pack("<QII", 8, 1, 2) + b"\x01\x02",
        struct.pack("<QII", 8, 1, 2),
        None,
    ),
    "region_write_multi_with_reply": (
        lambda c: c.region_write_multi([(0, 8, b"\x01"), (2, 0x10, b"12345678")], posted=False),
        Command.REGION_WRITE_MULTI,
        struct.pack("<Q", 2)
        + struct.pack("<QII8s", 8, 0, 1, b"\x01")
        + struct.pack("<QII8s", 0x10, 2, 8, b"12345678"),
        struct.pack("<Q", 2),
        2,
    ),
    "reset": (lambda c: c.reset(), Command.DEVICE_RESET, b"", b"", None),
    "dma_map": (
        lambda c: c.dma_map(0x1000, 0x2000),
        Command.DMA_MAP,
        struct.pack("<IIQQQ", 32, 3, 0, 0x1000, 0x2000),
        b"",
        None,
    ),
    "dma_map_read_only": (
        lambda c: c.dma_map(0x1000, 0x2000, offset=0x40, writable=False),
        Command.DMA_MAP,
        struct.pack("<IIQQQ", 32, 1, 0x40, 0x1000, 0x2000),
        b"",
        None,
    ),
    "dma_unmap": (
        lambda c: c.dma_unmap(0x1000, 0x2000),
        Command.DMA_UNMAP,
        struct.pack("<IIQQ", 24, 0, 0x1000, 0x2000),
        struct.pack("<IIQQ", 24, 0, 0x1000, 0x2000),
        None,
    ),
    "dma_unmap_all": (
        lambda c: c.dma_unmap(unmap_all=True),
        Command.DMA_UNMAP,
        struct.pack("<IIQQ", 24, 2, 0, 0),
        struct.pack("<IIQQ", 24, 2, 0, 0),
        None,
    ),
    "set_irqs_none": (
        lambda c: c.set_irqs(0, 0x21, 0, 0),
        Command.DEVICE_SET_IRQS,
        struct.pack("<IIIII", 20, 0x21, 0, 0, 0),
        b"",
        None,
    ),
    "set_irqs_bool": (
        lambda c: c.set_irqs(1, 0x22, 0, 2, data=b"\x01\x00"),
        Command.DEVICE_SET_IRQS,
        struct.pack("<IIIII", 22, 0x22, 1, 0, 2) + b"\x01\x00",
        b"",
        None,
    ),
    "device_feature_get": (
        lambda c: c.device_feature(0x10001),
        Command.DEVICE_FEATURE,
        struct.pack("<II", 16, 0x10001),
        struct.pack("<IIQ", 16, 0x10001, 5),
        struct.pack("<IIQ", 16, 0x10001, 5),
    ),
    "device_feature_set": (
        lambda c: c.device_feature(0x20002, struct.pack("<Ii", 2, -1)),
        Command.DEVICE_FEATURE,
        struct.pack("<IIIi", 16, 0x20002, 2, -1),
        struct.pack("<IIIi", 16, 0x20002, 2, -1),
        struct.pack("<IIIi", 16, 0x20002, 2, -1),
    ),
    "device_feature_probe": (
        lambda c: c.device_feature(0x40000 | 0x10000 | 1),
        Command.DEVICE_FEATURE,
        struct.pack("<II", 8, 0x50001),
        struct.pack("<II", 8, 0x50001),
        struct.pack("<II", 8, 0x50001),
    ),
    "mig_data_read": (
        lambda c: c.mig_data_read(4),
        Command.MIG_DATA_READ,
        struct.pack("<II", 12, 4),
        struct.pack("<II", 10, 2) + b"xy",
        b"xy",
    ),
    "mig_data_read_padded": (
        lambda c: c.mig_data_read(4),
        Command.MIG_DATA_READ,
        struct.pack("<II", 12, 4),
        struct.pack("<II", 10, 2) + b"xy\0\0",
        b"xy",
    ),
    "mig_data_read_end": (
        lambda c: c.mig_data_read(4),
        Command.MIG_DATA_READ,
        struct.pack("<II", 12, 4),
        struct.pack("<II", 8, 0),
        b"",
    ),
    "mig_data_write": (
        lambda c: c.mig_data_write(b"abc"),
        Command.MIG_DATA_WRITE,
        struct.pack("<II", 11, 3) + b"abc",
        b"",
        None,
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_request_bytes_and_reply(nursery, case):
    call, command, request, reply, expected = case

    async def script(peer: Peer) -> None:
        msg = await peer.expect(command)
        assert msg.payload == request
        assert msg.fds == []
        await peer.reply(msg, reply)
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        assert await call(client) == expected


# (call, command, bad reply payload)
BAD_REPLIES: dict[str, tuple[Callable[[Client], Awaitable[Any]], int, bytes]] = {
    "get_info_short": (lambda c: c.get_info(), 4, struct.pack("<III", 16, 3, 9)),
    "get_info_long": (lambda c: c.get_info(), 4, struct.pack("<IIIII", 16, 3, 9, 5, 0)),
    "get_info_argsz": (lambda c: c.get_info(), 4, struct.pack("<IIII", 8, 3, 9, 5)),
    "irq_info_short": (lambda c: c.get_irq_info(0), 7, struct.pack("<III", 16, 1, 0)),
    "irq_info_long": (lambda c: c.get_irq_info(0), 7, struct.pack("<IIII", 16, 1, 0, 1) + b"\0"),
    "irq_info_index": (lambda c: c.get_irq_info(0), 7, struct.pack("<IIII", 16, 1, 1, 1)),
    "read_short": (lambda c: c.region_read(0, 0, 4), 9, struct.pack("<QII", 0, 0, 4) + b"abc"),
    "read_long": (lambda c: c.region_read(0, 0, 4), 9, struct.pack("<QII", 0, 0, 4) + b"abcde"),
    "read_offset": (lambda c: c.region_read(0, 0, 4), 9, struct.pack("<QII", 4, 0, 4) + b"abcd"),
    "read_region": (lambda c: c.region_read(0, 0, 4), 9, struct.pack("<QII", 0, 1, 4) + b"abcd"),
    "read_empty": (lambda c: c.region_read(0, 0, 4), 9, b""),
    "write_long": (
        lambda c: c.region_write(0, 0, b"ab"),
        10,
        struct.pack("<QII", 0, 0, 2) + b"ab",
    ),
    "write_short": (lambda c: c.region_write(0, 0, b"ab"), 10, struct.pack("<QI", 0, 0)),
    "write_count": (lambda c: c.region_write(0, 0, b"ab"), 10, struct.pack("<QII", 0, 0, 1)),
    "dma_map_payload": (lambda c: c.dma_map(0, 4096), 2, b"\0" * 4),
    "dma_unmap_short": (lambda c: c.dma_unmap(0, 4096), 3, struct.pack("<IIQ", 24, 0, 0)),
    "dma_unmap_long": (
        lambda c: c.dma_unmap(0, 4096),
        3,
        struct.pack("<IIQQQ", 24, 0, 0, 4096, 0),
    ),
    "dma_unmap_not_echo": (
        lambda c: c.dma_unmap(0, 4096),
        3,
        struct.pack("<IIQQ", 24, 0, 0, 8192),
    ),
    "set_irqs_payload": (lambda c: c.set_irqs(0, 0x21, 0, 0), 8, b"\0" * 20),
    "reset_payload": (lambda c: c.reset(), 13, b"\0"),
    "mig_write_payload": (lambda c: c.mig_data_write(b"a"), 18, struct.pack("<II", 9, 1)),
    "mig_read_too_much": (lambda c: c.mig_data_read(2), 17, struct.pack("<II", 11, 3) + b"abc"),
    "mig_read_short": (lambda c: c.mig_data_read(4), 17, struct.pack("<II", 12, 4) + b"ab"),
    "mig_read_padding_overflow": (
        lambda c: c.mig_data_read(2),
        17,
        struct.pack("<II", 10, 2) + b"ab\0",
    ),
    "feature_set_not_echo": (
        lambda c: c.device_feature(0x20002, struct.pack("<II", 2, 0)),
        16,
        struct.pack("<IIII", 16, 0x20002, 3, 0),
    ),
    "feature_get_argsz": (
        lambda c: c.device_feature(0x10001),
        16,
        struct.pack("<IIQ", 12, 0x10001, 5),
    ),
    "feature_get_flags": (
        lambda c: c.device_feature(0x10001),
        16,
        struct.pack("<IIQ", 16, 0x10002, 5),
    ),
    "feature_get_too_big": (
        lambda c: c.device_feature(0x10001),
        16,
        struct.pack("<IIQQ", 24, 0x10001, 5, 0),
    ),
    "multi_reply_size": (
        lambda c: c.region_write_multi([(0, 0, b"a")], posted=False),
        15,
        struct.pack("<III", 1, 0, 0),
    ),
    "multi_reply_count": (
        lambda c: c.region_write_multi([(0, 0, b"a")], posted=False),
        15,
        struct.pack("<Q", 2),
    ),
    "region_info_short": (
        lambda c: c.get_region_info(0),
        5,
        RegionInfo(32, 3, 0, 0, 4096, 0).pack()[:24],
    ),
    "region_info_index": (
        lambda c: c.get_region_info(0),
        5,
        RegionInfo(32, 3, 1, 0, 4096, 0).pack(),
    ),
}


@pytest.mark.parametrize("case", BAD_REPLIES.values(), ids=BAD_REPLIES.keys())
async def test_bad_reply_raises_and_connection_survives(nursery, case):
    call, command, reply = case

    async def script(peer: Peer) -> None:
        msg = await peer.expect(command)
        await peer.reply(msg, reply)
        msg = await peer.expect(Command.DEVICE_GET_INFO)
        await peer.reply(msg, DeviceInfo(16, 3, 9, 5).pack())
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        with pytest.raises(InvalidReply) as info:
            await call(client)
        assert info.value.command == command
        assert info.value.errno == errno.EPROTO
        # The bad reply was consumed whole: the stream is still in sync.
        assert (await client.get_info()).num_regions == 9


@pytest.mark.parametrize(
    ("sent", "seen"),
    [
        (errno.ENOENT, errno.ENOENT),
        (errno.EINVAL, errno.EINVAL),
        (4096, 4096),
        (0, errno.EINVAL),
        (4097, errno.EINVAL),
        (0xFFFFFFFF, errno.EINVAL),
    ],
)
async def test_error_reply_raises_client_error(nursery, sent, seen):
    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.DMA_UNMAP)
        await peer.error(msg, sent)
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        with pytest.raises(ClientError) as info:
            await client.dma_unmap(0x1000, 0x1000)
    assert type(info.value) is ClientError
    assert info.value.errno == seen
    assert info.value.command is Command.DMA_UNMAP
    assert "DMA_UNMAP" in str(info.value)


async def test_error_reply_with_payload_is_invalid(nursery):
    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.DEVICE_GET_INFO)
        header = Header(msg.header.msg_id, 4, 32, MsgType.REPLY | FLAG_ERROR, errno.EIO)
        await peer.send(header.pack() + bytes(16))
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        with pytest.raises(InvalidReply):
            await client.get_info()


async def test_reply_with_other_command_is_invalid(nursery):
    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.DEVICE_GET_INFO)
        await peer.send(pack_reply(msg.header.msg_id, Command.DEVICE_GET_IRQ_INFO, bytes(16)))
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        with pytest.raises(InvalidReply, match="DEVICE_GET_IRQ_INFO"):
            await client.get_info()


async def test_reply_with_no_reply_flag_is_invalid(nursery):
    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.DEVICE_RESET)
        await peer.send(pack_message(msg.header.msg_id, 13, b"", MsgType.REPLY | FLAG_NO_REPLY))
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        with pytest.raises(InvalidReply, match="flags"):
            await client.reset()


async def test_raw_request_and_send_raw(nursery):
    async def script(peer: Peer) -> None:
        msg = await peer.expect(99)
        assert msg.payload == b"odd"
        await peer.error(msg, errno.EINVAL)
        raw = await peer.recv()
        assert raw.header == Header(0x4242, 4, 20, 0, 0) and raw.payload == b"\1\2\3\4"
        msg = await peer.expect(Command.DEVICE_GET_INFO)
        assert msg.payload == b"\0" * 3  # a short GET_INFO, sent raw
        await peer.reply(msg, b"whatever")
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        with pytest.raises(ClientError) as info:
            await client.request(99, b"odd")
        assert info.value.errno == errno.EINVAL and info.value.command == 99
        await client.send_raw(struct.pack("<HHIII", 0x4242, 4, 20, 0, 0) + b"\1\2\3\4")
        header, payload, fds = await client.request(Command.DEVICE_GET_INFO, b"\0" * 3)
        assert header.is_reply and header.command == 4 and payload == b"whatever" and fds == []


# --------------------------------------------------------------------------------------------
# fds


async def test_dma_map_and_set_irqs_pass_fds(nursery):
    r1, w1 = os.pipe()
    efds = [os.eventfd(0) for _ in range(3)]

    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.DMA_MAP)
        assert len(msg.fds) == 1
        os.write(msg.fds[0], b"!")
        close_fds(msg.fds)
        await peer.reply(msg)
        msg = await peer.expect(Command.DEVICE_SET_IRQS)
        assert msg.payload == struct.pack("<IIIII", 20, 0x24, 2, 1, 3)
        for i, fd in enumerate(msg.fds):
            os.eventfd_write(fd, i + 1)
        close_fds(msg.fds)
        await peer.reply(msg)
        await peer.expect_eof()

    try:
        async with connected(nursery, script) as client:
            await client.dma_map(0x10000, 0x1000, fd=w1, offset=0x2000)
            await client.set_irqs(2, 0x24, 1, 3, fds=efds)
        assert os.read(r1, 1) == b"!"
        assert [os.eventfd_read(fd) for fd in efds] == [1, 2, 3]
    finally:
        close_fds([r1, w1, *efds])


async def test_unexpected_fd_on_reply_is_closed(nursery):
    r, w = pipe_with_peer_copy()

    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.DEVICE_GET_INFO)
        await peer.reply(msg, DeviceInfo(16, 3, 9, 5).pack(), fds=(w,))
        os.close(w)
        msg = await peer.expect(Command.DEVICE_RESET)
        await peer.send(pack_error_reply(msg.header.msg_id, 13, errno.EBUSY), (r,))
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        with pytest.raises(InvalidReply, match="fd"):
            await client.get_info()
        assert_no_writer_left(os.dup(r))
        with pytest.raises(InvalidReply, match="fd"):
            await client.reset()
    os.close(r)


def region_reply(
    argsz_asked: int,
    index: int,
    flags: int,
    size: int,
    caps: list[SparseMmapCap | TypeCap],
) -> bytes:
    chain = pack_region_caps(caps, 32) if caps else b""
    full_argsz = 32 + len(chain)
    cap_flag = 8 if caps and full_argsz <= argsz_asked else 0
    info = RegionInfo(full_argsz, flags | cap_flag, index, 32 if cap_flag else 0, size, 0)
    return (info.pack() + (chain if cap_flag else b""))[: min(full_argsz, argsz_asked)]


async def test_region_info_without_caps(nursery):
    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.DEVICE_GET_REGION_INFO)
        assert msg.payload == struct.pack("<IIIIQQ", 32, 0, 3, 0, 0, 0)
        await peer.reply(msg, region_reply(32, 3, 3, 0x1000, []))
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        desc = await client.get_region_info(3)
    assert desc.info == RegionInfo(32, 3, 3, 0, 0x1000, 0)
    assert desc.caps == [] and desc.fd is None


async def test_region_info_requery_with_larger_argsz_and_fd(nursery):
    r1, w1 = pipe_with_peer_copy()
    r2, w2 = os.pipe()
    caps: list[SparseMmapCap | TypeCap] = [SparseMmapCap(((0, 0x1000), (0x3000, 0x1000)))]

    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.DEVICE_GET_REGION_INFO)
        assert msg.payload == struct.pack("<IIIIQQ", 32, 0, 0, 0, 0, 0)
        first = region_reply(32, 0, 7, 0x4000, caps)
        assert len(first) == 32 and struct.unpack_from("<I", first)[0] == 80
        await peer.reply(msg, first, fds=(w1,))  # an fd on the truncated reply: closed
        os.close(w1)
        msg = await peer.expect(Command.DEVICE_GET_REGION_INFO)
        assert msg.payload == struct.pack("<IIIIQQ", 80, 0, 0, 0, 0, 0)
        await peer.reply(msg, region_reply(80, 0, 7, 0x4000, caps), fds=(w2,))
        await peer.expect_eof()

    try:
        async with connected(nursery, script) as client:
            desc = await client.get_region_info(0)
        assert desc.info.argsz == 80 and desc.info.flags == 0xF and desc.info.cap_offset == 32
        assert desc.caps == caps
        assert desc.fd is not None and same_pipe(desc.fd, r2)
        os.close(desc.fd)
        assert_no_writer_left(r1)
    finally:
        close_fds([r2, w2])


def same_pipe(write_fd: int, read_fd: int) -> bool:
    os.write(write_fd, b"ping")
    return os.read(read_fd, 16) == b"ping"


@pytest.mark.parametrize("variant", ["no-caps", "no-mmap", "two-fds", "type-cap-only-no-mmap"])
async def test_region_info_fd_refused_unless_caps_and_mmap(nursery, variant):
    r, w = pipe_with_peer_copy()
    flags = {"no-mmap": 3, "type-cap-only-no-mmap": 3}.get(variant, 7)
    caps: list[SparseMmapCap | TypeCap] = [SparseMmapCap(((0, 0x1000),))]
    if variant == "no-caps":
        caps = []
    elif variant == "type-cap-only-no-mmap":
        caps = [TypeCap(3, 1)]
    fds = (w, w) if variant == "two-fds" else (w,)

    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.DEVICE_GET_REGION_INFO)
        argsz = struct.unpack_from("<I", msg.payload)[0]
        reply = region_reply(argsz, 1, flags, 0x1000, caps)
        if struct.unpack_from("<I", reply)[0] > argsz:
            await peer.reply(msg, reply)
            msg = await peer.expect(Command.DEVICE_GET_REGION_INFO)
            reply = region_reply(struct.unpack_from("<I", msg.payload)[0], 1, flags, 0x1000, caps)
        await peer.reply(msg, reply, fds=fds)
        os.close(w)
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        with pytest.raises(InvalidReply, match="fd"):
            await client.get_region_info(1)
    assert_no_writer_left(r)


async def test_region_info_bad_cap_chain(nursery):
    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.DEVICE_GET_REGION_INFO)
        info = RegionInfo(48, 0xB, 2, 40, 0x1000, 0)  # cap_offset points past the payload
        await peer.reply(msg, info.pack() + bytes(16))
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        with pytest.raises(InvalidReply):
            await client.get_region_info(2)


async def test_region_io_fds(nursery):
    r, w = os.pipe()
    entry = IoFdEntry(0x100, 4, 0, 0, 1, 0xABCD)

    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.DEVICE_GET_REGION_IO_FDS)
        assert msg.payload == struct.pack("<IIII", 16, 0, 1, 0)
        await peer.reply(msg, struct.pack("<IIII", 56, 0, 1, 1))
        msg = await peer.expect(Command.DEVICE_GET_REGION_IO_FDS)
        assert msg.payload == struct.pack("<IIII", 56, 0, 1, 0)
        await peer.reply(msg, struct.pack("<IIII", 56, 0, 1, 1) + entry.pack(), fds=(w,))
        await peer.expect_eof()

    try:
        async with connected(nursery, script) as client:
            io_fds, fds = await client.get_region_io_fds(1)
        assert io_fds.count == 1 and io_fds.entries == (entry,)
        assert len(fds) == 1 and same_pipe(fds[0], r)
        close_fds(fds)
    finally:
        close_fds([r, w])


# --------------------------------------------------------------------------------------------
# concurrency, server->client DMA, connection failures


async def test_pipelined_requests_matched_by_id(nursery):
    async def script(peer: Peer) -> None:
        msgs = [await peer.expect(Command.DEVICE_GET_IRQ_INFO) for _ in range(4)]
        assert len({m.header.msg_id for m in msgs}) == 4
        for msg in reversed(msgs):  # answer out of order: matching is by msg_id
            index = struct.unpack_from("<IIII", msg.payload)[2]
            await peer.reply(msg, IrqInfo(16, 1, index, 10 + index).pack())
        await peer.expect_eof()

    results: dict[int, int] = {}

    async def ask(client: Client, index: int) -> None:
        results[index] = (await client.get_irq_info(index)).count

    async with connected(nursery, script) as client, trio.open_nursery() as inner:
        for index in range(4):
            inner.start_soon(ask, client, index)
    assert results == {0: 10, 1: 11, 2: 12, 3: 13}


async def test_dma_served_while_request_outstanding(nursery):
    memory = GuestMemory(0x10000, 0x1000)
    memory.write(0x10100, b"guest data")

    async def script(peer: Peer) -> None:
        read = await peer.expect(Command.REGION_READ)
        # DMA_WRITE, then a NO_REPLY DMA_WRITE, then DMA_READ, all before our reply.
        payload = struct.pack("<QQ", 0x10010, 5) + b"hello"
        await peer.send(pack_message(100, Command.DMA_WRITE, payload))
        reply = await peer.expect(Command.DMA_WRITE, flags=MsgType.REPLY)
        assert reply.header.msg_id == 100
        assert reply.payload == struct.pack("<QQ", 0x10010, 5)
        quiet = struct.pack("<QQ", 0x10020, 2) + b"qq"
        await peer.send(pack_message(101, Command.DMA_WRITE, quiet, FLAG_NO_REPLY))
        await peer.send(pack_message(102, Command.DMA_READ, struct.pack("<QQ", 0x10100, 10)))
        reply = await peer.expect(Command.DMA_READ, flags=MsgType.REPLY)
        assert reply.header.msg_id == 102
        assert reply.payload == struct.pack("<QQ", 0x10100, 10) + b"guest data"
        await peer.reply(read, struct.pack("<QII", 0, 0, 4) + b"regs")
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        client.serve_dma(memory)
        assert await client.region_read(0, 0, 4) == b"regs"
    assert memory.read(0x10010, 5) == b"hello"
    assert memory.read(0x10020, 2) == b"qq"


DMA_FAULTS = {
    "no-memory": ("read", struct.pack("<QQ", 0x10000, 4), False, False, errno.EFAULT),
    "read-out-of-range": ("read", struct.pack("<QQ", 0x10FFE, 4), False, True, errno.EFAULT),
    "read-too-big": ("read", struct.pack("<QQ", 0x10000, 8192), False, True, errno.E2BIG),
    "read-long-request": ("read", struct.pack("<QQQ", 0x10000, 4, 0), False, True, errno.EINVAL),
    "read-with-fd": ("read", struct.pack("<QQ", 0x10000, 4), True, True, errno.EINVAL),
    "write-out-of-range": ("write", struct.pack("<QQ", 0xFFFF, 2) + b"ab", False, True, 14),
    "write-count": ("write", struct.pack("<QQ", 0x10000, 3) + b"ab", False, True, errno.EINVAL),
    "other-command": ("other", struct.pack("<IIII", 16, 0, 0, 0), False, True, errno.ENOSYS),
}


@pytest.mark.parametrize("case", DMA_FAULTS.values(), ids=DMA_FAULTS.keys())
async def test_dma_faults_answered_with_errors(nursery, case):
    command, payload, fds, register, err = case
    cmd = {"read": Command.DMA_READ, "write": Command.DMA_WRITE, "other": 4}[command]
    r, w = pipe_with_peer_copy()
    registered = trio.Event()
    answered = trio.Event()

    async def script(peer: Peer) -> None:
        await registered.wait()
        await peer.send(pack_message(7, cmd, payload), (w,) if fds else ())
        os.close(w)
        reply = await peer.expect(cmd, flags=MsgType.REPLY | FLAG_ERROR, error=err)
        assert reply.payload == b"" and reply.header.msg_id == 7
        answered.set()
        msg = await peer.expect(Command.DEVICE_RESET)
        await peer.reply(msg)
        await peer.expect_eof()

    async with connected(nursery, script, capabilities={"max_data_xfer_size": 4096}) as client:
        if register:
            client.serve_dma(GuestMemory(0x10000, 0x1000))
        registered.set()
        await answered.wait()
        await client.reset()  # the connection is still fine
    assert_no_writer_left(r)


async def test_unexpected_reply_breaks_the_connection(nursery):
    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.DEVICE_GET_INFO)
        await peer.send(pack_reply(msg.header.msg_id + 1, 4, bytes(16)))
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        with pytest.raises(InvalidReply, match="matches no request"):
            await client.get_info()
        with pytest.raises(InvalidReply):
            await client.reset()


async def test_posted_writes_and_a_spurious_reply(nursery):
    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.REGION_WRITE, flags=FLAG_NO_REPLY)
        assert msg.payload == struct.pack("<QII", 4, 0, 4) + b"\1\2\3\4"
        msg = await peer.expect(Command.REGION_WRITE_MULTI, flags=FLAG_NO_REPLY)
        assert msg.payload == struct.pack("<Q", 1) + struct.pack("<QII8s", 0, 1, 2, b"zz")
        # Answering a NO_REPLY command is a server bug the client must not swallow.
        await peer.reply(msg, struct.pack("<Q", 1))
        # The GET_INFO may or may not get out before the client sees the bad reply.
        while True:
            try:
                msg = await peer.expect(Command.DEVICE_GET_INFO)
            except EOFError:
                return

    async with connected(nursery, script) as client:
        await client.region_write(0, 4, b"\1\2\3\4", posted=True)
        assert await client.region_write_multi([(1, 0, b"zz")]) is None
        with pytest.raises(InvalidReply, match="matches no request"):
            await client.get_info()


async def test_server_hangup_fails_pending_and_later_requests(nursery):
    async def script(peer: Peer) -> None:
        await peer.expect(Command.DEVICE_GET_INFO)

    async with connected(nursery, script) as client:
        with pytest.raises(ConnectionLost) as info:
            await client.get_info()
        assert info.value.command == Command.DEVICE_GET_INFO
        with pytest.raises(ConnectionLost):
            await client.reset()


async def test_cancelled_request_reply_dropped_quietly(nursery):
    r, w = pipe_with_peer_copy()
    asked = trio.Event()

    async def script(peer: Peer) -> None:
        first = await peer.expect(Command.DEVICE_GET_REGION_INFO)
        asked.set()
        second = await peer.expect(Command.DEVICE_GET_INFO)
        reply = region_reply(32, 0, 7, 0x1000, [SparseMmapCap(((0, 0x1000),))])
        await peer.reply(first, reply, fds=(w,))  # late reply to the cancelled request
        os.close(w)
        await peer.reply(second, DeviceInfo(16, 3, 9, 5).pack())
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        with trio.move_on_after(5) as scope:
            async with trio.open_nursery() as inner:
                inner.start_soon(client.get_region_info, 0)
                await asked.wait()
                inner.cancel_scope.cancel()
        assert not scope.cancelled_caught
        assert (await client.get_info()).num_regions == 9
    assert_no_writer_left(r)


async def test_aclose_fails_later_requests(nursery):
    async def script(peer: Peer) -> None:
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        await client.aclose()
        assert client.closed
        with pytest.raises(ConnectionLost):
            await client.get_info()


async def test_body_exception_is_not_wrapped(nursery):
    async def script(peer: Peer) -> None:
        await peer.expect_eof()

    with pytest.raises(KeyError):
        async with connected(nursery, script):
            raise KeyError("mine")


async def test_trace_hook(nursery):
    lines: list[str] = []

    async def script(peer: Peer) -> None:
        msg = await peer.expect(Command.DEVICE_RESET)
        await peer.error(msg, errno.EBUSY)
        data, _ = await receive_chunk(peer.sock, 100, 0)
        assert data == b"\1\2"
        await peer.expect_eof()

    async with connected(nursery, script, trace=lines.append) as client:
        with pytest.raises(ClientError):
            await client.reset()
        await client.send_raw(b"\1\2")
    assert lines[0].startswith("-> id=0 VERSION size=")
    assert lines[1].startswith("<- id=0 VERSION size=")
    assert lines[2] == "-> id=1 DEVICE_RESET size=16 flags=0x0"
    assert lines[3] == f"<- id=1 DEVICE_RESET size=16 flags=0x21 errno={errno.EBUSY}"
    assert lines[4] == "-> 2 raw bytes, fds=0"


def test_guest_memory_bounds():
    memory = GuestMemory(0x1000, 16, fill=0xFF)
    assert memory.read(0x1000, 2) == b"\xff\xff"
    memory.write(0x100E, b"ab")
    assert memory.read(0x100E, 2) == b"ab"
    for address, count in ((0xFFF, 1), (0x100F, 2), (0x1000, -1)):
        with pytest.raises(ValueError):
            memory.read(address, count)


# --------------------------------------------------------------------------------------------
# emulator.client.info


def _config_space() -> bytes:
    cfg = bytearray(4096)
    struct.pack_into("<HHHH", cfg, 0, 0x8086, 0x10D3, 0x0006, 0x0010)  # ids, command, status
    struct.pack_into("<I", cfg, 0x08, 0x02000003)  # class 020000, revision 3
    struct.pack_into("<IIIII", cfg, 0x10, 0x0, 0xC, 0x0, 0x1, 0x0)  # BAR0..4
    struct.pack_into("<HH", cfg, 0x2C, 0x8086, 0xA01F)
    cfg[0x34] = 0x40
    cfg[0x3D] = 1
    struct.pack_into("<BBHH", cfg, 0x40, 0x01, 0x50, 0x0003, 0x0000)  # PM
    struct.pack_into("<BBH", cfg, 0x50, 0x05, 0x70, 0x0086)  # MSI: 8 vectors, 64-bit
    struct.pack_into("<BBH", cfg, 0x70, 0x10, 0xA0, 0x0002)  # PCIe v2 endpoint
    struct.pack_into("<BBHII", cfg, 0xA0, 0x11, 0x00, 0x0004, 0x3, 0x2003)  # MSI-X
    struct.pack_into("<I", cfg, 0x100, 0x0001 | 2 << 16 | 0x148 << 20)  # AER v2
    struct.pack_into("<I", cfg, 0x148, 0x0003 | 1 << 16)  # DSN v1, end of list
    return bytes(cfg)


async def test_describe(nursery):
    cfg = _config_space()
    sparse: list[SparseMmapCap | TypeCap] = [SparseMmapCap(((0, 0x1000), (0x2000, 0x1000)))]
    regions = {
        0: (7, 0x20000, sparse),
        1: (3, 0x4000, []),
        2: (0, 0, []),
        3: (3, 0x20, []),
        4: (0, 0, []),
        5: (0, 0, []),
        6: (0, 0, []),
        7: (3, 4096, []),
    }
    irqs = {0: (1, 1), 1: (1, 8), 2: (1, 5), 3: (1, 1), 4: (1, 1)}
    r, w = pipe_with_peer_copy()

    async def script(peer: Peer) -> None:
        while True:
            try:
                msg = await peer.recv()
            except EOFError:
                return
            cmd = msg.header.command
            if cmd == Command.DEVICE_GET_INFO:
                await peer.reply(msg, DeviceInfo(16, 3, 9, 5).pack())
            elif cmd == Command.DEVICE_GET_REGION_INFO:
                argsz, _, index = struct.unpack_from("<III", msg.payload)
                if index not in regions:
                    await peer.error(msg, errno.EINVAL)
                    continue
                flags, size, caps = regions[index]
                reply = region_reply(argsz, index, flags, size, caps)
                full = struct.unpack_from("<I", reply)[0] <= argsz
                await peer.reply(msg, reply, fds=(w,) if caps and full else ())
            elif cmd == Command.DEVICE_GET_IRQ_INFO:
                index = struct.unpack_from("<III", msg.payload)[2]
                flags, count = irqs[index]
                await peer.reply(msg, IrqInfo(16, flags, index, count).pack())
            elif cmd == Command.REGION_READ:
                offset, region, count = struct.unpack("<QII", msg.payload)
                assert region == 7
                data = cfg[offset : offset + count]
                await peer.reply(msg, msg.payload + data)
            else:
                await peer.error(msg, errno.EINVAL)

    async with connected(nursery, script) as client:
        report = await describe(client)
    os.close(w)
    assert_no_writer_left(r)
    expected = [
        "Flags: RESET/PCI  regions: 9  irqs: 5",
        "vendor:device 8086:10d3  subsystem 8086:a01f",
        "class 020000  revision 03",
        "interrupt pin 1",
        "BAR0     size 0x20000 (128K)  [R/W/MMAP/CAPS]  mem32, non-prefetchable",
        "sparse mmap areas: 0x0+0x1000, 0x2000+0x1000",
        "BAR1     size 0x4000 (16K)  [R/W]  mem64, prefetchable",
        "BAR2     size 0x0 (0)  [-]",
        "BAR3     size 0x20 (32)  [R/W]  I/O",
        "CONFIG   size 0x1000 (4K)  [R/W]",
        "VGA      error: DEVICE_GET_REGION_INFO: EINVAL",
        "INTx   count 1  [EVENTFD]",
        "MSI-X  count 5  [EVENTFD]",
        "[40] Power Management: version 3, power state D0",
        "[50] MSI: enable=- 8 vector(s) capable, 1 enabled, 64-bit, per-vector masking -",
        "[70] PCI Express: version 2, Endpoint",
        "[a0] MSI-X: enable=- masked=- table size 5, table BAR3 offset 0x0, PBA BAR3 offset 0x2000",
    ]
    for text in expected:
        assert text in report, f"{text!r} missing from:\n{report}"


@pytest.mark.parametrize(
    "bad",
    [
        struct.pack("<HHIII", 0, 4, 16, 2, 0),  # message type 2
        struct.pack("<HHIII", 0, 4, 8, 1, 0),  # size below the header
    ],
    ids=["type-2", "size-8"],
)
async def test_framing_damage_breaks_the_connection(nursery, bad):
    async def script(peer: Peer) -> None:
        await peer.expect(Command.DEVICE_GET_INFO)
        await peer.send(bad)
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        with pytest.raises(InvalidReply):
            await client.get_info()
        with pytest.raises(InvalidReply):
            await client.reset()


async def test_message_ids_wrap_around(nursery):
    async def script(peer: Peer) -> None:
        msgs = [await peer.expect(Command.DEVICE_RESET) for _ in range(4)]
        assert [m.header.msg_id for m in msgs] == [0xFFFE, 0xFFFF, 0, 1]
        for msg in msgs:
            await peer.reply(msg)
        await peer.expect_eof()

    async with connected(nursery, script) as client:
        client._next_id = 0xFFFE
        async with trio.open_nursery() as inner:
            for _ in range(4):
                inner.start_soon(client.reset)
                await trio.sleep(0)  # keep the send order deterministic
