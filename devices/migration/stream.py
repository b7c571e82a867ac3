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

import enum
import errno
import re
import struct
from collections.abc import Callable, Iterable, Sequence, Set
from dataclasses import dataclass
from typing import NoReturn, Protocol

from devices.errors import DeviceError
from devices.migration import primitives as stream_primitives

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


def sections_by_name(
    sections: Sequence[LoadedSection], expected: Set[str]
) -> dict[str, memoryview]:
    """A device's loaded sections by name, as byte views; ValueError (for the device's
    ``load_state`` to turn into its refusal) when a name repeats or the names are not
    exactly ``expected``."""
    by_name: dict[str, memoryview] = {}
    for name, payload in sections:
        if name in by_name:
            raise ValueError(f"section {name!r} repeated")
        by_name[name] = memoryview(payload).cast("B")
    if set(by_name) != expected:
        missing = sorted(expected - set(by_name))
        unknown = sorted(set(by_name) - expected)
        raise ValueError(f"sections missing {missing}, unknown {unknown}")
    return by_name


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
) -> tuple[StreamHeader, list[LoadedSection]]:
    """Validate a whole stream and return its sections in order (:class:`StreamDecoder`
    makes the same checks on a stream while it arrives)."""
    limits = limits or StreamLimits()
    view = memoryview(data).cast("B")
    if len(view) > limits.max_stream:
        raise StreamError(f"{len(view)} bytes exceeds the {limits.max_stream}-byte limit")
    header = parse_header(view)
    _check_device(header, device_type, max_model_version)
    sections: list[LoadedSection] = []
    pos = HEADER.size
    stream_crc = _crc(view[:pos])  # built from the sections' own: each byte is read once
    while True:
        if len(view) - pos < 4:
            raise StreamError("truncated: no trailer")
        tag = bytes(view[pos : pos + 4])
        if tag == TRAILER_TAG:
            break
        if tag != SECTION_TAG:
            raise StreamError(f"unknown record tag {tag!r} at offset {pos}")
        start = pos
        pos, section_crc = _section(view, pos, len(sections), limits, sections)
        stream_crc = _crc(view[start : start + SECTION.size], stream_crc)
        stream_crc = _combine(stream_crc, section_crc, pos - start - SECTION.size)
    if len(view) - pos != TRAILER.size:
        raise StreamError("truncated trailer or bytes after it")
    _check_trailer(view[pos:], len(sections), stream_crc)
    return header, sections


def _check_device(header: StreamHeader, device_type: str, max_model_version: int) -> None:
    if header.device_type != device_type:
        raise StreamError(f"stream is for device {header.device_type!r}, not {device_type!r}")
    if not 1 <= header.model_version <= max_model_version:
        raise StreamError(
            f"device model version {header.model_version} unsupported (max {max_model_version})"
        )


def _check_trailer(trailer: Buffer, sections: int, stream_crc: int) -> None:
    _tag, count, crc, reserved = TRAILER.unpack_from(trailer)
    if reserved:
        # Not covered by the stream CRC (which ends before the trailer): must be exact.
        raise StreamError(f"trailer reserved word is {reserved:#x}, not 0")
    if count != sections:
        raise StreamError(f"trailer counts {count} sections, stream has {sections}")
    if stream_crc != crc:
        raise StreamError("stream checksum mismatch")


def _section(
    view: memoryview,
    pos: int,
    index: int,
    limits: StreamLimits,
    out: list[LoadedSection],
) -> tuple[int, int]:
    """One section at ``pos``, checked and appended to ``out``: (its end, its CRC)."""
    if len(view) - pos < SECTION.size:
        raise StreamError("truncated section header")
    record = _section_record(view[pos : pos + SECTION.size], index, limits)
    start = pos + SECTION.size
    end = start + record.name_len + record.length
    if end > len(view):
        raise StreamError(f"section {index}: truncated ({record.length} payload bytes announced)")
    name = _section_name(view[start : start + record.name_len], index)
    payload = view[start + record.name_len : end]
    if _crc(view[start:end]) != record.crc:
        raise StreamError(f"section {index} ({name}): checksum mismatch")
    out.append((name, payload))
    return int(end), record.crc


@dataclass(frozen=True, slots=True)
class _SectionRecord:
    name_len: int
    length: int
    crc: int


def _section_record(head: Buffer, index: int, limits: StreamLimits) -> _SectionRecord:
    """A section header's fields, each checked (index ``index`` expected)."""
    _tag, got_index, name_len, flags, length, crc = SECTION.unpack_from(head)
    if got_index != index:
        raise StreamError(f"section {got_index} where {index} was expected (reordered?)")
    if index >= limits.max_sections:
        raise StreamError(f"more than {limits.max_sections} sections")
    if flags or not 0 < name_len <= MAX_NAME:
        raise StreamError(f"section {index}: bad flags {flags:#x} or name length {name_len}")
    if length > limits.max_section:
        raise StreamError(f"section {index}: {length} bytes exceeds the section limit")
    return _SectionRecord(name_len, length, crc)


