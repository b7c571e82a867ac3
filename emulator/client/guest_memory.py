"""Guest memory migrated alongside the device, with the device's dirty-page log.

A VMM migrates guest RAM itself; the device's part is to say which pages *it* wrote by DMA
(the CPU's writes the VMM tracks on its own, e.g. with KVM's dirty log). QEMU does this
with DMA_LOGGING_START / REPORT / STOP (facts 9.1). :class:`GuestMemoryMigration` is the
migration driver's model of that: the guest memory the source device DMAs into, a separate
guest memory on the destination side (mapped into the destination server), and the IOVA
ranges they cover. Given to :func:`emulator.client.migrate.migrate` (``guest_memory=``):

* pre-copy: DMA_LOGGING_START on the source (the ranges, ``page_size``) before anything is
  copied, then the whole memory once; after each pre-copy round a REPORT (which reads and
  clears the log) and a copy of the pages it names; once the source is stopped (its DMA
  ended when it entered STOP_COPY: the engine waits for work in progress; the driver does
  this after STOP_COPY -> STOP) a last REPORT and copy, then DMA_LOGGING_STOP. Whatever
  the device wrote before it stopped is on the destination.
* stop-copy: no logging; the whole memory is copied once the source is stopped.

Pages the CPU (the test playing the guest) writes during a migration must be announced with
:meth:`GuestMemoryMigration.mark_dirty`, as a VMM's own tracking would; they are copied at
the next synchronisation like pages from the device's log.

Both memories are :class:`emulator.client.requests.DmaMemory` objects (``read``/``write`` by guest
address): an :class:`emulator.testing.harness.GuestRam` memfd mapped with DMA_MAP ``fd=``, or an
:class:`emulator.client.requests.GuestMemory` served with ``Client.serve_dma``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from emulator.client.core import Client
from emulator.client.requests import DmaMemory, InvalidReply
from protocol.constants import FEATURE_GET, FEATURE_PROBE, FEATURE_SET, Command, DeviceFeature
from protocol.dirty_logging import MAX_RANGES, RANGE, REPORT, START_HEADER, bitmap_bytes
from protocol.messages import DeviceFeatureMsg

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "GuestMemoryMigration",
    "MemoryCopyReport",
    "SizedMemory",
]

DEFAULT_PAGE_SIZE = 4096
#: A REPORT covers at most this much (a 2 KiB bitmap at 4 KiB pages): bounded replies.
REPORT_SPAN = 64 * 1024 * 1024
#: Bytes copied between checkpoints (other tasks, e.g. a client serving DMA, keep running).
COPY_CHUNK = 1024 * 1024


class SizedMemory(DmaMemory, Protocol):
    """Guest memory that knows where it sits: ``[base, base + size)``."""

    @property
    def base(self) -> int: ...

    @property
    def size(self) -> int: ...


@dataclass(frozen=True, slots=True)
class MemoryCopyReport:
    """Guest pages copied to the destination, by phase (pages of ``page_size`` bytes)."""

    page_size: int
    #: Pages of guest memory in all.
    total_pages: int
    #: The first full copy (pre-copy: before the first round, with logging on).
    initial_pages: int
    #: Dirty pages copied after pre-copy rounds, the device still running.
    precopy_pages: int
    #: Pages copied with the source stopped (stop-copy mode: all of them).
    stop_copy_pages: int
    #: Dirty pages copied after each pre-copy round.
    round_pages: tuple[int, ...] = ()

    @property
    def copied_pages(self) -> int:
        return self.initial_pages + self.precopy_pages + self.stop_copy_pages

    def lines(self) -> list[str]:
        return [
            f"guest memory: {self.total_pages} pages of {self.page_size} bytes",
            f"guest pages copied: {self.initial_pages} initial, {self.precopy_pages} "
            f"pre-copy (dirty), {self.stop_copy_pages} stop-copy",
        ]


def _check_ranges(ranges: Sequence[tuple[int, int]], page_size: int) -> None:
    if not ranges:
        raise ValueError("guest memory needs at least one range")
    if len(ranges) > MAX_RANGES:
        raise ValueError(f"at most {MAX_RANGES} guest memory ranges, not {len(ranges)}")
    end = 0
    for iova, length in sorted(ranges):
        if length <= 0 or iova < 0:
            raise ValueError(f"guest memory range [{iova:#x}, +{length:#x}) is empty")
        if iova % page_size or length % page_size:
            raise ValueError(
                f"guest memory range [{iova:#x}, +{length:#x}) is not {page_size}-aligned"
            )
        if iova < end:
            raise ValueError(f"guest memory range at {iova:#x} overlaps another")
        end = iova + length


def _runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted page numbers as (first page, count) runs of consecutive pages."""
    runs: list[tuple[int, int]] = []
    for page in sorted(pages):
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


