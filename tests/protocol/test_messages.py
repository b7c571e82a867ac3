"""Payload codecs (facts section 2): round trips, exact sizes, malformed input, real traces."""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.constants import (
    FEATURE_GET,
    FEATURE_PROBE,
    FEATURE_SET,
    Command,
    DmaUnmapFlags,
    IrqSetFlags,
    RegionCapId,
    RegionFlags,
)
from protocol.errors import ProtocolError
from protocol.messages import (
    DeviceFeatureMsg,
    DeviceInfo,
    DmaData,
    DmaLayout,
    DmaMap,
    DmaRw,
    DmaUnmap,
    IoFdEntry,
    IrqInfo,
    IrqSet,
    MigData,
    MigDataRead,
    MigDeviceState,
    RegionAccess,
    RegionCap,
    RegionData,
    RegionInfo,
    RegionIoFds,
    RegionWriteMulti,
    SparseMmapCap,
    TypeCap,
    VersionPayload,
    WriteMultiEntry,
    check_dma_write_reply,
    pack_dma_write,
    pack_region_caps,
    unpack_dma_read_reply,
    unpack_region_caps,
)
from protocol.migration_v1 import DirtyPages
from tests import traces

FAST = settings(max_examples=200, deadline=None)

U16 = 0xFFFF
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1
u16 = st.integers(0, U16)
u32 = st.integers(0, U32)
u64 = st.integers(0, U64)


def raises_einval(fn: Callable[[], Any], err: int = errno.EINVAL) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn()
    assert info.value.errno == err, str(info.value)
    assert not info.value.fatal
    return info.value


def check_round_trip(cls: Any, msg: Any) -> bytes:
    raw = msg.pack()
    assert isinstance(raw, bytes)
    assert cls.unpack(raw) == msg
    assert cls.unpack(memoryview(raw)) == msg
    assert cls.unpack(bytearray(raw)) == msg
    return raw


# --------------------------------------------------------------------------------------------
# strategies


@st.composite
def dma_maps(draw: st.DrawFn) -> DmaMap:
    size = draw(st.integers(1, U64))
    return DmaMap(
        argsz=draw(st.integers(32, U32)),
        flags=draw(st.sampled_from([0, 1, 2, 3])),
        offset=draw(st.integers(0, (1 << 64) - size)),
        address=draw(st.integers(0, (1 << 64) - size)),
        size=size,
    )


@st.composite
def dma_unmaps(draw: st.DrawFn) -> DmaUnmap:
    kind = draw(st.sampled_from(["plain", "bitmap", "all"]))
    argsz = draw(st.integers(24, U32))
    if kind == "all":
        return DmaUnmap(argsz, DmaUnmapFlags.ALL, 0, 0)
    size = draw(u64)
    address = draw(st.integers(0, (1 << 64) - max(size, 1)))  # a u64, and address + size <= 2**64
    if kind == "plain":
        return DmaUnmap(argsz, 0, address, size)
    return DmaUnmap(argsz, DmaUnmapFlags.GET_DIRTY_BITMAP, address, size, draw(u64), draw(u64))


@st.composite
def irq_sets(draw: st.DrawFn) -> IrqSet:
    data_flag = draw(st.sampled_from(list(IrqSetFlags)[:3]))
    action = draw(st.sampled_from(list(IrqSetFlags)[3:]))
    if data_flag == IrqSetFlags.DATA_BOOL:
        data = draw(st.binary(max_size=64))
        count = len(data)
        argsz = draw(st.integers(20 + count, U32))
    else:
        data = b""
        count = draw(u32)
        argsz = draw(st.integers(20, U32))
    start = draw(st.integers(0, U32 - count))
    return IrqSet(argsz, int(data_flag | action), draw(u32), start, count, data)


@st.composite
def region_data(draw: st.DrawFn) -> RegionData:
    data = draw(st.binary(max_size=300))
    return RegionData(draw(u64), draw(u32), len(data), data)


@st.composite
def dma_data(draw: st.DrawFn) -> DmaData:
    data = draw(st.binary(max_size=300))
    return DmaData(draw(u64), len(data), data)


@st.composite
def write_multi_entries(draw: st.DrawFn) -> WriteMultiEntry:
    count = draw(st.integers(1, 8))
    data = draw(st.binary(min_size=count, max_size=count))
    return WriteMultiEntry(draw(u64), draw(u32), count, data)


feature_flags = st.builds(
    lambda index, ops: index | ops,
    u16,
    st.sampled_from([0, FEATURE_GET, FEATURE_SET, FEATURE_PROBE, FEATURE_GET | FEATURE_PROBE]),
)


@st.composite
def mig_data(draw: st.DrawFn) -> MigData:
    data = draw(st.binary(max_size=300))
    return MigData(draw(u32), len(data), data)


@st.composite
def mig_data_reads(draw: st.DrawFn) -> MigDataRead:
    size = draw(st.integers(0, U32 - 8))
    return MigDataRead(draw(st.integers(8 + size, U32)), size)


json_texts = st.none() | st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\0"),
    max_size=200,
)


@st.composite
def io_fd_entries(draw: st.DrawFn) -> IoFdEntry:
    return IoFdEntry(draw(u64), draw(u64), draw(u32), draw(u32), draw(u32), draw(u64))


sparse_caps = st.builds(SparseMmapCap, st.lists(st.tuples(u64, u64), max_size=6).map(tuple))
type_caps = st.builds(TypeCap, u32, u32)
region_caps = st.lists(st.one_of(sparse_caps, type_caps), max_size=6)


# --------------------------------------------------------------------------------------------
# round trips and exact sizes


@FAST
@given(u16, u16, json_texts)
def test_version_round_trip(major: int, minor: int, text: str | None) -> None:
    msg = VersionPayload(major, minor, text)
    raw = check_round_trip(VersionPayload, msg)
    assert raw[:4] == struct.pack("<HH", major, minor)
    if text is None:
        assert len(raw) == 4
    else:
        encoded = text.encode()
        assert len(raw) == 4 + len(encoded) + 1
        assert raw[4:] == encoded + b"\0"


