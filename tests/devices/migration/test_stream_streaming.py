"""Streaming the migration stream: CRC-32C combination, sections checksummed only when the
reader reaches them (:class:`SavingSession`), and resumed streams decoded while they arrive
(:class:`StreamDecoder`, with sinks that apply sections in place).

The invariants: the bytes are exactly those of :func:`encode`, and however a stream is cut
into pieces, the decoder accepts exactly what :func:`decode` accepts, with the same sections,
and what its sinks applied is taken back whenever it rejects.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.errors import DeviceError
from devices.migration import primitives as sp
from devices.migration.engine import EnvelopeCodec, MemoryStaging, ResumingSession, SavingSession
from devices.migration.stream import (
    HEADER,
    LazyPiece,
    StreamDecoder,
    StreamError,
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


def outcome(data: bytes) -> object:
    try:
        _, sections = decode(data, device_type=DTYPE, max_model_version=1)
    except DeviceError as exc:
        return ("error", exc.errno)
    return [(name, bytes(payload)) for name, payload in sections]


class RecordingSink:
    """Collects a payload; ``undo`` / ``commit`` record what the decoder asked for."""

    def __init__(self, name: str, length: int, log: list[str]) -> None:
        self.name, self.length, self.log = name, length, log
        self.data = bytearray(length)
        self.filled = 0

    def write(self, data: memoryview) -> None:
        self.data[self.filled : self.filled + len(data)] = data
        self.filled += len(data)

    def target(self, limit: int) -> memoryview | None:
        return memoryview(self.data)[self.filled : self.filled + limit]

    def landed(self, count: int) -> None:
        self.filled += count

    def finish(self) -> None:
        assert self.filled == self.length
        self.log.append(f"finish {self.name}")

    def undo(self) -> None:
        self.log.append(f"undo {self.name}")

    def commit(self) -> None:
        self.log.append(f"commit {self.name}")


class Received:
    """A stream fed to a :class:`StreamDecoder` piece by piece; sections whose name starts
    with "big" go to sinks."""

    def __init__(self, data: bytes, cuts: list[int], limits: StreamLimits | None = None) -> None:
        self.log: list[str] = []
        self.order: list[str] = []  # every section's name, as the decoder reached it
        self.sinks: list[RecordingSink] = []
        self.store = MemoryStaging()
        self.decoder = StreamDecoder(
            device_type=DTYPE,
            max_model_version=1,
            sink_for=self._sink_for,
            store=self.store,
            limits=limits,
        )
        for piece in chunked(data, cuts):
            try:
                self._give(memoryview(piece))
            except StreamError:
                break

    def _give(self, piece: memoryview) -> None:
        """As the runtime does: into a sink's memory where one offers it, else fed."""
        while piece:
            target = self.decoder.target(len(piece))
            if target is None:
                self.decoder.feed(piece)
                return
            target[:] = piece[: len(target)]
            self.decoder.landed(len(target))
            piece = piece[len(target) :]

    def _sink_for(self, name: str, length: int) -> RecordingSink | None:
        self.order.append(name)
        if not name.startswith("big"):
            return None
        sink = RecordingSink(name, length, self.log)
        self.sinks.append(sink)
        return sink

    def outcome(self) -> object:
        """In :func:`outcome`'s form: every section in stream order, sunk ones included."""
        try:
            kept = iter(self.decoder.sections())
        except DeviceError as exc:
            return ("error", exc.errno)
        sunk = iter(self.sinks)
        out: list[tuple[str, bytes]] = []
        for name in self.order:
            if name.startswith("big"):
                sink = next(sunk)
                out.append((sink.name, bytes(sink.data)))
            else:
                kept_name, payload = next(kept)
                out.append((kept_name, bytes(payload)))
        return out


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


big_sections_st = st.lists(
    st.tuples(st.sampled_from(["big.ram", "bigger", "small", "regs"]), payloads), max_size=6
)


@given(
    sections=big_sections_st,
    cuts=st.lists(st.integers(0, 60_000), max_size=12),
)
@settings(max_examples=80)
def test_decoder_takes_a_stream_cut_anywhere(sections: list[Sec], cuts: list[int]) -> None:
    stream = encode(DTYPE, 1, SESSION, sections)
    received = Received(stream, cuts)
    assert received.outcome() == sections == outcome(stream)
    assert received.decoder.received == len(stream)
    received.decoder.commit()
    assert received.log == [f"finish {n}" for n, _ in sections if n.startswith("big")] + [
        f"commit {n}" for n, _ in sections if n.startswith("big")
    ]


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
@settings(max_examples=200)
def test_decoder_decides_as_decode_does(data: bytes, cuts: list[int]) -> None:
    received = Received(data, cuts)
    assert received.outcome() == outcome(data)


