"""Device dirty-page logging: DEVICE_FEATURE DMA_LOGGING_START (6), STOP (7), REPORT (8).

Rules (vfio-user 0.9.2 with the kernel's and libvfio-user's checks, facts section 9.1):

* START data: ``page_size u64, num_ranges u32, reserved u32`` then ``num_ranges`` x
  ``{iova u64, length u64}``. page_size must be a power of two >= 4096 (EINVAL); the data
  length must match num_ranges (EINVAL); at most MAX_RANGES ranges (E2BIG); each range
  non-empty, aligned to page_size (EINVAL), not wrapping (EOVERFLOW), not overlapping another
  (EINVAL). num_ranges 0 logs every write (spec). A second START while logging succeeds if
  it is identical and fails with EINVAL otherwise (libvfio-user).
* STOP ends logging; without logging it is a no-op. Its data is ignored.
* REPORT data: ``iova u64, length u64, page_size u64``. EINVAL before START, for a
  page_size that is not a power of two >= 4096, for length 0 or wrapping; the range must lie
  inside a started range (explicit ranges) or be covered by current mappings (num_ranges 0),
  else ENOENT — ranges that span or sit inside mappings are fine (libvfio-user only takes
  exact mappings, which broke QEMU's migration prototype). The reply carries the request's
  24 bytes and a bitmap of u64 words, page k of the report at bit k % 64 of word k / 64,
  ``argsz >= 8 + 24 + bitmap`` (EINVAL otherwise). The report reads *and clears*: logged
  pages wholly inside the range are forgotten; a logged page only partly inside stays
  dirty (reporting too much is safe, too little loses data).
* Every byte a device writes through the DMA API is logged, and so is every DMA_WRITE we
  send. Logging granularity is the START page size; a REPORT with another page size maps
  onto it (finer: every report page inside a dirty logged page is set; coarser: OR).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable

from protocol.dirty_logging import (
    MAX_RANGES,
    RANGE,
    REPORT,
    START_HEADER,
    U64_LIMIT,
    LoggingRequest,
    bitmap_bytes,
    page_size_ok,
)
from protocol.errors import ProtocolError, require

__all__ = [
    "MAX_RANGES",
    "RANGE",
    "REPORT",
    "START_HEADER",
    "DirtyLogging",
    "LoggingFeature",
    "LoggingRequest",
    "covered",
]


class DirtyLogging:
    """One logging session: which pages (at the START page size) were written."""

    def __init__(self, request: LoggingRequest) -> None:
        self.request = request
        self.page_size = request.page_size
        self.pages: set[int] = set()

    def record(self, iova: int, length: int) -> None:
        if not length:
            return
        if self.request.ranges and not self._inside_ranges(iova, length):
            return  # writes outside the started ranges are not logged
        first = iova // self.page_size
        last = (iova + length - 1) // self.page_size
        self.pages.update(range(first, last + 1))

    def _inside_ranges(self, iova: int, length: int) -> bool:
        end = iova + length
        return any(start < end and iova < start + size for start, size in self.request.ranges)

    def report(self, iova: int, length: int, page_size: int) -> bytes:
        """The bitmap for ``[iova, iova+length)`` at ``page_size``; clears what it reports."""
        bitmap = 0
        end = iova + length
        logged = self.page_size
        first = iova // logged
        last = (end - 1) // logged
        # Walk whichever is smaller: the range's pages or the logged pages.
        dirty = (
            [p for p in range(first, last + 1) if p in self.pages]
            if last - first < len(self.pages)
            else sorted(p for p in self.pages if first <= p <= last)
        )
        forget = []
        for page in dirty:
            start, stop = page * logged, (page + 1) * logged
            lo = max(start, iova)
            hi = min(stop, end)
            for k in range((lo - iova) // page_size, (hi - 1 - iova) // page_size + 1):
                bitmap |= 1 << k
            if iova <= start and stop <= end:
                forget.append(page)
        self.pages.difference_update(forget)
        return bitmap.to_bytes(bitmap_bytes(length, page_size), "little")


class LoggingFeature:
    """The DEVICE_FEATURE side of dirty logging for one client session."""

    def __init__(self, mapped: Callable[[int, int], bool]) -> None:
        #: mapped(iova, length): is the whole range covered by current DMA mappings?
        self.mapped = mapped
        self.session: DirtyLogging | None = None

    def record(self, iova: int, length: int) -> None:
        if self.session is not None:
            self.session.record(iova, length)

    def start(self, data: bytes) -> None:
        request = LoggingRequest.unpack(data)
        if self.session is not None:
            require(
                self.session.request == request,
                "DMA logging already started with other parameters (STOP first)",
            )
            return
        self.session = DirtyLogging(request)

    def stop(self) -> None:
        self.session = None

    def report(self, data: bytes, argsz: int, max_bitmap: int = 1 << 20) -> bytes:
        """The reply data: the 24 request bytes, then the bitmap (at most ``max_bitmap``
        bytes: the reply must fit one message, E2BIG otherwise)."""
        require(self.session is not None, "DMA_LOGGING_REPORT before DMA_LOGGING_START")
        assert self.session is not None
        require(len(data) >= REPORT.size, "DMA_LOGGING_REPORT: data too short")
        iova, length, page_size = REPORT.unpack_from(data)
        require(page_size_ok(page_size), f"DMA_LOGGING_REPORT: page size {page_size}")
        require(length > 0, "DMA_LOGGING_REPORT: empty range")
        require(iova + length <= U64_LIMIT, "range wraps", errno.EOVERFLOW)
        self._check_reportable(iova, length)
        bitmap_size = bitmap_bytes(length, page_size)
        require(
            bitmap_size <= max_bitmap,
            f"DMA_LOGGING_REPORT: a {bitmap_size}-byte bitmap exceeds {max_bitmap}",
            errno.E2BIG,
        )
        needed = 8 + REPORT.size + bitmap_size
        require(argsz >= needed, f"DMA_LOGGING_REPORT: argsz {argsz} < {needed}")
        return REPORT.pack(iova, length, page_size) + self.session.report(iova, length, page_size)

    def _check_reportable(self, iova: int, length: int) -> None:
        assert self.session is not None
        ranges = self.session.request.ranges
        if ranges:
            inside = any(start <= iova and iova + length <= start + size for start, size in ranges)
            if not inside:
                raise ProtocolError(
                    errno.ENOENT, f"[{iova:#x}, +{length:#x}) is not inside a logged range"
                )
        elif not self.mapped(iova, length):
            raise ProtocolError(errno.ENOENT, f"[{iova:#x}, +{length:#x}) is not mapped")


def covered(ranges: Iterable[tuple[int, int]], iova: int, length: int) -> bool:
    """Is ``[iova, iova+length)`` covered by the union of ``(start, size)`` ranges?"""
    pos = iova
    end = iova + length
    for start, size in sorted(ranges):
        if start > pos:
            break
        pos = max(pos, start + size)
        if pos >= end:
            return True
    return pos >= end