def test_version_empty_json_text_is_just_a_nul() -> None:
    assert VersionPayload(0, 2, "").pack() == b"\0\0\x02\0\0"
    assert VersionPayload.unpack(b"\0\0\x02\0\0") == VersionPayload(0, 2, "")
    assert VersionPayload.unpack(b"\0\0\x02\0") == VersionPayload(0, 2, None)


@FAST
@given(dma_maps())
def test_dma_map_round_trip(msg: DmaMap) -> None:
    raw = check_round_trip(DmaMap, msg)
    assert len(raw) == 32 == DmaMap.SIZE


@FAST
@given(dma_unmaps())
def test_dma_unmap_round_trip(msg: DmaUnmap) -> None:
    raw = check_round_trip(DmaUnmap, msg)
    assert len(raw) == (40 if msg.wants_bitmap else 24)
    assert msg.unmap_all == (msg.flags == DmaUnmapFlags.ALL)
    echo = msg.pack_echo()
    assert len(echo) == 24
    assert echo == raw[:24]


@FAST
@given(st.integers(16, U32), u32, u32, u32)
def test_device_info_round_trip(argsz: int, flags: int, regions: int, irqs: int) -> None:
    raw = check_round_trip(DeviceInfo, DeviceInfo(argsz, flags, regions, irqs))
    assert len(raw) == 16 == DeviceInfo.SIZE


@FAST
@given(st.builds(RegionInfo, st.integers(32, U32), u32, u32, u32, u64, u64))
def test_region_info_round_trip(msg: RegionInfo) -> None:
    raw = check_round_trip(RegionInfo, msg)
    assert len(raw) == 32 == RegionInfo.SIZE


@FAST
@given(st.integers(16, U32), u32, u32, u32)
def test_region_io_fds_request_round_trip(argsz: int, flags: int, index: int, count: int) -> None:
    raw = check_round_trip(RegionIoFds, RegionIoFds(argsz, flags, index, count))
    assert len(raw) == 16


@FAST
@given(st.integers(16, U32), u32, u32, st.lists(io_fd_entries(), min_size=1, max_size=5))
def test_region_io_fds_reply_round_trip(
    argsz: int, flags: int, index: int, entries: list[IoFdEntry]
) -> None:
    msg = RegionIoFds(argsz, flags, index, len(entries), tuple(entries))
    raw = msg.pack()
    assert len(raw) == 16 + 40 * len(entries)
    assert RegionIoFds.unpack_reply(raw) == msg
    # The request parser only looks at the 16-byte header.
    assert RegionIoFds.unpack(raw) == RegionIoFds(argsz, flags, index, len(entries))


def test_region_io_fds_reply_with_header_only() -> None:
    # argsz too small in the request: the reply is the header with the needed count, no entries.
    raw = RegionIoFds(16 + 80, 0, 1, 2).pack()
    assert RegionIoFds.unpack_reply(raw) == RegionIoFds(96, 0, 1, 2, ())


def test_io_fd_entry_layout() -> None:
    entry = IoFdEntry(0x1000, 4, 1, 0, 3, 0xDEADBEEF)
    assert entry.pack() == struct.pack("<QQIIIIQ", 0x1000, 4, 1, 0, 3, 0, 0xDEADBEEF)


@FAST
@given(st.integers(16, U32), u32, u32, u32)
def test_irq_info_round_trip(argsz: int, flags: int, index: int, count: int) -> None:
    raw = check_round_trip(IrqInfo, IrqInfo(argsz, flags, index, count))
    assert len(raw) == 16 == IrqInfo.SIZE


@FAST
@given(irq_sets())
def test_irq_set_round_trip(msg: IrqSet) -> None:
    raw = check_round_trip(IrqSet, msg)
    if msg.data_type == IrqSetFlags.DATA_BOOL:
        assert len(raw) == 20 + msg.count
    else:
        assert len(raw) == 20
    assert msg.data_type | msg.action == msg.flags
    assert msg.data_type.bit_count() == 1 and msg.action.bit_count() == 1


def test_irq_set_qemu_intx_trigger_eventfd() -> None:
    # 36-byte message, argsz 20, TRIGGER|EVENTFD, index 0, start 0, count 1; fd rides along.
    raw = struct.pack("<IIIII", 20, 0x24, 0, 0, 1)
    msg = IrqSet.unpack(raw)
    assert msg.data_type == IrqSetFlags.DATA_EVENTFD
    assert msg.action == IrqSetFlags.ACTION_TRIGGER
    assert (msg.index, msg.start, msg.count, msg.data) == (0, 0, 1, b"")


@FAST
@given(u64, u32, u32)
def test_region_access_round_trip(offset: int, region: int, count: int) -> None:
    raw = check_round_trip(RegionAccess, RegionAccess(offset, region, count))
    assert len(raw) == 16 == RegionAccess.SIZE


@FAST
@given(region_data())
def test_region_data_round_trip(msg: RegionData) -> None:
    raw = check_round_trip(RegionData, msg)
    assert len(raw) == 16 + msg.count
    assert raw[:16] == RegionAccess(msg.offset, msg.region, msg.count).pack()


@FAST
@given(u64, u64)
def test_dma_rw_round_trip(address: int, count: int) -> None:
    raw = check_round_trip(DmaRw, DmaRw(address, count))
    assert len(raw) == 16 == DmaRw.SIZE


@FAST
@given(dma_data())
def test_dma_data_round_trip(msg: DmaData) -> None:
    raw = check_round_trip(DmaData, msg)
    assert len(raw) == 16 + msg.count


