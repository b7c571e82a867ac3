"""Payload codecs for every vfio-user command (spec 0.9.2, facts sheet section 2).

Each type packs to exactly the bytes on the wire after the 16-byte header and unpacks from
them. ``unpack`` validates the shape (sizes, argsz, flag bits) and raises
:class:`~protocol.errors.ProtocolError` carrying the errno to answer with; it never raises
anything else. Semantic checks that need device knowledge (region exists, offset in range)
belong to the session layer.

Reply sizes matter: libvfio-user's client reads exactly the size it expects and QEMU refuses
replies larger than the request buffer, so every reply type here packs to its exact size.
"""

from __future__ import annotations

import enum
import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Self

from .constants import (
    FEATURE_FLAGS_KNOWN,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_DATA_MASK,
    DmaMapFlags,
    DmaUnmapFlags,
    IrqSetFlags,
    RegionCapId,
)
from .errors import ProtocolError, require

U64 = struct.Struct("<Q")
ARGSZ_FLAGS = struct.Struct("<II")


def _need(payload: bytes | memoryview, size: int, what: str) -> None:
    if len(payload) < size:  # the message is only formatted when it is needed
        raise ProtocolError(errno.EINVAL, f"{what}: payload of {len(payload)} bytes, need {size}")


# --------------------------------------------------------------------------------------------
# VERSION (1)

VERSION_FIXED = struct.Struct("<HH")


@dataclass(frozen=True, slots=True)
class VersionPayload:
    """major, minor and the optional NUL-terminated JSON capabilities text."""

    major: int
    minor: int
    json_text: str | None = None

    def pack(self) -> bytes:
        fixed = VERSION_FIXED.pack(self.major, self.minor)
        if self.json_text is None:
            return fixed
        if "\0" in self.json_text:
            raise ValueError("VERSION JSON text may not contain NUL")
        return fixed + self.json_text.encode() + b"\0"

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        _need(payload, VERSION_FIXED.size, "VERSION")
        major, minor = VERSION_FIXED.unpack_from(payload)
        rest = bytes(payload[VERSION_FIXED.size :])
        if not rest:
            return cls(major, minor, None)
        require(rest.endswith(b"\0"), "VERSION: JSON is not NUL-terminated")
        body = rest[:-1]
        require(b"\0" not in body, "VERSION: NUL inside the JSON text")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(errno.EINVAL, f"VERSION: JSON is not UTF-8 ({exc})") from None
        return cls(major, minor, text)


# --------------------------------------------------------------------------------------------
# DMA_MAP (2), DMA_UNMAP (3)

DMA_MAP = struct.Struct("<IIQQQ")
DMA_UNMAP = struct.Struct("<IIQQ")
DMA_BITMAP = struct.Struct("<QQ")


@dataclass(frozen=True, slots=True)
class DmaMap:
    argsz: int
    flags: int
    offset: int
    address: int
    size: int

    SIZE: ClassVar[int] = DMA_MAP.size
    # int(): ~ on an IntFlag only inverts its defined bits (~READ|WRITE == 0).
    KNOWN_FLAGS: ClassVar[int] = int(DmaMapFlags.READ | DmaMapFlags.WRITE)

    def pack(self) -> bytes:
        return DMA_MAP.pack(self.argsz, self.flags, self.offset, self.address, self.size)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        _need(payload, DMA_MAP.size, "DMA_MAP")
        msg = cls(*DMA_MAP.unpack_from(payload))
        require(msg.argsz >= DMA_MAP.size, f"DMA_MAP: argsz {msg.argsz} < {DMA_MAP.size}")
        require(not msg.flags & ~cls.KNOWN_FLAGS, f"DMA_MAP: unknown flags {msg.flags:#x}")
        require(msg.size > 0, "DMA_MAP: size 0")
        require(msg.address + msg.size <= 1 << 64, "DMA_MAP: address range wraps")
        require(msg.offset + msg.size <= 1 << 64, "DMA_MAP: offset range wraps")
        return msg


