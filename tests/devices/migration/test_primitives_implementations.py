"""The C fast path and the pure-Python fallback produce byte-identical streams and reject
exactly the same corrupted streams."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.migration import fastpath
from devices.migration import primitives as stream_primitives
from devices.migration.stream import StreamError, decode, encode

C_IMPL = fastpath.load()
needs_c = pytest.mark.skipif(
    C_IMPL is None, reason=f"C fast path not built: {fastpath.load_error()}"
)

SESSION = bytes(range(16))
names = st.from_regex(r"[a-z0-9][a-z0-9_.\-]{0,20}", fullmatch=True)
sections = st.lists(st.tuples(names, st.binary(max_size=3000)), max_size=6)


def with_impl(impl: stream_primitives.Impl) -> Iterator[None]:
    previous = stream_primitives.install(impl)
    try:
        yield
    finally:
        stream_primitives.install(previous)


def encode_with(impl: stream_primitives.Impl, secs: list[tuple[str, bytes]]) -> bytes:
    for _ in with_impl(impl):
        return encode("testdev", 1, SESSION, secs)
    raise AssertionError("unreachable")


def outcome_with(impl: stream_primitives.Impl, data: bytes) -> object:
    for _ in with_impl(impl):
        try:
            _, got = decode(data, device_type="testdev", max_model_version=1)
        except StreamError as exc:
            return ("rejected", str(exc))
        return [(name, bytes(payload)) for name, payload in got]
    raise AssertionError("unreachable")


@needs_c
@settings(max_examples=150, deadline=None)
@given(sections)
def test_byte_identical_streams(secs: list[tuple[str, bytes]]) -> None:
    assert C_IMPL is not None
    assert encode_with(C_IMPL, secs) == encode_with(stream_primitives.PYTHON, secs)


@needs_c
@settings(max_examples=100, deadline=None)
@given(sections, st.integers(0, 2**32 - 1))
def test_identical_rejections_of_corrupted_streams(
    secs: list[tuple[str, bytes]], seed: int
) -> None:
    assert C_IMPL is not None
    stream = bytearray(encode_with(stream_primitives.PYTHON, secs))
    rng = random.Random(seed)
    for _ in range(8):
        mutated = bytearray(stream)
        kind = rng.randrange(3)
        if kind == 0:
            mutated = mutated[: rng.randrange(len(mutated))]
        elif kind == 1:
            bit = rng.randrange(len(mutated) * 8)
            mutated[bit // 8] ^= 1 << (bit % 8)
        else:
            at = rng.randrange(len(mutated))
            mutated[at : at + 4] = rng.randbytes(4)
        data = bytes(mutated)
        assert outcome_with(C_IMPL, data) == outcome_with(stream_primitives.PYTHON, data)


@needs_c
def test_large_sparse_memory_round_trips_on_both() -> None:
    assert C_IMPL is not None
    memory = bytearray(1 << 20)
    memory[4096 * 7 : 4096 * 7 + 5] = b"hello"
    memory[-3:] = b"end"
    pieces = stream_primitives.pack_pages(memory, 4096)
    assert sum(len(p) for p in pieces) < 3 * 4096  # zero pages are elided
    for impl in (C_IMPL, stream_primitives.PYTHON):
        for _ in with_impl(impl):
            stream = encode("testdev", 1, SESSION, [("ram.z", pieces)])
            _, got = decode(stream, device_type="testdev", max_model_version=1)
            assert stream_primitives.unpack_pages(got[0][1], 1 << 20) == memory
