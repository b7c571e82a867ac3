"""Fuzzing :func:`devices.migration.stream.decode` with random and structure-aware inputs.

Three properties: the only exception decode may raise is :class:`StreamError` (errno
EINVAL), whatever it accepts re-encodes to exactly the bytes it was given, and the C fast
path and the pure-Python path (``devices.migration.primitives``) give the same verdict on
every input. Elided-page payloads (the parser behind large memory sections) are fuzzed the
same way. ``FUZZ_EXAMPLES`` scales the example counts (``make fuzz``).
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from devices.migration import fastpath
from devices.migration import primitives as sp
from devices.migration.engine import MemoryStaging
from devices.migration.primitives import crc32c
from devices.migration.stream import StreamDecoder, StreamError, StreamLimits, decode, encode

DTYPE = "testdev"
MAXV = 2
HEADER_SIZE, SECTION_SIZE, TRAILER_SIZE = 64, 24, 16

#: Both paths the server may run: the C fast path (when built, as the server installs it)
#: and the pure-Python reference.
C_IMPL = fastpath.load()
IMPLS = [sp.PYTHON] if C_IMPL is None else [C_IMPL, sp.PYTHON]


def examples(count: int) -> int:
    return count * int(os.environ.get("FUZZ_EXAMPLES", "0") or 0) // 300 or count


@contextmanager
def using(impl: sp.Impl) -> Iterator[None]:
    previous = sp.install(impl)
    try:
        yield
    finally:
        sp.install(previous)


FUZZ = settings(
    max_examples=examples(300),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def crc(data: bytes | bytearray) -> int:
    return crc32c(data)


def check(data: bytes, limits: StreamLimits | None = None) -> bool:
    """Decode on every implementation: same verdict everywhere (see check_one)."""
    verdicts = set()
    for impl in IMPLS:
        with using(impl):
            verdicts.add(check_one(data, limits))
    assert len(verdicts) == 1, f"C and Python paths disagree on {data.hex()}"
    return verdicts.pop()


def check_one(data: bytes, limits: StreamLimits | None = None) -> bool:
    """Decode; only StreamError may escape, and an accepted stream must be exact. The
    decoder of arriving streams must decide the same, whole or in pieces."""
    try:
        header, sections = decode(data, device_type=DTYPE, max_model_version=MAXV, limits=limits)
    except StreamError as exc:
        assert exc.errno == errno.EINVAL
        assert arriving(data, limits) is None
        return False
    assert arriving(data, limits) == [(name, bytes(payload)) for name, payload in sections]
    again = encode(header.device_type, header.model_version, header.session_id, sections)
    if again != data:
        # The one known inexactness: decode ignores the trailer's reserved word (see the
        # strict xfail tests in test_state_stream.py). Anything else is a new bug.
        assert again[:-4] == data[:-4], "decoded stream does not re-encode to its bytes"
        assert again[-4:] == bytes(4) != data[-4:]
    if limits is not None:
        assert len(data) <= limits.max_stream
        assert len(sections) <= limits.max_sections
        assert all(len(payload) <= limits.max_section for _, payload in sections)
    return True


def arriving(data: bytes, limits: StreamLimits | None) -> list[tuple[str, bytes]] | None:
    """The sections a :class:`StreamDecoder` fed ``data`` in pieces of 1, 7, 64, ... bytes
    accepts (None: rejected with StreamError); odd-numbered sections go to a sink."""
    order: list[str] = []
    sunk: dict[int, bytearray] = {}

    class Sink:
        def __init__(self, index: int) -> None:
            self.data = sunk.setdefault(index, bytearray())

        def write(self, piece: memoryview) -> None:
            self.data += piece

        def target(self, limit: int) -> memoryview | None:
            return None  # test_stream_streaming covers reads in place

        def landed(self, count: int) -> None:
            raise AssertionError("no target was offered")

        def finish(self) -> None: ...

        def undo(self) -> None: ...

        def commit(self) -> None: ...

    def sink_for(name: str, length: int) -> Sink | None:
        order.append(name)
        return Sink(len(order) - 1) if len(order) % 2 == 0 else None

    store = MemoryStaging()
    decoder = StreamDecoder(
        device_type=DTYPE, max_model_version=MAXV, sink_for=sink_for, store=store, limits=limits
    )
    at, sizes = 0, [1, 7, 64, 4096]
    try:
        while at < len(data):
            size = sizes[at % len(sizes)]
            decoder.feed(data[at : at + size])
            at += size
        kept = iter(decoder.sections())
    except StreamError as exc:
        assert exc.errno == errno.EINVAL
        return None
    return [
        (name, bytes(sunk[index]) if index in sunk else bytes(next(kept)[1]))
        for index, name in enumerate(order)
    ]


# ---------------------------------------------------------------------------------------------
# Strategies

names = st.from_regex(r"[a-z0-9][a-z0-9_.\-]{0,8}", fullmatch=True)
section_lists = st.lists(st.tuples(names, st.binary(max_size=40)), max_size=4)
versions = st.sampled_from([0, 1, 2, 3, 0xFFFFFFFF])
dtypes = st.sampled_from([DTYPE, DTYPE, DTYPE, "other", "testdev2"])


@st.composite
def valid_streams(draw: st.DrawFn) -> bytes:
    sections: list[tuple[str, bytes]] = draw(section_lists)
    version = draw(st.sampled_from([1, 2]))
    session = draw(st.binary(min_size=16, max_size=16))
    return encode(DTYPE, version, session, sections)


@st.composite
def any_streams(draw: st.DrawFn) -> bytes:
    """Mostly valid streams, some for another device type or model version."""
    sections: list[tuple[str, bytes]] = draw(section_lists)
    session = draw(st.binary(min_size=16, max_size=16))
    return encode(draw(dtypes), draw(versions), session, sections)


def _record_offsets(data: bytes | bytearray) -> list[int]:
    """Offsets of the section headers, following lengths as far as they make sense."""
    offsets = []
    pos = HEADER_SIZE
    while pos + SECTION_SIZE <= len(data) and data[pos : pos + 4] == b"SECT":
        offsets.append(pos)
        name_len = struct.unpack_from("<H", data, pos + 8)[0]
        length = struct.unpack_from("<Q", data, pos + 12)[0]
        pos += SECTION_SIZE + name_len + length
    return offsets


def _fix_checksums(data: bytearray) -> None:
    """Recompute the header CRC and the trailer's CRC so parsing goes deeper."""
    if len(data) >= HEADER_SIZE:
        struct.pack_into("<I", data, 60, crc(data[:60]))
    if len(data) >= HEADER_SIZE + TRAILER_SIZE and data[-16:-12] == b"END!":
        struct.pack_into("<I", data, len(data) - 8, crc(data[:-16]))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(any_streams()))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        kind = draw(
            st.sampled_from(
                ["truncate", "flip", "overwrite", "splice", "length", "field", "insert", "fix"]
            )
        )
        if kind == "truncate":
            del data[draw(st.integers(min_value=0, max_value=len(data))) :]
        elif kind == "flip" and data:
            bit = draw(st.integers(min_value=0, max_value=len(data) * 8 - 1))
            data[bit // 8] ^= 1 << (bit % 8)
        elif kind == "overwrite" and data:
            at = draw(st.integers(min_value=0, max_value=len(data) - 1))
            data[at : at + 8] = draw(st.binary(min_size=1, max_size=8))[: len(data) - at]
        elif kind == "splice":
            other = draw(any_streams())
            cut_a = draw(st.integers(min_value=0, max_value=len(data)))
            cut_b = draw(st.integers(min_value=0, max_value=len(other)))
            data = data[:cut_a] + other[cut_b:]
        elif kind == "insert":
            at = draw(st.integers(min_value=0, max_value=len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=24))
        elif kind in ("length", "field"):
            offsets = _record_offsets(data)
            if not offsets:
                continue
            pos = draw(st.sampled_from(offsets))
            if kind == "length":
                # name length (u16 at +8) or payload length (u64 at +12)
                if draw(st.booleans()):
                    value = draw(st.one_of(st.integers(0, 70), st.integers(0, 0xFFFF)))
                    struct.pack_into("<H", data, pos + 8, value)
                else:
                    old = struct.unpack_from("<Q", data, pos + 12)[0]
                    value = draw(
                        st.one_of(
                            st.integers(max(old - 20, 0), old + 40),
                            st.integers(0, (1 << 64) - 1),
                        )
                    )
                    struct.pack_into("<Q", data, pos + 12, value)
            else:
                # index (u32 at +4), flags (u16 at +10) or section CRC (u32 at +20)
                field, fmt = draw(st.sampled_from([(4, "<I"), (10, "<H"), (20, "<I")]))
                width = struct.calcsize(fmt)
                value = draw(st.integers(0, (1 << (8 * width)) - 1))
                struct.pack_into(fmt, data, pos + field, value)
        elif kind == "fix":
            _fix_checksums(data)
    return bytes(data)


limits_st = st.one_of(
    st.none(),
    st.builds(
        StreamLimits,
        max_stream=st.integers(0, 600),
        max_section=st.integers(0, 64),
        max_sections=st.integers(0, 5),
    ),
)


# ---------------------------------------------------------------------------------------------
# Properties


@given(data=st.binary(max_size=400), limits=limits_st)
@settings(max_examples=examples(200), deadline=None)
def test_random_bytes(data: bytes, limits: StreamLimits | None) -> None:
    check(data, limits)


@given(tail=st.binary(max_size=200), stream=valid_streams())
@settings(max_examples=examples(150), deadline=None)
def test_valid_header_then_random_bytes(tail: bytes, stream: bytes) -> None:
    check(stream[:HEADER_SIZE] + tail)
    check(stream[: HEADER_SIZE + SECTION_SIZE] + tail)


@given(data=mutated(), limits=limits_st)
@FUZZ
def test_mutated_streams(data: bytes, limits: StreamLimits | None) -> None:
    event("accepted" if check(data, limits) else "rejected")


@given(stream=valid_streams(), limits=limits_st)
@settings(max_examples=examples(100), deadline=None)
def test_valid_streams_decode_exactly_within_limits(
    stream: bytes, limits: StreamLimits | None
) -> None:
    accepted = check(stream, limits)
    if limits is None:
        assert accepted


@given(stream=valid_streams(), data=st.data())
@settings(max_examples=examples(100), deadline=None)
def test_single_mutations_of_valid_streams_are_rejected(stream: bytes, data: st.DataObject) -> None:
    """One truncation, bit flip (outside the trailer's reserved word) or appended byte
    never yields an accepted stream."""
    cut = data.draw(st.integers(min_value=0, max_value=len(stream) - 1))
    assert not check(stream[:cut])
    bit = data.draw(st.integers(min_value=0, max_value=(len(stream) - 4) * 8 - 1))
    flipped = bytearray(stream)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert not check(bytes(flipped))
    assert not check(stream + data.draw(st.binary(min_size=1, max_size=4)))


# ---------------------------------------------------------------------------------------------
# Elided-page payloads (devices.migration.primitives.pack_pages / unpack_pages)

page_data = st.lists(
    st.sampled_from([bytes(512), b"\x01" * 512, bytes(100), b"\xff" * 7]), max_size=8
).map(b"".join)


@given(data=page_data, page_size=st.sampled_from([512, 1024, 4096]), draw=st.data())
@settings(max_examples=examples(200), deadline=None)
def test_mutated_page_payloads(data: bytes, page_size: int, draw: st.DataObject) -> None:
    """Packed by either implementation, identical; mutated, unpacked or refused with
    ValueError only; whatever unpacks fits the limit it was given."""
    packed = set()
    for impl in IMPLS:
        with using(impl):
            packed.add(b"".join(bytes(piece) for piece in sp.pack_pages(data, page_size)))
    assert len(packed) == 1
    payload = bytearray(packed.pop())
    assert sp.unpack_pages(bytes(payload), len(data)) == data
    for _ in range(draw.draw(st.integers(1, 3))):
        at = draw.draw(st.integers(0, max(len(payload) - 1, 0)))
        kind = draw.draw(st.sampled_from(["flip", "cut", "grow", "header"]))
        if kind == "flip" and payload:
            payload[at] ^= 1 << draw.draw(st.integers(0, 7))
        elif kind == "cut":
            del payload[at:]
        elif kind == "grow":
            payload[at:at] = draw.draw(st.binary(min_size=1, max_size=16))
        elif len(payload) >= 12:
            struct.pack_into(
                "<IQ", payload, 0, draw.draw(st.sampled_from([0, 511, 512, 4096, 1 << 21])),
                draw.draw(st.integers(0, (1 << 64) - 1)),
            )  # fmt: skip
    limit = draw.draw(st.integers(0, 2 * len(data) + 1))
    try:
        out = sp.unpack_pages(bytes(payload), limit)
    except ValueError:
        return
    assert len(out) <= limit
