"""The server over a real UNIX socket: every command, malformed input, life cycle."""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import socket
import stat
import struct
from pathlib import Path

import pytest
import trio

from devices import testdev as td
from devices.testdev import TestDev
from emulator.client import Client, ClientError
from emulator.server import DeviceServer, ServerError, adopt_listener, create_listener
from emulator.testing.harness import RawConnection, ServedDevice, served_device
from emulator.transport import receive_chunk
from protocol.constants import (
    FLAG_NO_REPLY,
    HEADER_SIZE,
    Command,
    DeviceFlags,
    IrqIndex,
    PciRegion,
    RegionFlags,
)
from protocol.header import HEADER, Header, pack_message
from protocol.messages import (
    DeviceInfo,
    DmaMap,
    IrqInfo,
    IrqSet,
    RegionAccess,
    RegionData,
    RegionInfo,
    SparseMmapCap,
    VersionPayload,
)

BAR0 = PciRegion.BAR0
CONFIG = PciRegion.CONFIG


async def raw_socket(path: Path) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    return sock


async def read_message(sock: trio.socket.SocketType) -> tuple[Header, bytes]:
    data = b""
    while len(data) < HEADER_SIZE:
        chunk, _ = await receive_chunk(sock, HEADER_SIZE - len(data), 4)
        assert chunk, "server closed the connection"
        data += chunk
    header = Header.unpack(data)
    payload = b""
    while len(payload) < header.payload_size:
        chunk, _ = await receive_chunk(sock, header.payload_size - len(payload), 4)
        assert chunk
        payload += chunk
    return header, payload


async def is_closed(sock: trio.socket.SocketType) -> bool:
    with trio.fail_after(5):
        data, _ = await receive_chunk(sock, 64, 4)
    return data == b""


# -- VERSION and connection state ---------------------------------------------------------


async def test_version_reply_is_small_and_valid(served: ServedDevice) -> None:
    sock = await raw_socket(served.socket_path)
    request = VersionPayload(0, 0, json.dumps({"capabilities": {"max_msg_fds": 16}}))
    await sock.send(pack_message(7, Command.VERSION, request.pack()))
    header, payload = await read_message(sock)
    assert (header.msg_id, header.command, header.flags) == (7, Command.VERSION, 1)
    reply = VersionPayload.unpack(payload)
    assert (reply.major, reply.minor) == (0, 0)
    caps = json.loads(reply.json_text or "")["capabilities"]
    assert caps["max_msg_fds"] <= 16 and caps["write_multiple"] is True
    assert header.size <= 214  # QEMU's buffer for the reply is its own request's size
    sock.close()


async def test_first_message_must_be_version(served: ServedDevice) -> None:
    sock = await raw_socket(served.socket_path)
    await sock.send(pack_message(3, Command.DEVICE_GET_INFO, DeviceInfo(16, 0, 0, 0).pack()))
    header, payload = await read_message(sock)
    assert header.is_error and header.error == errno.EINVAL and payload == b""
    assert await is_closed(sock)
    sock.close()


async def test_bad_version_closes_connection(served: ServedDevice) -> None:
    sock = await raw_socket(served.socket_path)
    await sock.send(pack_message(1, Command.VERSION, VersionPayload(1, 0, "{}").pack()))
    header, _ = await read_message(sock)
    assert header.is_error and header.error == errno.EINVAL
    assert await is_closed(sock)
    sock.close()


async def test_second_version_is_refused(client: Client) -> None:
    with pytest.raises(ClientError) as info:
        await client.request(Command.VERSION, VersionPayload(0, 0, "{}").pack())
    assert info.value.errno == errno.EINVAL
    assert (await client.get_info()).num_regions == 9


# -- device info, regions, irqs -----------------------------------------------------------


async def test_get_info(client: Client) -> None:
    info = await client.get_info()
    assert info.argsz == 16
    assert info.flags == DeviceFlags.PCI | DeviceFlags.RESET
    assert (info.num_regions, info.num_irqs) == (9, 5)


