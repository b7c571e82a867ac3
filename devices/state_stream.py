"""The migration stream envelope: a versioned, checksummed container of named sections.

Layout (little-endian)::

    header   64 B  magic "VFUSTATE", format u16, checksum-algorithm u16, header size u32,
                   session id 16 B, device type 24 B (ASCII, NUL-padded), model version u32,
                   header CRC u32 (of the 60 bytes before it)
    section  24 B  tag "SECT", index u32 (0, 1, 2, ... in order), name length u16,
                   flags u16 (0), payload length u64, CRC u32 of name + payload
             then  the name (ASCII, 1-64 bytes) and the payload
    trailer  16 B  tag "END!", section count u32, CRC u32 of every byte before the trailer,
                   reserved u32

The receiver treats a stream as hostile: every length is bounded before anything is
allocated, each section's CRC and index are checked, the trailer's count and whole-stream CRC
must match, nothing may follow the trailer, and the device type and model version are
checked before a single section reaches the device. Any defect raises :class:`StreamError`
(errno EINVAL) and nothing else.
"""

from __future__ import annotations

import errno
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from . import stream_primitives
from .errors import DeviceError

MAGIC = b"VFUSTATE"
FORMAT_VERSION = 1
CHECKSUM_CRC32C = 2  # CRC-32C (Castagnoli): hardware-accelerated in the C fast path

HEADER = struct.Struct("<8sHHI16s24sII")
SECTION = struct.Struct("<4sIHHQI")
TRAILER = struct.Struct("<4sIII")
SECTION_TAG = b"SECT"
TRAILER_TAG = b"END!"
assert HEADER.size == 64 and SECTION.size == 24 and TRAILER.size == 16

MAX_NAME = 64
_NAME = re.compile(rb"[a-z0-9][a-z0-9_.\-]*")

Buffer = bytes | bytearray | memoryview
#: A section payload: one buffer, or several that are sent back to back as one payload
#: (so a device can hand over zero-page-elided memory without joining it).
Payload = Buffer | Sequence[Buffer]
#: A named section as a device produces it.
Section = tuple[str, Payload]
#: A named section as a device receives it: the payload is a view into the received stream.
LoadedSection = tuple[str, Buffer]


class StreamError(DeviceError):
    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, f"migration stream: {message}")


@dataclass(frozen=True, slots=True)
class StreamLimits:
    max_stream: int = 1 << 34  # 16 GiB
    max_section: int = 1 << 32  # 4 GiB
    max_sections: int = 1 << 20


@dataclass(frozen=True, slots=True)
class StreamHeader:
    session_id: bytes
    device_type: str
    model_version: int


@dataclass(frozen=True, slots=True)
class LazyPiece:
    """``size`` bytes of a stream that :attr:`produce` makes when the reader reaches them
    (the pieces it returns add up to exactly ``size`` bytes)."""

    size: int
    produce: Callable[[], Sequence[Buffer]]


def _combine(crc1: int, crc2: int, len2: int) -> int:
    return stream_primitives.current().crc32c_combine(crc1, crc2, len2)


def _crc(data: Buffer, crc: int = 0) -> int:
    # The C fast path when the runtime installed it, else the pure-Python reference:
    # the two produce the same value for every input (tests check both).
    return stream_primitives.current().crc32c(data, crc)