@dataclass(frozen=True, slots=True)
class DmaUnmap:
    """DMA_UNMAP request; its reply echoes the same 24 bytes (plus a bitmap, legacy)."""

    argsz: int
    flags: int
    address: int
    size: int
    bitmap_pgsize: int = 0
    bitmap_size: int = 0

    SIZE: ClassVar[int] = DMA_UNMAP.size

    @property
    def wants_bitmap(self) -> bool:
        return bool(self.flags & DmaUnmapFlags.GET_DIRTY_BITMAP)

    @property
    def unmap_all(self) -> bool:
        return bool(self.flags & DmaUnmapFlags.ALL)

    def pack(self) -> bytes:
        fixed = DMA_UNMAP.pack(self.argsz, self.flags, self.address, self.size)
        if self.wants_bitmap:
            return fixed + DMA_BITMAP.pack(self.bitmap_pgsize, self.bitmap_size)
        return fixed

    def pack_echo(self) -> bytes:
        """The 24-byte reply: the request's struct echoed (spec: "the original DMA entry")."""
        return DMA_UNMAP.pack(self.argsz, self.flags, self.address, self.size)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        _need(payload, DMA_UNMAP.size, "DMA_UNMAP")
        argsz, flags, address, size = DMA_UNMAP.unpack_from(payload)
        known = int(DmaUnmapFlags.GET_DIRTY_BITMAP | DmaUnmapFlags.ALL)
        require(not flags & ~known, f"DMA_UNMAP: unknown flags {flags:#x}")
        require(argsz >= DMA_UNMAP.size, f"DMA_UNMAP: argsz {argsz} < {DMA_UNMAP.size}")
        if flags & DmaUnmapFlags.ALL:
            require(not flags & DmaUnmapFlags.GET_DIRTY_BITMAP, "DMA_UNMAP: ALL with bitmap")
            require(address == 0 and size == 0, "DMA_UNMAP: ALL needs address = size = 0")
            return cls(argsz, flags, address, size)
        require(address + size <= 1 << 64, "DMA_UNMAP: address range wraps")
        if flags & DmaUnmapFlags.GET_DIRTY_BITMAP:
            _need(payload, DMA_UNMAP.size + DMA_BITMAP.size, "DMA_UNMAP with bitmap")
            pgsize, bsize = DMA_BITMAP.unpack_from(payload, DMA_UNMAP.size)
            return cls(argsz, flags, address, size, pgsize, bsize)
        return cls(argsz, flags, address, size)


# --------------------------------------------------------------------------------------------
# DEVICE_GET_INFO (4)

DEVICE_INFO = struct.Struct("<IIII")


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    argsz: int
    flags: int
    num_regions: int
    num_irqs: int

    SIZE: ClassVar[int] = DEVICE_INFO.size

    def pack(self) -> bytes:
        return DEVICE_INFO.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        _need(payload, DEVICE_INFO.size, "DEVICE_GET_INFO")
        msg = cls(*DEVICE_INFO.unpack_from(payload))
        require(msg.argsz >= DEVICE_INFO.size, f"DEVICE_GET_INFO: argsz {msg.argsz} < 16")
        return msg


# --------------------------------------------------------------------------------------------
# DEVICE_GET_REGION_INFO (5) and region capabilities

REGION_INFO = struct.Struct("<IIIIQQ")
CAP_HEADER = struct.Struct("<HHI")
SPARSE_HEADER = struct.Struct("<II")
SPARSE_AREA = struct.Struct("<QQ")
TYPE_CAP = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class SparseMmapCap:
    areas: tuple[tuple[int, int], ...]  # (offset, size) relative to the region

    ID: ClassVar[int] = RegionCapId.SPARSE_MMAP
    VERSION: ClassVar[int] = 1

    def body(self) -> bytes:
        parts = [SPARSE_HEADER.pack(len(self.areas), 0)]
        parts.extend(SPARSE_AREA.pack(off, size) for off, size in self.areas)
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class TypeCap:
    type: int
    subtype: int

    ID: ClassVar[int] = RegionCapId.TYPE
    VERSION: ClassVar[int] = 1

    def body(self) -> bytes:
        return TYPE_CAP.pack(self.type, self.subtype)


@dataclass(frozen=True, slots=True)
class NdmaCap:
    """Legacy v1 migration region: the device supports the NDMA bit (no body)."""

    ID: ClassVar[int] = RegionCapId.MIGRATION_NDMA
    VERSION: ClassVar[int] = 1

    def body(self) -> bytes:
        return b""