@FAST
@given(st.lists(write_multi_entries(), min_size=1, max_size=20))
def test_region_write_multi_round_trip(entries: list[WriteMultiEntry]) -> None:
    raw = check_round_trip(RegionWriteMulti, RegionWriteMulti(tuple(entries)))
    assert len(raw) == 8 + 24 * len(entries)
    assert struct.unpack_from("<Q", raw)[0] == len(entries)


def test_region_write_multi_pads_data_to_eight_bytes() -> None:
    raw = RegionWriteMulti((WriteMultiEntry(0x10, 2, 2, b"\xab\xcd"),)).pack()
    assert raw == struct.pack("<QQII8s", 1, 0x10, 2, 2, b"\xab\xcd" + b"\0" * 6)


def test_region_write_multi_max_entries_accepted() -> None:
    entries = tuple(WriteMultiEntry(i, 0, 4, b"abcd") for i in range(RegionWriteMulti.MAX_ENTRIES))
    msg = RegionWriteMulti(entries)
    assert RegionWriteMulti.unpack(msg.pack()) == msg


@FAST
@given(st.integers(8, U32), feature_flags, st.binary(max_size=100))
def test_device_feature_round_trip(argsz: int, flags: int, data: bytes) -> None:
    raw = check_round_trip(DeviceFeatureMsg, DeviceFeatureMsg(argsz, flags, data))
    assert len(raw) == 8 + len(data)


@FAST
@given(mig_data_reads())
def test_mig_data_read_round_trip(msg: MigDataRead) -> None:
    raw = check_round_trip(MigDataRead, msg)
    assert len(raw) == 8


@FAST
@given(mig_data(), st.integers(0, 400))
def test_mig_data_round_trip(msg: MigData, pad_to: int) -> None:
    raw = check_round_trip(MigData, msg)
    assert len(raw) == 8 + msg.size
    padded = msg.pack(pad_to=pad_to)
    assert len(padded) == 8 + max(pad_to, msg.size)
    assert padded[: len(raw)] == raw
    assert set(padded[len(raw) :]) <= {0}
    # Padding after the valid bytes (libvfio-user pads reads) is not part of the data.
    assert MigData.unpack(padded) == msg


# --------------------------------------------------------------------------------------------
# malformed input

_V = struct.Struct("<HH")


def _dma_map(argsz: int = 32, flags: int = 3, offset: int = 0, addr: int = 0, size: int = 4096):
    return struct.pack("<IIQQQ", argsz, flags, offset, addr, size)


def _dma_unmap(argsz: int = 24, flags: int = 0, addr: int = 0, size: int = 4096) -> bytes:
    return struct.pack("<IIQQ", argsz, flags, addr, size)


def _irq_set(flags: int, count: int = 1, argsz: int = 20, start: int = 0) -> bytes:
    return struct.pack("<IIIII", argsz, flags, 0, start, count)


_NONE_TRIGGER = int(IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER)
_BOOL_TRIGGER = int(IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_TRIGGER)
_EVENTFD_TRIGGER = int(IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER)


def _multi(wr_cnt: int, entries: list[tuple[int, int, int, bytes]]) -> bytes:
    out = struct.pack("<Q", wr_cnt)
    for off, region, count, data in entries:
        out += struct.pack("<QII8s", off, region, count, data)
    return out


