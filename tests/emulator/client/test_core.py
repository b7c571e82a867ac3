"""emulator.client.core, the typed commands, against a scripted peer on a real UNIX socket.

The peer (tests/emulator/client/test_requests.py) is written with the protocol codecs; each
test scripts what the "server" does and checks the exact bytes the client sends. Expected
request payloads are spelled out with ``struct`` from the facts sheet rather than with the
codecs, so a codec bug cannot hide.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from emulator.client import (
    Client,
    ClientError,
    InvalidReply,
)
from emulator.transport import close_fds
from protocol.constants import Command
from protocol.framer import Message
from protocol.header import pack_error_reply
from protocol.messages import (
    DeviceInfo,
    IoFdEntry,
    IrqInfo,
    RegionInfo,
    SparseMmapCap,
    TypeCap,
    VersionPayload,
)
from tests.emulator.client.test_requests import (
    SERVER_JSON,
    Peer,
    assert_no_writer_left,
    connected,
    pipe_with_peer_copy,
    region_reply,
)

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