class GuestMemoryMigration:
    """Source and destination guest memory, and the copying a migration does between them.

    ``ranges`` are the ``(iova, length)`` ranges of guest memory (page-aligned, the ones
    mapped into both servers with DMA_MAP); both memories must hold them at the same guest
    addresses. One object may serve several migrations (one at a time); the counters of
    the last one are in :meth:`report`.
    """

    def __init__(
        self,
        source: DmaMemory,
        destination: DmaMemory,
        ranges: Iterable[tuple[int, int]],
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        if page_size < DEFAULT_PAGE_SIZE or page_size & (page_size - 1):
            raise ValueError(f"page size must be a power of two >= 4096, not {page_size}")
        if source is destination:
            raise ValueError("source and destination guest memory are the same object")
        self.source = source
        self.destination = destination
        self.ranges = tuple(sorted(ranges))
        _check_ranges(self.ranges, page_size)
        self.page_size = page_size
        #: Whether DMA_LOGGING_START succeeded on the source and no STOP followed yet.
        self.logging = False
        self._cpu_dirty: set[int] = set()
        self._initial = self._precopy = self._stop_copy = 0
        self._rounds: list[int] = []

    @classmethod
    def between(
        cls, source: SizedMemory, destination: SizedMemory, *, page_size: int = DEFAULT_PAGE_SIZE
    ) -> GuestMemoryMigration:
        """One range: the whole of ``source`` (``destination`` must sit at the same place)."""
        if (source.base, source.size) != (destination.base, destination.size):
            raise ValueError(
                f"destination memory [{destination.base:#x}, +{destination.size:#x}) is not "
                f"where the source's is [{source.base:#x}, +{source.size:#x})"
            )
        return cls(source, destination, [(source.base, source.size)], page_size=page_size)

    @property
    def total_pages(self) -> int:
        return sum(length for _, length in self.ranges) // self.page_size

    def mark_dirty(self, iova: int, length: int) -> None:
        """The guest's CPU wrote ``[iova, iova+length)`` (the VMM's own dirty tracking);
        copied at the next synchronisation. Writes outside the ranges are ignored."""
        if length <= 0:
            return
        first = iova // self.page_size
        last = (iova + length - 1) // self.page_size
        self._cpu_dirty.update(p for p in range(first, last + 1) if self._inside(p))

    def _inside(self, page: int) -> bool:
        address = page * self.page_size
        return any(start <= address < start + size for start, size in self.ranges)

    def report(self) -> MemoryCopyReport:
        return MemoryCopyReport(
            page_size=self.page_size,
            total_pages=self.total_pages,
            initial_pages=self._initial,
            precopy_pages=self._precopy,
            stop_copy_pages=self._stop_copy,
            round_pages=tuple(self._rounds),
        )

    # -- the driver's steps ---------------------------------------------------------------------
    def begin(self) -> None:
        """A new migration: counters from zero, no CPU writes pending (all gets copied)."""
        self._initial = self._precopy = self._stop_copy = 0
        self._rounds = []
        self._cpu_dirty.clear()

    async def check_logging(self, client: Client) -> None:
        """PROBE for DMA_LOGGING_START and REPORT: raises ClientError if unsupported."""
        await client.device_feature(FEATURE_PROBE | FEATURE_SET | DeviceFeature.DMA_LOGGING_START)
        await client.device_feature(FEATURE_PROBE | FEATURE_GET | DeviceFeature.DMA_LOGGING_REPORT)

    async def start_logging(self, client: Client) -> None:
        data = START_HEADER.pack(self.page_size, len(self.ranges), 0) + b"".join(
            RANGE.pack(iova, length) for iova, length in self.ranges
        )
        await client.device_feature(FEATURE_SET | DeviceFeature.DMA_LOGGING_START, data)
        self.logging = True

    async def stop_logging(self, client: Client) -> None:
        await client.device_feature(FEATURE_SET | DeviceFeature.DMA_LOGGING_STOP)
        self.logging = False

    async def copy_all(self) -> int:
        """Copy every page (the first pre-copy pass); returns the page count."""
        self._cpu_dirty.clear()  # this copy includes them
        for iova, length in self.ranges:
            await self._copy(iova, length)
        self._initial = self.total_pages
        return self._initial

    async def copy_all_stopped(self) -> int:
        """Stop-copy mode: every page, with the source stopped."""
        self._cpu_dirty.clear()
        for iova, length in self.ranges:
            await self._copy(iova, length)
        self._stop_copy = self.total_pages
        return self._stop_copy

    async def sync_round(self, client: Client) -> int:
        """After a pre-copy round: copy what the log (and the CPU) dirtied since last time."""
        count = await self._sync(client)
        self._rounds.append(count)
        self._precopy += count
        return count

    async def sync_stopped(self, client: Client) -> int:
        """The source is stopped: the last dirty pages."""
        count = await self._sync(client)
        self._stop_copy += count
        return count

    async def _sync(self, client: Client) -> int:
        pages = await self.read_dirty_log(client)
        pages |= self._cpu_dirty
        self._cpu_dirty = set()
        for first, count in _runs(pages):
            await self._copy(first * self.page_size, count * self.page_size)
        return len(pages)

    async def read_dirty_log(self, client: Client) -> set[int]:
        """REPORT every range (reading *and clearing* the source's log): the page numbers
        (guest address // page_size) the device wrote since the last report."""
        pages: set[int] = set()
        for iova, length in self.ranges:
            for at in range(iova, iova + length, REPORT_SPAN):
                span = min(REPORT_SPAN, iova + length - at)
                bitmap = await self._report(client, at, span)
                first = at // self.page_size
                pages.update(first + bit for bit in _set_bits(bitmap))
        return pages

    async def _report(self, client: Client, iova: int, length: int) -> int:
        bits = length // self.page_size
        request = REPORT.pack(iova, length, self.page_size)
        argsz = DeviceFeatureMsg.HEADER_SIZE + REPORT.size + bitmap_bytes(length, self.page_size)
        payload = await client.device_feature(
            FEATURE_GET | DeviceFeature.DMA_LOGGING_REPORT, request, argsz=argsz
        )
        data = payload[DeviceFeatureMsg.HEADER_SIZE :]
        if data[: REPORT.size] != request or len(payload) != argsz:
            raise InvalidReply(
                Command.DEVICE_FEATURE,
                f"DMA_LOGGING_REPORT [{iova:#x}, +{length:#x}): reply of {len(payload)} "
                f"bytes does not echo the request with a {argsz - 32}-byte bitmap",
            )
        bitmap = int.from_bytes(data[REPORT.size :], "little")
        if bitmap >> bits:
            raise InvalidReply(
                Command.DEVICE_FEATURE, "DMA_LOGGING_REPORT: bits set beyond the range"
            )
        return bitmap

    async def _copy(self, iova: int, length: int) -> None:
        for at in range(iova, iova + length, COPY_CHUNK):
            count = min(COPY_CHUNK, iova + length - at)
            self.destination.write(at, self.source.read(at, count))
            await trio.lowlevel.checkpoint()


def _set_bits(value: int) -> Iterable[int]:
    """Indexes of the set bits of ``value``, lowest first."""
    while value:
        low = value & -value
        yield low.bit_length() - 1
        value ^= low