MALFORMED: list[tuple[str, Callable[[bytes], Any], bytes]] = [
    # VERSION
    ("version-empty", VersionPayload.unpack, b""),
    ("version-3-bytes", VersionPayload.unpack, b"\0\0\0"),
    ("version-json-without-nul", VersionPayload.unpack, _V.pack(0, 0) + b"{}"),
    ("version-bytes-after-nul", VersionPayload.unpack, _V.pack(0, 0) + b"{}\0 "),
    ("version-nul-inside-json", VersionPayload.unpack, _V.pack(0, 0) + b'{"a"\0:1}\0'),
    ("version-not-utf8", VersionPayload.unpack, _V.pack(0, 0) + b'{"\xff\xfe":1}\0'),
    ("version-truncated-utf8", VersionPayload.unpack, _V.pack(0, 0) + b"\xc3\0"),
    ("version-surrogate-utf8", VersionPayload.unpack, _V.pack(0, 0) + b"\xed\xa0\x80\0"),
    # DMA_MAP
    ("dma-map-short", DmaMap.unpack, _dma_map()[:31]),
    ("dma-map-argsz-small", DmaMap.unpack, _dma_map(argsz=31)),
    ("dma-map-argsz-zero", DmaMap.unpack, _dma_map(argsz=0)),
    ("dma-map-flag-4", DmaMap.unpack, _dma_map(flags=4 | 3)),
    ("dma-map-flag-8", DmaMap.unpack, _dma_map(flags=8 | 1)),
    ("dma-map-flag-high", DmaMap.unpack, _dma_map(flags=0x80000000)),
    ("dma-map-size-zero", DmaMap.unpack, _dma_map(size=0)),
    ("dma-map-address-wraps", DmaMap.unpack, _dma_map(addr=(1 << 64) - 4096, size=8192)),
    ("dma-map-offset-wraps", DmaMap.unpack, _dma_map(offset=U64, size=2)),
    # DMA_UNMAP
    ("dma-unmap-short", DmaUnmap.unpack, _dma_unmap()[:23]),
    ("dma-unmap-argsz-small", DmaUnmap.unpack, _dma_unmap(argsz=23)),
    ("dma-unmap-flag-4", DmaUnmap.unpack, _dma_unmap(flags=4)),
    ("dma-unmap-flag-high", DmaUnmap.unpack, _dma_unmap(flags=1 << 31)),
    ("dma-unmap-all-address", DmaUnmap.unpack, _dma_unmap(flags=2, addr=0x1000, size=0)),
    ("dma-unmap-all-size", DmaUnmap.unpack, _dma_unmap(flags=2, addr=0, size=0x1000)),
    ("dma-unmap-all-with-bitmap", DmaUnmap.unpack, _dma_unmap(flags=3, addr=0, size=0)),
    ("dma-unmap-wraps", DmaUnmap.unpack, _dma_unmap(addr=U64, size=2)),
    ("dma-unmap-bitmap-missing", DmaUnmap.unpack, _dma_unmap(argsz=40, flags=1)),
    (
        "dma-unmap-bitmap-short",
        DmaUnmap.unpack,
        _dma_unmap(argsz=40, flags=1) + struct.pack("<Q", 4096) + b"\0" * 7,
    ),
    # DEVICE_GET_INFO
    ("device-info-short", DeviceInfo.unpack, struct.pack("<IIII", 16, 0, 0, 0)[:15]),
    ("device-info-argsz-small", DeviceInfo.unpack, struct.pack("<IIII", 15, 0, 0, 0)),
    # DEVICE_GET_REGION_INFO
    ("region-info-short", RegionInfo.unpack, struct.pack("<IIIIQQ", 32, 0, 0, 0, 0, 0)[:31]),
    ("region-info-argsz-small", RegionInfo.unpack, struct.pack("<IIIIQQ", 31, 0, 0, 0, 0, 0)),
    # DEVICE_GET_REGION_IO_FDS
    ("io-fds-short", RegionIoFds.unpack, b"\x10" + b"\0" * 14),
    ("io-fds-argsz-small", RegionIoFds.unpack, struct.pack("<IIII", 15, 0, 0, 0)),
    ("io-fds-reply-short", RegionIoFds.unpack_reply, struct.pack("<IIII", 15, 0, 0, 0)),
    (
        "io-fds-reply-truncated-entry",
        RegionIoFds.unpack_reply,
        struct.pack("<IIII", 96, 0, 0, 2) + IoFdEntry(0, 4, 0, 0, 0, 0).pack(),
    ),
    # DEVICE_GET_IRQ_INFO
    ("irq-info-short", IrqInfo.unpack, struct.pack("<IIII", 16, 0, 0, 0)[:15]),
    ("irq-info-argsz-small", IrqInfo.unpack, struct.pack("<IIII", 15, 0, 0, 0)),
    # DEVICE_SET_IRQS
    ("set-irqs-short", IrqSet.unpack, _irq_set(_NONE_TRIGGER)[:19]),
    ("set-irqs-argsz-small", IrqSet.unpack, _irq_set(_NONE_TRIGGER, argsz=19)),
    ("set-irqs-unknown-flag", IrqSet.unpack, _irq_set(_NONE_TRIGGER | 0x40)),
    ("set-irqs-no-data-bit", IrqSet.unpack, _irq_set(int(IrqSetFlags.ACTION_TRIGGER))),
    ("set-irqs-two-data-bits", IrqSet.unpack, _irq_set(_NONE_TRIGGER | IrqSetFlags.DATA_EVENTFD)),
    ("set-irqs-three-data-bits", IrqSet.unpack, _irq_set(0x07 | IrqSetFlags.ACTION_TRIGGER)),
    ("set-irqs-no-action-bit", IrqSet.unpack, _irq_set(int(IrqSetFlags.DATA_EVENTFD))),
    ("set-irqs-two-action-bits", IrqSet.unpack, _irq_set(0x01 | 0x08 | 0x10)),
    ("set-irqs-all-bits", IrqSet.unpack, _irq_set(0x3F)),
    ("set-irqs-bool-too-few", IrqSet.unpack, _irq_set(_BOOL_TRIGGER, 3, 23) + b"\1\0"),
    ("set-irqs-bool-too-many", IrqSet.unpack, _irq_set(_BOOL_TRIGGER, 3, 23) + b"\1\0\1\1"),
    ("set-irqs-bool-argsz-small", IrqSet.unpack, _irq_set(_BOOL_TRIGGER, 2, 20) + b"\1\1"),
    ("set-irqs-none-with-data", IrqSet.unpack, _irq_set(_NONE_TRIGGER, argsz=21) + b"\1"),
    ("set-irqs-eventfd-fd-array", IrqSet.unpack, _irq_set(_EVENTFD_TRIGGER, 1, 24) + b"\5\0\0\0"),
    ("set-irqs-range-overflow", IrqSet.unpack, _irq_set(_NONE_TRIGGER, count=2, start=U32)),
    # REGION_READ / REGION_WRITE
    ("region-access-short", RegionAccess.unpack, b"\0" * 15),
    ("region-data-short", RegionData.unpack, b"\0" * 15),
    ("region-write-count-over", RegionData.unpack, struct.pack("<QII", 0, 0, 4) + b"abc"),
    ("region-write-count-under", RegionData.unpack, struct.pack("<QII", 0, 0, 4) + b"abcde"),
    ("region-write-count-zero-data", RegionData.unpack, struct.pack("<QII", 0, 0, 0) + b"a"),
    # DMA_READ / DMA_WRITE
    ("dma-rw-short", DmaRw.unpack, b"\0" * 15),
    ("dma-data-short", DmaData.unpack, b"\0" * 15),
    ("dma-data-count-mismatch", DmaData.unpack, struct.pack("<QQ", 0, 8) + b"1234567"),
    ("dma-data-huge-count", DmaData.unpack, struct.pack("<QQ", 0, U64) + b"1234567"),
    # REGION_WRITE_MULTI
    ("multi-short", RegionWriteMulti.unpack, b"\1\0\0\0\0\0\0"),
    ("multi-wr-cnt-zero", RegionWriteMulti.unpack, _multi(0, [])),
    (
        "multi-wr-cnt-over-limit",
        RegionWriteMulti.unpack,
        _multi(4097, [(0, 0, 4, b"abcd")] * 4097),
    ),
    ("multi-wr-cnt-huge", RegionWriteMulti.unpack, _multi(1 << 63, [(0, 0, 4, b"abcd")])),
    ("multi-too-few-entries", RegionWriteMulti.unpack, _multi(2, [(0, 0, 4, b"abcd")])),
    ("multi-too-many-entries", RegionWriteMulti.unpack, _multi(1, [(0, 0, 4, b"abcd")] * 2)),
    ("multi-trailing-byte", RegionWriteMulti.unpack, _multi(1, [(0, 0, 4, b"abcd")]) + b"\0"),
    ("multi-truncated-entry", RegionWriteMulti.unpack, _multi(1, [(0, 0, 4, b"abcd")])[:-1]),
    ("multi-entry-count-zero", RegionWriteMulti.unpack, _multi(1, [(0, 0, 0, b"")])),
    ("multi-entry-count-nine", RegionWriteMulti.unpack, _multi(1, [(0, 0, 9, b"a" * 8)])),
    (
        "multi-second-entry-bad",
        RegionWriteMulti.unpack,
        _multi(2, [(0, 0, 4, b"abcd"), (8, 0, 0xFFFFFFFF, b"")]),
    ),
    # DEVICE_FEATURE
    ("feature-short", DeviceFeatureMsg.unpack, struct.pack("<II", 8, 1)[:7]),
    ("feature-argsz-small", DeviceFeatureMsg.unpack, struct.pack("<II", 7, FEATURE_GET | 1)),
    ("feature-unknown-flag", DeviceFeatureMsg.unpack, struct.pack("<II", 16, 1 << 19 | 1)),
    ("feature-top-flag", DeviceFeatureMsg.unpack, struct.pack("<II", 16, 1 << 31 | FEATURE_SET)),
    # MIG_DATA_READ / MIG_DATA_WRITE
    ("mig-read-short", MigDataRead.unpack, b"\x08\0\0\0\0\0\0"),
    ("mig-read-argsz-small", MigDataRead.unpack, struct.pack("<II", 8 + 99, 100)),
    ("mig-read-argsz-zero", MigDataRead.unpack, struct.pack("<II", 0, 0)),
    ("mig-data-short", MigData.unpack, b"\x08\0\0\0\0\0\0"),
    ("mig-data-truncated", MigData.unpack, struct.pack("<II", 18, 10) + b"123456789"),
]


