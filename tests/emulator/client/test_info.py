"""emulator.client.info: ``describe`` against a scripted peer on a real UNIX socket (the peer
of tests/emulator/client/test_requests.py)."""

from __future__ import annotations

import errno
import os
import struct

from emulator.client.info import describe
from protocol.constants import Command
from protocol.messages import (
    DeviceInfo,
    IrqInfo,
    SparseMmapCap,
    TypeCap,
)
from tests.emulator.client.test_requests import (
    Peer,
    assert_no_writer_left,
    connected,
    pipe_with_peer_copy,
    region_reply,
)


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
