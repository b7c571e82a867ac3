"""Dirty-page logging (DEVICE_FEATURE 6/7/8) over a real socket, and its model."""

from __future__ import annotations

import errno
import os
import struct
import tempfile
from collections.abc import Awaitable, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.client import Client, ClientError, GuestMemory
from emulator.dirty import DirtyLogging, LoggingRequest
from emulator.testing.harness import GuestRam, ServedDevice
from emulator.testing.testdev_driver import copy
from protocol.constants import FEATURE_GET, FEATURE_PROBE, FEATURE_SET

START, STOP, REPORT = 6, 7, 8
PAGE = 4096


def start_data(page_size: int, ranges: Sequence[tuple[int, int]] = ()) -> bytes:
    return struct.pack("<QII", page_size, len(ranges), 0) + b"".join(
        struct.pack("<QQ", iova, length) for iova, length in ranges
    )


async def start(
    client: Client, page_size: int = PAGE, ranges: tuple[tuple[int, int], ...] = ()
) -> None:
    data = start_data(page_size, list(ranges))
    reply = await client.device_feature(FEATURE_SET | START, data)
    assert reply == struct.pack("<II", 8 + len(data), FEATURE_SET | START) + data


async def report(client: Client, iova: int, length: int, page_size: int = PAGE) -> int:
    bits = (length + page_size - 1) // page_size
    argsz = 8 + 24 + 8 * ((bits + 63) // 64)
    data = struct.pack("<QQQ", iova, length, page_size)
    reply = await client.device_feature(FEATURE_GET | REPORT, data, argsz=argsz)
    assert len(reply) == argsz  # exactly 8 + 24 + bitmap, as libvfio-user's client wants
    assert reply[8:32] == data
    return int.from_bytes(reply[32:], "little")


async def errno_of(coro: Awaitable[object]) -> int:
    with pytest.raises(ClientError) as info:
        await coro
    return info.value.errno


async def test_device_writes_are_reported_once(client: Client) -> None:
    with GuestRam(0x20000) as ram:
        await client.dma_map(0, 0x10000, fd=ram.fd)
        await client.dma_map(0x10000, 0x10000, fd=ram.fd, offset=0x10000)
        await start(client)
        await copy(client, 0x0, 0x5000 + 100, 2 * PAGE)  # dirties pages 5, 6 and 7
        # A range spanning both mappings is accepted (libvfio-user wants exact mappings).
        assert await report(client, 0, 0x20000) == 0b111 << 5
        assert await report(client, 0, 0x20000) == 0  # read and cleared
        await copy(client, 0x0, 0x12000, 16)
        # A range inside a mapping, at a coarser page size: 32 KiB pages.
        assert await report(client, 0x10000, 0x10000, 8 * PAGE) == 0b1


async def test_writes_to_a_file_on_disk_are_direct_and_reported(
    client: Client, tmp_path: Path
) -> None:
    """libvfio-user's sample client maps offsets of one mkstemp() file (unsealable): the
    device reaches it with pread/pwrite, no messages, and its writes are logged."""
    fd, name = tempfile.mkstemp(dir=tmp_path)
    try:
        os.ftruncate(fd, 0x20000)
        os.pwrite(fd, bytes(range(256)) * 16, 0x1000)
        await client.dma_map(0, 0x10000, fd=os.dup(fd))
        await client.dma_map(0x10000, 0x10000, fd=os.dup(fd), offset=0x10000)
        await start(client)
        # The client serves no DMA messages: a message would fail the copy.
        await copy(client, 0x1000, 0x12000 + 8, PAGE)  # pages 0x12 and 0x13 of the file
        assert os.pread(fd, PAGE, 0x12000 + 8) == bytes(range(256)) * 16
        assert await report(client, 0x10000, 0x10000) == 0b11 << 2
    finally:
        os.close(fd)
        os.unlink(name)


async def test_finer_report_pages_and_messages(served: ServedDevice, client: Client) -> None:
    memory = GuestMemory(0, 0x8000)
    client.serve_dma(memory)
    await client.dma_map(0, 0x8000)  # no fd: the device writes with DMA_WRITE messages
    await start(client, page_size=2 * PAGE)
    await copy(client, 0, 0x4000 + 10, 4)  # logged page 2 (8 KiB pages)
    # 4 KiB report pages inside a dirty 8 KiB logged page are all set.
    assert await report(client, 0, 0x8000, PAGE) == 0b11 << 4


async def test_explicit_ranges_limit_what_is_logged(client: Client) -> None:
    with GuestRam(0x10000) as ram:
        await client.dma_map(0, 0x10000, fd=ram.fd)
        await start(client, ranges=((0x8000, 0x4000),))
        await copy(client, 0, 0x1000, 16)  # outside the logged range: not logged
        await copy(client, 0, 0x9000, 16)
        assert await report(client, 0x8000, 0x4000) == 0b10
        assert await errno_of(report(client, 0, 0x4000)) == errno.ENOENT


async def test_errno_rules(client: Client) -> None:
    set_start = FEATURE_SET | START
    assert await errno_of(report(client, 0, PAGE)) == errno.EINVAL  # before START
    for page_size in (0, 1000, 6000, 2048):
        data = start_data(page_size)
        assert await errno_of(client.device_feature(set_start, data)) == errno.EINVAL
    bad_ranges = {
        "misaligned": [(0x100, PAGE)],
        "empty": [(0, 0)],
        "overlap": [(0, 2 * PAGE), (PAGE, PAGE)],
    }
    for ranges in bad_ranges.values():
        data = start_data(PAGE, ranges)
        assert await errno_of(client.device_feature(set_start, data)) == errno.EINVAL
    wrap = start_data(PAGE, [(2**64 - PAGE, 2 * PAGE)])
    assert await errno_of(client.device_feature(set_start, wrap)) == errno.EOVERFLOW
    many = start_data(PAGE, [(i * PAGE, PAGE) for i in range(1025)])
    assert await errno_of(client.device_feature(set_start, many, argsz=8 + len(many))) == (
        errno.E2BIG
    )
    short = start_data(PAGE, [(0, PAGE)])[:-8]
    assert await errno_of(client.device_feature(set_start, short)) == errno.EINVAL
    # STOP without START is a no-op; PROBE says what is supported.
    await client.device_feature(FEATURE_SET | STOP, b"")
    await client.device_feature(FEATURE_PROBE | FEATURE_GET | REPORT, b"")
    assert await errno_of(client.device_feature(FEATURE_PROBE | FEATURE_GET | START)) == (
        errno.EINVAL
    )
    with GuestRam(0x4000) as ram:
        await client.dma_map(0, 0x4000, fd=ram.fd)
        await start(client)
        await start(client)  # the same START again: fine
        data = start_data(2 * PAGE)
        assert await errno_of(client.device_feature(set_start, data)) == errno.EINVAL
        assert await errno_of(report(client, 0x4000, PAGE)) == errno.ENOENT  # not mapped
        assert await errno_of(report(client, 0, 3 * PAGE, 3000)) == errno.EINVAL
        tight = struct.pack("<QQQ", 0, 0x4000, PAGE)
        assert await errno_of(client.device_feature(FEATURE_GET | REPORT, tight, argsz=32)) == (
            errno.EINVAL
        )
        await client.device_feature(FEATURE_SET | STOP, b"")
        assert await errno_of(report(client, 0, PAGE)) == errno.EINVAL  # after STOP


async def test_unmap_and_remap_while_logging(client: Client) -> None:
    with GuestRam(0x10000) as ram:
        await client.dma_map(0, 0x8000, fd=ram.fd)
        await start(client)
        await copy(client, 0, 0x2000, 16)
        await client.dma_unmap(0, 0x8000)
        await client.dma_map(0, 0x10000, fd=ram.fd)  # a bigger map, mapped while logging
        await copy(client, 0, 0xA000, 16)
        assert await report(client, 0, 0x10000) == (1 << 2) | (1 << 10)


# -- the model ------------------------------------------------------------------------------

writes = st.lists(st.tuples(st.integers(0, 0x40000), st.integers(1, 0x3000)), max_size=20)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([4096, 8192, 16384]),
    writes,
    st.lists(
        st.tuples(
            st.integers(0, 0x10).map(lambda n: n * 4096),
            st.integers(1, 0x20).map(lambda n: n * 4096),
            st.sampled_from([4096, 8192, 32768]),
        ),
        max_size=6,
    ),
)
def test_reports_never_miss_a_write(
    log_page: int, written: list[tuple[int, int]], reports: list[tuple[int, int, int]]
) -> None:
    """Safety: every byte written since it was last reported shows in the next report
    covering it. Precision: a page nobody wrote is never reported."""
    log = DirtyLogging(LoggingRequest(log_page, ()))
    unreported: set[int] = set()  # bytes written and not yet reported (sparse: page starts)
    for iova, length in written:
        log.record(iova, length)
        unreported.update(range(iova, iova + length, 512))
        unreported.add(iova + length - 1)
    for iova, length, page in reports:
        bitmap = log.report(iova, length, page)
        value = int.from_bytes(bitmap, "little")
        for byte in [b for b in unreported if iova <= b < iova + length]:
            assert value >> ((byte - iova) // page) & 1, (byte, iova, length, page)
        for k in range((length + page - 1) // page):
            if value >> k & 1:
                lo = max(iova + k * page, 0)
                hi = iova + (k + 1) * page
                touched = any(w < hi + log_page and lo - log_page < w + wl for w, wl in written)
                assert touched, (k, page)
        unreported = {
            b
            for b in unreported
            if not (
                iova <= b < iova + length
                and iova <= (b // log_page) * log_page
                and (b // log_page + 1) * log_page <= iova + length
            )
        }
