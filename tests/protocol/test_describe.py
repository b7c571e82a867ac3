"""One-line message descriptions (``--trace``)."""

from __future__ import annotations

import struct

from protocol.constants import Command
from protocol.describe import describe
from protocol.header import Header, pack_message
from protocol.messages import DmaLayout, RegionAccess


def test_region_read_line() -> None:
    payload = RegionAccess(0x10, 0, 4).pack()
    header = Header.unpack(pack_message(7, Command.REGION_READ, payload))
    assert describe(header, payload) == (
        "id=7 REGION_READ cmd size=32 region=0 offset=0x10 count=4 data=0B"
    )


def test_dma_read_reply_in_qemus_layout() -> None:
    # QEMU: address u64, count u32, data at 12. Read with the spec layout, the first data
    # bytes would land in the count's high half.
    data = bytes.fromhex("c0de") + bytes(62)
    payload = struct.pack("<QI", 0x2000, len(data)) + data + bytes(4)
    header = Header.unpack(pack_message(3, Command.DMA_READ, payload, flags=1))
    assert "count=64 " in describe(header, payload, dma_layout=DmaLayout.QEMU)
    assert "count=64 " not in describe(header, payload)


def test_undecodable_payload_is_described_not_raised() -> None:
    header = Header.unpack(pack_message(1, Command.DEVICE_GET_INFO, b"\x01"))
    assert "undecodable" in describe(header, b"\x01")


def test_dirty_pages_lines() -> None:
    start = struct.pack("<II", 8, 1)
    header = Header.unpack(pack_message(0, Command.DIRTY_PAGES, start))
    assert describe(header, start).endswith("DIRTY_PAGES cmd size=24 argsz=8 flags=0x1")
    reply = struct.pack("<IIQQQQ", 48, 4, 0x1000, 0x1000, 4096, 8) + bytes(8)
    header = Header.unpack(pack_message(5, Command.DIRTY_PAGES, reply, flags=1))
    assert describe(header, reply).endswith(
        "argsz=48 flags=0x4 iova=0x1000 size=0x1000 pgsize=0x1000 bitmap=8B"
    )
    assert "undecodable" in describe(header, b"\x01")