RegionCap = SparseMmapCap | TypeCap | NdmaCap


def pack_region_caps(caps: Sequence[RegionCap], base: int) -> bytes:
    """Encode a capability chain whose first header sits ``base`` bytes after the struct start.

    ``next`` offsets count from the start of the 32-byte region-info struct, as does
    ``cap_offset``; the last cap has next = 0.
    """
    out = bytearray()
    for i, cap in enumerate(caps):
        body = cap.body()
        here = base + len(out)
        nxt = here + CAP_HEADER.size + len(body) if i + 1 < len(caps) else 0
        out += CAP_HEADER.pack(cap.ID, cap.VERSION, nxt)
        out += body
    return bytes(out)


def unpack_region_caps(payload: bytes | memoryview, cap_offset: int) -> list[RegionCap]:
    """Walk a capability chain inside a GET_REGION_INFO reply payload (offsets from 0)."""
    caps: list[RegionCap] = []
    seen: set[int] = set()
    offset = cap_offset
    while offset:
        require(offset not in seen, "region caps: loop in the chain")
        require(offset >= REGION_INFO.size, f"region caps: offset {offset} inside the struct")
        seen.add(offset)
        _need(payload, offset + CAP_HEADER.size, "region cap header")
        cap_id, version, nxt = CAP_HEADER.unpack_from(payload, offset)
        body = offset + CAP_HEADER.size
        if cap_id == RegionCapId.SPARSE_MMAP:
            _need(payload, body + SPARSE_HEADER.size, "sparse mmap cap")
            nr_areas, _ = SPARSE_HEADER.unpack_from(payload, body)
            end = body + SPARSE_HEADER.size + nr_areas * SPARSE_AREA.size
            _need(payload, end, "sparse mmap areas")
            areas = tuple(
                SPARSE_AREA.unpack_from(payload, body + SPARSE_HEADER.size + i * SPARSE_AREA.size)
                for i in range(nr_areas)
            )
            caps.append(SparseMmapCap(areas))
        elif cap_id == RegionCapId.TYPE:
            _need(payload, body + TYPE_CAP.size, "type cap")
            caps.append(TypeCap(*TYPE_CAP.unpack_from(payload, body)))
        elif cap_id == RegionCapId.MIGRATION_NDMA:
            caps.append(NdmaCap())
        else:
            raise ProtocolError(errno.EINVAL, f"region caps: unknown cap id {cap_id} v{version}")
        offset = nxt
    return caps


@dataclass(frozen=True, slots=True)
class RegionInfo:
    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int

    SIZE: ClassVar[int] = REGION_INFO.size

    def pack(self) -> bytes:
        return REGION_INFO.pack(
            self.argsz, self.flags, self.index, self.cap_offset, self.size, self.offset
        )

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        _need(payload, REGION_INFO.size, "DEVICE_GET_REGION_INFO")
        msg = cls(*REGION_INFO.unpack_from(payload))
        require(msg.argsz >= REGION_INFO.size, f"GET_REGION_INFO: argsz {msg.argsz} < 32")
        return msg


# --------------------------------------------------------------------------------------------
# DEVICE_GET_REGION_IO_FDS (6)

IO_FDS_HEADER = struct.Struct("<IIII")
IO_FD_ENTRY = struct.Struct("<QQIIIIQ")  # spec layout, 40 bytes


@dataclass(frozen=True, slots=True)
class IoFdEntry:
    offset: int
    size: int
    fd_index: int
    type: int
    flags: int
    datamatch: int

    def pack(self) -> bytes:
        return IO_FD_ENTRY.pack(
            self.offset, self.size, self.fd_index, self.type, self.flags, 0, self.datamatch
        )