async def test_region_info_layout(client: Client) -> None:
    expected = {0: 0x1000, 1: 0, 2: 0x10000, 3: 0, 4: 0x1000, 5: 0, 6: 0, 7: 0x1000, 8: 0}
    for index, size in expected.items():
        described = await client.get_region_info(index)
        try:
            assert described.info.size == size, index
            if index == 2:
                assert described.info.flags & RegionFlags.MMAP
                assert described.info.flags & RegionFlags.CAPS
                assert described.info.cap_offset == 32
                assert described.caps == [SparseMmapCap(((0, 0x10000),))]
                assert described.fd is not None
            else:
                assert described.fd is None
                assert not described.info.flags & RegionFlags.MMAP
        finally:
            if described.fd is not None:
                os.close(described.fd)


async def test_region_info_small_argsz_gets_fixed_part_and_no_fd(client: Client) -> None:
    _, payload, fds = await client.request(
        Command.DEVICE_GET_REGION_INFO, RegionInfo(32, 0, 2, 0, 0, 0).pack()
    )
    info = RegionInfo.unpack(payload)
    assert len(payload) == 32 and fds == []
    assert info.argsz > 32 and info.flags & RegionFlags.MMAP and not info.flags & RegionFlags.CAPS


async def test_mmapped_ram_bar_is_the_device_memory(served: ServedDevice, client: Client) -> None:
    described = await client.get_region_info(td.BAR_RAM)
    assert described.fd is not None
    with mmap.mmap(described.fd, described.info.size, mmap.MAP_SHARED) as ram:
        os.close(described.fd)
        ram[0x100:0x104] = b"\xde\xad\xbe\xef"
        assert await client.region_read(td.BAR_RAM, 0x100, 4) == b"\xde\xad\xbe\xef"
        await client.region_write(td.BAR_RAM, 0x2000, b"guest")
        assert ram[0x2000:0x2005] == b"guest"


async def test_irq_info_matches_config_capabilities(served: ServedDevice, client: Client) -> None:
    config = served.device.config
    msix = config.msix_layout
    assert msix is not None
    expected = {
        IrqIndex.INTX: 1 if config.interrupt_pin else 0,
        IrqIndex.MSI: config.msi_vectors,
        IrqIndex.MSIX: msix.table_size,
        IrqIndex.ERR: 1,
        IrqIndex.REQ: 1,
    }
    for index, count in expected.items():
        info = await client.get_irq_info(index)
        assert (info.index, info.count, info.argsz) == (index, count, 16)
    intx = await client.get_irq_info(IrqIndex.INTX)
    assert intx.flags == 0x7  # EVENTFD | MASKABLE | AUTOMASKED, like vfio-pci
    with pytest.raises(ClientError) as exc:
        await client.get_irq_info(5)
    assert exc.value.errno == errno.EINVAL


# -- region access ------------------------------------------------------------------------


async def test_config_space_reads(client: Client) -> None:
    header = await client.region_read(CONFIG, 0, 0x80)
    vendor, device = struct.unpack_from("<HH", header)
    assert (vendor, device) == (td.VENDOR_ID, td.DEVICE_ID)
    # Any size and alignment is accepted (QEMU forwards every guest access).
    for offset in range(0, 0x48, 3):
        for count in (1, 2, 3, 4, 8):
            assert (
                await client.region_read(CONFIG, offset, count) == header[offset : offset + count]
            )


@pytest.mark.parametrize("region", [CONFIG, 0])
async def test_a_zero_count_region_read_is_answered_with_its_header(
    served: ServedDevice, region: int
) -> None:
    """A REGION_READ reply is always {offset, region, count} plus count bytes: for count 0,
    the 16-byte header (not an empty payload)."""
    conn = await RawConnection.connect(served.socket_path)
    try:
        request = struct.pack("<QII", 0x10, region, 0)
        header, payload = await conn.call(Command.REGION_READ, request)
        assert not header.is_error
        assert payload == request
    finally:
        conn.close()