class StreamWriter:
    """Builds a stream piece by piece (PRE_COPY sends sections as they appear)."""

    def __init__(self, device_type: str, model_version: int, session_id: bytes) -> None:
        encoded = device_type.encode("ascii")
        if not 0 < len(encoded) <= 24 or b"\0" in encoded or len(session_id) != 16:
            raise ValueError("device type must be 1-24 ASCII bytes, session id 16 bytes")
        self._type = encoded
        self._version = model_version
        self._session = session_id
        self._count = 0
        self._crc = 0
        self._produced = 0  # sections (and then the trailer) produced so far
        self.ended = False

    def header(self) -> bytes:
        fixed = HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            CHECKSUM_CRC32C,
            HEADER.size,
            self._session,
            self._type,
            self._version,
            0,
        )[:-4]
        head = fixed + struct.pack("<I", _crc(fixed))
        self._crc = _crc(head, self._crc)
        return head

    def section_pieces(self, name: str, payload: Payload) -> list[Buffer]:
        """A section as pieces: its header and name, then the payload itself, not copied
        (large device memory goes out as views of the device's own buffer)."""
        return list(self.deferred_section(name, payload).produce())

    def deferred_section(self, name: str, payload: Payload) -> LazyPiece:
        """A section whose size is known now and whose bytes are checksummed only when
        :meth:`LazyPiece.produce` is called, so a large state streams out while it is being
        checksummed. Deferred pieces (sections and trailer) must be produced in the order
        they were made."""
        raw_name = name.encode("ascii")
        if not _NAME.fullmatch(raw_name) or len(raw_name) > MAX_NAME:
            raise ValueError(f"bad section name {name!r}")
        parts = payload_parts(payload)
        length = sum(len(part) for part in parts)
        index = self._count
        self._count += 1

        def produce() -> list[Buffer]:
            self._check_order(index)
            # Each payload byte is read once: both checksums follow from the payload's own.
            body = 0
            for part in parts:
                body = _crc(part, body)
            crc = _combine(_crc(raw_name), body, length)
            head = SECTION.pack(SECTION_TAG, index, len(raw_name), 0, length, crc) + raw_name
            self._crc = _combine(_crc(head, self._crc), body, length)
            return [head, *parts]

        return LazyPiece(SECTION.size + len(raw_name) + length, produce)

    def _check_order(self, index: int) -> None:
        if index != self._produced:
            raise RuntimeError(f"stream piece {index} produced before piece {self._produced}")
        self._produced += 1

    def section(self, name: str, payload: Payload) -> bytes:
        return b"".join(self.section_pieces(name, payload))

    def sections(self, sections: Iterable[Section]) -> bytes:
        return b"".join(self.section(name, payload) for name, payload in sections)

    def trailer(self) -> bytes:
        return bytes(self.deferred_trailer().produce()[0])

    def deferred_trailer(self) -> LazyPiece:
        """The trailer, produced after every section before it (it holds their checksum)."""
        self.ended = True
        count = self._count

        def produce() -> list[Buffer]:
            self._check_order(count)
            return [TRAILER.pack(TRAILER_TAG, count, self._crc, 0)]

        return LazyPiece(TRAILER.size, produce)