def _section_name(raw: Buffer, index: int) -> str:
    raw_name = bytes(raw)
    if not _NAME.fullmatch(raw_name):
        raise StreamError(f"section {index}: bad name {raw_name!r}")
    return raw_name.decode("ascii")


# --------------------------------------------------------------------------- arriving streams


class SectionSink(Protocol):
    """Takes one section's payload while it arrives, so that large state (device RAM) is
    applied in place instead of being staged. What it writes must be revertible: the
    engine calls :meth:`undo` if the stream or the device's load fails afterwards, or
    :meth:`commit` once the whole state is loaded."""

    def write(self, data: memoryview) -> None:
        """The next payload bytes, in order; raises DeviceError (EINVAL) on bad content."""
        ...

    def target(self, limit: int) -> memoryview | None:
        """Where the next payload bytes (at most ``limit``) go, for the runtime to read them
        straight into (then :meth:`landed`), or None: pass them to :meth:`write`."""
        ...

    def landed(self, count: int) -> None:
        """``count`` payload bytes were read into the last :meth:`target`."""
        ...

    def finish(self) -> None:
        """Every payload byte was written and its checksum matched."""
        ...

    def undo(self) -> None: ...

    def commit(self) -> None: ...


#: ``(name, payload length) -> sink`` for a section to apply while it arrives, or None to
#: keep it for the device's load.
SinkFactory = Callable[[str, int], SectionSink | None]


class PayloadStore(Protocol):
    """Where the payloads of kept sections wait (the engine's staging)."""

    def append(self, data: Buffer) -> None: ...

    def view(self) -> memoryview: ...


#: Bytes read at a time outside payloads (records and a sink's header are far smaller).
SMALL_READ = 4096


class _Phase(enum.Enum):
    HEADER = "header"
    TAG = "tag"  # the first 4 bytes of a record: section or trailer
    SECTION = "section header"
    NAME = "name"
    PAYLOAD = "payload"
    TRAILER = "trailer"
    DONE = "done"


@dataclass(slots=True)
class _Arriving:
    """The section whose name or payload is arriving."""

    index: int
    record: _SectionRecord
    name: str = ""
    crc: int = 0  # of the name and the payload bytes so far
    left: int = 0  # payload bytes still to come
    sink: SectionSink | None = None
    kept_at: int = 0  # where the payload starts in the store