@pytest.mark.parametrize("asked", [False, True])
async def test_error_replies_carry_the_reason_only_when_asked(
    served: ServedDevice, asked: bool
) -> None:
    """The error_detail extension: a client that asks gets the reason after the header;
    every other client (QEMU, libvfio-user) gets the spec's header-only error reply."""
    conn = await RawConnection.connect(served.socket_path, negotiate=False)
    try:
        caps = json.dumps({"capabilities": {"error_detail": True} if asked else {}})
        header, reply = await conn.call(Command.VERSION, VersionPayload(0, 2, caps).pack())
        assert not header.is_error
        offered = json.loads(VersionPayload.unpack(reply).json_text or "{}")["capabilities"]
        assert offered.get("error_detail", False) is asked
        header, payload = await conn.call(
            Command.REGION_READ, struct.pack("<QII", 0, 0xDEADBEEF, 4)
        )
        assert header.is_error and header.error == errno.EINVAL
        if asked:
            assert payload.decode() == "region 3735928559 >= 9 regions"
        else:
            assert payload == b"" and header.size == 16
    finally:
        conn.close()


async def test_bar_sizing_through_config_space(client: Client) -> None:
    await client.region_write(CONFIG, 0x10, b"\xff\xff\xff\xff")
    assert struct.unpack("<I", await client.region_read(CONFIG, 0x10, 4))[0] == 0xFFFFF000
    # ROM sizing as QEMU does it: no ROM reads back 0.
    await client.region_write(CONFIG, 0x30, struct.pack("<I", 0xFFFFF800))
    assert await client.region_read(CONFIG, 0x30, 4) == bytes(4)


async def test_scratch_registers_and_posted_writes(client: Client) -> None:
    for i in range(td.SCRATCH_COUNT):
        await client.region_write(
            BAR0, td.REG_SCRATCH + 4 * i, struct.pack("<I", 0x1000 + i), posted=i % 2 == 0
        )
    for i in range(td.SCRATCH_COUNT):
        value = await client.region_read(BAR0, td.REG_SCRATCH + 4 * i, 4)
        assert struct.unpack("<I", value)[0] == 0x1000 + i
    assert struct.unpack("<I", await client.region_read(BAR0, td.REG_ID, 4))[0] == td.ID_VALUE


async def test_posted_write_errors_are_never_answered(served: ServedDevice) -> None:
    sock = await raw_socket(served.socket_path)
    await sock.send(pack_message(1, Command.VERSION, VersionPayload(0, 2, "{}").pack()))
    await read_message(sock)
    bad = [
        RegionData(0, 99, 4, b"abcd").pack(),  # no such region
        RegionData(0x2000, BAR0, 4, b"abcd").pack(),  # outside the region
        b"\x00" * 3,  # short payload
    ]
    for i, payload in enumerate(bad):
        await sock.send(pack_message(10 + i, Command.REGION_WRITE, payload, FLAG_NO_REPLY))
    await sock.send(pack_message(50, Command.REGION_READ, RegionAccess(0, BAR0, 4).pack()))
    header, payload = await read_message(sock)
    assert header.msg_id == 50 and not header.is_error
    sock.close()


async def test_write_multi(served: ServedDevice, client: Client) -> None:
    entries = [(BAR0, td.REG_SCRATCH + 4 * i, struct.pack("<I", 7 * i)) for i in range(4)]
    assert await client.region_write_multi(entries, posted=False) == 4
    for i in range(4):
        assert await client.region_read(BAR0, td.REG_SCRATCH + 4 * i, 4) == struct.pack("<I", 7 * i)


async def test_reset_restores_power_on_state(client: Client) -> None:
    await client.region_write(BAR0, td.REG_SCRATCH, b"\x01\x02\x03\x04")
    await client.region_write(CONFIG, 4, b"\x06\x00")
    await client.reset()
    assert await client.region_read(BAR0, td.REG_SCRATCH, 4) == bytes(4)
    assert await client.region_read(CONFIG, 4, 2) == bytes(2)


