"""Streaming the migration stream: CRC-32C combination, sections checksummed only when the
reader reaches them (:class:`SavingSession`), and resumed streams checksummed while they
arrive (:class:`ChecksumScanner`, ``decode(..., checksums=...)``).

The invariants: the bytes are exactly those of :func:`encode`, and what the scanner records
can never make :func:`decode` accept or reject anything it would not have without it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices import stream_primitives as sp
from devices.errors import DeviceError
from devices.migration import EnvelopeCodec, MemoryStaging, ResumingSession, SavingSession
from devices.state_stream import (
    HEADER,
    SECTION,
    ChecksumScanner,
    LazyPiece,
    StreamLimits,
    StreamWriter,
    decode,
    encode,
)

DTYPE = "testdev"
SESSION = bytes(range(16))
Sec = tuple[str, bytes]


@pytest.fixture(autouse=True)
def _restore_impl() -> Iterator[None]:
    previous = sp.current()
    yield
    sp.install(previous)


names = st.from_regex(r"[a-z][a-z0-9_.\-]{0,20}", fullmatch=True)


def noise(size: int) -> bytes:
    return random.Random(size).randbytes(size)


payloads = st.one_of(
    st.binary(max_size=300),
    st.integers(4096, 20_000).map(noise),  # large enough to be scanned
)
sections_st = st.lists(st.tuples(names, payloads), max_size=6)


def chunked(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    at = 0
    for cut in sorted(set(cuts)):
        yield data[at:cut]
        at = cut
    yield data[at:]


def outcome(data: bytes, checksums: dict[tuple[int, int], int] | None) -> object:
    try:
        _, sections = decode(data, device_type=DTYPE, max_model_version=1, checksums=checksums)
    except DeviceError as exc:
        return ("error", exc.errno, str(exc))
    return [(name, bytes(payload)) for name, payload in sections]


def scanned(data: bytes, cuts: list[int]) -> ChecksumScanner:
    scanner = ChecksumScanner()
    for piece in chunked(data, cuts):
        scanner.feed(piece)
    return scanner


# --------------------------------------------------------------------------- CRC combination


@given(a=st.binary(max_size=3000), b=st.binary(max_size=3000))
def test_combine_is_the_crc_of_the_concatenation(a: bytes, b: bytes) -> None:
    combined = sp.crc32c_combine(sp.crc32c(a), sp.crc32c(b), len(b))
    assert combined == sp.crc32c(a + b)


def test_combine_of_long_zero_runs_and_empty_parts() -> None:
    head = b"vfio-user-emu"
    zeros = bytes(1 << 20)
    assert sp.crc32c_combine(sp.crc32c(head), sp.crc32c(zeros), len(zeros)) == sp.crc32c(
        head + zeros
    )
    assert sp.crc32c_combine(sp.crc32c(head), 0, 0) == sp.crc32c(head)
    assert sp.crc32c_combine(0, sp.crc32c(head), len(head)) == sp.crc32c(head)


@pytest.mark.parametrize(("crc1", "crc2", "length"), [(-1, 0, 0), (0, 1 << 32, 0), (0, 0, -1)])
def test_combine_rejects_out_of_range_arguments(crc1: int, crc2: int, length: int) -> None:
    with pytest.raises(ValueError):
        sp.crc32c_combine(crc1, crc2, length)


# --------------------------------------------------------------------------- deferred writing


@given(sections=sections_st)
@settings(max_examples=60)
def test_deferred_pieces_make_the_encoded_stream(sections: list[Sec]) -> None:
    writer = StreamWriter(DTYPE, 1, SESSION)
    pieces: list[LazyPiece] = [writer.deferred_section(n, p) for n, p in sections]
    pieces.append(writer.deferred_trailer())
    out = writer.header()
    for piece in pieces:
        produced = b"".join(bytes(part) for part in piece.produce())
        assert len(produced) == piece.size
        out += produced
    assert out == encode(DTYPE, 1, SESSION, sections)


def test_deferred_pieces_must_be_produced_in_order() -> None:
    writer = StreamWriter(DTYPE, 1, SESSION)
    writer.header()
    first = writer.deferred_section("a", b"1")
    second = writer.deferred_section("b", b"2")
    with pytest.raises(RuntimeError, match="before"):
        second.produce()
    first.produce()
    second.produce()


def test_deferred_section_checks_the_name_at_once() -> None:
    writer = StreamWriter(DTYPE, 1, SESSION)
    with pytest.raises(ValueError, match="bad section name"):
        writer.deferred_section("Bad", b"")


def codec() -> EnvelopeCodec:
    return EnvelopeCodec(DTYPE, 1, StreamLimits())


@given(sections=sections_st, sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=8))
@settings(max_examples=60)
def test_saving_session_streams_exactly_the_encoded_bytes(
    sections: list[Sec], sizes: list[int]
) -> None:
    session = SavingSession(codec())
    session.finish(sections)
    expected = encode(DTYPE, 1, session.session_id, sections)
    # The size is known before anything is checksummed (the legacy region reports it).
    assert session.produced == session.pending == len(expected)
    out = b""
    turn = 0
    while session.pending:
        size = sizes[turn % len(sizes)]
        got = bytes(session.take(size) if turn % 2 else session.read(size))
        assert 0 < len(got) <= size
        out += got
        turn += 1
        assert session.pending == len(expected) - len(out)
    assert out == expected
    assert not session.take(10) and session.read(10) == b""


def test_saving_session_checksums_a_section_only_when_reached() -> None:
    payload = bytearray(b"a" * 8192)
    session = SavingSession(codec())
    session.finish([("ram", memoryview(payload))])
    session.read(HEADER.size)  # the header only: the section is not made yet
    payload[:] = b"b" * 8192  # the device's memory as it is when the reader gets there
    stream = session.read(session.pending)
    assert stream == encode(DTYPE, 1, SESSION, [("ram", bytes(payload))])[HEADER.size :]


# --------------------------------------------------------------------------- the scanner


@given(
    sections=sections_st,
    cuts=st.lists(st.integers(0, 60_000), max_size=12),
)
@settings(max_examples=80)
def test_scanner_records_true_checksums_and_spares_the_second_pass(
    sections: list[Sec], cuts: list[int]
) -> None:
    stream = encode(DTYPE, 1, SESSION, sections)
    scanner = scanned(stream, cuts)
    for (start, end), value in scanner.checksums.items():
        assert sp.crc32c(stream[start:end]) == value
    trailer_at = len(stream) - 16
    assert scanner.checksums[(0, trailer_at)] == sp.crc32c(stream[:trailer_at])
    large = [p for _, p in sections if len(p) >= ChecksumScanner.MIN_SECTION]
    assert len(scanner.checksums) == 1 + len(large)
    assert outcome(stream, scanner.checksums) == sections


@st.composite
def damaged_streams(draw: st.DrawFn) -> bytes:
    stream = bytearray(encode(DTYPE, 1, SESSION, draw(sections_st)))
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "splice", "noise"]))
    if kind == "flip":
        at = draw(st.integers(0, len(stream) - 1))
        stream[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del stream[draw(st.integers(0, len(stream) - 1)) :]
    elif kind == "extend":
        stream += draw(st.binary(min_size=1, max_size=40))
    elif kind == "splice":
        at = draw(st.integers(0, len(stream)))
        stream[at:at] = draw(st.binary(min_size=1, max_size=40))
    else:
        return draw(st.binary(max_size=400))
    return bytes(stream)


@given(data=damaged_streams(), cuts=st.lists(st.integers(0, 60_000), max_size=8))
@settings(max_examples=150)
def test_scanner_never_changes_what_decode_decides(data: bytes, cuts: list[int]) -> None:
    scanner = scanned(data, cuts)
    for (start, end), value in scanner.checksums.items():
        assert sp.crc32c(data[start:end]) == value
    assert outcome(data, scanner.checksums) == outcome(data, None)


def test_scanner_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ChecksumScanner, "MAX_RANGES", 3)
    sections = [(f"s{i}", os.urandom(5000)) for i in range(6)]
    stream = encode(DTYPE, 1, SESSION, sections)
    scanner = scanned(stream, [])
    assert len(scanner.checksums) == 3 and scanner.stopped
    assert outcome(stream, scanner.checksums) == sections  # decode computes the rest


def test_scanner_stops_on_a_record_that_is_not_a_section() -> None:
    stream = bytearray(encode(DTYPE, 1, SESSION, [("a", os.urandom(5000))]))
    stream[HEADER.size : HEADER.size + 4] = b"JUNK"
    scanner = scanned(bytes(stream), [])
    assert scanner.stopped and not scanner.checksums
    assert SECTION.size == 24


def test_resuming_session_scans_what_is_written() -> None:
    sections = [("geometry", b"g"), ("ram", os.urandom(10_000))]
    stream = encode(DTYPE, 1, SESSION, sections)
    session = ResumingSession(1 << 20, MemoryStaging())
    for at in range(0, len(stream), 777):
        session.write(stream[at : at + 777])
    assert len(session.checksums) == 2
    data = session.staging.view()
    assert outcome(bytes(data), dict(session.checksums)) == sections