def test_decoder_reports_the_first_defect_again_and_stops() -> None:
    stream = bytearray(encode(DTYPE, 1, SESSION, [("big.ram", noise(5000)), ("tail", b"t")]))
    stream[HEADER.size + 40] ^= 1  # inside the big section's payload
    received = Received(bytes(stream), [HEADER.size + 100])
    error = received.decoder.error
    assert error is not None and "checksum mismatch" in str(error)
    with pytest.raises(StreamError) as again:
        received.decoder.feed(b"more")
    assert again.value is error
    with pytest.raises(StreamError):
        received.decoder.sections()
    received.decoder.undo()
    assert received.log == ["undo big.ram"]  # the sink wrote, its checksum then failed


def test_decoder_undoes_sinks_newest_first() -> None:
    sections = [("big.a", noise(5000)), ("big.b", noise(6000))]
    received = Received(encode(DTYPE, 1, SESSION, sections), [])
    received.decoder.undo()
    assert received.log == ["finish big.a", "finish big.b", "undo big.b", "undo big.a"]
    received.decoder.undo()  # once only
    assert len(received.log) == 4


def test_decoder_checks_the_device_before_any_sink() -> None:
    stream = encode("e1000", 1, SESSION, [("big.ram", noise(5000))])
    received = Received(stream, [])
    assert received.outcome() == ("error", errno.EINVAL) and received.order == []


def test_decoder_enforces_the_stream_limit_while_it_arrives() -> None:
    stream = encode(DTYPE, 1, SESSION, [("big.ram", noise(50_000))])
    received = Received(stream, list(range(0, len(stream), 1000)), StreamLimits(max_stream=20_000))
    assert received.decoder.error is not None and "limit" in str(received.decoder.error)
    assert received.decoder.received <= 21_000  # stopped at the piece that crossed it


def test_resuming_session_keeps_the_error_for_the_end() -> None:
    sections = [("geometry", b"g"), ("ram", os.urandom(10_000))]
    stream = bytearray(encode(DTYPE, 1, SESSION, sections))
    stream[-20] ^= 0xFF
    store = MemoryStaging()
    codec = EnvelopeCodec(DTYPE, 1, StreamLimits())
    session = ResumingSession(1 << 20, store, codec.decoder(lambda name, length: None, store))
    for at in range(0, len(stream), 777):
        session.write(stream[at : at + 777])  # accepted: the error waits for RESUMING->STOP
    assert session.size == len(stream)
    with pytest.raises(StreamError):
        session.sections()


def test_resuming_session_stages_only_kept_payloads() -> None:
    sections = [("geometry", b"g"), ("big.ram", os.urandom(10_000)), ("regs", b"r" * 8)]
    stream = encode(DTYPE, 1, SESSION, sections)
    store = MemoryStaging()
    codec = EnvelopeCodec(DTYPE, 1, StreamLimits())
    log: list[str] = []
    session = ResumingSession(
        1 << 20,
        store,
        codec.decoder(
            lambda name, length: RecordingSink(name, length, log) if "big" in name else None,
            store,
        ),
    )
    for at in range(0, len(stream), 777):
        session.write(stream[at : at + 777])
    kept = session.sections()
    assert kept is not None
    assert [(n, bytes(p)) for n, p in kept] == [("geometry", b"g"), ("regs", b"r" * 8)]
    assert store.size == 9
    session.close()
    assert log == ["finish big.ram", "undo big.ram"]  # closed without a commit


def test_a_reader_that_follows_wanted_reads_sink_payloads_in_place() -> None:
    """What the data-fd pump does: read into the place :meth:`target` offers, else only
    :meth:`wanted` bytes, so that a sink's payload is read in place, not copied."""
    sections = [("regs", noise(300)), ("big.a", noise(200_000)), ("big.b", noise(90_000))]
    stream = memoryview(encode(DTYPE, 1, SESSION, sections))
    received = Received(b"", [])
    copied = in_place = 0
    while stream:
        target = received.decoder.target(1 << 16)
        if target is not None:
            size = len(target)
            target[:] = stream[:size]
            received.decoder.landed(size)
            in_place += size
        else:
            size = received.decoder.wanted(1 << 16)
            assert size > 0
            received.decoder.feed(stream[:size])
            copied += size
        stream = stream[size:]
    assert received.outcome() == sections
    assert in_place >= 290_000 - 2 * 4096  # all but what came with a record's read