class StreamDecoder:
    """Validates a stream while it arrives: the checks of :func:`decode`, each made as soon
    as its bytes are in, so a defect is found early and a large stream is never held.

    Section payloads go to the sink ``sink_for`` returns for them (applied in place, see
    :class:`SectionSink`) or are kept in ``store``; :meth:`sections` returns the kept ones
    once the trailer checked out. Sinks see payload bytes before their section's checksum is
    checked: whatever they wrote is undone unless :meth:`commit` is reached. The first defect
    raises :class:`StreamError` (EINVAL) and every later call raises it again.
    """

    def __init__(
        self,
        *,
        device_type: str,
        max_model_version: int,
        sink_for: SinkFactory,
        store: PayloadStore,
        limits: StreamLimits | None = None,
    ) -> None:
        self.device_type = device_type
        self.max_model_version = max_model_version
        self.limits = limits or StreamLimits()
        self._sink_for = sink_for
        self._store = store
        self._stored = 0
        self._phase = _Phase.HEADER
        self._record = bytearray()
        self._tag_bytes = b""  # of the record whose fixed part is arriving
        self._need = HEADER.size
        self._received = 0
        self._parsed = 0  # bytes parsed (``_received`` also counts those still being fed)
        self._stream_crc = 0  # of every byte before the current name/payload
        self._index = 0
        self._section: _Arriving | None = None
        self._kept: list[tuple[str, int, int]] = []  # name, store offset, length
        self._sinks: list[SectionSink] = []
        self._target = memoryview(b"")  # the last place offered for a read in place
        self.error: StreamError | None = None

    @property
    def received(self) -> int:
        return self._received

    def feed(self, data: Buffer) -> None:
        if self.error is not None:
            raise self.error
        view = memoryview(data).cast("B")
        try:
            self._count_received(len(view))
            while view:
                view = self._step(view)
        except DeviceError as exc:
            self._fail(exc)

    def _count_received(self, count: int) -> None:
        self._received += count
        if self._received > self.limits.max_stream:
            raise StreamError(f"more than the {self.limits.max_stream}-byte limit")

    def _fail(self, exc: DeviceError) -> NoReturn:
        self.error = exc if isinstance(exc, StreamError) else StreamError(str(exc))
        raise self.error from None

    def target(self, limit: int) -> memoryview | None:
        """Where the next stream bytes belong when a sink can take them in place (see
        :meth:`SectionSink.target`): the caller reads at most ``limit`` bytes into it and
        reports them with :meth:`landed`. None: pass bytes to :meth:`feed`."""
        section = self._section
        if self.error is not None or self._phase is not _Phase.PAYLOAD or section is None:
            return None
        if section.sink is None:
            return None
        target = section.sink.target(min(limit, section.left))
        if target is not None:
            self._target = target
        return target

    def wanted(self, limit: int) -> int:
        """How many bytes (at most ``limit``) to read for :meth:`feed` when :meth:`target`
        offers no place: few while records and a sink's own header arrive, so that the
        payload after them is read in place; a kept payload whole."""
        section = self._section
        if self._phase is _Phase.PAYLOAD and section is not None and section.sink is None:
            return min(limit, section.left)
        return min(limit, SMALL_READ)

    def landed(self, count: int) -> None:
        """``count`` bytes were read into the last :meth:`target` (checked like fed ones)."""
        if self.error is not None:
            raise self.error
        section, landed = self._section, self._target[:count]
        assert section is not None and section.sink is not None and len(landed) == count
        try:
            self._count_received(count)
            section.crc = _crc(landed, section.crc)
            section.left -= count
            self._parsed += count
            section.sink.landed(count)
            if not section.left:
                self._section_done(section)
        except DeviceError as exc:
            self._fail(exc)

    def sections(self) -> list[LoadedSection]:
        """The kept sections, once the whole stream arrived and checked out."""
        if self.error is not None:
            raise self.error
        if self._phase is not _Phase.DONE:
            self.error = StreamError(f"truncated: the stream ends in its {self._phase.value}")
            raise self.error
        stored = self._store.view() if self._kept else memoryview(b"")
        return [(name, stored[at : at + length]) for name, at, length in self._kept]

    def undo(self) -> None:
        """Revert what sinks applied (newest first: a later section may overwrite an earlier)."""
        sinks, self._sinks = self._sinks, []
        for sink in reversed(sinks):
            sink.undo()

    def commit(self) -> None:
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.commit()

    # -- parsing ---------------------------------------------------------------------------
    def _step(self, view: memoryview) -> memoryview:
        if self._phase is _Phase.PAYLOAD:
            return self._payload(view)
        if self._phase is _Phase.DONE:
            raise StreamError("bytes after the trailer")
        take = min(self._need - len(self._record), len(view))
        self._record += view[:take]
        self._parsed += take
        if len(self._record) == self._need:
            record = bytes(self._record)
            self._record.clear()
            self._complete(record)
        return view[take:]

    def _complete(self, record: bytes) -> None:
        """A fixed-size piece (header, tag, section header, name, trailer) is in."""
        if self._phase is _Phase.HEADER:
            _check_device(parse_header(record), self.device_type, self.max_model_version)
            self._stream_crc = _crc(record)
            self._expect(_Phase.TAG, 4)
        elif self._phase is _Phase.TAG:
            self._tag(record)
        elif self._phase is _Phase.SECTION:
            head = self._tag_bytes + record
            arriving = _Arriving(self._index, _section_record(head, self._index, self.limits))
            self._section = arriving
            self._stream_crc = _crc(head, self._stream_crc)
            self._expect(_Phase.NAME, arriving.record.name_len)
        elif self._phase is _Phase.NAME:
            self._named(record)
        elif self._phase is _Phase.TRAILER:
            _check_trailer(self._tag_bytes + record, self._index, self._stream_crc)
            self._expect(_Phase.DONE, 0)

    def _expect(self, phase: _Phase, size: int) -> None:
        self._phase, self._need = phase, size

    def _tag(self, tag: bytes) -> None:
        self._tag_bytes = tag
        if tag == SECTION_TAG:
            self._expect(_Phase.SECTION, SECTION.size - 4)
        elif tag == TRAILER_TAG:
            self._expect(_Phase.TRAILER, TRAILER.size - 4)
        else:
            raise StreamError(f"unknown record tag {tag!r} at offset {self._parsed - 4}")

    def _named(self, raw: bytes) -> None:
        section = self._section
        assert section is not None
        section.name = _section_name(raw, section.index)
        section.crc = _crc(raw)
        section.left = section.record.length
        section.sink = self._sink_for(section.name, section.record.length)
        if section.sink is not None:
            self._sinks.append(section.sink)
        else:
            section.kept_at = self._stored
        self._phase = _Phase.PAYLOAD
        if not section.left:
            self._section_done(section)

    def _payload(self, view: memoryview) -> memoryview:
        section = self._section
        assert section is not None
        piece = view[: section.left]
        section.crc = _crc(piece, section.crc)
        section.left -= len(piece)
        self._parsed += len(piece)
        if section.sink is not None:
            section.sink.write(piece)
        else:
            self._store.append(piece)
            self._stored += len(piece)
        if not section.left:
            self._section_done(section)
        return view[len(piece) :]

    def _section_done(self, section: _Arriving) -> None:
        if section.crc != section.record.crc:
            raise StreamError(f"section {section.index} ({section.name}): checksum mismatch")
        covered = section.record.name_len + section.record.length
        self._stream_crc = _combine(self._stream_crc, section.crc, covered)
        if section.sink is not None:
            section.sink.finish()
        else:
            self._kept.append((section.name, section.kept_at, section.record.length))
        self._section = None
        self._index += 1
        self._expect(_Phase.TAG, 4)
