"""emulator.client.requests, the request machinery, against a scripted peer on a real UNIX
socket: matching replies to requests, error replies, raw sends, concurrency, the server's DMA
requests, broken connections, message ids.

The peer is written here with the protocol codecs (test_core.py and test_info.py use it
too); each test scripts what the "server" does and checks the exact bytes the client sends.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from emulator.client import (
    Client,
    ClientError,
    ConnectionLost,
    GuestMemory,
    InvalidReply,
)
from emulator.transport import close_fds, receive_chunk, send_message
from protocol.constants import FLAG_ERROR, FLAG_NO_REPLY, Command, MsgType
from protocol.framer import Message, MessageFramer
from protocol.header import Header, pack_error_reply, pack_message, pack_reply
from protocol.messages import (
    DeviceInfo,
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


# --------------------------------------------------------------------------------------------
# error replies and raw requests


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