# -- malformed input: errno and the server keeps serving -----------------------------------

MALFORMED = [
    ("dma-map-short", Command.DMA_MAP, b"\x20\0\0\0" + bytes(8), errno.EINVAL),
    ("dma-map-argsz", Command.DMA_MAP, DmaMap(16, 3, 0, 0, 4096).pack(), errno.EINVAL),
    ("dma-map-flags", Command.DMA_MAP, DmaMap(32, 0x100, 0, 0, 4096).pack(), errno.EINVAL),
    ("dma-unmap-short", Command.DMA_UNMAP, bytes(10), errno.EINVAL),
    (
        "dma-unmap-missing",
        Command.DMA_UNMAP,
        struct.pack("<IIQQ", 24, 0, 0x5000, 0x1000),
        errno.ENOENT,
    ),
    ("get-info-short", Command.DEVICE_GET_INFO, bytes(8), errno.EINVAL),
    ("get-info-argsz", Command.DEVICE_GET_INFO, DeviceInfo(8, 0, 0, 0).pack(), errno.EINVAL),
    ("region-info-short", Command.DEVICE_GET_REGION_INFO, bytes(20), errno.EINVAL),
    (
        "region-info-argsz",
        Command.DEVICE_GET_REGION_INFO,
        RegionInfo(16, 0, 0, 0, 0, 0).pack(),
        errno.EINVAL,
    ),
    (
        "region-info-index",
        Command.DEVICE_GET_REGION_INFO,
        RegionInfo(32, 0, 9, 0, 0, 0).pack(),
        errno.EINVAL,
    ),
    (
        "io-fds-flags",
        Command.DEVICE_GET_REGION_IO_FDS,
        struct.pack("<IIII", 16, 1, 0, 0),
        errno.EINVAL,
    ),
    ("irq-info-short", Command.DEVICE_GET_IRQ_INFO, bytes(12), errno.EINVAL),
    ("irq-info-index", Command.DEVICE_GET_IRQ_INFO, IrqInfo(16, 0, 7, 0).pack(), errno.EINVAL),
    ("set-irqs-short", Command.DEVICE_SET_IRQS, bytes(16), errno.EINVAL),
    (
        "set-irqs-two-actions",
        Command.DEVICE_SET_IRQS,
        IrqSet(20, 0x1 | 0x8 | 0x10, 0, 0, 1).pack(),
        errno.EINVAL,
    ),
    ("set-irqs-range", Command.DEVICE_SET_IRQS, IrqSet(20, 0x21, 2, 3, 2).pack(), errno.EINVAL),
    ("set-irqs-index", Command.DEVICE_SET_IRQS, IrqSet(20, 0x21, 9, 0, 1).pack(), errno.EINVAL),
    (
        "set-irqs-bool-count",
        Command.DEVICE_SET_IRQS,
        IrqSet(22, 0x22, 2, 0, 3).pack()[:20] + b"\1\1",
        errno.EINVAL,
    ),
    ("read-short", Command.REGION_READ, bytes(12), errno.EINVAL),
    ("read-region", Command.REGION_READ, RegionAccess(0, 99, 4).pack(), errno.EINVAL),
    ("read-empty-region", Command.REGION_READ, RegionAccess(0, 1, 4).pack(), errno.EINVAL),
    ("read-offset", Command.REGION_READ, RegionAccess(0xFFE, BAR0, 4).pack(), errno.EINVAL),
    (
        "read-huge-offset",
        Command.REGION_READ,
        RegionAccess(2**64 - 2, BAR0, 4).pack(),
        errno.EINVAL,
    ),
    ("read-count", Command.REGION_READ, RegionAccess(0, BAR0, 2**20 + 1).pack(), errno.EINVAL),
    (
        "write-count-mismatch",
        Command.REGION_WRITE,
        RegionAccess(0, BAR0, 8).pack() + b"abc",
        errno.EINVAL,
    ),
    ("write-offset", Command.REGION_WRITE, RegionData(0x1000, BAR0, 1, b"x").pack(), errno.EINVAL),
    ("multi-zero", Command.REGION_WRITE_MULTI, struct.pack("<Q", 0), errno.EINVAL),
    ("reset-payload", Command.DEVICE_RESET, b"junk", errno.EINVAL),
    ("feature-get-and-set", Command.DEVICE_FEATURE, struct.pack("<II", 16, 0x30001), errno.EINVAL),
    ("feature-unknown", Command.DEVICE_FEATURE, struct.pack("<II", 16, 0x10005), errno.EINVAL),
    ("feature-short-argsz", Command.DEVICE_FEATURE, struct.pack("<II", 8, 0x10001), errno.EINVAL),
    ("mig-read", Command.MIG_DATA_READ, struct.pack("<II", 1032, 1024), errno.EINVAL),
    ("dirty-pages", Command.DIRTY_PAGES, struct.pack("<II", 8, 1), errno.EINVAL),
    ("dma-read-from-client", Command.DMA_READ, struct.pack("<QQ", 0, 4), errno.EINVAL),
    ("unknown-command", 99, b"\0" * 8, errno.EINVAL),
    ("no-payload", Command.DEVICE_GET_INFO, b"", errno.EINVAL),
]