@dataclass(frozen=True, slots=True)
class RegionIoFds:
    argsz: int
    flags: int
    index: int
    count: int
    entries: tuple[IoFdEntry, ...] = ()

    HEADER_SIZE: ClassVar[int] = IO_FDS_HEADER.size
    ENTRY_SIZE: ClassVar[int] = IO_FD_ENTRY.size

    def pack(self) -> bytes:
        head = IO_FDS_HEADER.pack(self.argsz, self.flags, self.index, self.count)
        return head + b"".join(e.pack() for e in self.entries)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        _need(payload, IO_FDS_HEADER.size, "DEVICE_GET_REGION_IO_FDS")
        argsz, flags, index, count = IO_FDS_HEADER.unpack_from(payload)
        require(argsz >= IO_FDS_HEADER.size, f"GET_REGION_IO_FDS: argsz {argsz} < 16")
        return cls(argsz, flags, index, count)

    @classmethod
    def unpack_reply(cls, payload: bytes | memoryview) -> Self:
        head = cls.unpack(payload)
        entries = []
        for i in range(head.count if len(payload) > IO_FDS_HEADER.size else 0):
            at = IO_FDS_HEADER.size + i * IO_FD_ENTRY.size
            _need(payload, at + IO_FD_ENTRY.size, "GET_REGION_IO_FDS entry")
            off, size, fd_index, typ, flags, _pad, dm = IO_FD_ENTRY.unpack_from(payload, at)
            entries.append(IoFdEntry(off, size, fd_index, typ, flags, dm))
        return cls(head.argsz, head.flags, head.index, head.count, tuple(entries))


# --------------------------------------------------------------------------------------------
# DEVICE_GET_IRQ_INFO (7)

IRQ_INFO = struct.Struct("<IIII")


@dataclass(frozen=True, slots=True)
class IrqInfo:
    argsz: int
    flags: int
    index: int
    count: int

    SIZE: ClassVar[int] = IRQ_INFO.size

    def pack(self) -> bytes:
        return IRQ_INFO.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        _need(payload, IRQ_INFO.size, "DEVICE_GET_IRQ_INFO")
        msg = cls(*IRQ_INFO.unpack_from(payload))
        require(msg.argsz >= IRQ_INFO.size, f"GET_IRQ_INFO: argsz {msg.argsz} < 16")
        return msg


# --------------------------------------------------------------------------------------------
# DEVICE_SET_IRQS (8)

IRQ_SET = struct.Struct("<IIIII")


@dataclass(frozen=True, slots=True)
class IrqSet:
    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""  # DATA_BOOL: one byte per vector

    SIZE: ClassVar[int] = IRQ_SET.size

    @property
    def data_type(self) -> IrqSetFlags:
        return IrqSetFlags(self.flags & IRQ_SET_DATA_MASK)

    @property
    def action(self) -> IrqSetFlags:
        return IrqSetFlags(self.flags & IRQ_SET_ACTION_MASK)

    def pack(self) -> bytes:
        return IRQ_SET.pack(self.argsz, self.flags, self.index, self.start, self.count) + self.data

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        _need(payload, IRQ_SET.size, "DEVICE_SET_IRQS")
        argsz, flags, index, start, count = IRQ_SET.unpack_from(payload)
        require(argsz >= IRQ_SET.size, f"SET_IRQS: argsz {argsz} < 20")
        known = int(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK)
        require(not flags & ~known, f"SET_IRQS: unknown flags {flags:#x}")
        data_bits = flags & IRQ_SET_DATA_MASK
        action_bits = flags & IRQ_SET_ACTION_MASK
        require(data_bits.bit_count() == 1, f"SET_IRQS: need exactly one DATA bit ({flags:#x})")
        require(action_bits.bit_count() == 1, f"SET_IRQS: need one ACTION bit ({flags:#x})")
        require(start + count <= 0xFFFFFFFF, "SET_IRQS: start + count overflows")
        data = bytes(payload[IRQ_SET.size :])
        if data_bits == IrqSetFlags.DATA_BOOL:
            require(len(data) == count, f"SET_IRQS: {len(data)} bool bytes for count {count}")
            require(argsz >= IRQ_SET.size + count, "SET_IRQS: argsz too small for bool data")
        else:
            require(not data, f"SET_IRQS: {len(data)} unexpected data bytes")
        return cls(argsz, flags, index, start, count, data)


# --------------------------------------------------------------------------------------------
# REGION_READ (9), REGION_WRITE (10)

REGION_ACCESS = struct.Struct("<QII")


