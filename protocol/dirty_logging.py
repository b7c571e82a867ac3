"""Dirty-page logging on the wire (sans-IO): the DMA_LOGGING_START / REPORT data layouts
(facts 9.1), the START request codec and the bitmap size every dirty bitmap uses (facts 9.2:
DMA_LOGGING_REPORT, protocol-0.1 DIRTY_PAGES and DMA_UNMAP with a dirty bitmap).

Layouts (all after the 8-byte DEVICE_FEATURE header):

* START: ``page_size u64, num_ranges u32, reserved u32`` (START_HEADER) then
  ``num_ranges`` x ``{iova u64, length u64}`` (RANGE), at most MAX_RANGES;
* REPORT: ``iova u64, length u64, page_size u64`` (REPORT), in the request and echoed at
  the start of the reply, followed by the bitmap.

A bitmap holds one bit per page, LSB first, in whole u64 words (:func:`bitmap_bytes`).
The checks START's data must pass are listed in :mod:`emulator.dirty`.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from .errors import require

START_HEADER = struct.Struct("<QII")
RANGE = struct.Struct("<QQ")
REPORT = struct.Struct("<QQQ")
MAX_RANGES = 1024
MIN_PAGE = 4096
U64_LIMIT = 1 << 64


def page_size_ok(size: int) -> bool:
    return size >= MIN_PAGE and size & (size - 1) == 0


@dataclass(frozen=True, slots=True)
class LoggingRequest:
    page_size: int
    ranges: tuple[tuple[int, int], ...]  # empty: every write

    @classmethod
    def unpack(cls, data: bytes) -> LoggingRequest:
        require(len(data) >= START_HEADER.size, "DMA_LOGGING_START: data too short")
        page_size, count, _reserved = START_HEADER.unpack_from(data)
        require(page_size_ok(page_size), f"DMA_LOGGING_START: page size {page_size}")
        require(count <= MAX_RANGES, f"DMA_LOGGING_START: {count} ranges", errno.E2BIG)
        require(
            len(data) == START_HEADER.size + count * RANGE.size,
            f"DMA_LOGGING_START: {len(data)} bytes for {count} ranges",
        )
        ranges = sorted(
            RANGE.unpack_from(data, START_HEADER.size + i * RANGE.size) for i in range(count)
        )
        end = 0
        for iova, length in ranges:
            require(length > 0, "DMA_LOGGING_START: empty range")
            require(
                iova % page_size == 0 and length % page_size == 0,
                f"DMA_LOGGING_START: range [{iova:#x}, +{length:#x}) not page-aligned",
            )
            require(iova + length <= U64_LIMIT, "range wraps", errno.EOVERFLOW)
            require(iova >= end, "DMA_LOGGING_START: overlapping ranges")
            end = iova + length
        return cls(page_size, tuple(ranges))


def bitmap_bytes(length: int, page_size: int) -> int:
    """Bytes of a bitmap with one bit per page of ``length`` bytes, in whole u64 words."""
    pages = (length + page_size - 1) // page_size
    return 8 * ((pages + 63) // 64)