@pytest.mark.parametrize(
    ("fn", "payload"), [pytest.param(fn, p, id=name) for name, fn, p in MALFORMED]
)
def test_malformed_payload_raises_einval(fn: Callable[[bytes], Any], payload: bytes) -> None:
    raises_einval(lambda: fn(payload))
    raises_einval(lambda: fn(memoryview(payload)))  # type: ignore[arg-type]


# Boundary values that must still be accepted next to the rejected ones above.
ACCEPTED: list[tuple[str, Callable[[bytes], Any], bytes]] = [
    ("dma-map-range-ends-at-top", DmaMap.unpack, _dma_map(addr=(1 << 64) - 4096, size=4096)),
    ("dma-map-read-only", DmaMap.unpack, _dma_map(flags=1)),
    ("dma-map-no-flags", DmaMap.unpack, _dma_map(flags=0)),
    ("dma-unmap-all", DmaUnmap.unpack, _dma_unmap(flags=2, addr=0, size=0)),
    ("dma-unmap-range-ends-at-top", DmaUnmap.unpack, _dma_unmap(addr=U64, size=1)),
    ("set-irqs-disable-all", IrqSet.unpack, _irq_set(_NONE_TRIGGER, count=0)),
    ("set-irqs-eventfd-deassign", IrqSet.unpack, _irq_set(_EVENTFD_TRIGGER, count=5)),
    ("set-irqs-bool", IrqSet.unpack, _irq_set(_BOOL_TRIGGER, 3, 23) + b"\1\0\1"),
    ("set-irqs-range-to-top", IrqSet.unpack, _irq_set(_NONE_TRIGGER, count=1, start=U32 - 1)),
    ("region-write-empty", RegionData.unpack, struct.pack("<QII", 0, 7, 0)),
    ("multi-one-byte", RegionWriteMulti.unpack, _multi(1, [(0, 0, 1, b"a")])),
    ("multi-eight-bytes", RegionWriteMulti.unpack, _multi(1, [(0, 0, 8, b"a" * 8)])),
    ("feature-probe-all", DeviceFeatureMsg.unpack, struct.pack("<II", 8, 0x7FFFF)),
    ("mig-read-argsz-exact", MigDataRead.unpack, struct.pack("<II", 108, 100)),
    ("mig-data-padded", MigData.unpack, struct.pack("<II", 18, 2) + b"ab" + b"\0" * 8),
    ("version-bare", VersionPayload.unpack, _V.pack(0, 0)),
]


@pytest.mark.parametrize(
    ("fn", "payload"), [pytest.param(fn, p, id=name) for name, fn, p in ACCEPTED]
)
def test_boundary_payload_accepted(fn: Callable[[bytes], Any], payload: bytes) -> None:
    fn(payload)


def test_multi_entry_data_is_cut_to_count() -> None:
    msg = RegionWriteMulti.unpack(_multi(1, [(0x20, 3, 2, b"\x01\x02\x03\x04\x05\x06\x07\x08")]))
    assert msg.entries == (WriteMultiEntry(0x20, 3, 2, b"\x01\x02"),)


def test_mig_data_padding_is_ignored() -> None:
    msg = MigData.unpack(struct.pack("<II", 18, 2) + b"ab" + b"\xee" * 8)
    assert (msg.argsz, msg.size, msg.data) == (18, 2, b"ab")


def test_dma_unmap_bitmap_fields() -> None:
    raw = _dma_unmap(argsz=48, flags=1, addr=0x1000, size=0x4000) + struct.pack("<QQ", 4096, 8)
    msg = DmaUnmap.unpack(raw)
    assert msg.wants_bitmap and not msg.unmap_all
    assert (msg.bitmap_pgsize, msg.bitmap_size) == (4096, 8)
    assert msg.pack() == raw
    assert msg.pack_echo() == raw[:24]


