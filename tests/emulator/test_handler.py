"""emulator.handler: every command's handling over a real UNIX socket (device info, regions,
interrupts, region access, reset) and malformed requests answered with an errno.

Migration commands are tested in tests/scenarios/test_migration_wire.py (the whole v2
walk) and the data fd in tests/emulator/test_datafd.py.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct

import pytest

from devices import testdev as td
from emulator.client import Client, ClientError
from emulator.testing.harness import RawConnection, ServedDevice
from protocol.constants import (
    FLAG_NO_REPLY,
    Command,
    DeviceFlags,
    IrqIndex,
    PciRegion,
    RegionFlags,
)
from protocol.header import pack_message
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
from tests.emulator.test_connection import raw_socket, receive_message

BAR0 = PciRegion.BAR0
CONFIG = PciRegion.CONFIG


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
    await receive_message(sock)
    bad = [
        RegionData(0, 99, 4, b"abcd").pack(),  # no such region
        RegionData(0x2000, BAR0, 4, b"abcd").pack(),  # outside the region
        b"\x00" * 3,  # short payload
    ]
    for i, payload in enumerate(bad):
        await sock.send(pack_message(10 + i, Command.REGION_WRITE, payload, FLAG_NO_REPLY))
    await sock.send(pack_message(50, Command.REGION_READ, RegionAccess(0, BAR0, 4).pack()))
    header, payload = await receive_message(sock)
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