@pytest.mark.parametrize(
    ("command", "payload", "expected"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
async def test_malformed_request_gets_errno_and_server_keeps_serving(
    client: Client, command: int, payload: bytes, expected: int
) -> None:
    with pytest.raises(ClientError) as info:
        await client.request(command, payload)
    assert info.value.errno == expected
    assert (await client.get_info()).num_regions == 9
    assert await client.region_read(BAR0, td.REG_ID, 4) == struct.pack("<I", td.ID_VALUE)


async def test_oversized_message_is_refused_and_skipped(served: ServedDevice) -> None:
    sock = await raw_socket(served.socket_path)
    await sock.send(pack_message(1, Command.VERSION, VersionPayload(0, 2, "{}").pack()))
    await read_message(sock)
    limit = served.server.limits.max_message_size
    big = RegionData(0, BAR0, limit, bytes(limit)).pack()
    data = pack_message(2, Command.REGION_WRITE, big)
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]
    header, _ = await read_message(sock)
    assert (header.msg_id, header.is_error, header.error) == (2, True, errno.E2BIG)
    await sock.send(pack_message(3, Command.REGION_READ, RegionAccess(0, BAR0, 4).pack()))
    header, payload = await read_message(sock)
    assert header.msg_id == 3 and payload[16:] == struct.pack("<I", td.ID_VALUE)
    sock.close()


async def test_a_size_claim_past_the_skip_limit_is_answered_and_closed(
    served: ServedDevice,
) -> None:
    """A header claiming 0xfffffff0 bytes with no body: answered E2BIG and closed at once,
    not a silent wait for 4 GiB; the next client is served."""
    conn = await RawConnection.connect(served.socket_path)
    try:
        await conn.send_raw(HEADER.pack(7, Command.REGION_WRITE, 0xFFFFFFF0, 0, 0))
        reply = await conn.receive(timeout=5)
        assert reply is not None
        header, _ = reply
        assert (header.msg_id, header.is_error, header.error) == (7, True, errno.E2BIG)
        assert await conn.closed(timeout=5)
    finally:
        conn.close()
    async with Client.connect(served.socket_path) as client:
        assert await client.region_read(BAR0, td.REG_ID, 4) == struct.pack("<I", td.ID_VALUE)


async def test_size_below_header_closes_only_that_connection(served: ServedDevice) -> None:
    sock = await raw_socket(served.socket_path)
    await sock.send(pack_message(1, Command.VERSION, VersionPayload(0, 2, "{}").pack()))
    await read_message(sock)
    await sock.send(struct.pack("<HHIII", 2, Command.REGION_READ, 8, 0, 0))
    assert await is_closed(sock)
    sock.close()
    async with Client.connect(served.socket_path) as again:
        assert (await again.get_info()).num_regions == 9


# -- clients, disconnects, sockets ---------------------------------------------------------


async def test_second_client_is_refused_without_disturbing_the_first(
    served: ServedDevice, client: Client
) -> None:
    await client.region_write(BAR0, td.REG_SCRATCH, b"\x05\x00\x00\x00")
    sock = await raw_socket(served.socket_path)
    await sock.send(pack_message(9, Command.VERSION, VersionPayload(0, 2, "{}").pack()))
    header, _ = await read_message(sock)
    assert (header.msg_id, header.is_error, header.error) == (9, True, errno.EBUSY)
    assert await is_closed(sock)
    sock.close()
    assert await client.region_read(BAR0, td.REG_SCRATCH, 4) == b"\x05\x00\x00\x00"


async def test_disconnect_drops_maps_and_fds_but_keeps_device_state(
    served: ServedDevice, tmp_path: Path
) -> None:
    from emulator.testing.harness import EventFd, GuestRam

    with GuestRam(0x10000) as ram:
        async with Client.connect(served.socket_path) as first:
            await first.region_write(BAR0, td.REG_SCRATCH + 4, b"keep")
            await first.dma_map(0, ram.size, fd=ram.fd)
            irq = EventFd()
            await first.set_irqs(IrqIndex.INTX, 0x24, 0, 1, fds=[irq.fd])
            session = served.server.active
            assert session is not None and len(session.maps) == 1
            assert session.irqs.fd_count() == 1
        with trio.fail_after(5):
            while served.server.active is not None:
                await trio.sleep(0.01)
        assert len(session.maps) == 0 and session.irqs.fd_count() == 0
        irq.close()
        async with Client.connect(served.socket_path) as second:
            assert await second.region_read(BAR0, td.REG_SCRATCH + 4, 4) == b"keep"


async def test_socket_is_private_and_removed_on_exit(tmp_path: Path) -> None:
    path = tmp_path / "private.sock"
    async with served_device(TestDev(), tmp_path, name=path.name):
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert not path.exists()


def test_stale_socket_is_replaced_but_a_file_is_not(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    old = socket.socket(socket.AF_UNIX)
    old.bind(str(stale))
    old.close()  # bound, never listened: a connect is refused
    create_listener(stale).close()
    regular = tmp_path / "file.sock"
    regular.write_text("not a socket")
    with pytest.raises(ServerError):
        create_listener(regular)
    assert regular.read_text() == "not a socket"


async def test_inherited_listening_socket(tmp_path: Path) -> None:
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    server = DeviceServer(TestDev(), listen_fd=listener.detach())
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with Client.connect(path) as client:
            assert (await client.get_info()).num_irqs == 5
        nursery.cancel_scope.cancel()
    assert path.exists()  # we did not create it, so we leave it


def test_inherited_fd_must_be_a_listening_unix_socket(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for not_listening in (a, udp):
            with pytest.raises(ServerError):
                adopt_listener(not_listening.fileno())
            os.fstat(not_listening.fileno())  # refused, and still open for its owner
    finally:
        for s in (a, b, udp):
            s.close()


async def test_trace_logs_each_message(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vfio_user_emu.trace")
    async with (
        served_device(TestDev(), tmp_path, trace=True) as served,
        Client.connect(served.socket_path) as client,
    ):
        await client.region_read(BAR0, 0, 4)
    lines = [r.getMessage() for r in caplog.records if r.name == "vfio_user_emu.trace"]
    assert any("VERSION cmd" in line and "json=" in line for line in lines)
    assert any(
        "REGION_READ cmd" in line and "region=0 offset=0x0 count=4" in line for line in lines
    )
    assert any("REGION_READ reply" in line for line in lines)