# --------------------------------------------------------------------------------------------
# region capabilities


def _walk_next_offsets(blob: bytes, cap_offset: int) -> list[tuple[int, int, int]]:
    """(offset, id, next) of every cap header, read straight from the bytes."""
    out = []
    offset = cap_offset
    while offset:
        cap_id, _version, nxt = struct.unpack_from("<HHI", blob, offset)
        out.append((offset, cap_id, nxt))
        offset = nxt
    return out


def _cap_size(cap: RegionCap) -> int:
    if isinstance(cap, SparseMmapCap):
        return 8 + 8 + 16 * len(cap.areas)
    return 16


@FAST
@given(region_caps, st.integers(0, U32), st.integers(0, U64))
def test_region_caps_round_trip(caps: list[RegionCap], index: int, size: int) -> None:
    blob_caps = pack_region_caps(caps, 32)
    assert len(blob_caps) == sum(_cap_size(c) for c in caps)
    info = RegionInfo(
        32 + len(blob_caps),
        int(RegionFlags.READ | RegionFlags.CAPS) if caps else int(RegionFlags.READ),
        index,
        32 if caps else 0,
        size,
        0,
    )
    payload = info.pack() + blob_caps
    parsed = RegionInfo.unpack(payload)
    assert parsed == info
    assert unpack_region_caps(payload, parsed.cap_offset) == caps
    # next offsets are relative to the start of the 32-byte struct; first cap at 32.
    walked = _walk_next_offsets(payload, info.cap_offset)
    expected_offsets = []
    at = 32
    for cap in caps:
        expected_offsets.append(at)
        at += _cap_size(cap)
    assert [w[0] for w in walked] == expected_offsets
    assert [w[1] for w in walked] == [int(c.ID) for c in caps]
    if caps:
        assert walked[-1][2] == 0
        for (_off, _id, nxt), following in zip(walked, expected_offsets[1:], strict=False):
            assert nxt == following


@FAST
@given(region_caps.filter(bool), st.integers(32, 4096))
def test_region_caps_other_base(caps: list[RegionCap], base: int) -> None:
    blob = pack_region_caps(caps, base)
    payload = b"\xaa" * base + blob
    assert unpack_region_caps(payload, base) == caps
    assert _walk_next_offsets(payload, base)[0][0] == base


def test_region_caps_exact_bytes_sparse_then_type() -> None:
    caps: list[RegionCap] = [SparseMmapCap(((0, 0x1000), (0x3000, 0x1000))), TypeCap(3, 1)]
    blob = pack_region_caps(caps, 32)
    expected = (
        struct.pack("<HHI", RegionCapId.SPARSE_MMAP, 1, 32 + 48)
        + struct.pack("<II", 2, 0)
        + struct.pack("<QQ", 0, 0x1000)
        + struct.pack("<QQ", 0x3000, 0x1000)
        + struct.pack("<HHI", RegionCapId.TYPE, 1, 0)
        + struct.pack("<II", 3, 1)
    )
    assert blob == expected


def test_region_caps_empty() -> None:
    assert pack_region_caps([], 32) == b""
    assert unpack_region_caps(b"\0" * 32, 0) == []


def test_region_caps_lvu_trace_bar1_sparse() -> None:
    # lvu-client-server.jsonl seq 12: BAR1 (0x4000) with a SPARSE_MMAP cap of two areas.
    msg = traces.by_seq("lvu-client-server.jsonl", 12)
    assert msg.header.command == Command.DEVICE_GET_REGION_INFO and not msg.from_client
    info = RegionInfo.unpack(msg.payload)
    assert (info.argsz, info.flags, info.index, info.cap_offset) == (80, 0xF, 1, 32)
    assert info.size == 0x4000
    caps = unpack_region_caps(msg.payload, info.cap_offset)
    assert caps == [SparseMmapCap(((0, 0x1000), (0x2000, 0x1000)))]
    assert info.pack() + pack_region_caps(caps, 32) == msg.payload


def test_region_caps_lvu_v1_trace_type_then_sparse() -> None:
    # lvu-v1-client-server.jsonl seq 30: migration region 9, CAP_TYPE 3/1 chained to SPARSE.
    msg = traces.by_seq("lvu-v1-client-server.jsonl", 30)
    info = RegionInfo.unpack(msg.payload)
    assert info.index == 9 and info.cap_offset == 32
    caps = unpack_region_caps(msg.payload, info.cap_offset)
    assert caps == [TypeCap(3, 1), SparseMmapCap(((0x1000, 0x4000),))]
    assert info.pack() + pack_region_caps(caps, 32) == msg.payload


def _cap(cap_id: int, nxt: int, body: bytes) -> bytes:
    return struct.pack("<HHI", cap_id, 1, nxt) + body


_STRUCT = b"\0" * 32
_TYPE_BODY = struct.pack("<II", 3, 1)

BAD_CAPS: list[tuple[str, bytes, int]] = [
    ("self-loop", _STRUCT + _cap(2, 32, _TYPE_BODY), 32),
    ("two-cap-cycle", _STRUCT + _cap(2, 48, _TYPE_BODY) + _cap(2, 32, _TYPE_BODY), 32),
    ("next-into-struct", _STRUCT + _cap(2, 8, _TYPE_BODY), 32),
    ("cap-offset-into-struct", _STRUCT + _cap(2, 0, _TYPE_BODY), 16),
    ("cap-offset-past-end", _STRUCT + _cap(2, 0, _TYPE_BODY), 48),
    ("next-past-end", _STRUCT + _cap(2, 4096, _TYPE_BODY), 32),
    ("header-truncated", _STRUCT + _cap(2, 0, _TYPE_BODY)[:7], 32),
    ("type-body-truncated", _STRUCT + _cap(2, 0, _TYPE_BODY)[:15], 32),
    ("unknown-id", _STRUCT + _cap(3, 0, _TYPE_BODY), 32),
    ("id-zero", _STRUCT + _cap(0, 0, _TYPE_BODY), 32),
    ("sparse-header-truncated", _STRUCT + _cap(1, 0, b"\1\0\0"), 32),
    (
        "sparse-areas-truncated",
        _STRUCT + _cap(1, 0, struct.pack("<II", 2, 0) + struct.pack("<QQ", 0, 4096)),
        32,
    ),
    ("sparse-huge-count", _STRUCT + _cap(1, 0, struct.pack("<II", U32, 0)), 32),
    ("garbage", _STRUCT + b"\xff" * 40, 32),
]