@dataclass(frozen=True, slots=True)
class RegionAccess:
    """REGION_READ request / REGION_WRITE reply: offset, region, count (no data)."""

    offset: int
    region: int
    count: int

    SIZE: ClassVar[int] = REGION_ACCESS.size

    def pack(self) -> bytes:
        return REGION_ACCESS.pack(self.offset, self.region, self.count)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        _need(payload, REGION_ACCESS.size, "REGION access")
        return cls(*REGION_ACCESS.unpack_from(payload))


@dataclass(frozen=True, slots=True)
class RegionData:
    """REGION_WRITE request / REGION_READ reply: offset, region, count and the data."""

    offset: int
    region: int
    count: int
    data: bytes

    def pack(self) -> bytes:
        return REGION_ACCESS.pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        _need(payload, REGION_ACCESS.size, "REGION data")
        offset, region, count = REGION_ACCESS.unpack_from(payload)
        data = bytes(payload[REGION_ACCESS.size :])
        if len(data) != count:
            raise ProtocolError(
                errno.EINVAL, f"REGION data: count {count} but {len(data)} data bytes"
            )
        return cls(offset, region, count, data)


# --------------------------------------------------------------------------------------------
# DMA_READ (11), DMA_WRITE (12): server -> client

DMA_RW = struct.Struct("<QQ")
QEMU_DMA_RW = struct.Struct("<QI")  # QEMU 10.x: count is u32, data starts at payload offset 12


@dataclass(frozen=True, slots=True)
class DmaRw:
    """DMA_READ request / DMA_WRITE reply (spec layout): address and count."""

    address: int
    count: int

    SIZE: ClassVar[int] = DMA_RW.size

    def pack(self) -> bytes:
        return DMA_RW.pack(self.address, self.count)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        _need(payload, DMA_RW.size, "DMA access")
        return cls(*DMA_RW.unpack_from(payload))


@dataclass(frozen=True, slots=True)
class DmaData:
    """DMA_WRITE request / DMA_READ reply (spec layout): address, count and the data."""

    address: int
    count: int
    data: bytes

    def pack(self) -> bytes:
        return DMA_RW.pack(self.address, self.count) + self.data

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        _need(payload, DMA_RW.size, "DMA data")
        address, count = DMA_RW.unpack_from(payload)
        data = bytes(payload[DMA_RW.size :])
        require(len(data) == count, f"DMA data: count {count} but {len(data)} data bytes")
        return cls(address, count, data)


class DmaLayout(enum.Enum):
    """How a peer lays out in-band DMA messages (facts section 4.4).

    ``SPEC`` (the spec, libvfio-user): ``address u64, count u64, data``.
    ``QEMU`` (QEMU 10.x's unpadded ``VFIOUserDMARW``): ``address u64, count u32, data`` with
    the data at payload offset 12 and 4 trailing bytes, so the payload is still 16 + count.
    The two cannot be told apart from one message (a QEMU reply whose data starts with four
    zero bytes reads as a valid spec reply), so the layout is fixed per connection.
    """

    SPEC = "spec"
    QEMU = "qemu"


def pack_dma_write(layout: DmaLayout, address: int, data: bytes) -> bytes:
    """A server->client DMA_WRITE request payload in the peer's layout."""
    if layout is DmaLayout.QEMU:
        return QEMU_DMA_RW.pack(address, len(data)) + data + bytes(4)
    return DMA_RW.pack(address, len(data)) + data


def unpack_dma_read_reply(
    payload: bytes | memoryview, address: int, count: int, layout: DmaLayout = DmaLayout.SPEC
) -> bytes:
    """The data of a DMA_READ reply, checked against what was asked."""
    require(len(payload) == DMA_RW.size + count, f"DMA_READ reply: {len(payload)} bytes")
    if layout is DmaLayout.QEMU:
        got_address, got_count = QEMU_DMA_RW.unpack_from(payload)
        start = QEMU_DMA_RW.size
    else:
        got_address, got_count = DMA_RW.unpack_from(payload)
        start = DMA_RW.size
    require(got_address == address, f"DMA_READ reply for {got_address:#x}, asked {address:#x}")
    require(got_count == count, f"DMA_READ reply count {got_count}, asked {count}")
    return bytes(payload[start : start + count])