def payload_parts(payload: Payload) -> list[Buffer]:
    """The non-empty buffers of a payload, in order."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return [payload] if len(payload) else []
    return [part for part in payload if len(part)]


def encode(
    device_type: str, model_version: int, session_id: bytes, sections: Iterable[Section]
) -> bytes:
    writer = StreamWriter(device_type, model_version, session_id)
    return writer.header() + writer.sections(sections) + writer.trailer()


def parse_header(data: Buffer) -> StreamHeader:
    if len(data) < HEADER.size:
        raise StreamError(f"{len(data)} bytes is shorter than the header")
    magic, fmt, checksum, size, session, dtype, version, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StreamError("bad magic (not a vfio-user-emu state stream)")
    if fmt != FORMAT_VERSION:
        raise StreamError(f"format version {fmt} unsupported (we read {FORMAT_VERSION})")
    if checksum != CHECKSUM_CRC32C or size != HEADER.size:
        raise StreamError(f"checksum algorithm {checksum} / header size {size} unsupported")
    if _crc(memoryview(data)[: HEADER.size - 4]) != crc:
        raise StreamError("header checksum mismatch")
    name = dtype.rstrip(b"\0")
    if not name or b"\0" in name or not name.isascii():
        raise StreamError("bad device type field")
    return StreamHeader(session, name.decode("ascii"), version)


def decode(
    data: Buffer,
    *,
    device_type: str,
    max_model_version: int,
    limits: StreamLimits | None = None,
    checksums: Mapping[tuple[int, int], int] | None = None,
) -> tuple[StreamHeader, list[LoadedSection]]:
    """Validate a whole stream and return its sections in order.

    ``checksums`` may hold CRC-32C values of byte ranges ``(start, end)`` of ``data``
    computed while it arrived (:class:`ChecksumScanner`); a range found there is not read
    again. Every check is made all the same, against those values."""
    limits = limits or StreamLimits()
    known = checksums or {}
    view = memoryview(data).cast("B")
    if len(view) > limits.max_stream:
        raise StreamError(f"{len(view)} bytes exceeds the {limits.max_stream}-byte limit")
    header = parse_header(view)
    if header.device_type != device_type:
        raise StreamError(f"stream is for device {header.device_type!r}, not {device_type!r}")
    if not 1 <= header.model_version <= max_model_version:
        raise StreamError(
            f"device model version {header.model_version} unsupported (max {max_model_version})"
        )
    sections: list[LoadedSection] = []
    pos = HEADER.size
    while True:
        if len(view) - pos < 4:
            raise StreamError("truncated: no trailer")
        tag = bytes(view[pos : pos + 4])
        if tag == TRAILER_TAG:
            break
        if tag != SECTION_TAG:
            raise StreamError(f"unknown record tag {tag!r} at offset {pos}")
        pos = _section(view, pos, len(sections), limits, sections, known=known)
    if len(view) - pos != TRAILER.size:
        raise StreamError("truncated trailer or bytes after it")
    _tag, count, crc, reserved = TRAILER.unpack_from(view, pos)
    if reserved:
        # Not covered by the stream CRC (which ends before the trailer): must be exact.
        raise StreamError(f"trailer reserved word is {reserved:#x}, not 0")
    if count != len(sections):
        raise StreamError(f"trailer counts {count} sections, stream has {len(sections)}")
    if _range_crc(view, 0, pos, known) != crc:
        raise StreamError("stream checksum mismatch")
    return header, sections


def _range_crc(view: memoryview, start: int, end: int, known: Mapping[tuple[int, int], int]) -> int:
    crc = known.get((start, end))
    return _crc(view[start:end]) if crc is None else crc


def _section(
    view: memoryview,
    pos: int,
    index: int,
    limits: StreamLimits,
    out: list[LoadedSection],
    *,
    known: Mapping[tuple[int, int], int],
) -> int:
    if len(view) - pos < SECTION.size:
        raise StreamError("truncated section header")
    _tag, got_index, name_len, flags, length, crc = SECTION.unpack_from(view, pos)
    if got_index != index:
        raise StreamError(f"section {got_index} where {index} was expected (reordered?)")
    if index >= limits.max_sections:
        raise StreamError(f"more than {limits.max_sections} sections")
    if flags or not 0 < name_len <= MAX_NAME:
        raise StreamError(f"section {index}: bad flags {flags:#x} or name length {name_len}")
    if length > limits.max_section:
        raise StreamError(f"section {index}: {length} bytes exceeds the section limit")
    start = pos + SECTION.size
    end = start + name_len + length
    if end > len(view):
        raise StreamError(f"section {index}: truncated ({length} payload bytes announced)")
    raw_name = bytes(view[start : start + name_len])
    payload = view[start + name_len : end]
    if not _NAME.fullmatch(raw_name):
        raise StreamError(f"section {index}: bad name {raw_name!r}")
    if _range_crc(view, start, end, known) != crc:
        raise StreamError(f"section {index} ({raw_name.decode()}): checksum mismatch")
    out.append((raw_name.decode("ascii"), payload))
    return int(end)


class ChecksumScanner:
    """Follows a stream while it arrives and checksums its large sections on the way, so
    that :func:`decode` need not read them again (``decode(..., checksums=scanner.checksums)``).

    It validates nothing and trusts nothing: it only records the CRC of byte ranges that
    ``decode`` will ask about if the stream is what it claims to be. Once the bytes stop
    looking like a stream it stops (``decode`` computes whatever is missing and rejects
    what is wrong). Memory stays bounded: at most ``MAX_RANGES`` ranges, only for sections
    of at least ``MIN_SECTION`` bytes.
    """

    MIN_SECTION = 4096
    MAX_RANGES = 1 << 16

    def __init__(self) -> None:
        self.checksums: dict[tuple[int, int], int] = {}
        self._pos = 0  # stream bytes fed so far
        self._record = bytearray()  # the header or record header being assembled
        self._need = HEADER.size  # bytes ``_record`` must reach (0: in a payload)
        self._stream_crc = 0  # of every byte before the current payload
        self._payload_start = 0  # of the current section's name + payload
        self._payload_left = 0
        self._payload_crc = 0
        self.stopped = False

    def feed(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        while view and not self.stopped:
            view = self._feed_payload(view) if self._payload_left else self._feed_record(view)

    def _feed_payload(self, view: memoryview) -> memoryview:
        take = min(self._payload_left, len(view))
        self._payload_crc = _crc(view[:take], self._payload_crc)
        self._payload_left -= take
        self._pos += take
        if not self._payload_left:
            length = self._pos - self._payload_start
            if length >= self.MIN_SECTION:
                self.checksums[(self._payload_start, self._pos)] = self._payload_crc
            self._stream_crc = _combine(self._stream_crc, self._payload_crc, length)
            self.stopped = len(self.checksums) >= self.MAX_RANGES
        return view[take:]

    def _feed_record(self, view: memoryview) -> memoryview:
        take = min(self._need - len(self._record), len(view))
        self._record += view[:take]
        self._pos += take
        in_section_header = self._need == SECTION.size
        if in_section_header and len(self._record) >= 4 and self._record[:4] != SECTION_TAG:
            if self._record[:4] == TRAILER_TAG:  # the stream checksum covers all before it
                self.checksums[(0, self._pos - len(self._record))] = self._stream_crc
            self.stopped = True  # a trailer (nothing more to checksum) or not a stream
        elif len(self._record) == self._need:
            self._stream_crc = _crc(self._record, self._stream_crc)
            if in_section_header:
                _tag, _index, name_len, _flags, length, _crc_value = SECTION.unpack(self._record)
                self._payload_start = self._pos
                self._payload_left = name_len + length
                self._payload_crc = 0
            self._record.clear()
            self._need = SECTION.size
        return view[take:]
