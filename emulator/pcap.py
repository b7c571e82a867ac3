"""Classic libpcap capture files (what ``tcpdump -w`` writes), for ``--netdev ...,pcap=FILE``.

The format: a 24-byte file header (magic ``0xa1b2c3d4`` in the writer's byte order,
version 2.4, snap length, link type) followed by one 16-byte record header (seconds,
microseconds, captured length, original length) and the frame bytes per frame. We write
``LINKTYPE_ETHERNET`` (1), microsecond timestamps, in the host's byte order, as libpcap does.

Classic pcap has no direction flag: which way a frame went is seen from its MAC addresses.

:class:`PcapWriter` buffers (a data path writes through it); it is flushed by
:meth:`PcapWriter.flush` (the netdev backends do so periodically) and on close.
:func:`read_pcap` is a small reader for tests and tools; it also reads big-endian and
nanosecond-resolution files.
"""

from __future__ import annotations

import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

LINKTYPE_ETHERNET = 1
#: tcpdump's default snap length; larger than any frame a netdev passes, so nothing is cut.
DEFAULT_SNAPLEN = 262144

MAGIC_MICROSECONDS = 0xA1B2C3D4
MAGIC_NANOSECONDS = 0xA1B23C4D

_FILE_HEADER = struct.Struct("=IHHiIII")
_RECORD_HEADER = struct.Struct("=IIII")
_VERSION = (2, 4)


class PcapError(Exception):
    """A file that is not a classic pcap capture (or is cut short)."""


@dataclass(frozen=True, slots=True)
class PcapRecord:
    timestamp: float  # seconds since the epoch
    frame: bytes  # the captured bytes (all of the frame unless the snap length cut it)
    original_length: int


@dataclass(frozen=True, slots=True)
class PcapFile:
    linktype: int
    snaplen: int
    version: tuple[int, int]
    nanoseconds: bool
    byte_order: str  # "little" or "big"
    records: list[PcapRecord]

    @property
    def frames(self) -> list[bytes]:
        return [record.frame for record in self.records]


class PcapWriter:
    """Append frames to a new capture file (truncated if it exists)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        snaplen: int = DEFAULT_SNAPLEN,
        linktype: int = LINKTYPE_ETHERNET,
        buffer_size: int = 256 * 1024,
    ) -> None:
        if snaplen <= 0:
            raise ValueError("snaplen must be positive")
        self.path = Path(path)
        self.snaplen = snaplen
        self.frames_written = 0
        self._file: BinaryIO | None = open(self.path, "wb", buffering=buffer_size)  # noqa: SIM115
        self._file.write(_FILE_HEADER.pack(MAGIC_MICROSECONDS, *_VERSION, 0, 0, snaplen, linktype))
        self._dirty = True

    @property
    def closed(self) -> bool:
        return self._file is None

    def write(self, frame: bytes | bytearray | memoryview, timestamp_ns: int | None = None) -> None:
        """One frame, stamped now (or at ``timestamp_ns``, nanoseconds since the epoch)."""
        file = self._file
        if file is None:
            raise ValueError(f"{self.path}: capture file is closed")
        if timestamp_ns is None:
            timestamp_ns = time.time_ns()
        seconds, nanoseconds = divmod(timestamp_ns, 1_000_000_000)
        length = len(frame)
        captured = min(length, self.snaplen)
        file.write(_RECORD_HEADER.pack(seconds, nanoseconds // 1000, captured, length))
        file.write(frame if captured == length else memoryview(frame)[:captured])
        self.frames_written += 1
        self._dirty = True

    def flush(self) -> None:
        """Make what was written visible to readers (``tcpdump -r`` on a live capture)."""
        if self._file is not None and self._dirty:
            self._file.flush()
            self._dirty = False

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_pcap(data: bytes) -> PcapFile:
    """Decode a whole classic pcap file."""
    if len(data) < _FILE_HEADER.size:
        raise PcapError("too short for a pcap file header")
    (magic,) = struct.unpack_from("<I", data)
    if magic in (MAGIC_MICROSECONDS, MAGIC_NANOSECONDS):
        order, prefix = "little", "<"
    else:
        (magic,) = struct.unpack_from(">I", data)
        if magic not in (MAGIC_MICROSECONDS, MAGIC_NANOSECONDS):
            raise PcapError(f"not a classic pcap file (magic {data[:4].hex()})")
        order, prefix = "big", ">"
    nanoseconds = magic == MAGIC_NANOSECONDS
    header = struct.Struct(prefix + "IHHiIII")
    record = struct.Struct(prefix + "IIII")
    _, major, minor, _, _, snaplen, linktype = header.unpack_from(data, 0)
    divisor = 1e9 if nanoseconds else 1e6
    records: list[PcapRecord] = []
    offset = header.size
    while offset < len(data):
        if offset + record.size > len(data):
            raise PcapError(f"record header cut short at offset {offset}")
        seconds, fraction, captured, original = record.unpack_from(data, offset)
        offset += record.size
        if offset + captured > len(data):
            raise PcapError(f"record data cut short at offset {offset}")
        records.append(
            PcapRecord(seconds + fraction / divisor, data[offset : offset + captured], original)
        )
        offset += captured
    return PcapFile(linktype, snaplen, (major, minor), nanoseconds, order, records)


def read_pcap(path: str | os.PathLike[str]) -> PcapFile:
    return parse_pcap(Path(path).read_bytes())


#: The byte order :class:`PcapWriter` writes in.
NATIVE_BYTE_ORDER = sys.byteorder