def check_dma_write_reply(payload: bytes | memoryview, address: int, count: int) -> None:
    """A DMA_WRITE reply may be empty (QEMU), 12 bytes (spec table) or 16 (libvfio-user)."""
    size = len(payload)
    require(size in (0, 12, 16), f"DMA_WRITE reply of {size} bytes")
    if size >= 12:
        got_address = U64.unpack_from(payload)[0]
        require(got_address == address, f"DMA_WRITE reply for {got_address:#x}")


# --------------------------------------------------------------------------------------------
# REGION_WRITE_MULTI (15)

MULTI_ENTRY = struct.Struct("<QII8s")
MULTI_MAX_DATA = 8


@dataclass(frozen=True, slots=True)
class WriteMultiEntry:
    offset: int
    region: int
    count: int
    data: bytes  # the first ``count`` bytes of the 8-byte data field


@dataclass(frozen=True, slots=True)
class RegionWriteMulti:
    entries: tuple[WriteMultiEntry, ...] = field(default_factory=tuple)

    #: Upper bound on entries per message; QEMU sends at most 200.
    MAX_ENTRIES: ClassVar[int] = 4096

    def pack(self) -> bytes:
        out = [U64.pack(len(self.entries))]
        for e in self.entries:
            if not 0 < len(e.data) <= MULTI_MAX_DATA or e.count != len(e.data):
                raise ValueError(f"write-multi entry of {len(e.data)} bytes (1..8, = count)")
            out.append(MULTI_ENTRY.pack(e.offset, e.region, e.count, e.data.ljust(8, b"\0")))
        return b"".join(out)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        _need(payload, U64.size, "REGION_WRITE_MULTI")
        (wr_cnt,) = U64.unpack_from(payload)
        require(0 < wr_cnt <= cls.MAX_ENTRIES, f"REGION_WRITE_MULTI: wr_cnt {wr_cnt}")
        expected = U64.size + wr_cnt * MULTI_ENTRY.size
        require(len(payload) == expected, f"REGION_WRITE_MULTI: {len(payload)} != {expected}")
        entries = []
        for i in range(wr_cnt):
            off, region, count, data = MULTI_ENTRY.unpack_from(payload, U64.size + i * 24)
            require(0 < count <= MULTI_MAX_DATA, f"REGION_WRITE_MULTI: entry count {count}")
            entries.append(WriteMultiEntry(off, region, count, data[:count]))
        return cls(tuple(entries))

    @classmethod
    def unpack_writes(cls, payload: bytes | memoryview) -> list[tuple[int, int, bytes]]:
        """``(offset, region, data)`` of every entry, checked exactly as :meth:`unpack`
        checks them but without an object per entry (a guest's batched register writes)."""
        if len(payload) >= U64.size:
            (wr_cnt,) = U64.unpack_from(payload)
            if 0 < wr_cnt <= cls.MAX_ENTRIES and len(payload) == U64.size + wr_cnt * 24:
                writes = []
                for off, region, count, data in MULTI_ENTRY.iter_unpack(payload[U64.size :]):
                    if not 0 < count <= MULTI_MAX_DATA:
                        break  # unpack() below says what is wrong
                    writes.append((off, region, data[:count]))
                else:
                    return writes
        return [(e.offset, e.region, e.data) for e in cls.unpack(payload).entries]


# --------------------------------------------------------------------------------------------
# DEVICE_FEATURE (16)


@dataclass(frozen=True, slots=True)
class DeviceFeatureMsg:
    argsz: int
    flags: int
    data: bytes = b""

    HEADER_SIZE: ClassVar[int] = ARGSZ_FLAGS.size

    def pack(self) -> bytes:
        return ARGSZ_FLAGS.pack(self.argsz, self.flags) + self.data

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        _need(payload, ARGSZ_FLAGS.size, "DEVICE_FEATURE")
        argsz, flags = ARGSZ_FLAGS.unpack_from(payload)
        require(argsz >= ARGSZ_FLAGS.size, f"DEVICE_FEATURE: argsz {argsz} < 8")
        require(not flags & ~FEATURE_FLAGS_KNOWN, f"DEVICE_FEATURE: unknown flags {flags:#x}")
        return cls(argsz, flags, bytes(payload[ARGSZ_FLAGS.size :]))