@pytest.mark.parametrize(
    ("payload", "cap_offset"), [pytest.param(p, o, id=n) for n, p, o in BAD_CAPS]
)
def test_region_caps_malformed(payload: bytes, cap_offset: int) -> None:
    raises_einval(lambda: unpack_region_caps(payload, cap_offset))


# --------------------------------------------------------------------------------------------
# DMA_READ / DMA_WRITE replies (server -> client requests answered by the client)


@FAST
@given(u64, st.binary(max_size=200))
def test_dma_read_reply_spec_layout(address: int, data: bytes) -> None:
    payload = struct.pack("<QQ", address, len(data)) + data
    assert unpack_dma_read_reply(payload, address, len(data)) == data
    assert unpack_dma_read_reply(memoryview(payload), address, len(data)) == data


@FAST
@given(u64, st.binary(min_size=1, max_size=200), st.binary(min_size=4, max_size=4))
def test_dma_read_reply_qemu_layout(address: int, data: bytes, pad: bytes) -> None:
    # QEMU 10.x (facts 4.4): address u64, count u32, data, then 4 trailing bytes.
    payload = struct.pack("<QI", address, len(data)) + data + pad
    assert len(payload) == 16 + len(data)
    assert unpack_dma_read_reply(payload, address, len(data), DmaLayout.QEMU) == data


def test_dma_read_reply_qemu_layout_leading_zero_data() -> None:
    # Ambiguous in isolation (it also parses as a spec reply): the layout is per connection.
    data = b"\0\0\0\0" + b"payload!"
    payload = struct.pack("<QI", 0x1000, len(data)) + data + b"\0" * 4
    assert unpack_dma_read_reply(payload, 0x1000, len(data), DmaLayout.QEMU) == data
    assert unpack_dma_read_reply(payload, 0x1000, len(data), DmaLayout.SPEC) != data


@FAST
@given(u64, st.binary(max_size=200))
def test_dma_write_request_layouts(address: int, data: bytes) -> None:
    spec = pack_dma_write(DmaLayout.SPEC, address, data)
    assert DmaData.unpack(spec) == DmaData(address, len(data), data)
    qemu = pack_dma_write(DmaLayout.QEMU, address, data)
    # QEMU reads count (u32) at 8 and data at 12, and wants msg_size - 32 >= count.
    assert len(qemu) == 16 + len(data)
    assert struct.unpack_from("<QI", qemu) == (address, len(data))
    assert qemu[12 : 12 + len(data)] == data


def test_dma_read_reply_lvu_trace() -> None:
    # lvu-client-server.jsonl seq 89 (server's DMA_READ) and seq 90 (client's reply).
    request = traces.by_seq("lvu-client-server.jsonl", 89)
    reply = traces.by_seq("lvu-client-server.jsonl", 90)
    assert request.header.command == reply.header.command == Command.DMA_READ
    assert reply.header.msg_id == request.header.msg_id and reply.header.is_reply
    want = DmaRw.unpack(request.payload)
    assert (want.address, want.count) == (0, 1024)
    assert unpack_dma_read_reply(reply.payload, want.address, want.count) == b"A" * 1024


@pytest.mark.parametrize(
    ("payload", "address", "count"),
    [
        pytest.param(struct.pack("<QQ", 0x1000, 4) + b"abc", 0x1000, 4, id="short"),
        pytest.param(struct.pack("<QQ", 0x1000, 4) + b"abcde", 0x1000, 4, id="long"),
        pytest.param(struct.pack("<QQ", 0x2000, 4) + b"abcd", 0x1000, 4, id="wrong-address"),
        pytest.param(struct.pack("<QQ", 0x1000, 5) + b"abcd", 0x1000, 4, id="wrong-count"),
        pytest.param(
            struct.pack("<QI", 0x1000, 3) + b"abcd" + b"\0\0\0\0", 0x1000, 4, id="qemu-wrong-count"
        ),
        pytest.param(b"", 0, 0, id="empty"),
        pytest.param(b"\0" * 15, 0, 0, id="fifteen"),
    ],
)
def test_dma_read_reply_rejected(payload: bytes, address: int, count: int) -> None:
    raises_einval(lambda: unpack_dma_read_reply(payload, address, count))


@pytest.mark.parametrize("size", [0, 12, 16])
def test_dma_write_reply_sizes_accepted(size: int) -> None:
    payload = struct.pack("<QQ", 0xABC000, 64)[:size]
    check_dma_write_reply(payload, 0xABC000, 64)


@pytest.mark.parametrize("size", [s for s in range(25) if s not in (0, 12, 16)] + [32, 80])
def test_dma_write_reply_other_sizes_rejected(size: int) -> None:
    payload = (struct.pack("<QQ", 0xABC000, 64) + b"\0" * 80)[:size]
    raises_einval(lambda: check_dma_write_reply(payload, 0xABC000, 64))


@pytest.mark.parametrize("size", [12, 16])
def test_dma_write_reply_wrong_address_rejected(size: int) -> None:
    payload = struct.pack("<QQ", 0xABD000, 64)[:size]
    raises_einval(lambda: check_dma_write_reply(payload, 0xABC000, 64))