MIG_DEVICE_STATE = struct.Struct("<Ii")


@dataclass(frozen=True, slots=True)
class MigDeviceState:
    """The data of DEVICE_FEATURE MIG_DEVICE_STATE, the kernel's ``struct
    vfio_device_feature_mig_state``: ``device_state`` (u32) and ``data_fd`` (s32).

    A GET reply and a SET request carry data_fd -1. A SET reply with the data_fd extension
    carries 0, the index of the one fd passed with it, when the transition opened a data
    session, else -1."""

    device_state: int
    data_fd: int = -1

    SIZE: ClassVar[int] = MIG_DEVICE_STATE.size

    def pack(self) -> bytes:
        return MIG_DEVICE_STATE.pack(self.device_state, self.data_fd)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        _need(data, MIG_DEVICE_STATE.size, "MIG_DEVICE_STATE data")
        return cls(*MIG_DEVICE_STATE.unpack_from(data))


# --------------------------------------------------------------------------------------------
# MIG_DATA_READ (17), MIG_DATA_WRITE (18)


@dataclass(frozen=True, slots=True)
class MigDataRead:
    argsz: int
    size: int

    def pack(self) -> bytes:
        return ARGSZ_FLAGS.pack(self.argsz, self.size)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        _need(payload, ARGSZ_FLAGS.size, "MIG_DATA_READ")
        msg = cls(*ARGSZ_FLAGS.unpack_from(payload))
        require(msg.argsz >= ARGSZ_FLAGS.size + msg.size, "MIG_DATA_READ: argsz < 8 + size")
        return msg


PRECOPY_INFO = struct.Struct("<IIQQ")


@dataclass(frozen=True, slots=True)
class PrecopyInfo:
    """MIG_GET_PRECOPY_INFO (19, extension) request and reply: the kernel's
    ``struct vfio_precopy_info`` (argsz, flags, initial_bytes, dirty_bytes)."""

    argsz: int
    flags: int
    initial_bytes: int
    dirty_bytes: int

    SIZE: ClassVar[int] = PRECOPY_INFO.size

    def pack(self) -> bytes:
        return PRECOPY_INFO.pack(self.argsz, self.flags, self.initial_bytes, self.dirty_bytes)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        _need(payload, PRECOPY_INFO.size, "MIG_GET_PRECOPY_INFO")
        msg = cls(*PRECOPY_INFO.unpack_from(payload))
        require(
            msg.argsz >= PRECOPY_INFO.size,
            f"MIG_GET_PRECOPY_INFO: argsz {msg.argsz} < {PRECOPY_INFO.size}",
        )
        require(msg.flags == 0, f"MIG_GET_PRECOPY_INFO: flags {msg.flags:#x}")
        return msg


@dataclass(frozen=True, slots=True)
class MigData:
    """MIG_DATA_WRITE request / MIG_DATA_READ reply: argsz, size and ``size`` data bytes.

    A read reply may carry padding after the valid bytes (libvfio-user always pads to the
    requested size); ``size`` tells how many are valid.
    """

    argsz: int
    size: int
    data: bytes

    def pack(self, pad_to: int = 0) -> bytes:
        body = self.data.ljust(pad_to, b"\0") if pad_to > len(self.data) else self.data
        return ARGSZ_FLAGS.pack(self.argsz, self.size) + body

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> Self:
        argsz, size, data = unpack_mig_data_view(payload)
        return cls(argsz, size, bytes(data))


def unpack_mig_data_view(payload: bytes | memoryview) -> tuple[int, int, memoryview]:
    """``argsz``, ``size`` and a view of the ``size`` data bytes of a MIG_DATA payload (not
    copied: migration data moves in megabyte messages)."""
    _need(payload, ARGSZ_FLAGS.size, "MIG_DATA")
    argsz, size = ARGSZ_FLAGS.unpack_from(payload)
    _need(payload, ARGSZ_FLAGS.size + size, "MIG_DATA data")
    return argsz, size, memoryview(payload)[ARGSZ_FLAGS.size : ARGSZ_FLAGS.size + size]