def test_dma_write_reply_lvu_trace() -> None:
    request = traces.by_seq("lvu-client-server.jsonl", 81)
    reply = traces.by_seq("lvu-client-server.jsonl", 82)
    sent = DmaData.unpack(request.payload)
    assert sent.count == 1024 and sent.data == b"A" * 1024
    assert len(reply.payload) == 16
    check_dma_write_reply(reply.payload, sent.address, sent.count)


# --------------------------------------------------------------------------------------------
# every message of the real traces goes through its codec


REQUEST_CODECS: dict[int, Any] = {
    Command.VERSION: VersionPayload,
    Command.DMA_MAP: DmaMap,
    Command.DMA_UNMAP: DmaUnmap,
    Command.DEVICE_GET_INFO: DeviceInfo,
    Command.DEVICE_GET_REGION_INFO: RegionInfo,
    Command.DEVICE_GET_REGION_IO_FDS: RegionIoFds,
    Command.DEVICE_GET_IRQ_INFO: IrqInfo,
    Command.DEVICE_SET_IRQS: IrqSet,
    Command.REGION_READ: RegionAccess,
    Command.REGION_WRITE: RegionData,
    Command.DMA_READ: DmaRw,
    Command.DMA_WRITE: DmaData,
    Command.REGION_WRITE_MULTI: RegionWriteMulti,
    Command.DEVICE_FEATURE: DeviceFeatureMsg,
    Command.MIG_DATA_READ: MigDataRead,
    Command.MIG_DATA_WRITE: MigData,
    Command.DIRTY_PAGES: DirtyPages,
}

REPLY_CODECS: dict[int, Any] = {
    Command.VERSION: VersionPayload,
    Command.DEVICE_GET_INFO: DeviceInfo,
    Command.DEVICE_GET_REGION_INFO: RegionInfo,
    Command.DEVICE_GET_IRQ_INFO: IrqInfo,
    Command.REGION_READ: RegionData,
    Command.REGION_WRITE: RegionAccess,
    Command.DEVICE_FEATURE: DeviceFeatureMsg,
    Command.MIG_DATA_READ: MigData,
}


@pytest.mark.parametrize("name", traces.ALL_TRACES)
def test_trace_requests_parse_and_repack_exactly(name: str) -> None:
    seen: set[int] = set()
    for msg in traces.load(name):
        if not msg.header.is_command:
            continue
        command = msg.header.command
        if command == Command.DEVICE_RESET:
            assert msg.payload == b""
            continue
        if command == Command.DIRTY_PAGES:  # protocol 0.1 only
            assert name == "lvu-v1-client-server.jsonl"
        codec = REQUEST_CODECS[command]
        parsed = codec.unpack(msg.payload)
        raw = parsed.pack()
        if command == Command.DEVICE_GET_REGION_INFO:
            # libvfio-user's client sends a request as large as its argsz (zero-filled).
            assert msg.payload[: len(raw)] == raw, (name, msg.seq)
            assert set(msg.payload[len(raw) :]) <= {0}
        else:
            assert raw == msg.payload, (name, msg.seq)
        seen.add(command)
    assert Command.VERSION in seen and Command.REGION_READ in seen


@pytest.mark.parametrize("name", traces.ALL_TRACES)
def test_trace_replies_parse(name: str) -> None:
    requests: dict[tuple[str, bool, int], traces.TraceMessage] = {}
    checked = 0
    for msg in traces.load(name):
        key = (msg.conn, msg.from_client, msg.header.msg_id)
        if msg.header.is_command:
            requests[(msg.conn, not msg.from_client, msg.header.msg_id)] = msg
            continue
        request = requests.pop(key)
        assert request.header.command == msg.header.command
        if msg.header.is_error:
            assert msg.payload == b"", "error replies are header-only"
            continue
        command = msg.header.command
        if command == Command.DMA_READ:
            want = DmaRw.unpack(request.payload)
            assert len(unpack_dma_read_reply(msg.payload, want.address, want.count)) == want.count
        elif command == Command.DMA_WRITE:
            sent = DmaData.unpack(request.payload)
            check_dma_write_reply(msg.payload, sent.address, sent.count)
        elif command == Command.DMA_UNMAP:
            echo = DmaUnmap.unpack(msg.payload)
            assert echo.pack_echo() == request.payload[:24]
        elif command == Command.DEVICE_GET_REGION_INFO:
            info = RegionInfo.unpack(msg.payload)
            if info.flags & RegionFlags.CAPS and info.argsz <= len(msg.payload):
                unpack_region_caps(msg.payload, info.cap_offset)
        elif command == Command.MIG_DATA_READ:
            got = MigData.unpack(msg.payload)
            assert got.size <= MigDataRead.unpack(request.payload).size
        elif command in REPLY_CODECS and msg.payload:
            parsed = REPLY_CODECS[command].unpack(msg.payload)
            assert parsed.pack() == msg.payload, (name, msg.seq)
        checked += 1
    assert checked > 0


@given(st.integers(0, 2**32 - 1), st.integers(-(2**31), 2**31 - 1))
def test_mig_device_state_round_trip(device_state: int, data_fd: int) -> None:
    packed = MigDeviceState(device_state, data_fd).pack()
    assert packed == struct.pack("<Ii", device_state, data_fd)  # the kernel's layout
    assert MigDeviceState.unpack(packed) == MigDeviceState(device_state, data_fd)
    # Trailing bytes (a larger argsz) are not the codec's business.
    assert MigDeviceState.unpack(packed + b"\xff") == MigDeviceState(device_state, data_fd)


def test_mig_device_state_defaults_and_short_data() -> None:
    assert MigDeviceState(3).pack() == struct.pack("<Ii", 3, -1)
    for size in range(MigDeviceState.SIZE):
        with pytest.raises(ProtocolError) as info:
            MigDeviceState.unpack(bytes(size))
        assert info.value.errno == errno.EINVAL
